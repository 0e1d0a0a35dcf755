"""Image similarity for X-ray/DRR comparison: NCC, patch-wise and multiscale NCC, gradient NCC.

All measures are dimensionless in [-1, 1] (1 = identical up to an affine intensity change), so
they compare line integrals with log-transformed fluoroscopy whatever the unknown I0 and gain.
Images are ``(..., H, W)``; sparse pixel sets are ``(..., N)`` with :func:`ncc`. An optional
``mask`` (same shape, bool or 0/1) restricts a measure to the pixels it selects.
"""

from __future__ import annotations

import torch

__all__ = [
    "ncc",
    "patches",
    "patch_ncc",
    "multiscale_ncc",
    "gradient_ncc",
    "standardize",
    "standardize_with_jacobian",
    "sobel",
]

_EPS = 1e-8


def standardize(x: torch.Tensor, mask: torch.Tensor | None = None, dim=-1) -> torch.Tensor:
    """Zero-mean, unit-RMS ``x`` along ``dim`` (over ``mask`` where given; masked-out entries become 0)."""
    if mask is None:
        c = x - x.mean(dim, keepdim=True)
        return c / (c.square().mean(dim, keepdim=True).sqrt() + _EPS)
    m = mask.to(x.dtype)
    n = m.sum(dim, keepdim=True).clamp(min=1)
    c = (x - (x * m).sum(dim, keepdim=True) / n) * m
    return c / ((c.square().sum(dim, keepdim=True) / n).sqrt() + _EPS)


def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, dims: int = 1) -> torch.Tensor:
    """Normalised cross-correlation over the last ``dims`` dimensions (1 for pixel lists, 2 for images)."""
    a, b = a.flatten(-dims), b.flatten(-dims)
    if mask is not None:
        mask = mask.flatten(-dims)
        n = mask.to(a.dtype).sum(-1).clamp(min=1)
        return (standardize(a, mask) * standardize(b, mask)).sum(-1) / n
    return (standardize(a) * standardize(b)).mean(-1)


def patches(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., P, size*size)`` non-overlapping square patches of ``(..., H, W)`` (the remainder is cropped)."""
    H, W = x.shape[-2:]
    h, w = H // size * size, W // size * size
    x = x[..., :h, :w].reshape(*x.shape[:-2], h // size, size, w // size, size)
    return x.transpose(-3, -2).reshape(*x.shape[:-4], (h // size) * (w // size), size * size)


def patch_ncc(a: torch.Tensor, b: torch.Tensor, size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean NCC of non-overlapping ``size x size`` patches (local NCC) of ``(..., H, W)`` images."""
    pa, pb = patches(a, size), patches(b, size)
    pm = None if mask is None else patches(mask.to(a.dtype), size)
    return ncc(pa, pb, pm).mean(-1)


def multiscale_ncc(
    a: torch.Tensor,
    b: torch.Tensor,
    patch_sizes: tuple[int | None, ...] = (None, 13),
    weights: tuple[float, ...] = (0.5, 0.5),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of NCCs at several patch sizes (``None`` = the whole image), as DiffPose uses."""
    total = 0.0
    for size, w in zip(patch_sizes, weights, strict=True):
        total = total + w * (ncc(a, b, mask, dims=2) if size is None else patch_ncc(a, b, size, mask))
    return total


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel gradients ``(..., 2, H - 2, W - 2)`` of ``(..., H, W)`` (valid region).

    The kernels ``[[1, 0, -1], [2, 0, -2], [1, 0, -1]]`` and its transpose, applied as a correlation
    (``conv2d``'s convention), in separable form on shifted views, which is quicker than ``conv2d``
    on the small multi-channel images of the refinement (values and Jacobian).
    """
    across = x[..., :, :-2] - x[..., :, 2:]  # horizontal difference, then smoothed vertically
    gx = across[..., :-2, :] + 2 * across[..., 1:-1, :] + across[..., 2:, :]
    along = x[..., :, :-2] + 2 * x[..., :, 1:-1] + x[..., :, 2:]  # horizontal smoothing, then vertical difference
    gy = along[..., :-2, :] - along[..., 2:, :]
    return torch.stack([gx, gy], -3)


def gradient_ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of the NCCs of the horizontal and vertical Sobel gradients of ``(..., H, W)`` images."""
    return ncc(sobel(a), sobel(b), dims=2).mean(-1)


def standardize_with_jacobian(x: torch.Tensor, jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise groups of values and carry their Jacobian along (for Gauss-Newton on NCC).

    ``x``: ``(G, n)`` values in ``G`` groups (the whole image, or patches); ``jac``: ``(G, n, p)``
    derivatives. Returns ``x_hat`` (zero-mean, unit-RMS per group) and ``d x_hat`` ``(G, n, p)``.
    ``1 - NCC(x, y) = mean((x_hat - y_hat)^2) / 2`` per group, so NCC becomes least squares.
    """
    n = x.shape[-1]
    c = x - x.mean(-1, keepdim=True)
    s = c.square().mean(-1, keepdim=True).sqrt() + _EPS
    xh = c / s
    jc = jac - jac.mean(-2, keepdim=True)
    proj = (xh[..., None] * jc).sum(-2, keepdim=True) / n  # (G, 1, p)
    return xh, (jc - xh[..., None] * proj) / s[..., None]
