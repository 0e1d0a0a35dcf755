"""A navigator's end of OpenIGTLink, ROS-free: a pyigtl client that keeps every message it receives.

pyigtl's own client keeps only the last message per device; :class:`Receiver` keeps them all, in
arrival order, for ``diffpose-demo`` (scored by :func:`~diffpose_ros.bags.score.score_navigator`)
and the tests of the bridge (``diffpose-igtl``).
"""

from __future__ import annotations

import socket
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pyigtl

__all__ = ["Receiver", "free_port", "wait_until"]


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``address`` now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """``predicate()``'s first true value, polled every 10 ms; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


class Receiver:
    """Connects to ``port`` on localhost (retrying for ``timeout`` s) and unpacks every message with
    pyigtl into :attr:`messages`, each with ``received_at`` (``time.monotonic()`` at its arrival).

    With ``unpack_images=False`` an IMAGE is kept as its header fields only (``device_name``,
    ``message_type``, ``timestamp``): pyigtl checks and unpacks megabytes slowly in Python, and a
    reader that must keep up with a stream of large images skips that.
    """

    def __init__(self, port: int, timeout: float = 10.0, unpack_images: bool = True):
        self.messages: list = []
        self.unpack_images = unpack_images
        self._lock = threading.Lock()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _recv(self, size: int) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            try:
                chunk = self.sock.recv(min(size - len(data), 1 << 20))
            except TimeoutError:
                if self.closed:
                    return None
                continue
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def _run(self) -> None:
        while True:
            header = self._recv(pyigtl.MessageBase.IGTL_HEADER_SIZE)
            if header is None:
                break
            fields = pyigtl.MessageBase.parse_header(header)
            body = self._recv(fields["body_size"])
            if body is None:
                break
            if fields["message_type"] == "IMAGE" and not self.unpack_images:
                message = types.SimpleNamespace(
                    device_name=fields["device_name"], message_type="IMAGE", timestamp=fields["timestamp"]
                )
            else:
                message = pyigtl.MessageBase.create_message(fields["message_type"])
                message.unpack(fields, body)
            message.received_at = time.monotonic()
            with self._lock:
                self.messages.append(message)
        self.closed = True

    def received(self) -> list:
        """A copy of :attr:`messages` (the reading thread may be appending)."""
        with self._lock:
            return list(self.messages)

    def of(self, device: str, kind: str | None = None) -> list:
        """The messages of ``device`` (of type ``kind``, e.g. ``TRANSFORM``, when given), in arrival order."""
        return [m for m in self.received() if m.device_name == device and (kind is None or m.message_type == kind)]

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        return wait_until(predicate, timeout, what)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
