"""The ``numba`` backend: the per-ray march (:mod:`..ray`) compiled for the CPU, rays in parallel on numba's pool."""

from __future__ import annotations

import os

import numba
import numpy as np
import torch

from ..ray import ray_function

__all__ = ["NumbaCPU", "march_numba", "set_renderer_threads", "tile_order"]

# numba's OpenMP pool and PyTorch's (a different libgomp) spin against each other on the same
# cores and slow both down (docs/performance.md). TBB (thread-safe) or numba's own workqueue avoid
# that; an explicit NUMBA_THREADING_LAYER* setting still wins.
if not any(k.startswith("NUMBA_THREADING_LAYER") for k in os.environ):
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]


def set_renderer_threads(requested: int = 0) -> int:
    """Threads of the numba kernel for renders made *by the calling thread* (numba keeps the count per
    thread), and their number: ``requested`` when positive (at most numba's pool), else the whole pool
    (one per core).

    Fewer threads leave cores to other software on the machine: a parallel render waits for its
    slowest thread, so a thread that loses its core stalls it (docs/performance.md).
    """
    pool = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(min(requested, pool) if requested > 0 else pool)
    return numba.get_num_threads()


_march_ray = ray_function(numba.njit(inline="always", fastmath=True))


# nogil: a render holds no Python lock, so the node's executor thread takes the next frame off DDS
# while the worker renders. cache: numba checks this file only, so clear its cache after editing ray.py.
@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _march_numba(vol, P, dirs, order, h, with_grad, jacobian, out):
    nr = dirs.shape[0]
    nz, ny, nx = vol.shape
    for r in numba.prange(P.shape[0] * nr):
        b = r // nr
        _march_ray(vol, nz, ny, nx, P, dirs, b, order[r - b * nr], h, with_grad, jacobian, out)


def march_numba(
    vol: np.ndarray,
    P: torch.Tensor,
    dirs: torch.Tensor,
    step_mm: float,
    with_grad: bool,
    order: np.ndarray | None = None,
    jacobian: bool = False,
) -> torch.Tensor:
    """Accumulators ``(B, N, 1)`` (``L``) or ``(B, N, 7)`` (``L, G, H``) on the CPU (see :mod:`..backends`).

    ``vol``: zero-padded ``(D, H, W)`` float32 attenuation (1/mm), C-contiguous; ``P``: ``(B, 3, 4)``
    source -> padded index maps; ``dirs``: ``(N, 3)`` source-frame directions with z = 1;
    ``step_mm``: sampling step along the ray (mm); ``order``: the order in which the rays are
    marched, a permutation of ``range(N)`` (see :func:`tile_order`); results are in ``dirs``' order.
    ``jacobian``: ``(B, N, 7)`` is ``L`` and the six columns of
    :func:`~diffpose_ros.core.rendering.derivatives.twist_jacobian` instead.
    """
    P64 = np.ascontiguousarray(P.detach().cpu().numpy(), dtype=np.float64)
    d64 = np.ascontiguousarray(dirs.detach().cpu().numpy(), dtype=np.float64)
    if order is None:
        order = np.arange(d64.shape[0], dtype=np.int64)
    out = np.empty((P64.shape[0], d64.shape[0], 7 if with_grad or jacobian else 1), dtype=np.float32)
    _march_numba(vol, P64, d64, order, float(step_mm), bool(with_grad or jacobian), bool(jacobian), out)
    return torch.from_numpy(out)


def tile_order(width: int, height: int, tile: int = 4) -> np.ndarray:
    """Row-major pixel indices of a ``width`` x ``height`` image, visited tile by tile (``tile`` x ``tile``).

    Neighbouring rays read the same cache lines of the volume, so marching them tile by tile rather
    than row by row reuses more of the cache.
    """
    v, u = np.divmod(np.arange(width * height, dtype=np.int64), width)
    tiles_per_row = -(-width // tile)
    key = ((v // tile) * tiles_per_row + u // tile) * tile * tile + (v % tile) * tile + u % tile
    return np.argsort(key, kind="stable")


class NumbaCPU:
    """The ``numba`` backend: :func:`march_numba` on a C-contiguous numpy volume, results moved to ``device``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rays_device = torch.device("cpu")

    def upload(self, padded: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(padded.numpy())

    def march(self, vol, P, dirs, step_mm, with_grad, order, jacobian) -> torch.Tensor:
        return march_numba(vol, P, dirs, step_mm, with_grad, order, jacobian).to(self.device)
