"""C-arm views: random over a range (training, evaluation) and smooth sweeps (sequences).

Views are drawn from the modes of a :class:`~.views.ViewSet` by their weights, and within a mode
uniformly in the contract's parameters (``alpha, beta, gamma`` in degrees, ``SOD`` in mm, isocentre
offset in mm from the CT centre), then mapped to SE(3) by
:func:`~diffpose_ros.core.geometry.camera.carm_pose`: every pose is a rigid C-arm view about an
isocentre, the rotation ranges are geodesic angles about the anatomical axes, and the same seed
gives the same poses. Ranges and procedure presets: :mod:`.views`.
"""

from __future__ import annotations

import math

import torch

from diffpose_ros.core.geometry.camera import carm_pose

from .views import ViewRange, ViewSet

__all__ = ["sample_views", "carm_sweep"]


def sample_views(
    views: ViewRange | ViewSet, n: int, center_ct: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` poses ``T_ct_source`` ``(n, 4, 4)`` (float64, mm) and their parameters ``(n, 7)``.

    Parameters per row: alpha, beta, gamma (rad), SOD (mm), isocentre (LPS mm, 3).
    ``center_ct``: the CT centre the isocentre box is centred on. A set of one mode draws exactly
    what its :class:`~.views.ViewRange` alone draws.
    """
    modes, weights = (views.modes, views.weights) if isinstance(views, ViewSet) else ((views,), (1.0,))
    if len(modes) == 1 or n == 0:
        index = torch.zeros(n, dtype=torch.long)
    else:
        index = torch.multinomial(torch.tensor(weights), n, replacement=True, generator=generator)

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(m, name) for m in modes], dtype=torch.float64)[index]

    def uniform(name: str, scale: float = 1.0) -> torch.Tensor:
        lo, hi = column(name).unbind(-1)
        return (lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)) * scale

    rad = math.pi / 180
    alpha, beta, gamma = uniform("alpha_deg", rad), uniform("beta_deg", rad), uniform("gamma_deg", rad)
    sod = uniform("sod_mm")
    half = column("isocenter_mm")
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
