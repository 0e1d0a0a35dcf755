"""Pose derivatives of line integrals from a kernel's accumulators (see :mod:`.backends` for the accumulators)."""

from __future__ import annotations

import torch

__all__ = ["pose_derivatives", "twist_jacobian"]


def pose_derivatives(acc: torch.Tensor, P: torch.Tensor, dirs: torch.Tensor):
    """Line integrals ``L (B, N)`` and vectors ``G, H (B, N, 3)`` with ``dL/dP[:, 3] = G``, ``dL/dP[:, :3] = H d^T``.

    ``acc``: a kernel's accumulators ``(B, N, 7)``. The marched sums differentiate every sample,
    including their slide along the ray when the pose moves, which is sampling noise (the sawtooth of
    a Riemann sum). The along-ray part of the motion is therefore integrated by parts exactly instead
    (the integrand is zero at both ends): it contributes nothing for a shift and ``-L / |e|`` along
    the ray for a stretch, leaving the derivative of the continuous integral.
    """
    acc = acc.float()
    L, G, H = acc[..., 0], acc[..., 1:4], acc[..., 4:7]
    e = dirs.to(acc) @ P[:, :, :3].to(acc).transpose(1, 2)
    norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    u = e / norm
    G = G - (G * u).sum(-1, keepdim=True) * u
    H = H - (H * u).sum(-1, keepdim=True) * u - u * (L[..., None] / norm)
    return L, G, H


def twist_jacobian(acc: torch.Tensor, P: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Line integrals ``(B, N)`` and their Jacobian ``(B, N, 6)`` w.r.t. ``xi`` in ``T exp(xi)`` at 0.

    From the accumulators ``acc (B, N, 7)`` of the rays ``dirs (N, 3)`` under the maps ``P (B, 3, 4)``
    (:func:`pose_derivatives`); columns: translation (per mm) along source x, y, z, then rotation
    (per rad) about them. The numba and CUDA kernels evaluate the same per ray (``jacobian=True``).
    """
    L, G, H = pose_derivatives(acc, P, dirs)
    P3 = P[:, :, :3].to(G)
    j_rho = G @ P3  # (P3^T G)^T
    j_phi = torch.linalg.cross(dirs.to(G).expand_as(j_rho), H @ P3)
    return L, torch.cat([j_rho, j_phi], -1)
