"""``diffpose_node``'s ``~/status`` and its staleness: whether each frame got a pose, and since when none did.

``~/status`` is a ``std_msgs/String`` holding :class:`~diffpose_ros.core.navigation.PoseStatus` JSON
(``valid``, ``reason``, ``similarity``, ``latency_s``, ``stamp``, ``source``, ``frame_id``), one per
frame, accepted or not; reliable and transient local (depth 1), so a late subscriber gets the last
one. Consumers of ``/tf`` can tell "no new pose: the frame was rejected" from "no frames".
"""

from __future__ import annotations

import time

from diagnostic_msgs.msg import DiagnosticStatus

from ..core.navigation import SOURCES, PoseStatus, StaleTimer
from .camera_info import stamp_text
from .diagnostics import key_value

__all__ = ["STATUS_TOPIC", "StatusReporter", "outcome_status", "status_qos"]

STATUS_TOPIC = "~/status"


def status_qos():
    """Reliable, transient local, depth 1 (the last status is latched)."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def outcome_status(outcome, header, frame_id: str, latency_s: float | None) -> PoseStatus:
    """The :class:`PoseStatus` of a worker ``Outcome`` for the image with ``header``."""
    values = outcome.values
    similarity = values.get("similarity")
    valid = outcome.kind == "published"
    return PoseStatus(
        valid=valid,
        reason="" if valid else outcome.message,
        similarity=None if similarity is None else float(similarity),
        latency_s=latency_s,
        stamp=stamp_text((int(header.stamp.sec), int(header.stamp.nanosec))),
        source=SOURCES.get(values.get("mode")),
        frame_id=frame_id,
    )


class StatusReporter:
    """Publishes ``~/status`` for ``node`` and keeps the time of its last accepted pose."""

    def __init__(self, node, stale_after_s: float):
        from std_msgs.msg import String

        self._string = String
        self._clock = node.get_clock()
        self._pub = node.create_publisher(String, STATUS_TOPIC, status_qos())
        self._timer = StaleTimer(stale_after_s, time.monotonic())

    def publish(self, outcome, header, frame_id: str) -> PoseStatus:
        """Publish the status of one frame (and note an accepted pose)."""
        if outcome.kind == "published":
            self._timer.accepted(time.monotonic())
        stamp_ns = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
        latency = (self._clock.now().nanoseconds - stamp_ns) * 1e-9
        status = outcome_status(outcome, header, frame_id, latency)
        self._pub.publish(self._string(data=status.to_json()))
        return status

    def stale(self, stale_after_s: float) -> bool:
        """Whether no pose was accepted for ``stale_after_s`` (since the node started, when none was yet)."""
        self._timer.after_s = stale_after_s
        return self._timer.stale(time.monotonic())

    def flag_stale(self, summary: DiagnosticStatus, stale_after_s: float) -> DiagnosticStatus:
        """``summary`` with ``last_accepted_age_s``, raised to WARN when no pose was accepted for
        ``stale_after_s`` (since the node started, when none was yet); an ERROR stays an ERROR."""
        now = time.monotonic()
        self._timer.after_s = stale_after_s
        age = self._timer.age(now)
        summary.values.append(key_value("last_accepted_age_s", age if self._timer.ever_accepted else float("nan")))
        summary.values.append(key_value("stale", self._timer.stale(now)))
        if self._timer.stale(now) and summary.level == DiagnosticStatus.OK:
            summary.level = DiagnosticStatus.WARN
            what = "no pose accepted" if self._timer.ever_accepted else "no pose accepted since start"
            summary.message = f"stale: {what} for {age:.1f} s (diagnostics.stale_after_s {stale_after_s:g})"
        return summary
