"""Training poses over the clinical range of C-arm views.

Views are drawn uniformly in the contract's parameters (``alpha, beta, gamma`` in degrees, ``SOD``
in mm, isocentre offset in mm from the CT centre) and mapped to SE(3) by
:func:`~.geometry.carm_pose`: every pose is a rigid C-arm view about an isocentre, the rotation
ranges are geodesic angles about the anatomical axes, and the same seed gives the same poses.
Ranges are configured in readable units (see ``config/training.yaml``); the defaults cover the
contract's range with a margin so that views at its edges are not extrapolation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from .geometry import carm_pose

__all__ = ["ViewRange", "sample_views"]


@dataclass(frozen=True)
class ViewRange:
    """Uniform ranges ``(low, high)``: angles in degrees, SOD in mm; ``isocenter_mm``: half-widths
    of the isocentre box around the CT centre per LPS axis (mm)."""

    alpha_deg: tuple[float, float] = (-35.0, 35.0)
    beta_deg: tuple[float, float] = (-25.0, 25.0)
    gamma_deg: tuple[float, float] = (-12.0, 12.0)
    sod_mm: tuple[float, float] = (630.0, 870.0)
    isocenter_mm: tuple[float, float, float] = (45.0, 45.0, 45.0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = tuple(float(v) for v in getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            if f.name != "isocenter_mm" and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"{f.name} must be [low, high] with low <= high, got {list(value)}")
        if len(self.isocenter_mm) != 3 or min(self.isocenter_mm) < 0:
            raise ValueError(f"isocenter_mm must be three non-negative half-widths, got {list(self.isocenter_mm)}")
        if self.sod_mm[0] <= 0:
            raise ValueError("sod_mm must be positive")

    @classmethod
    def from_dict(cls, d: dict | None) -> "ViewRange":
        """From a mapping with the field names (missing keys keep their defaults; unknown keys are errors)."""
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown view-range keys: {sorted(unknown)}")
        return cls(**d)

    def as_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


def sample_views(
    view_range: ViewRange, n: int, center_ct: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` poses ``T_ct_source`` ``(n, 4, 4)`` (float64, mm) and their parameters ``(n, 7)``.

    Parameters per row: alpha, beta, gamma (rad), SOD (mm), isocentre (LPS mm, 3).
    ``center_ct``: the CT centre the isocentre box is centred on.
    """

    def uniform(lo_hi, scale=1.0):
        lo, hi = lo_hi
        return (lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)) * scale

    rad = math.pi / 180
    alpha, beta, gamma = uniform(view_range.alpha_deg, rad), uniform(view_range.beta_deg, rad), uniform(view_range.gamma_deg, rad)
    sod = uniform(view_range.sod_mm)
    half = torch.tensor(view_range.isocenter_mm, dtype=torch.float64)
    iso = center_ct.to(torch.float64) + (2 * torch.rand(n, 3, generator=generator, dtype=torch.float64) - 1) * half
    poses = carm_pose(alpha, beta, gamma, sod, iso)
    return poses, torch.stack([alpha, beta, gamma, sod, *iso.unbind(-1)], -1)
