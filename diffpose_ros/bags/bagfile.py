"""rosbag2 files (sqlite3 and mcap storage) read and written through ``rosbags``.

Messages stay in ROS 2's own serialisation: writing takes rclpy messages (or CDR bytes) and stores
``rclpy.serialization.serialize_message`` output; reading yields the raw CDR, which the replay
publishes unchanged and :func:`decode` turns into rclpy messages. ``rosbags`` only handles the
container and supplies the message definitions and type hashes for ``metadata.yaml`` (its ROS 2
Kilted type store), so the files open in ``ros2 bag info``/``play`` on a ROS 2 install.

QoS: every topic records the profile its publisher offered (``offered_qos_profiles``), as
``ros2 bag record`` does; :func:`rclpy_qos` turns it back into an rclpy profile for replay.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "QosSpec",
    "TopicInfo",
    "BagWriter",
    "bag_topics",
    "read_messages",
    "message_class",
    "decode",
    "rclpy_qos",
    "qos_of_publishers",
]


@dataclass(frozen=True)
class QosSpec:
    """The QoS settings a topic's publisher offers (what a bag stores and a replay reproduces)."""

    reliable: bool = True
    transient_local: bool = False
    depth: int = 10

    @classmethod
    def named(cls, name: str) -> QosSpec:
        """``reliable``, ``best_effort``/``sensor_data`` or ``latched`` (reliable, transient local)."""
        table = {
            "reliable": cls(True, False, 10),
            "best_effort": cls(False, False, 5),
            "sensor_data": cls(False, False, 5),
            "latched": cls(True, True, 1),
        }
        if name not in table:
            raise ValueError(f"unknown QoS {name!r}: one of {', '.join(table)}")
        return table[name]


@dataclass(frozen=True)
class TopicInfo:
    """A topic of a bag: its type (``pkg/msg/Name``), message count and offered QoS (if recorded)."""

    name: str
    msgtype: str
    count: int
    qos: QosSpec | None


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _rosbags_qos(spec: QosSpec):
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    infinite = QosTime(0x7FFFFFFF, 0xFFFFFFFF)
    return Qos(
        QosHistory.KEEP_LAST,
        int(spec.depth),
        QosReliability.RELIABLE if spec.reliable else QosReliability.BEST_EFFORT,
        QosDurability.TRANSIENT_LOCAL if spec.transient_local else QosDurability.VOLATILE,
        infinite,
        infinite,
        QosLiveliness.AUTOMATIC,
        infinite,
        False,
    )


def _spec_of(connection) -> QosSpec | None:
    from rosbags.interfaces import QosDurability, QosReliability

    profiles = list(getattr(connection.ext, "offered_qos_profiles", None) or [])
    if not profiles:
        return None
    q = profiles[0]
    depth = int(q.depth) if int(q.depth) > 0 else 10
    return QosSpec(q.reliability != QosReliability.BEST_EFFORT, q.durability == QosDurability.TRANSIENT_LOCAL, depth)


def _open_reader(path: str | Path):
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError

    path = Path(path)
    if not (path / "metadata.yaml").is_file():
        raise FileNotFoundError(f"not a rosbag2 folder (no metadata.yaml): {path}")
    try:
        reader = Reader(path)
        reader.open()
    except ReaderError as err:
        raise ValueError(f"cannot read the rosbag2 {path}: {err}") from err
    return reader


def bag_topics(path: str | Path) -> dict[str, TopicInfo]:
    """The topics of the rosbag2 folder ``path``, by name."""
    reader = _open_reader(path)
    try:
        topics: dict[str, TopicInfo] = {}
        for c in reader.connections:
            old = topics.get(c.topic)
            count = c.msgcount + (old.count if old else 0)
            topics[c.topic] = TopicInfo(c.topic, c.msgtype, count, (old.qos if old else None) or _spec_of(c))
        return topics
    finally:
        reader.close()


