"""OpenIGTLink transport of the bridge: a server for any number of clients, or a client that reconnects.

The protocol is pyigtl's: messages are built and packed by ``pyigtl`` and incoming headers parsed by
it. pyigtl's own ``OpenIGTLinkServer`` serves one client at a time from one shared queue, with a
blocking ``sendall``, and installs signal handlers; so the sockets are handled here instead:

- :meth:`IgtlLink.send` never blocks: messages go to a packing thread, whose bytes go to one bounded
  queue per connection (oldest dropped when a client falls behind), sent by that connection's
  thread. A client that stops reading is dropped after :data:`SEND_TIMEOUT_S`; one that sends
  something that is not OpenIGTLink is dropped at once; neither disturbs the others.
- Incoming messages are read and discarded (the bridge only sends).
- The last message of each device is kept and sent first to every new connection, so a navigator
  that connects (or a server that comes back) gets the current state at once.

No rclpy here; ``pyigtl`` is imported by the functions that need it.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket
import threading
import time

__all__ = ["IgtlClient", "IgtlLink", "IgtlServer", "SEND_TIMEOUT_S", "parse_endpoint"]

SEND_TIMEOUT_S = 5.0
"""A connection that accepts no bytes for this long is closed."""
QUEUE_MESSAGES = 32
"""Messages waiting per connection; beyond that the oldest are dropped."""
MAX_BODY_BYTES = 64 * 2**20
"""Larger incoming bodies are taken as garbage."""
RECONNECT_S = 0.5

logger = logging.getLogger(__name__)


def parse_endpoint(text: str, default_port: int = 18944) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``) -> ``(host, port)``; ``ValueError`` when malformed."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = port, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class _Connection:
    """One socket: a writer thread draining a bounded queue, a reader thread discarding input."""

    def __init__(self, sock: socket.socket, name: str, initial: list[bytes], on_close):
        self.name = name
        self._sock = sock
        self._on_close = on_close
        self._cond = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque(initial, maxlen=QUEUE_MESSAGES)
        self._closed = False
        sock.settimeout(SEND_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        for target in (self._write, self._read):
            threading.Thread(target=target, name=f"igtl {self.name}", daemon=True).start()

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, data: bytes) -> None:
        with self._cond:
            self._queue.append(data)
            self._cond.notify()

    def close(self, why: str = "") -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if why:
            logger.warning("OpenIGTLink %s closed: %s", self.name, why)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._on_close(self)

    def _write(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                data = self._queue.popleft()
            try:
                self._sock.sendall(data)
            except OSError as err:  # socket.timeout included: the peer stopped reading
                self.close(f"send failed ({type(err).__name__}: {err})")
                return

    def _read(self) -> None:
        from pyigtl import MessageBase

        try:
            while not self._closed:
                header = self._recv_exactly(MessageBase.IGTL_HEADER_SIZE)
                if header is None:
                    break
                fields = _parse_header(header)
                if fields is None:
                    self.close("received bytes that are not an OpenIGTLink header")
                    return
                if self._recv_exactly(fields["body_size"], keep=False) is None:
                    break
        except OSError:
            pass
        self.close()

    def _recv_exactly(self, size: int, keep: bool = True) -> bytes | None:
        """``size`` bytes (``b""`` when not ``keep``-ing them), or None when the peer closed."""
        chunks, got = [], 0
        while got < size:
            try:
                chunk = self._sock.recv(min(size - got, 1 << 16))
            except TimeoutError:
                if self._closed:
                    return None
                continue  # an idle peer is fine
            if not chunk:
                return None
            got += len(chunk)
            if keep:
                chunks.append(chunk)
        return b"".join(chunks)


def _parse_header(header: bytes) -> dict | None:
    """pyigtl's header fields, or None when they cannot be an OpenIGTLink header."""
    from pyigtl import MessageBase

    try:
        fields = MessageBase.parse_header(header)
    except (UnicodeDecodeError, ValueError):
        return None
    kind = fields["message_type"]
    if not kind or not all(c.isalnum() or c == "_" for c in kind) or fields["header_version"] not in (1, 2, 3):
        return None
    if fields["body_size"] > MAX_BODY_BYTES:
        return None
    return fields


class IgtlLink:
    """Base of :class:`IgtlServer` and :class:`IgtlClient`: packs messages in a thread of its own and
    hands the bytes to every open connection."""

    def __init__(self):
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._latest: dict[str, bytes] = {}  # device name -> last packed message
        self._inbox: queue.Queue = queue.Queue(maxsize=256)
        self._stopping = threading.Event()
        threading.Thread(target=self._pack_loop, name="igtl pack", daemon=True).start()

    def send(self, messages) -> None:
        """Queue pyigtl messages for every connection (never blocks; drops when the packer is 256 behind)."""
        try:
            self._inbox.put_nowait(list(messages))
        except queue.Full:
            logger.warning("OpenIGTLink: packing is behind, messages dropped")

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def close(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        with self._lock:
            connections = list(self._connections)
        for c in connections:
            c.close()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything sent so far is packed and queued (tests)."""
        deadline = time.monotonic() + timeout
        while self._inbox.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._inbox.unfinished_tasks

    def _pack_loop(self) -> None:
        while True:
            batch = self._inbox.get()
            try:
                if batch is None:
                    return
                for message in batch:
                    data = message.pack()
                    with self._lock:
                        self._latest[message.device_name] = data
                        connections = list(self._connections)
                    for c in connections:
                        c.put(data)
            except Exception as err:  # a malformed message must not end the link
                logger.error("OpenIGTLink: could not pack a message: %r", err)
            finally:
                self._inbox.task_done()

    def _open(self, sock: socket.socket, name: str) -> _Connection:
        with self._lock:
            connection = _Connection(sock, name, list(self._latest.values()), self._forget)
            self._connections.append(connection)
        connection.start()
        logger.info("OpenIGTLink %s connected", name)
        return connection

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections.remove(connection)


class IgtlServer(IgtlLink):
    """Listens on ``address:port`` (port 0: any free one, see :attr:`port`) for any number of clients."""

    def __init__(self, port: int, address: str = "0.0.0.0"):
        super().__init__()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((address, int(port)))
        self._listener.listen(16)
        self._listener.settimeout(0.5)
        self.address, self.port = self._listener.getsockname()[:2]
        threading.Thread(target=self._accept_loop, name="igtl accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._open(sock, f"client {peer[0]}:{peer[1]}")

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        super().close()

    def describe(self) -> str:
        return f"serving OpenIGTLink on {self.address}:{self.port}"


class IgtlClient(IgtlLink):
    """Connects to a navigator's OpenIGTLink server at ``host:port`` and reconnects whenever it goes
    away (every :data:`RECONNECT_S`); messages sent meanwhile leave only the last per device."""

    def __init__(self, host: str, port: int):
        super().__init__()
        self.host, self.port = host, int(port)
        threading.Thread(target=self._connect_loop, name="igtl connect", daemon=True).start()

    def _connect_loop(self) -> None:
        connection = None
        while not self._stopping.is_set():
            if connection is None or connection.closed:
                try:
                    sock = socket.create_connection((self.host, self.port), timeout=2.0)
                    connection = self._open(sock, f"server {self.host}:{self.port}")
                except OSError:
                    connection = None
            self._stopping.wait(RECONNECT_S)

    @property
    def connected(self) -> bool:
        return self.connections > 0

    def describe(self) -> str:
        return f"connecting to the OpenIGTLink server {self.host}:{self.port}"
