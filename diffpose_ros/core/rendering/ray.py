"""The march of one ray, as plain Python that numba compiles: once for the CPU kernel, once for the CUDA kernel.

One source for both backends, so that they take the same samples in the same order. The
accumulators written per ray are those of :mod:`.backends`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ray_function"]


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
    """``i`` clamped to ``[0, hi]`` (written out: numba's CUDA target does not type ``min``/``max`` here)."""
    return 0 if i < 0 else (hi if i > hi else i)


def _twist_columns(P, b, dx, dy, dz, ex, ey, ez, L, G0, G1, G2, H0, H1, H2, out, n):
    """``out[b, n, 1:7]``: ``dL/dxi`` of one ray from its accumulators (per ray, as ``derivatives.twist_jacobian``)."""
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


def ray_function(compile_function):
    """The march of one ray, compiled by ``compile_function`` (numba's CPU ``njit``, or a CUDA device ``jit``).

    ``march_ray(vol, nz, ny, nx, P, dirs, b, n, h, with_grad, jacobian, out)``: the ray ``n`` of pose
    ``b`` writes ``out[b, n]``: ``L``, then ``G, H`` (``with_grad``) or the six Jacobian columns
    (``jacobian``), for the step ``h`` (mm) through the padded volume ``vol`` of shape ``(nz, ny, nx)``.
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
        # float32, which is faster and precise enough for a sum of a few hundred samples.
        acc = np.float32(0.0)
        g0 = g1 = g2 = np.float32(0.0)
        s0 = s1 = s2 = np.float32(0.0)
        if t1 > t0:
            dt = h / math.sqrt(dx * dx + dy * dy + dz * dz)
            # The midpoint samples t_k = t0 + (k + 1/2) dt that lie in [t0, t1], so every one is in
            # the box up to rounding: the cell index is clamped rather than tested (no branch per sample).
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
