"""What a navigator needs from a pose, ROS-free (numpy): the C-arm in CT RAS, the frame placed on its
detector, the pose's validity as JSON, and when the last accepted pose has gone stale.

Frames (docs/geometry-contract.md): ``ct`` is LPS in mm; the C-arm source frame is optical (origin at
the focal spot, +z the principal ray toward the detector, +x along columns, +y along rows) and
``T_ct_source`` maps its points into ``ct``. 3D Slicer's world is the CT in RAS (x and y negated).
Used by the OpenIGTLink bridge (``diffpose_ros/ros/igtl.py``), the node's ``~/status`` and the scoring of
what a navigator received (``diffpose_ros/bags/score.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "LPS_TO_RAS",
    "SOURCES",
    "PoseStatus",
    "StaleTimer",
    "carm_to_ras",
    "fluoro_ijk_to_world",
    "ras_to_carm",
    "stamp_from_ns",
    "stamp_ns",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""``T_ct_ctras`` = ``T_ctras_ct``: a half turn about z between LPS and RAS (its own inverse)."""

SOURCES = {"cold": "cnn", "tracking": "tracking", "pyramid": "tracking"}
"""The status ``source`` of a pipeline ``mode``: the CNN's estimate, or the last accepted pose
(refined sparsely, or by the full pyramid when that failed)."""


def carm_to_ras(T_ct_source, T_ct_ctras=LPS_TO_RAS) -> np.ndarray:
    """``T_ctras_source`` (4x4, mm): C-arm source-frame points -> CT RAS. ``T_ct_ctras`` is the
    ``ct`` -> ``ct_ras`` transform (points in RAS to ``ct``; by default :data:`LPS_TO_RAS`)."""
    T = np.asarray(T_ct_source, dtype=np.float64)
    return np.linalg.inv(np.asarray(T_ct_ctras, dtype=np.float64)) @ T


def ras_to_carm(T_ctras_source, T_ct_ctras=LPS_TO_RAS) -> np.ndarray:
    """``T_ct_source`` (4x4, mm, ``ct`` in LPS) of a ``T_ctras_source`` (CT RAS): :func:`carm_to_ras` undone."""
    return np.asarray(T_ct_ctras, dtype=np.float64) @ np.asarray(T_ctras_source, dtype=np.float64)


def fluoro_ijk_to_world(T_world_source, fx: float, fy: float, cx: float, cy: float, sdd_mm: float, mirror=False):
    """4x4 taking the frame's voxel index ``(i, j, k=0, 1)`` (i: column, j: row) to ``world`` (mm).

    The pixel centre ``(u, v) = (i, j)`` lies on its ray at ``sdd_mm * K^-1 [u, v, 1]`` in the source
    frame: on the detector plane ``z = sdd_mm``. ``fx, fy, cx, cy`` describe the delivered image; a
    ``mirror``-ed frame (flipped left-right) has column ``i`` at ``x = sdd (cx - i) / fx``. The k axis
    is the detector normal, pointing away from the source or toward it so that (i, j, k) stay
    right-handed, as long as the mean pixel spacing. ``T_world_source``: the source in ``world``.
    """
    if not (fx > 0 and fy > 0 and sdd_mm > 0):
        raise ValueError(f"fx, fy and sdd_mm must be positive (fx={fx}, fy={fy}, sdd_mm={sdd_mm})")
    s = -1.0 if mirror else 1.0
    dx, dy = sdd_mm / fx, sdd_mm / fy
    source_from_ijk = np.eye(4)
    source_from_ijk[:3, 0] = (s * dx, 0.0, 0.0)
    source_from_ijk[:3, 1] = (0.0, dy, 0.0)
    source_from_ijk[:3, 2] = (0.0, 0.0, s * 0.5 * (dx + dy))  # i x j along +z, or -z when mirrored
    source_from_ijk[:3, 3] = (-s * dx * cx, -dy * cy, sdd_mm)
    return np.asarray(T_world_source, dtype=np.float64) @ source_from_ijk


@dataclass(frozen=True)
class PoseStatus:
    """The validity of the pose of one frame (``~/status``, OpenIGTLink ``DiffPoseStatus``).

    ``valid``: a pose was accepted for the frame; ``reason``: why not (empty when valid; ``stale``
    when no pose was accepted for a while); ``similarity``: the final similarity, or None;
    ``latency_s``: the frame's stamp to this status being sent (s), or None; ``stamp``: the frame's
    stamp as ``sec.nanosec`` (9 digits, exact); ``source``: ``cnn`` or ``tracking`` (see
    :data:`SOURCES`), or None when the frame was not registered; ``frame_id``: the frame's TF frame.
    """

    valid: bool
    reason: str
    similarity: float | None
    latency_s: float | None
    stamp: str
    source: str | None
    frame_id: str = ""

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
            )
            status.stamp_ns  # noqa: B018 - checks the stamp
            return status
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"not a pose status: {text[:200]!r} ({err})") from None

    @property
    def stamp_ns(self) -> int:
        """The stamp in integer nanoseconds."""
        sec, _, nanosec = self.stamp.partition(".")
        if not sec.isdigit() or not (nanosec.isdigit() and len(nanosec) == 9):
            raise ValueError(f"stamp must be sec.nanosec with 9 digits, got {self.stamp!r}")
        return int(sec) * 1_000_000_000 + int(nanosec)


def stamp_from_ns(stamp_ns: int) -> str:
    """``sec.nanosec`` (9 digits) of a stamp in nanoseconds."""
    return f"{stamp_ns // 1_000_000_000}.{stamp_ns % 1_000_000_000:09d}"


def stamp_ns(stamp) -> int:
    """Integer nanoseconds of a stamp with ``sec`` and ``nanosec`` (``builtin_interfaces/Time``)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


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
