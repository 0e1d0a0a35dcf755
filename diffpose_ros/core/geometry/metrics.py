"""Registration error measures, in millimetres and degrees, never rescaled.

Poses are ``T_ct_source`` (4x4, mm); target points are in ``ct`` (LPS, mm). The definitions
(``docs/geometry-contract.md``, "Error metrics") use ``T_source_ct``, the inverse, to map targets
into the source frame; that is what happens here.
"""

from __future__ import annotations

import math

import torch

from . import se3
from .camera import Intrinsics

__all__ = ["mtre", "mpe", "pose_errors", "frame_errors", "grid_targets"]


def mtre(T_est: torch.Tensor, T_true: torch.Tensor, targets_ct: torch.Tensor) -> torch.Tensor:
    """3D mean target registration error (mm): mean over targets of ``|T_est^-1 p - T_true^-1 p|``."""
    a = se3.transform_points(se3.inverse(T_est.double()), targets_ct.double())
    b = se3.transform_points(se3.inverse(T_true.double()), targets_ct.double())
    return torch.linalg.vector_norm(a - b, dim=-1).mean(-1)


def mpe(
    T_est: torch.Tensor, T_true: torch.Tensor, targets_ct: torch.Tensor, intrinsics: Intrinsics, pixel_mm: float
) -> torch.Tensor:
    """Mean projection error (mm on the detector): target projections under both poses, pixels times ``pixel_mm``."""
    a = intrinsics.project(se3.transform_points(se3.inverse(T_est.double()), targets_ct.double()))
    b = intrinsics.project(se3.transform_points(se3.inverse(T_true.double()), targets_ct.double()))
    return torch.linalg.vector_norm(a - b, dim=-1).mean(-1) * pixel_mm


def pose_errors(T_est: torch.Tensor, T_true: torch.Tensor, radius_mm: float) -> dict[str, float]:
    """Rotation error (deg), translation error (mm) and double geodesic (mm, ``radius_mm`` per radian)."""
    return {
        "rotation_deg": math.degrees(float(se3.rotation_angle(T_est, T_true))),
        "translation_mm": float(se3.translation_distance(T_est, T_true)),
        "double_geodesic_mm": float(se3.double_geodesic(T_est, T_true, radius_mm)),
    }


def frame_errors(
    T_est: torch.Tensor,
    T_true: torch.Tensor,
    targets_ct: torch.Tensor,
    intrinsics: Intrinsics,
    pixel_mm: float,
    sdd_mm: float,
) -> dict[str, float]:
    """Every error of one frame: 3D mTRE and mPE (mm), then :func:`pose_errors` with DiffPose's radius ``SDD / 2``."""
    return {
        "mtre_mm": float(mtre(T_est, T_true, targets_ct)),
        "mpe_mm": float(mpe(T_est, T_true, targets_ct, intrinsics, pixel_mm)),
        **pose_errors(T_est, T_true, radius_mm=sdd_mm / 2),
    }


def grid_targets(center_ct: torch.Tensor, half_extent_mm: float = 60.0, n: int = 3) -> torch.Tensor:
    """``(n^3, 3)`` targets on a cube grid around ``center_ct`` (LPS, mm) when no label map is given."""
    axis = torch.linspace(-half_extent_mm, half_extent_mm, n, dtype=torch.float64)
    g = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    return g + center_ct.double()
