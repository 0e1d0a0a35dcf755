"""Frame conventions between the CT's LPS and a navigator's RAS, and where a frame's pixels lie.

Frames (docs/geometry-contract.md): ``ct`` is LPS in mm; the C-arm source frame is optical (origin at
the focal spot, +z the principal ray toward the detector, +x along columns, +y along rows) and
``T_ct_source`` maps its points into ``ct``. 3D Slicer's world is the CT in RAS (x and y negated).
"""

from __future__ import annotations

import numpy as np

__all__ = ["LPS_TO_RAS", "carm_to_ras", "fluoro_ijk_to_world", "ras_to_carm"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""``T_ct_ctras`` = ``T_ctras_ct``: a half turn about z between LPS and RAS (its own inverse)."""


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
