"""Differentiable DRRs: dense images, batches of poses, and sparse sets of pixels.

A DRR pixel is the line integral of linear attenuation (1/mm) along the ray from the C-arm source
through that pixel's centre (dimensionless), for a pose ``T_ct_source`` (mm) and pinhole
:class:`~diffpose_ros.core.geometry.camera.Intrinsics`, as the geometry contract defines. Sampling is
trilinear at a fixed step along each ray, clipped to the volume (see :mod:`.backends` for why the
kernels are ours and how the pose derivative is exact).

``Renderer.render`` is differentiable with respect to the pose matrix through autograd;
``Renderer.render_jacobian`` returns the per-pixel Jacobian with respect to a right-perturbation
twist ``T exp(xi)`` (``xi = (rho mm, phi rad)``, source frame) for Gauss-Newton.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from diffpose_ros.core.geometry.camera import Intrinsics

from .backends import BACKENDS, REGISTRY
from .backends.numba_cpu import tile_order
from .derivatives import pose_derivatives
from .volume import Volume

__all__ = ["BACKENDS", "Renderer", "patch_pixels"]


@functools.lru_cache(maxsize=16)
def _rays(intrinsics: Intrinsics, device: torch.device) -> torch.Tensor:
    """Dense source-frame ray directions of a camera on ``device`` (cached: every registration step
    reuses them, and a GPU backend gets them without a copy per render)."""
    return intrinsics.rays().to(device)


@functools.lru_cache(maxsize=16)
def _dense_order(width: int, height: int) -> np.ndarray:
    """The order in which the numba kernel marches a dense image's rays (cached)."""
    return tile_order(width, height)


class _LineIntegrals(torch.autograd.Function):
    """Line integrals ``(B, N)`` as a function of poses ``(B, 4, 4)``; backward uses the accumulators."""

    @staticmethod
    def forward(ctx, pose, renderer, dirs, order):
        P = renderer.source_to_index(pose.detach())
        acc = renderer.march(P, dirs, with_grad=ctx.needs_input_grad[0], order=order)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(acc, P, dirs, renderer.ct_to_index)
            ctx.pose_dtype = pose.dtype
        return acc[..., 0].to(pose.device)

    @staticmethod
    def backward(ctx, grad_out):
        acc, P, dirs, M = ctx.saved_tensors
        _, G, H = pose_derivatives(acc, P, dirs)
        g = grad_out.to(G)
        grad_P3 = torch.einsum("bn,bni,nj->bij", g, H, dirs.to(G)).double()
        grad_Pt = torch.einsum("bn,bni->bi", g, G).double()
        M3 = M[:3, :3].to(grad_P3)
        grad = torch.zeros(g.shape[0], 4, 4, dtype=torch.float64, device=G.device)
        grad[:, :3, :3] = M3.T @ grad_P3
        grad[:, :3, 3] = grad_Pt @ M3
        return grad.to(grad_out.device, ctx.pose_dtype), None, None, None