def read_messages(path: str | Path, topics: list[str] | None = None) -> Iterator[tuple[str, str, int, bytes]]:
    """``(topic, msgtype, log_time_ns, cdr)`` of the bag's messages in log-time order (``topics``: only these)."""
    reader = _open_reader(path)
    try:
        connections = [c for c in reader.connections if topics is None or c.topic in topics]
        if not connections:
            return
        for connection, timestamp, raw in reader.messages(connections=connections):
            yield connection.topic, connection.msgtype, int(timestamp), bytes(raw)
    finally:
        reader.close()


def message_class(msgtype: str):
    """The rclpy message class of ``pkg/msg/Name`` (``ValueError`` if that package is not installed)."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or parts[1] != "msg":
        raise ValueError(f"not a message type name: {msgtype!r} (expected pkg/msg/Name)")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.msg"), parts[2])
    except (ImportError, AttributeError) as err:
        raise ValueError(f"message type {msgtype} is not installed here: {err}") from err


def decode(cdr: bytes, msgtype: str):
    """An rclpy message from its CDR bytes."""
    from rclpy.serialization import deserialize_message

    return deserialize_message(cdr, message_class(msgtype))


def rclpy_qos(spec: QosSpec):
    """The rclpy ``QoSProfile`` of ``spec`` (keep last ``depth``)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=max(1, int(spec.depth)),
        reliability=ReliabilityPolicy.RELIABLE if spec.reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if spec.transient_local else DurabilityPolicy.VOLATILE,
    )


def qos_of_publishers(node, topic: str) -> QosSpec | None:
    """The QoS to subscribe ``topic`` with, from its publishers' offers (None: no publisher yet).

    Reliable only when every publisher is reliable (a reliable reader does not match a best-effort
    writer); transient local when every publisher is (to get their latched history).
    """
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    infos = node.get_publishers_info_by_topic(topic)
    if not infos:
        return None
    reliable = all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
    latched = all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
    return QosSpec(reliable, latched, 100)


class BagWriter:
    """Writes a new rosbag2 folder (``storage``: ``mcap`` or ``sqlite3``); a context manager.

    >>> with BagWriter(path) as bag:
    ...     bag.add_topic("/tf", "tf2_msgs/msg/TFMessage", QosSpec())
    ...     bag.write("/tf", t_ns, msg)
    """

    def __init__(self, path: str | Path, storage: str = "mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.rosbag2.errors import WriterError

        plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
        if storage not in plugins:
            raise ValueError(f"unknown bag storage {storage!r}: mcap or sqlite3")
        self.path = Path(path)
        if self.path.exists():
            raise ValueError(f"{self.path} exists already; a bag is never overwritten (remove it or choose --out)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = Writer(self.path, version=9, storage_plugin=plugins[storage])
        self._error = WriterError
        self._store = _typestore()
        self._connections: dict[str, object] = {}
        self._writer.open()
        self.counts: dict[str, int] = {}

    def add_topic(self, topic: str, msgtype: str, qos: QosSpec | None = None) -> None:
        """Declare ``topic`` of type ``pkg/msg/Name`` (a type of ROS 2 Kilted's common interfaces)."""
        if topic in self._connections:
            raise ValueError(f"topic {topic} was added already")
        if msgtype not in self._store.types:
            raise ValueError(f"message type {msgtype} has no definition in rosbags' ROS 2 Kilted type store")
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=self._store, offered_qos_profiles=[_rosbags_qos(qos or QosSpec())]
        )
        self.counts[topic] = 0

    def has_topic(self, topic: str) -> bool:
        return topic in self._connections

    def write(self, topic: str, log_time_ns: int, message) -> None:
        """Store ``message`` (an rclpy message or its CDR bytes) on ``topic`` at ``log_time_ns``."""
        if isinstance(message, (bytes, bytearray, memoryview)):
            data = bytes(message)
        else:
            from rclpy.serialization import serialize_message

            data = serialize_message(message)
        self._writer.write(self._connections[topic], int(log_time_ns), data)
        self.counts[topic] += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
