"""A test-side OpenIGTLink client that keeps every message (pyigtl's client keeps the last per device)."""

from __future__ import annotations

import socket
import threading
import time
import types

import pyigtl


def wait_until(predicate, timeout: float, what: str):
    """``predicate()``'s first true value, polled every 10 ms; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


class Receiver:
    """Connects to ``port`` on localhost and unpacks every message with pyigtl into :attr:`messages`
    (each with ``received_at``, ``time.monotonic()`` at its arrival). With ``unpack_images=False``
    an IMAGE is kept as its header fields only (pyigtl checks and unpacks megabytes slowly in Python:
    a reader that must keep up with a stream of large images skips that)."""

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
                message = types.SimpleNamespace(device_name=fields["device_name"], message_type="IMAGE")
            else:
                message = pyigtl.MessageBase.create_message(fields["message_type"])
                message.unpack(fields, body)
            message.received_at = time.monotonic()
            with self._lock:
                self.messages.append(message)
        self.closed = True

    def of(self, device: str, kind: str | None = None) -> list:
        with self._lock:
            return [m for m in self.messages if m.device_name == device and (kind is None or m.message_type == kind)]

    def wait(self, predicate, timeout: float, what: str):
        return wait_until(predicate, timeout, what)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