class Renderer:
    """DRR renderer for one attenuation volume.

    ``mu``: linear attenuation (1/mm) in ``ct``; ``step_mm``: sampling step along rays (default: the
    smallest voxel edge); ``backend``: ``"numba"`` (CPU), ``"cuda"`` (the numba kernel's per-ray
    march compiled for the GPU: same samples, one thread per ray), ``"torch"`` (``grid_sample``; any
    device), or ``"auto"`` (torch on CUDA devices, numba otherwise); ``device``: where the GPU backends
    keep the volume and where outputs go. ``ValueError`` for an unknown backend, or one that cannot run
    on ``device``.
    """

    def __init__(self, mu: Volume, step_mm: float | None = None, backend: str = "auto", device=None):
        self.device = torch.device(device or "cpu")
        if backend == "auto":
            backend = "torch" if self.device.type == "cuda" else "numba"
        if backend not in BACKENDS:
            raise ValueError(f"unknown renderer backend {backend!r} ({', '.join(BACKENDS)} or auto)")
        self._backend = REGISTRY[backend](self.device)
        self.backend = backend
        """The backend's name, one of :data:`BACKENDS`."""
        self.volume = mu
        self.step_mm = float(step_mm if step_mm is not None else mu.spacing.min())
        padded = F.pad(mu.data.float(), (1, 1, 1, 1, 1, 1))
        shift = torch.eye(4, dtype=torch.float64)
        shift[:3, 3] = 1.0
        self.ct_to_index = shift @ torch.linalg.inv(mu.index_to_ct)
        """4x4 map from ``ct`` (mm) to padded voxel-index space ``(i, j, k)``."""
        self._vol = self._backend.upload(padded)

    def source_to_index(self, pose: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 4)`` float64 maps from the source frame (mm) to padded index space for poses ``(B, 4, 4)``."""
        return (self.ct_to_index @ pose.to(torch.float64).cpu())[:, :3]

    def march(
        self,
        P: torch.Tensor,
        dirs: torch.Tensor,
        with_grad: bool,
        order: np.ndarray | None = None,
        jacobian: bool = False,
    ) -> torch.Tensor:
        """Per-ray accumulators (see :mod:`.backends`): ``(B, N, 1)`` or ``(B, N, 7)`` float32 on :attr:`device`.

        ``order``: the numba kernel's marching order of the rays (results stay in ``dirs``' order);
        ``jacobian``: ``(B, N, 7)`` holds ``L`` and its six twist columns instead
        (:func:`~.derivatives.twist_jacobian`; the numba and CUDA kernels finish them per ray).
        """
        return self._backend.march(self._vol, P, dirs, self.step_mm, with_grad, order, jacobian)

    def _directions(
        self, intrinsics: Intrinsics, pixels: torch.Tensor | None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Ray directions ``(N, 3)`` (all pixels, row-major, when ``pixels`` is None) and their marching order."""
        if pixels is None:
            return _rays(intrinsics, self._backend.rays_device), _dense_order(intrinsics.width, intrinsics.height)
        return intrinsics.rays(pixels), None

    @staticmethod
    def _batch(pose: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if pose.shape[-2:] != (4, 4):
            raise ValueError(f"poses must be (..., 4, 4) matrices, got {tuple(pose.shape)}")
        single = pose.dim() == 2
        return (pose[None] if single else pose), single

    def render(self, pose: torch.Tensor, intrinsics: Intrinsics, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """DRRs for poses ``T_ct_source`` ``(4, 4)`` or ``(B, 4, 4)`` (mm).

        Dense (``pixels`` None): ``(B, H, W)`` (or ``(H, W)`` for one pose). Sparse: ``pixels`` is
        ``(N, 2)`` pixel coordinates ``(u, v)`` and the result is ``(B, N)`` (or ``(N,)``).
        Differentiable with respect to ``pose``.
        """
        poses, single = self._batch(pose)
        dirs, order = self._directions(intrinsics, pixels)
        out = _LineIntegrals.apply(poses, self, dirs, order)
        if pixels is None:
            out = out.reshape(-1, intrinsics.height, intrinsics.width)
        return out[0] if single else out

    def render_jacobian(
        self, pose: torch.Tensor, intrinsics: Intrinsics, pixels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Line integrals ``(B, N)`` and their Jacobian ``(B, N, 6)`` w.r.t. ``xi`` in ``T exp(xi)`` at 0.

        Columns: translation (per mm) along source x, y, z, then rotation (per rad) about them.
        Pixels are row-major when ``pixels`` is None. Float32, on :attr:`device`.
        """
        poses, _ = self._batch(pose.detach())
        dirs, order = self._directions(intrinsics, pixels)
        P = self.source_to_index(poses)
        out = self.march(P, dirs, with_grad=True, order=order, jacobian=True)
        return out[..., 0], out[..., 1:]


def patch_pixels(intrinsics: Intrinsics, centers: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinates ``(P * size * size, 2)`` of square patches around integer ``(P, 2)`` centres (u, v).

    Patches are clipped to the image; pixels of one patch are contiguous, row-major.
    """
    half = size // 2
    off = torch.arange(size, dtype=torch.float64) - half
    dv, du = torch.meshgrid(off, off, indexing="ij")
    c = centers.to(torch.float64).round()
    c[:, 0] = c[:, 0].clamp(half, intrinsics.width - 1 - (size - 1 - half))
    c[:, 1] = c[:, 1].clamp(half, intrinsics.height - 1 - (size - 1 - half))
    return (c[:, None, :] + torch.stack([du.flatten(), dv.flatten()], -1)[None]).reshape(-1, 2)
