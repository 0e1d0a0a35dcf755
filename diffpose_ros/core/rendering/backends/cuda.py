"""The ``cuda`` backend: the per-ray march (:mod:`..ray`) compiled by numba's CUDA target, one GPU thread per ray.

Imported only by a renderer that chooses this backend, so that machines without a GPU never load
numba's CUDA target. Under numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) it runs on CPU tensors,
which is how the tests check it against the CPU kernel.
"""

from __future__ import annotations

import numba
import torch
from numba import cuda

from ..ray import ray_function

__all__ = ["THREADS_PER_BLOCK", "CudaKernel", "march_cuda"]

THREADS_PER_BLOCK = 128
"""Threads per block (one per ray)."""

_march_ray = ray_function(cuda.jit(device=True, fastmath=True))


@cuda.jit(fastmath=True)
def _march_kernel(vol, P, dirs, h, with_grad, jacobian, out):
    """Rays ``r = b N + n`` of a launch over ``B N`` threads; arguments as in the CPU kernel of :mod:`.numba_cpu`."""
    r = cuda.grid(1)
    nr = dirs.shape[0]
    if r < P.shape[0] * nr:
        b = r // nr
        nz, ny, nx = vol.shape
        _march_ray(vol, nz, ny, nx, P, dirs, b, r - b * nr, h, with_grad, jacobian, out)


def march_cuda(
    vol: torch.Tensor, P: torch.Tensor, dirs: torch.Tensor, step_mm: float, with_grad: bool, jacobian: bool = False
) -> torch.Tensor:
    """What :func:`.numba_cpu.march_numba` computes, on ``vol``'s GPU: ``(B, N, 1 | 7)`` float32 there.

    ``vol``: the zero-padded ``(D, H, W)`` float32 attenuation (1/mm) on a CUDA device, contiguous;
    the rays are marched in ``dirs``' order on PyTorch's current stream, so the result is ready for
    the tensor operations queued after it. Under the simulator, ``vol`` and the result are CPU tensors.
    """
    device = vol.device
    P64 = P.detach().to(device=device, dtype=torch.float64).contiguous()
    d64 = dirs.detach().to(device=device, dtype=torch.float64).contiguous()
    channels = 7 if with_grad or jacobian else 1
    out = torch.empty(P64.shape[0], d64.shape[0], channels, dtype=torch.float32, device=device)
    rays = P64.shape[0] * d64.shape[0]
    if rays == 0:
        return out
    blocks = -(-rays // THREADS_PER_BLOCK)
    args = (float(step_mm), bool(with_grad or jacobian), bool(jacobian))
    if device.type != "cuda":  # the simulator: host arrays
        _march_kernel[blocks, THREADS_PER_BLOCK](vol.numpy(), P64.numpy(), d64.numpy(), *args, out.numpy())
        return out
    with cuda.gpus[device.index if device.index is not None else torch.cuda.current_device()]:
        stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
        arrays = [cuda.as_cuda_array(t) for t in (vol, P64, d64, out)]
        _march_kernel[blocks, THREADS_PER_BLOCK, stream](*arrays[:3], *args, arrays[3])
    return out


class CudaKernel:
    """The ``cuda`` backend: :func:`march_cuda` on the volume kept on ``device`` (rays in ``dirs``' order).

    ``ValueError`` unless ``device`` is a CUDA device and numba's CUDA target can load (either is
    waived under the simulator).
    """

    def __init__(self, device: torch.device):
        if not numba.config.ENABLE_CUDASIM:
            if device.type != "cuda":
                raise ValueError(f"the cuda renderer backend needs a CUDA device, not {device}")
            if not cuda.is_available():
                raise ValueError(
                    "the cuda renderer backend needs numba's CUDA target (numba-cuda, and a driver it can load); "
                    "the torch backend runs on any CUDA device"
                )
        self.device = device
        self.rays_device = device

    def upload(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.to(self.device).contiguous()

    def march(self, vol, P, dirs, step_mm, with_grad, order, jacobian) -> torch.Tensor:
        return march_cuda(vol, P, dirs, step_mm, with_grad, jacobian)
