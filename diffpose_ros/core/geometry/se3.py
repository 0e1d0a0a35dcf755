"""Rigid transforms on SE(3): exp/log maps, composition, inverse and distances.

Conventions (used everywhere in the project):

- A pose is a homogeneous 4x4 matrix ``T`` (``(..., 4, 4)``, any float dtype, batched over leading
  dimensions). ``T_a_b`` maps points given in frame ``b`` into frame ``a``; translations are in
  millimetres in the core.
- A twist ``xi = (rho, phi)`` is a ``(..., 6)`` tensor: translation part ``rho`` (mm) first, rotation
  vector ``phi`` (rad) second. ``exp(xi)`` is the matrix exponential of its hat.
- Perturbations are applied on the right, ``T @ exp(xi)``: ``xi`` is expressed in the frame ``T`` maps
  *from* (for ``T_ct_source``, the C-arm source frame).

SO(3) uses ``roma`` (well-kept, handles small angles and angles near pi). roma has no SE(3)
exponential, so the coupling matrix V and its inverse are written here with Taylor branches that keep
values and gradients finite at zero rotation.
"""

from __future__ import annotations

import roma
import torch

__all__ = [
    "skew",
    "make_pose",
    "exp",
    "log",
    "inverse",
    "compose",
    "transform_points",
    "rotation_angle",
    "translation_distance",
    "double_geodesic",
]

_SMALL = 0.1  # rad: below this the V-matrix coefficients use Taylor series (relative error below 1e-10 there)


def skew(v: torch.Tensor) -> torch.Tensor:
    """Hat operator: ``(..., 3)`` vector -> ``(..., 3, 3)`` skew matrix with ``skew(a) @ b = a x b``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*v.shape[:-1], 3, 3)


def make_pose(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Build ``(..., 4, 4)`` homogeneous poses from ``(..., 3, 3)`` rotations and ``(..., 3)`` translations (mm)."""
    batch = torch.broadcast_shapes(rotation.shape[:-2], translation.shape[:-1])
    T = torch.zeros(*batch, 4, 4, dtype=rotation.dtype, device=rotation.device)
    T[..., :3, :3] = rotation
    T[..., :3, 3] = translation
    T[..., 3, 3] = 1
    return T


def _coefficients(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = (1 - cos t) / t^2`` and ``B = (t - sin t) / t^3``, finite with finite gradients at ``t = 0``.

    ``1 - cos t`` is computed as ``2 sin^2(t / 2)`` and ``B`` by its series below ``_SMALL``, so
    float32 keeps its precision at small angles.
    """
    small = theta < _SMALL
    t = torch.where(small, torch.ones_like(theta), theta)
    t2 = theta * theta
    a = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, 2 * torch.sin(t / 2) ** 2 / (t * t))
    b = torch.where(small, 1 / 6 - t2 / 120 + t2 * t2 / 5040, (t - torch.sin(t)) / (t * t * t))
    return a, b


def exp(xi: torch.Tensor) -> torch.Tensor:
    """Exponential map se(3) -> SE(3): ``(..., 6)`` twist ``(rho mm, phi rad)`` -> ``(..., 4, 4)`` pose."""
    rho, phi = xi[..., :3], xi[..., 3:]
    theta = torch.linalg.vector_norm(phi, dim=-1)
    a, b = _coefficients(theta)
    W = skew(phi)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device)
    V = eye + a[..., None, None] * W + b[..., None, None] * (W @ W)
    return make_pose(roma.rotvec_to_rotmat(phi), (V @ rho[..., None])[..., 0])


def log(T: torch.Tensor) -> torch.Tensor:
    """Logarithm map SE(3) -> se(3): ``(..., 4, 4)`` pose -> ``(..., 6)`` twist ``(rho mm, phi rad)``.

    The rotation angle is taken in ``[0, pi]``.
    """
    phi = roma.rotmat_to_rotvec(T[..., :3, :3])
    theta = torch.linalg.vector_norm(phi, dim=-1)
    small = theta < _SMALL
    t = torch.where(small, torch.ones_like(theta), theta)
    # V^-1 = I - W/2 + c W^2 with c = (1 - (t/2) cot(t/2)) / t^2 (series below _SMALL)
    t2 = theta * theta
    c = torch.where(small, 1 / 12 + t2 / 720 + t2 * t2 / 30240, (1 - (t / 2) / torch.tan(t / 2)) / (t * t))
    W = skew(phi)
    eye = torch.eye(3, dtype=T.dtype, device=T.device)
    V_inv = eye - 0.5 * W + c[..., None, None] * (W @ W)
    rho = (V_inv @ T[..., :3, 3:4])[..., 0]
    return torch.cat([rho, phi], dim=-1)


def inverse(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid ``(..., 4, 4)`` poses (uses ``R^T``; exact for rotations)."""
    Rt = T[..., :3, :3].transpose(-1, -2)
    return make_pose(Rt, -(Rt @ T[..., :3, 3:4])[..., 0])


def compose(*poses: torch.Tensor) -> torch.Tensor:
    """Matrix product ``poses[0] @ poses[1] @ ...`` (frames chain left to right: ``T_a_b @ T_b_c = T_a_c``)."""
    out = poses[0]
    for T in poses[1:]:
        out = out @ T
    return out


def transform_points(T: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``(..., 4, 4)`` poses to ``(..., N, 3)`` points (same length units as the translation)."""
    return points @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def rotation_angle(Ta: torch.Tensor, Tb: torch.Tensor) -> torch.Tensor:
    """Geodesic distance on SO(3) between the rotations of two poses, in radians, in ``[0, pi]``."""
    R = Ta[..., :3, :3].transpose(-1, -2) @ Tb[..., :3, :3]
    return roma.rotmat_geodesic_distance(torch.eye(3, dtype=R.dtype, device=R.device).expand_as(R), R)


def translation_distance(Ta: torch.Tensor, Tb: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between the translations of two poses (mm)."""
    return torch.linalg.vector_norm(Ta[..., :3, 3] - Tb[..., :3, 3], dim=-1)


def double_geodesic(Ta: torch.Tensor, Tb: torch.Tensor, radius: float) -> torch.Tensor:
    """DiffPose's double-geodesic distance ``sqrt((radius * angle)^2 + |dt|^2)`` in mm.

    ``radius`` converts radians to millimetres; DiffPose uses ``SDD / 2``.
    """
    return torch.hypot(radius * rotation_angle(Ta, Tb), translation_distance(Ta, Tb))
