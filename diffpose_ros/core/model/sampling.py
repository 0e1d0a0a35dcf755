"""C-arm views: random over the clinical range (training, evaluation) and smooth sweeps (sequences).

Views are drawn uniformly in the contract's parameters (``alpha, beta, gamma`` in degrees, ``SOD``
in mm, isocentre offset in mm from the CT centre) and mapped to SE(3) by
:func:`~diffpose_ros.core.geometry.camera.carm_pose`: every pose is a rigid C-arm view about an isocentre, the rotation
ranges are geodesic angles about the anatomical axes, and the same seed gives the same poses.
Ranges are configured in readable units (see ``config/training.yaml``); the defaults cover the
contract's range with a margin (2 deg, 1 deg of roll, 10 mm of SOD, 2 mm of isocentre) so that
views at its edges are not extrapolation. A wider margin (:data:`~.train.GPU_PROFILE`'s: 5 deg, 2 deg of
roll, 20 mm, 5 mm) spreads the same number of training views over a larger pose space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from diffpose_ros.core.geometry.camera import carm_pose

__all__ = ["ViewRange", "CLINICAL_RANGE", "sample_views", "carm_sweep"]


@dataclass(frozen=True)
class ViewRange:
    """Uniform ranges ``(low, high)``: angles in degrees, SOD in mm; ``isocenter_mm``: half-widths
    of the isocentre box around the CT centre per LPS axis (mm)."""

    alpha_deg: tuple[float, float] = (-32.0, 32.0)
    beta_deg: tuple[float, float] = (-22.0, 22.0)
    gamma_deg: tuple[float, float] = (-11.0, 11.0)
    sod_mm: tuple[float, float] = (640.0, 860.0)
    isocenter_mm: tuple[float, float, float] = (42.0, 42.0, 42.0)

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
    def from_dict(cls, d: dict | None) -> ViewRange:
        """From a mapping with the field names (missing keys keep their defaults; unknown keys are errors)."""
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown view-range keys: {sorted(unknown)}")
        return cls(**d)

    def as_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


CLINICAL_RANGE = ViewRange((-30, 30), (-20, 20), (-10, 10), (650, 850), (40, 40, 40))
"""The geometry contract's clinical range (evaluation and test sequences; training adds a margin)."""


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
    alpha, beta, gamma = (
        uniform(view_range.alpha_deg, rad),
        uniform(view_range.beta_deg, rad),
        uniform(view_range.gamma_deg, rad),
    )
    sod = uniform(view_range.sod_mm)
    half = torch.tensor(view_range.isocenter_mm, dtype=torch.float64)
    iso = center_ct.to(torch.float64) + (2 * torch.rand(n, 3, generator=generator, dtype=torch.float64) - 1) * half
    poses = carm_pose(alpha, beta, gamma, sod, iso)
    return poses, torch.stack([alpha, beta, gamma, sod, *iso.unbind(-1)], -1)


def carm_sweep(
    n: int,
    fps: float,
    center_ct: torch.Tensor,
    alpha_deg: tuple[float, float] = (-20.0, 20.0),
    beta_deg: float = 5.0,
    gamma_deg: float = 0.0,
    sod_mm: float = 750.0,
    isocenter_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    breathing_mm: float = 3.0,
    breathing_hz: float = 0.25,
) -> torch.Tensor:
    """``n`` poses ``T_ct_source`` ``(n, 4, 4)`` (float64, mm) of a C-arm sweep filmed at ``fps``.

    The orbit angle goes linearly from ``alpha_deg[0]`` to ``alpha_deg[1]`` (degrees) at fixed
    ``beta_deg``, ``gamma_deg`` and ``sod_mm``; the patient breathes: the isocentre (``center_ct`` plus
    ``isocenter_offset_mm``, LPS mm) moves by ``breathing_mm`` superior-inferior and half of that
    anterior-posterior, sinusoidally at ``breathing_hz``, so the pose relative to the CT drifts
    between frames as it does in a real run.
    """
    if n < 1 or fps <= 0:
        raise ValueError(f"a sweep needs n >= 1 frames and fps > 0, got n={n}, fps={fps}")
    t = torch.arange(n, dtype=torch.float64) / fps
    fraction = t / t[-1] if n > 1 else torch.zeros(1, dtype=torch.float64)
    rad = math.pi / 180
    alpha = (alpha_deg[0] + (alpha_deg[1] - alpha_deg[0]) * fraction) * rad
    phase = torch.sin(2 * math.pi * breathing_hz * t)
    breathing = torch.stack([torch.zeros_like(t), 0.5 * breathing_mm * phase, breathing_mm * phase], -1)
    iso = center_ct.to(torch.float64) + torch.tensor(isocenter_offset_mm, dtype=torch.float64) + breathing
    return carm_pose(alpha, beta_deg * rad, gamma_deg * rad, sod_mm, iso)
