"""The OpenIGTLink server's check that ``test_igtl.py`` runs in a process of its own: several
clients, one sending garbage and one never reading, beside a reader of a stream of large images
(``send`` never blocks, the reader gets every transform in order, the bad clients are dropped, a
pyigtl client still works). Prints ``ok`` and exits 0 when every check holds."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import numpy as np
import pyigtl

sys.path.insert(0, str(Path(__file__).parent))
from igtl_receiver import Receiver, wait_until  # noqa: E402

from diffpose_ros.ros import igtl_link  # noqa: E402
from diffpose_ros.ros.igtl_link import IgtlServer  # noqa: E402


def _transform(x: float) -> pyigtl.TransformMessage:
    m = np.eye(4)
    m[0, 3] = x
    return pyigtl.TransformMessage(m, device_name="CArmToCT")


def main() -> None:
    # Short enough that the silent client goes soon, long enough for a reader on a loaded 2-core machine.
    igtl_link.SEND_TIMEOUT_S = 2.0
    server = IgtlServer(0, "127.0.0.1")
    try:
        first = Receiver(server.port, unpack_images=False)
        wait_until(lambda: server.connections == 1, 5, "the first client")
        server.send([_transform(1.0)])
        first.wait(lambda: first.of("CArmToCT"), 5, "the first transform")
        # A second client gets the current state at once, then disconnects.
        second = Receiver(server.port)
        second.wait(lambda: second.of("CArmToCT"), 5, "the state for a new client")
        second.close()
        # A client that sends garbage is dropped; one that never reads is dropped once its buffers fill.
        garbage = socket.create_connection(("127.0.0.1", server.port))
        garbage.sendall(b"\xff" * 200)
        silent = socket.create_connection(("127.0.0.1", server.port))
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = np.zeros((1, 512, 512), np.uint16)
        t0 = time.monotonic()
        for i in range(40):
            server.send([pyigtl.ImageMessage(big, device_name="Fluoro"), _transform(2.0 + i)])
        assert time.monotonic() - t0 < 0.5, "send() must not block"
        first.wait(lambda: len(first.of("CArmToCT")) >= 41, 30, "every transform at the first client")
        assert [m.matrix[0, 3] for m in first.of("CArmToCT")] == [1.0] + [2.0 + i for i in range(40)]
        wait_until(lambda: server.connections == 1, 10, "the garbage and silent clients to be dropped")
        assert not first.closed
        # pyigtl's own client also works.
        client = pyigtl.OpenIGTLinkClient("127.0.0.1", server.port)
        try:
            wait_until(lambda: server.connections == 2, 5, "pyigtl's client")
            server.send([string_message := pyigtl.StringMessage("hello", device_name="DiffPoseStatus")])
            got = client.wait_for_message("DiffPoseStatus", timeout=5)
            assert got is not None and got.string == string_message.string
        finally:
            client.stop()
        for s in (garbage, silent):
            s.close()
        first.close()
    finally:
        server.close()
    print("ok")


if __name__ == "__main__":
    main()
