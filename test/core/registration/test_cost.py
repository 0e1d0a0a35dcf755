"""Registration costs (diffpose_ros.core.registration.cost): values, Jacobians and masks."""

from __future__ import annotations

import pytest
import torch

from diffpose_ros.core.registration.cost import COSTS, DENSE_COSTS, GradientNCC, PatchCost, make_cost
from diffpose_ros.core.registration.similarity import gradient_ncc, multiscale_ncc, ncc, sobel


@pytest.fixture(scope="module")
def pair(renderer, clinical_pose, k64):
    """A DRR at a pose near the truth (with its per-pixel Jacobian) and the target at the truth."""
    from diffpose_ros.core.geometry import se3

    near = clinical_pose @ se3.exp(torch.tensor([2.0, -1.0, 3.0, 0.01, 0.02, -0.01], dtype=torch.float64))
    values, jac = renderer.render_jacobian(near, k64)
    with torch.no_grad():
        target = renderer.render(clinical_pose, k64)
    return values[0].double(), jac[0].double(), target.double()


def _similarity(cost, values, jac):
    r, _ = cost.residuals(values, jac)
    return cost.similarity(0.5 * float(r.square().sum()))


def test_sobel_equals_the_kernels_as_a_correlation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 17, 12, generator=g, dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    reference = torch.nn.functional.conv2d(x.reshape(-1, 1, 17, 12), torch.stack([k, k.T])[:, None])
    got = sobel(x)
    assert got.shape == (3, 4, 2, 15, 10)
    torch.testing.assert_close(got.reshape(-1, 2, 15, 10), reference, atol=1e-12, rtol=0)
    ramp = torch.arange(12.0)[None].expand(17, 12)  # grows to the right: horizontal kernel gives -8 per step
    torch.testing.assert_close(sobel(ramp)[0], torch.full((15, 10), -8.0))
    torch.testing.assert_close(sobel(ramp)[1], torch.zeros(15, 10))


def test_ncc_cost_is_the_multiscale_ncc(pair):
    values, jac, target = pair
    cost = make_cost("ncc", target, None, 8, 0.5)
    expected = multiscale_ncc(values.reshape(64, 64), target, (None, 8), (0.5, 0.5))
    assert _similarity(cost, values, jac) == pytest.approx(float(expected), abs=1e-6)
    # Without patches the whole weight goes to the global NCC.
    assert _similarity(make_cost("ncc", target, None, None, 0.5), values, jac) == pytest.approx(
        float(ncc(values, target.flatten())), abs=1e-6
    )


def test_gradient_ncc_cost_is_the_gradient_ncc(pair):
    values, jac, target = pair
    cost = make_cost("gradient_ncc", target, None, 8, 0.5)
    assert isinstance(cost, GradientNCC)
    assert _similarity(cost, values, jac) == pytest.approx(
        float(gradient_ncc(values.reshape(64, 64), target)), abs=1e-6
    )
    # A linear shading across the field (a heel effect) leaves the gradient NCC as it is; NCC drops.
    ramp = torch.linspace(0, 2 * float(target.max() - target.min()), 64, dtype=torch.float64)[None, :]
    shaded = target + ramp
    robust = make_cost("gradient_ncc", shaded, None, None, 0.5)
    assert _similarity(robust, values, jac) == pytest.approx(_similarity(cost, values, jac), abs=1e-6)
    plain, clean = make_cost("ncc", shaded, None, None, 0.5), make_cost("ncc", target, None, None, 0.5)
    assert _similarity(plain, values, jac) < _similarity(clean, values, jac) - 0.05


def test_mixed_cost_is_half_ncc_half_gradient_ncc(pair):
    values, jac, target = pair
    mixed = _similarity(make_cost("mixed", target, None, 8, 0.5), values, jac)
    parts = [_similarity(make_cost(name, target, None, 8, 0.5), values, jac) for name in ("ncc", "gradient_ncc")]
    assert mixed == pytest.approx(0.5 * sum(parts), abs=1e-6)


