"""What a navigator reads about a frame's pose, ROS-free: the status JSON and when poses went stale.

:class:`PoseStatus` is the node's ``~/status`` and the OpenIGTLink ``DiffPoseStatus``;
:class:`StaleTimer` says when the last accepted pose is too old to guide anyone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from .stamps import parse_stamp

__all__ = ["SOURCES", "PoseStatus", "StaleTimer"]

SOURCES = {"cold": "cnn", "multistart": "cnn", "tracking": "tracking", "pyramid": "tracking"}
"""The status ``source`` of a pipeline ``mode``: the CNN's estimate (refined, or the best start
around it), or the last accepted pose (refined sparsely, or by the full pyramid when that failed)."""


@dataclass(frozen=True)
class PoseStatus:
    """The validity of the pose of one frame (``~/status``, OpenIGTLink ``DiffPoseStatus``).

    ``valid``: a pose was accepted for the frame; ``reason``: why not (empty when valid; ``stale``
    when no pose was accepted for a while); ``similarity``: the final similarity, or None;
    ``latency_s``: the frame's stamp to this status being sent (s), or None; ``stamp``: the frame's
    stamp as ``sec.nanosec`` (9 digits, exact); ``source``: ``cnn`` or ``tracking`` (see
    :data:`SOURCES`), or None when the frame was not registered; ``frame_id``: the frame's TF frame;
    ``in_view_range``: whether the frame's estimate lies among the views the patient model was
    trained on (false: a view it was not made for, whether or not it was accepted), or None when
    the frame was not registered.
    """

    valid: bool
    reason: str
    similarity: float | None
    latency_s: float | None
    stamp: str
    source: str | None
    frame_id: str = ""
    in_view_range: bool | None = None

    def to_json(self) -> str:
        """One-line JSON; a non-finite number is written as null."""
        fields = asdict(self)
        for key in ("similarity", "latency_s"):
            value = fields[key]
            fields[key] = float(value) if value is not None and math.isfinite(value) else None
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PoseStatus:
        """Parse :meth:`to_json`'s output (``ValueError`` when it is not such an object)."""
        try:
            doc = json.loads(text)
            status = cls(
                valid=bool(doc["valid"]),
                reason=str(doc["reason"]),
                similarity=None if doc.get("similarity") is None else float(doc["similarity"]),
                latency_s=None if doc.get("latency_s") is None else float(doc["latency_s"]),
                stamp=str(doc["stamp"]),
                source=doc.get("source"),
                frame_id=str(doc.get("frame_id", "")),
                in_view_range=None if doc.get("in_view_range") is None else bool(doc["in_view_range"]),
            )
            status.stamp_ns  # noqa: B018 - checks the stamp
            return status
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"not a pose status: {text[:200]!r} ({err})") from None

    @property
    def stamp_ns(self) -> int:
        """The stamp in integer nanoseconds."""
        return parse_stamp(self.stamp)


class StaleTimer:
    """Whether the last accepted pose is older than ``after_s`` (seconds of any monotonic clock).

    Counts from ``start`` until the first accepted pose, so a source that never delivers goes stale.
    """

    def __init__(self, after_s: float, start: float):
        self.after_s = float(after_s)
        self._last = float(start)
        self.ever_accepted = False

    def accepted(self, now: float) -> None:
        self._last, self.ever_accepted = float(now), True

    def age(self, now: float) -> float:
        """Seconds since the last accepted pose (since ``start`` when none yet)."""
        return float(now) - self._last

    def stale(self, now: float) -> bool:
        return self.age(now) > self.after_s
