"""Image similarity: NCC, masked, patch-wise, multiscale, gradient NCC (diffpose_ros.core.registration.similarity)."""

from __future__ import annotations

import pytest
import torch

from diffpose_ros.core.registration.similarity import (
    gradient_ncc,
    multiscale_ncc,
    ncc,
    patch_ncc,
    standardize,
    standardize_with_jacobian,
)


def smooth_image(seed, shape=(2, 52, 65)):
    """Random images with structure at several scales (not white noise), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    k = torch.ones(1, 1, 5, 5, dtype=torch.float64) / 25
    blurred = torch.nn.functional.conv2d(x.reshape(-1, 1, *shape[-2:]), k, padding=2).reshape(shape)
    return blurred + 0.1 * x


def test_ncc_affine_copy_and_negation():
    a = smooth_image(0)
    assert ncc(a, 3.7 * a - 12.0, dims=2).shape == (2,)
    torch.testing.assert_close(ncc(a, 3.7 * a - 12.0, dims=2), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ncc(a, -0.5 * a + 1.0, dims=2), -torch.ones(2, dtype=torch.float64))
    b = smooth_image(1)
    v = ncc(a, b, dims=2)
    assert bool((v.abs() < 0.2).all())  # independent images
    # Symmetric, pixel lists (dims=1) agree with images (dims=2).
    torch.testing.assert_close(ncc(b, a, dims=2), v)
    torch.testing.assert_close(ncc(a.flatten(-2), b.flatten(-2)), v)
    # Against a plain Pearson correlation.
    x, y = a[0].flatten(), b[0].flatten()
    pearson = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()).norm() * (y - y.mean()).norm())
    torch.testing.assert_close(v[0], pearson)
    # A partial correlation lands in between.
    mixed = ncc(a, a + b, dims=2)
    assert bool(((mixed > 0.5) & (mixed < 0.95)).all())


def test_ncc_constant_image_is_finite():
    a = smooth_image(2)[0]
    v = ncc(a, torch.full_like(a, 5.0), dims=2)
    assert torch.isfinite(v) and abs(float(v)) < 1e-6


def test_masked_ncc_ignores_masked_out_pixels():
    a = smooth_image(3)[0]
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(a.shape, generator=g) > 0.4
    garbage = torch.randn(a.shape, generator=g, dtype=torch.float64) * 100
    b = torch.where(mask, 2.0 * a + 1.0, garbage)
    assert float(ncc(a, b, dims=2)) < 0.5
    torch.testing.assert_close(ncc(a, b, mask=mask, dims=2), torch.tensor(1.0, dtype=torch.float64))
    # Equal to the NCC of the selected pixels alone.
    c = smooth_image(5)[0]
    torch.testing.assert_close(ncc(a, c, mask=mask, dims=2), ncc(a[mask], c[mask]))
    # A 0/1 float mask works like a bool mask.
    torch.testing.assert_close(ncc(a, c, mask=mask.double(), dims=2), ncc(a[mask], c[mask]))


def test_patch_ncc():
    a = smooth_image(6)
    torch.testing.assert_close(patch_ncc(a, 2 * a + 3, 13), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(patch_ncc(a, -a, 13), -torch.ones(2, dtype=torch.float64))
    # Local NCC is invariant to a different affine change in every patch, unlike global NCC.
    H, W = a.shape[-2:]
    rows = torch.arange(H)[:, None] // 13
    cols = torch.arange(W)[None, :] // 13
    gain = (1.0 + rows + 2.0 * cols).double()
    offset = (10.0 * rows - 7.0 * cols).double()
    b = a * gain + offset
    torch.testing.assert_close(patch_ncc(a, b, 13), torch.ones(2, dtype=torch.float64))
    assert bool((ncc(a, b, dims=2) < 0.9).all())
    # Independent images: near zero.
    assert bool((patch_ncc(a, smooth_image(7), 13).abs() < 0.2).all())
    # A masked patch NCC ignores masked-out pixels inside each patch.
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[:, ::2] = True
    noisy = torch.where(mask, a, torch.randn_like(a) * 50)
    torch.testing.assert_close(patch_ncc(a, noisy, 13, mask=mask), torch.ones(2, dtype=torch.float64))


def test_multiscale_ncc():
    a, b = smooth_image(8), smooth_image(9)
    torch.testing.assert_close(multiscale_ncc(a, 5 * a), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(multiscale_ncc(a, -a), -torch.ones(2, dtype=torch.float64))
    expected = 0.5 * ncc(a, b, dims=2) + 0.5 * patch_ncc(a, b, 13)
    torch.testing.assert_close(multiscale_ncc(a, b), expected)
    expected = 0.2 * ncc(a, b, dims=2) + 0.3 * patch_ncc(a, b, 8) + 0.5 * patch_ncc(a, b, 16)
    torch.testing.assert_close(multiscale_ncc(a, b, (None, 8, 16), (0.2, 0.3, 0.5)), expected)
    with pytest.raises(ValueError):
        multiscale_ncc(a, b, (None, 13), (1.0,))


def test_gradient_ncc():
    a, b = smooth_image(10), smooth_image(11)
    torch.testing.assert_close(gradient_ncc(a, 4 * a - 1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(gradient_ncc(a, -a), -torch.ones(2, dtype=torch.float64))
    assert bool((gradient_ncc(a, b).abs() < 0.2).all())
    # A linear ramp adds a constant to each Sobel gradient: gradient NCC ignores it, plain NCC does not.
    H, W = a.shape[-2:]
    ramp = 0.05 * torch.arange(W, dtype=torch.float64)[None, :] + 0.03 * torch.arange(H, dtype=torch.float64)[:, None]
    torch.testing.assert_close(gradient_ncc(a, a + ramp), torch.ones(2, dtype=torch.float64))
    assert bool((ncc(a, a + ramp, dims=2) < 0.9).all())
    # Transposing the image swaps which Sobel direction sees what: not a match.
    sq = smooth_image(12, (40, 40))
    assert float(gradient_ncc(sq, sq.T)) < 0.5


def test_standardize():
    x = smooth_image(13)[0].flatten()
    s = standardize(x)
    assert abs(float(s.mean())) < 1e-12 and float(s.square().mean()) == pytest.approx(1.0, abs=1e-6)
    mask = x > 0
    sm = standardize(x, mask)
    assert bool((sm[~mask] == 0).all())
    assert abs(float(sm[mask].mean())) < 1e-12 and float(sm[mask].square().mean()) == pytest.approx(1.0, abs=1e-6)


def test_standardize_with_jacobian_matches_autograd():
    g = torch.Generator().manual_seed(14)
    G, n, p = 3, 50, 4
    x0 = torch.randn(G, n, generator=g, dtype=torch.float64) * 3 + 1
    jac = torch.randn(G, n, p, generator=g, dtype=torch.float64)
    xh, dxh = standardize_with_jacobian(x0, jac)
    torch.testing.assert_close(xh, standardize(x0))

    # x(q) = x0 + jac @ q: the Jacobian of standardize(x(q)) at q = 0.
    def f(q):
        return standardize(x0 + (jac @ q[:, :, None])[..., 0])

    ref = torch.autograd.functional.jacobian(f, torch.zeros(G, p, dtype=torch.float64))  # (G, n, G, p)
    ref = torch.stack([ref[i, :, i] for i in range(G)])  # groups are independent
    torch.testing.assert_close(dxh, ref, rtol=1e-6, atol=1e-8)
    # Cross-group blocks of the autograd Jacobian are zero (groups do not mix).
    full = torch.autograd.functional.jacobian(f, torch.zeros(G, p, dtype=torch.float64))
    assert float(full[0, :, 1].abs().max()) == 0.0
    # 1 - NCC = mean((x_hat - y_hat)^2) / 2 per group.
    y = torch.randn(G, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(1 - ncc(x0, y), ((xh - standardize(y)) ** 2).mean(-1) / 2)