def test_gradient_gain_fits_a_gain_that_follows_the_brightness(pair):
    """Scatter compresses the line integrals most where they are largest (``-log(exp(-L) + s)``): each
    gradient is scaled by a gain that falls with the frame's brightness. The gain cost fits it (R^2
    near 1), the gradient NCC cannot; a frame equal to the DRR up to a gain and an offset gives 1."""
    values, jac, target = pair
    same = make_cost("gradient_gain", 3.0 * target + 1.0, None, None, 0.5)
    assert _similarity(same, target.flatten(), jac) == pytest.approx(1.0, abs=1e-9)
    hazed = -torch.log(torch.exp(-target) + 0.3 * float(torch.exp(-target).mean()))
    gain = _similarity(make_cost("gradient_gain", hazed, None, None, 0.5), target.flatten(), jac)
    ncc_squared = _similarity(make_cost("gradient_ncc", hazed, None, None, 0.5), target.flatten(), jac) ** 2
    assert gain > ncc_squared + 0.5 * (1.0 - ncc_squared), (gain, ncc_squared)  # half the misfit gone


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_gain_jacobian_gives_the_exact_gradient_of_the_cost(pair, masked):
    """Variable projection: the Jacobian holds the gain's coefficients, so it is not the residuals'
    derivative, but ``J^T r`` is the exact gradient of the cost (the residuals are orthogonal to the fit)."""
    values, jac, target = pair
    mask = None
    if masked:
        mask = torch.ones(64, 64, dtype=torch.bool)
        mask[:, :20] = False
    cost = make_cost("gradient_gain", target, mask, None, 0.5)
    r, J = cost.residuals(values, jac)

    def half_squared(q):
        return 0.5 * cost.residuals(values + jac @ q, jac)[0].square().sum()

    reference = torch.autograd.functional.jacobian(half_squared, torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(J.T @ r, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(COSTS))
@pytest.mark.parametrize("masked", [False, True])
def test_jacobian_is_the_derivative_of_the_residuals(pair, name, masked):
    # Residuals of a DRR that moves linearly with the pose (values + jac @ q): their exact derivative at q = 0.
    values, jac, target = pair
    mask = None
    if masked:
        mask = torch.ones(64, 64, dtype=torch.bool)
        mask[:, :20] = False
        mask[50:, 40:] = False
    cost = make_cost(name, target, mask, 8, 0.5)
    _, J = cost.residuals(values, jac)

    def residuals(q):
        return cost.residuals(values + jac @ q, jac)[0]

    q0 = torch.zeros(6, dtype=torch.float64)
    reference = torch.autograd.functional.jacobian(residuals, q0, vectorize=True, strategy="forward-mode")
    # (standardize_with_jacobian drops the 1e-8 regulariser of a patch's RMS from its derivative)
    torch.testing.assert_close(J, reference, rtol=1e-5, atol=1e-6)


def test_a_mask_restricts_the_cost_to_its_pixels(pair):
    values, jac, target = pair
    mask = torch.ones(64, 64, dtype=torch.bool)
    mask[:, 32:] = False
    spoiled = target.clone()
    spoiled[:, 32:] = torch.rand(64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 50
    masked = make_cost("ncc", spoiled, mask, None, 0.5)
    expected = ncc(values.reshape(64, 64), target, mask, dims=2)
    assert _similarity(masked, values, jac) == pytest.approx(float(expected), abs=1e-6)
    # Patches that reach into the invalid half are left out: the spoiled pixels change nothing.
    with_patches = make_cost("ncc", spoiled, mask, 8, 0.5)
    clean = make_cost("ncc", target, mask, 8, 0.5)
    assert _similarity(with_patches, values, jac) == pytest.approx(_similarity(clean, values, jac), abs=1e-9)
    # An all-valid mask is the same as none.
    full = make_cost("ncc", target, torch.ones(64, 64, dtype=torch.bool), 8, 0.5)
    r_full, _ = full.residuals(values, jac)
    r_none, _ = make_cost("ncc", target, None, 8, 0.5).residuals(values, jac)
    torch.testing.assert_close(r_full, r_none)


def test_unknown_cost_and_empty_masks_are_refused(pair):
    _, _, target = pair
    with pytest.raises(ValueError, match="unknown registration cost"):
        make_cost("mutual_information", target, None, None, 0.5)
    sparse = torch.zeros(64, 64, dtype=torch.bool)
    sparse[::2, ::2] = True
    with pytest.raises(ValueError, match="patch"):
        make_cost("ncc", target, sparse, 8, 0.5)
    with pytest.raises(ValueError, match="3x3"):
        make_cost("gradient_ncc", target, sparse, None, 0.5)
    with pytest.raises(ValueError, match="3x3"):
        make_cost("gradient_gain", target, sparse, None, 0.5)
    assert set(COSTS) < set(DENSE_COSTS)


@pytest.mark.parametrize("name", sorted(COSTS))
def test_patch_cost_is_the_cost_over_the_patches(pair, name):
    """On a sparse render (patches in patch_pixels order) the cost is the same formula over the
    patches: global terms over their union, patch NCC per patch, Sobel gradients inside each one."""
    values, jac, target = pair
    size = 9
    rows = [(5, 7), (20, 30), (40, 12), (50, 50)]  # top-left corners (i, j), inside 64 x 64

    def cut(image):
        return torch.stack([image[i : i + size, j : j + size] for i, j in rows])

    x, y = cut(values.reshape(64, 64)), cut(target)
    pj = cut(jac.reshape(64, 64, 6)).reshape(-1, 6)
    cost = PatchCost(name, y, 0.5)
    r, J = cost.residuals(x.reshape(-1), pj)
    whole = 0.5 * float(ncc(x.reshape(1, -1), y.reshape(1, -1))) + 0.5 * float(ncc(x.flatten(1), y.flatten(1)).mean())
    gx, gy = (sobel(v).transpose(0, 1).flatten(1) for v in (x, y))
    gradient = float(ncc(gx, gy).mean())
    expected = {"ncc": whole, "gradient_ncc": gradient, "mixed": 0.5 * whole + 0.5 * gradient}[name]
    assert cost.similarity(0.5 * float(r.square().sum())) == pytest.approx(expected, abs=1e-6)

    def residuals(q):
        return cost.residuals(x.reshape(-1) + pj @ q, pj)[0]

    reference = torch.autograd.functional.jacobian(
        residuals, torch.zeros(6, dtype=torch.float64), vectorize=True, strategy="forward-mode"
    )
    torch.testing.assert_close(J, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown registration cost"):
        PatchCost("ssd", y, 0.5)
