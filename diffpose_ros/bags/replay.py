"""Replay a rosbag2 into DDS with its original timing (``diffpose-replay``; ``ros2 bag play`` semantics).

Each message's raw CDR, as read from the bag, is published at ``start + (t_log - t_first) / rate`` on
the wall clock (sleeping between messages; a message that is late goes out at once and the lateness
is reported, the schedule is never shifted). Message contents, header stamps included, are not
touched. Publishers use the QoS each topic's publisher offered when the bag was recorded (reliable,
depth 10 when the bag has none), unless overridden. ``/clock`` (``rosgraph_msgs/Clock``) carries the
bag time for nodes run with ``use_sim_time``.

The first and the last message reach a subscriber: before playing, a subscriber must be matched on
the publisher's side and then given :data:`MATCH_SETTLE_S` to match on its own (a reader drops what a
writer it has not matched yet sends, and DDS shows a writer only its own side); after playing,
reliable topics wait until every subscriber acknowledged everything (``ros2 bag play
--wait-for-all-acked``) and best-effort ones linger :data:`BEST_EFFORT_LINGER_S`, since Fast DDS
publishes large samples asynchronously and a process that exits at once can take them with it.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffpose_ros.core import split_stamp

from .bagfile import QosSpec, bag_topics, message_class, rclpy_qos, read_messages

__all__ = ["BEST_EFFORT_LINGER_S", "MATCH_SETTLE_S", "ReplayOptions", "ReplayReport", "Player", "parse_remaps"]

MATCH_SETTLE_S = 0.5
"""Seconds between the publisher's side of a match and the first message (the subscriber's side)."""

BEST_EFFORT_LINGER_S = 1.0
"""Seconds a replay stays up after its last best-effort message, so that it leaves the process."""


def parse_remaps(items: list[str] | None) -> dict[str, str]:
    """``["OLD:=NEW", ...]`` -> ``{OLD: NEW}`` (absolute topic names)."""
    remaps = {}
    for item in items or []:
        old, sep, new = item.partition(":=")
        if not sep or not old or not new:
            raise ValueError(f"remap {item!r} is not OLD:=NEW")
        if not old.startswith("/") or not new.startswith("/"):
            raise ValueError(f"remap {item!r}: use absolute topic names (/a:=/b)")
        remaps[old] = new
    return remaps


@dataclass
class ReplayOptions:
    """``rate``: playback speed factor; ``start_offset_s``: skip this much of the bag; ``loop``: play
    the bag again and again until stopped; ``topics``: only these (bag names; None = all);
    ``remap``: bag name -> published name; ``qos``: per bag topic override; ``clock_hz``: publish
    ``/clock`` at this rate (0: not at all)."""

    rate: float = 1.0
    start_offset_s: float = 0.0
    loop: bool = False
    topics: list[str] | None = None
    remap: dict[str, str] = field(default_factory=dict)
    qos: dict[str, QosSpec] = field(default_factory=dict)
    clock_hz: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.start_offset_s < 0 or self.clock_hz < 0:
            raise ValueError("start offset and clock rate must be >= 0")


@dataclass
class ReplayReport:
    """What was published: counts per published topic, the timing error (s) against the schedule, the
    seconds of playing, and the reliable topics whose subscribers did not acknowledge everything."""

    published: dict[str, int] = field(default_factory=dict)
    lateness_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    unacknowledged: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        late = sorted(self.lateness_s) or [0.0]
        return {
            "messages": sum(self.published.values()),
            "per_topic": dict(self.published),
            "wall_s": self.wall_s,
            "timing_error_median_s": statistics.median(late),
            "timing_error_max_s": late[-1],
            "unacknowledged": list(self.unacknowledged),
        }


class Player:
    """Publishes a bag through ``node`` (an rclpy node; it need not be spinning); ``stop_event``
    (set from another thread or a signal handler) ends waiting and playing early."""

    def __init__(
        self, node, bag: str | Path, options: ReplayOptions | None = None, stop_event: threading.Event | None = None
    ):
        self.node = node
        self.bag = Path(bag)
        self.options = options or ReplayOptions()
        topics = bag_topics(self.bag)
        wanted = self.options.topics
        if wanted:
            missing = sorted(set(wanted) - set(topics))
            if missing:
                raise ValueError(f"topics not in {self.bag}: {', '.join(missing)} (it has {', '.join(sorted(topics))})")
        unknown_remaps = sorted(set(self.options.remap) - set(topics))
        if unknown_remaps:
            raise ValueError(f"remapped topics not in {self.bag}: {', '.join(unknown_remaps)}")
        self._publishers = {}
        for name, info in sorted(topics.items()):
            if wanted and name not in wanted:
                continue
            try:
                cls = message_class(info.msgtype)
            except ValueError as err:
                node.get_logger().warning(f"not replaying {name}: {err}")
                continue
            spec = self.options.qos.get(name) or info.qos or QosSpec()
            self._publishers[name] = node.create_publisher(cls, self.options.remap.get(name, name), rclpy_qos(spec))
        if not self._publishers:
            raise ValueError(f"nothing to replay from {self.bag}")
        self._clock_pub = None
        if self.options.clock_hz > 0:
            from rclpy.qos import QoSProfile
            from rosgraph_msgs.msg import Clock

            self._clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=10))
        self.stop_event = stop_event or threading.Event()

    def published_name(self, bag_topic: str) -> str:
        return self.options.remap.get(bag_topic, bag_topic)

    def wait_for_subscribers(self, topics: list[str], timeout_s: float) -> None:
        """Block until each published topic in ``topics`` (published names, each optionally
        ``TOPIC=N``) has a subscriber, or ``N``, and is matched with every subscription the ROS graph
        knows on it (DDS delivers nothing to a subscription before the match, and endpoints of one
        process match one by one). ``N`` covers subscribers this process has not discovered yet,
        e.g. a recorder in another process that subscribes once it sees the replay's publisher."""
        publishers = {self.published_name(t): p for t, p in self._publishers.items()}
        wanted = {}
        for spec in topics:
            topic, _, count = spec.partition("=")
            if not count.isdigit() and count:
                raise ValueError(f"--wait-for {spec!r}: expected TOPIC or TOPIC=N (N subscribers)")
            wanted[topic] = max(1, int(count or 1))
        unknown = [t for t in wanted if t not in publishers]
        if unknown:
            raise ValueError(f"--wait-for names topics that are not replayed: {', '.join(unknown)}")
        topics = list(wanted)

        def ready(topic: str) -> bool:
            matched = publishers[topic].get_subscription_count()
            return matched >= wanted[topic] and matched >= self.node.count_subscribers(topic)

        deadline = time.monotonic() + timeout_s
        while not all(ready(t) for t in topics):
            if time.monotonic() > deadline or self.stop_event.is_set():
                waiting = ", ".join(
                    f"{t} ({publishers[t].get_subscription_count()} of {self.node.count_subscribers(t)} "
                    "subscriptions matched)"
                    for t in topics
                    if not ready(t)
                )
                raise TimeoutError(
                    f"not matched with every subscriber after {timeout_s:.0f} s: {waiting}; "
                    "a subscription with an incompatible QoS never matches"
                )
            time.sleep(0.05)
        self.stop_event.wait(MATCH_SETTLE_S)

    def _deliver(self, timeout_s: float) -> list[str]:
        """After the last message: wait up to ``timeout_s`` (or until a stop is asked for) for every
        reliable topic's acknowledgements, and :data:`BEST_EFFORT_LINGER_S` for best-effort ones;
        returns the reliable topics not acknowledged."""
        from rclpy.duration import Duration
        from rclpy.qos import ReliabilityPolicy

        deadline = time.monotonic() + timeout_s
        missing, best_effort = [], False
        for topic, publisher in self._publishers.items():
            if publisher.qos_profile.reliability != ReliabilityPolicy.RELIABLE:
                best_effort = True
                continue
            # Short waits with sleeps between: rclpy's wait lets no other Python thread run, and one
            # until the next heartbeat (seconds) stalled a recorder in this process (its arrival times).
            while not publisher.wait_for_all_acked(Duration(seconds=0.01)):
                if time.monotonic() > deadline or self.stop_event.is_set():
                    missing.append(self.published_name(topic))
                    break
                self.stop_event.wait(0.05)
        if best_effort:
            self.stop_event.wait(BEST_EFFORT_LINGER_S)
        return missing

    def _publish_clock(self, bag_ns: int) -> None:
        from builtin_interfaces.msg import Time
        from rosgraph_msgs.msg import Clock

        self._clock_pub.publish(Clock(clock=Time(sec=split_stamp(bag_ns)[0], nanosec=split_stamp(bag_ns)[1])))

    def _sleep_until(self, wall_target: float, bag_at) -> None:
        """Sleep until ``wall_target`` (time.monotonic), publishing ``/clock`` meanwhile when asked."""
        period = 1.0 / self.options.clock_hz if self._clock_pub is not None else None
        while not self.stop_event.is_set():
            remaining = wall_target - time.monotonic()
            if remaining <= 0:
                return
            if period is not None:
                self._publish_clock(bag_at(time.monotonic()))
                remaining = min(remaining, period)
            time.sleep(min(remaining, 0.1))

    def play(self, on_message=None, ack_timeout_s: float = 10.0) -> ReplayReport:
        """Play the bag (looping as configured); ``on_message(topic, t_log_ns, cdr)`` after each publish.
        Returns once what was sent is delivered (reliable topics acknowledged within ``ack_timeout_s``:
        the others are named in the report) or a stop was requested."""
        report = ReplayReport(published={self.published_name(t): 0 for t in self._publishers})
        opts = self.options
        begin = time.monotonic()
        while not self.stop_event.is_set():
            first_ns = None
            start = 0.0
            for topic, _, t_ns, cdr in read_messages(self.bag, list(self._publishers)):
                if self.stop_event.is_set():
                    break
                if first_ns is None:
                    first_ns = t_ns + round(opts.start_offset_s * 1e9)
                if t_ns < first_ns:
                    continue
                if not start:  # the schedule starts at the first message played, once the bag is open
                    start = time.monotonic()
                target = start + (t_ns - first_ns) * 1e-9 / opts.rate
                self._sleep_until(target, lambda now, f=first_ns, s=start: f + round((now - s) * opts.rate * 1e9))
                if self.stop_event.is_set():
                    break
                if self._clock_pub is not None:
                    self._publish_clock(t_ns)
                self._publishers[topic].publish(cdr)
                lateness = time.monotonic() - target
                name = self.published_name(topic)
                report.published[name] += 1
                report.lateness_s.append(max(0.0, lateness))
                if on_message is not None:
                    on_message(topic, t_ns, cdr)
            if not opts.loop:
                break
        report.wall_s = time.monotonic() - begin
        if not self.stop_event.is_set():
            report.unacknowledged = self._deliver(ack_timeout_s)
        return report
