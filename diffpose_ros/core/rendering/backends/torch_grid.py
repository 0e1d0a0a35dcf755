"""The ``torch`` backend: line integrals and their gradient sums by ``grid_sample``, on any torch device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..derivatives import twist_jacobian

__all__ = ["TorchGrid", "gradient_channels", "march_torch", "ray_segments"]


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
    """Accumulators ``(B, N, 1)`` or ``(B, N, 7)`` (see :mod:`..backends`) with ``grid_sample`` on ``channels``.

    ``channels``: from :func:`gradient_channels`; ``P``, ``dirs``, ``step_mm`` as in
    :func:`.numba_cpu.march_numba`. Runs on the device of ``channels``; ``chunk`` bounds the number of
    samples held at once.
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


class TorchGrid:
    """The ``torch`` backend: :func:`march_torch` on the volume's :func:`gradient_channels` kept on ``device``.

    With ``jacobian``, the Jacobian columns follow from the accumulators by
    :func:`~diffpose_ros.core.rendering.derivatives.twist_jacobian`.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.rays_device = device

    def upload(self, padded: torch.Tensor) -> torch.Tensor:
        return gradient_channels(padded).to(self.device)

    def march(self, vol, P, dirs, step_mm, with_grad, order, jacobian) -> torch.Tensor:
        acc = march_torch(vol, P, dirs, step_mm, with_grad or jacobian)
        if not jacobian:
            return acc
        L, J = twist_jacobian(acc, P, dirs)
        return torch.cat([L[..., None], J], -1)
