"""Record DDS topics into a rosbag2 (``diffpose-record``; ``ros2 bag record`` semantics).

A topic is subscribed as soon as a publisher of it is discovered (polled every ``discovery_period_s``,
so topics that appear later are caught), with a raw subscription (the CDR is stored as received,
never decoded) whose QoS follows the publishers' offers (:func:`~.bagfile.qos_of_publishers`), depth
100 so that a burst does not overflow the reader queue. Each message is logged at its arrival time on
the recording node's clock (``time.time_ns()`` unless ``use_sim_time``). Stops on request, after
``max_messages`` or after ``max_seconds``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .bagfile import BagWriter, message_class, qos_of_publishers, rclpy_qos

__all__ = ["Recorder", "DEFAULT_TOPICS"]

DEFAULT_TOPICS = ["/tf", "/tf_static", "/diffpose_node/pose", "/diagnostics"]
"""What ``diffpose-record`` records when no topic is named: the node's outputs."""


class Recorder:
    """Records ``topics`` (absolute names) seen by ``node`` into the new bag ``out``.

    The node must be spun (by the caller's executor) for messages to arrive; :meth:`poll` subscribes
    to newly discovered topics and is called by a timer on the node.
    """

    def __init__(
        self,
        node,
        out: str | Path,
        topics: list[str],
        storage: str = "mcap",
        max_messages: int = 0,
        max_seconds: float = 0.0,
        discovery_period_s: float = 0.1,
        on_message=None,
    ):
        bad = [t for t in topics if not t.startswith("/")]
        if bad:
            raise ValueError(f"record absolute topic names (got {', '.join(bad)})")
        if not topics:
            raise ValueError("no topic to record")
        self.node = node
        self.topics = list(dict.fromkeys(topics))
        self.writer = BagWriter(out, storage)
        self.max_messages = int(max_messages)
        self.max_seconds = float(max_seconds)
        self.on_message = on_message
        self.done = threading.Event()
        self.count = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()  # poll() runs from the timer and from callers: one at a time
        self._subscriptions = {}
        self._timer = node.create_timer(discovery_period_s, self.poll)
        self.poll()

    def poll(self) -> None:
        """Subscribe to requested topics whose publishers have appeared; check the time limit."""
        with self._poll_lock:
            self._poll()

    def _poll(self) -> None:
        if self.max_seconds and time.monotonic() - self.started >= self.max_seconds:
            self.done.set()
        if self.done.is_set():
            return
        types = dict(self.node.get_topic_names_and_types())
        for topic in self.topics:
            if topic in self._subscriptions or topic not in types:
                continue
            spec = qos_of_publishers(self.node, topic)
            if spec is None:
                continue
            msgtype = types[topic][0]
            try:
                cls = message_class(msgtype)
                with self._lock:
                    if not self.writer.has_topic(topic):
                        self.writer.add_topic(topic, msgtype, spec)
            except ValueError as err:
                self.node.get_logger().warning(f"not recording {topic}: {err}", throttle_duration_sec=10.0)
                continue
            self._subscriptions[topic] = self.node.create_subscription(
                cls, topic, lambda raw, t=topic: self._on_message(t, raw), rclpy_qos(spec), raw=True
            )
            self.node.get_logger().info(
                f"recording {topic} ({msgtype}, {'reliable' if spec.reliable else 'best effort'}"
                f"{', transient local' if spec.transient_local else ''})"
            )

    def matched(self, topic: str) -> bool:
        """Whether ``topic`` is being recorded: subscribed and matched with a publisher (DDS delivers
        nothing a publisher sent before the match)."""
        sub = self._subscriptions.get(topic)
        return sub is not None and sub.get_publisher_count() > 0

    def _on_message(self, topic: str, raw: bytes) -> None:
        now_ns = self.node.get_clock().now().nanoseconds
        with self._lock:
            if self.done.is_set() or self.writer is None:
                return
            self.writer.write(topic, now_ns, raw)
            self.count += 1
            if self.max_messages and self.count >= self.max_messages:
                self.done.set()
        if self.on_message is not None:
            self.on_message(topic, now_ns, raw)

    def close(self) -> dict[str, int]:
        """Stop recording and finish the bag; returns the message count per topic."""
        self.done.set()
        self._timer.cancel()
        with self._poll_lock:
            for sub in self._subscriptions.values():
                self.node.destroy_subscription(sub)
            self._subscriptions.clear()
        with self._lock:
            counts = dict(self.writer.counts) if self.writer is not None else {}
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        return counts
