"""``diffpose_node``'s ``~/status`` and its staleness: whether each frame got a pose, and since when none did.

``~/status`` is a ``std_msgs/String`` holding :class:`~diffpose_ros.core.navigation.status.PoseStatus` JSON
(``valid``, ``reason``, ``similarity``, ``latency_s``, ``stamp``, ``source``, ``frame_id``,
``in_view_range``), one per
frame, accepted or not; reliable and transient local (depth 1), so a late subscriber gets the last
one. Consumers of ``/tf`` can tell "no new pose: the frame was rejected" from "no frames".
"""

from __future__ import annotations

import time

from diagnostic_msgs.msg import DiagnosticStatus

from diffpose_ros.core import stamp_from_ns, stamp_ns
from diffpose_ros.core.navigation.status import SOURCES, PoseStatus, StaleTimer

from .diagnostics import key_value
from .qos import latched_qos
from .worker import OutcomeKind

__all__ = ["STATUS_TOPIC", "StatusReporter", "outcome_status"]

STATUS_TOPIC = "~/status"


def outcome_status(outcome, header, frame_id: str, latency_s: float | None) -> PoseStatus:
    """The :class:`PoseStatus` of a worker ``Outcome`` for the image with ``header``."""
    result = outcome.result
    valid = outcome.kind == OutcomeKind.PUBLISHED
    return PoseStatus(
        valid=valid,
        reason="" if valid else outcome.message,
        similarity=None if result is None else float(result.similarity),
        latency_s=latency_s,
        stamp=stamp_from_ns(stamp_ns(header.stamp)),
        source=None if result is None else SOURCES.get(result.mode.value),
        frame_id=frame_id,
        in_view_range=None if result is None else result.in_view_range,
    )


class StatusReporter:
    """Publishes ``~/status`` for ``node`` and keeps the time of its last accepted pose."""

    def __init__(self, node, stale_after_s: float):
        from std_msgs.msg import String

        self._string = String
        self._clock = node.get_clock()
        self._pub = node.create_publisher(String, STATUS_TOPIC, latched_qos())
        self._timer = StaleTimer(stale_after_s, time.monotonic())

    def publish(self, outcome, header, frame_id: str) -> PoseStatus:
        """Publish the status of one frame (and note an accepted pose)."""
        if outcome.kind == OutcomeKind.PUBLISHED:
            self._timer.accepted(time.monotonic())
        latency = (self._clock.now().nanoseconds - stamp_ns(header.stamp)) * 1e-9
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
