"""The CUDA kernel of :mod:`.raymarch`: the CPU kernel's per-ray march, one GPU thread per ray.

Imported by :func:`.raymarch.march_cuda` only, so that machines without a GPU never load numba's
CUDA target; under numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) it runs on the CPU, which is how
the tests check it against the CPU kernel.
"""

from numba import cuda

from .raymarch import _ray_function

THREADS_PER_BLOCK = 128
"""Threads per block (one per ray)."""

_march_ray = _ray_function(cuda.jit(device=True, fastmath=True))


@cuda.jit(fastmath=True)
def march_kernel(vol, P, dirs, h, with_grad, jacobian, out):
    """Rays ``r = b N + n`` of a launch over ``B N`` threads; arguments as in ``raymarch._march_numba``."""
    r = cuda.grid(1)
    nr = dirs.shape[0]
    if r < P.shape[0] * nr:
        b = r // nr
        nz, ny, nx = vol.shape
        _march_ray(vol, nz, ny, nx, P, dirs, b, r - b * nr, h, with_grad, jacobian, out)
