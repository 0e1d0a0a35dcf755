"""Test-time registration: recover known poses from DRRs (diffpose_ros.core.registration.registrar)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffpose_ros.core.frames.prepare import line_integrals_from_transmission, resample_image, resample_mask
from diffpose_ros.core.geometry import metrics, se3
from diffpose_ros.core.geometry.camera import carm_pose
from diffpose_ros.core.registration.levels import Level, feature_patches, prepare_level, pyramid
from diffpose_ros.core.registration.registrar import Registrar, RegistrationConfig, RegistrationResult
from diffpose_ros.core.simulation.clinical import ClinicalFactors
from diffpose_ros.core.simulation.detector import simulate_transmission


@pytest.fixture(scope="module")
def truth(hu):
    """A clinical-range view: T_ct_source and its isocentre."""
    iso = hu.center + torch.tensor([12.0, -8.0, 18.0], dtype=torch.float64)
    return carm_pose(math.radians(18), math.radians(-9), math.radians(4), 760.0, iso), iso


@pytest.fixture(scope="module")
def target(renderer, truth, k128):
    return renderer.render(truth[0], k128)


def perturbed(T, iso, seed, angle_deg=10.0, shift_mm=30.0):
    """``T`` rotated by ``angle_deg`` about a random axis through the isocentre, then shifted ``shift_mm``."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm()
    shift = torch.randn(3, generator=g, dtype=torch.float64)
    shift = shift / shift.norm() * shift_mm
    R = se3.exp(torch.cat([torch.zeros(3, dtype=torch.float64), axis * math.radians(angle_deg)]))
    eye = torch.eye(3, dtype=torch.float64)
    about_iso = se3.make_pose(eye, iso) @ R @ se3.make_pose(eye, -iso)
    return se3.make_pose(eye, shift) @ about_iso @ T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_pose(seed, registrar, truth, target, k128, hu):
    T_true, iso = truth
    targets = metrics.grid_targets(hu.center)
    T0 = perturbed(T_true, iso, seed)
    e0 = metrics.pose_errors(T0, T_true, 510.0)
    assert e0["rotation_deg"] == pytest.approx(10.0, abs=1e-6)
    start_mtre = float(metrics.mtre(T0, T_true, targets))
    assert start_mtre > 15.0
    res = registrar.register(target, k128, T0)
    assert isinstance(res, RegistrationResult)
    final = float(metrics.mtre(res.pose, T_true, targets))
    assert final < 0.5, f"start {start_mtre:.1f} mm -> final {final:.3f} mm"
    assert res.converged and not res.failure()
    assert res.iterations < 60
    assert res.similarity > 0.99
    assert res.pose.shape == (4, 4) and res.pose.dtype == torch.float64
    R = res.pose[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)
    assert res.hessian.shape == (6, 6) and bool(torch.isfinite(res.hessian).all())
    assert torch.linalg.eigvalsh(res.hessian).min() > 0  # the pose is observable from the image
    assert len(res.history) == res.iterations and res.seconds > 0
    d = res.as_dict()
    assert d["converged"] is True and len(d["T_ct_source"]) == 4


def test_the_pyramid_ends_at_128_or_256_pixels():
    assert RegistrationConfig().levels == pyramid() == pyramid(128)
    assert [level.width for level in pyramid(128)] == [32, 64, 128]
    fine = pyramid(256)
    assert fine[:3] == pyramid(128) and fine[3].width == 256 and fine[3].voxel_mm == fine[2].voxel_mm
    with pytest.raises(ValueError, match="finest pyramid width"):
        pyramid(512)


def test_a_level_with_its_own_cost_moves_the_pose_and_the_gate_reads_the_registrations(registrar, truth, detector):
    """A level that names a cost (the 256 px level fits gradients) refines the pose; the result's
    similarity, what the gate reads, is the registration's own cost at the final pose on the last
    level that uses it."""
    with pytest.raises(ValueError, match="unknown registration cost"):
        Level(64, 2.0, cost="ssd")
    with pytest.raises(ValueError, match="unknown registration cost"):  # gradient_gain has no sparse form
        Level(128, 1.4, patch=15, sparse=32, cost="gradient_gain")
    assert pyramid(256)[-1].cost == "gradient_gain" and pyramid(256)[-1].remap
    assert all(level.cost is None and not level.remap for level in pyramid(128))
    T_true, iso = truth
    drr = registrar.renderer().render(T_true, detector).reshape(256, 256)
    image = line_integrals_from_transmission(simulate_transmission(drr, rng=np.random.default_rng(3)))
    start = perturbed(T_true, iso, seed=4, angle_deg=2.0, shift_mm=5.0)
    coarse = Level(64, 2.0, 10, patch=8)
    alone = registrar.register(image, detector, start, levels=(coarse,))
    polished = registrar.register(image, detector, start, levels=(coarse, Level(128, 1.4, 4, cost="gradient_ncc")))
    assert not torch.equal(polished.pose, alone.pose)
    gauge = registrar.register(image, detector, polished.pose, levels=(Level(64, 2.0, 0, patch=8),))
    assert gauge.iterations == 0 and polished.similarity == gauge.similarity


def test_a_remapping_level_maps_the_frame_onto_its_own_drr(registrar, truth, detector):
    """A dense level with ``remap`` compares the frame's grey values mapped onto its DRR at its start
    pose: a frame bent by a steep monotone display curve compares as if it were line integrals. The
    pyramid's first level has no DRR of its own (it keeps the caller's map); a sparse level cannot remap."""
    with pytest.raises(ValueError, match="dense level"):
        Level(128, 1.4, patch=15, sparse=32, remap=True)
    T_true, _ = truth
    k = detector.resized(64)
    renderer = registrar.renderer(2.0)
    drr = renderer.render(T_true, k).reshape(64, 64)
    shown = (drr / drr.max()) ** 6  # increasing, far from affine

    def similarity(level, first=False):
        problem = prepare_level(level, first, shown, k, None, T_true, renderer, "ncc", 0.5, 0.0)
        return problem.cost.similarity(problem.residuals(T_true)[0])

    plain, remapped = similarity(Level(64, 2.0, 5)), similarity(Level(64, 2.0, 5, remap=True))
    assert remapped > 0.995 and remapped > plain + 0.1, (plain, remapped)
    assert similarity(Level(64, 2.0, 5, remap=True), first=True) == plain


@pytest.mark.slow
def test_a_256_pixel_level_pins_the_pose_down_better_on_scattered_frames(registrar, hu, detector):
    """Mono16 frames with scatter and heel (physics the DRR lacks), from 3 deg / 10 mm off: ending
    the pyramid at 256 px (1.2 mm pixels) instead of 128 gives a clearly smaller 3D error (on 200
    clinical frames, see docs/performance.md)."""
    targets = metrics.grid_targets(hu.center)
    iso = hu.center + torch.tensor([12.0, -8.0, 18.0], dtype=torch.float64)
    rng = np.random.default_rng(0)
    errors = {128: [], 256: []}
    for i in range(3):
        T = carm_pose(math.radians(-20 + 6 * i), math.radians(-9 + 3 * i), math.radians(4), 760.0 - 5 * i, iso)
        pixels = simulate_transmission(
            registrar.renderer().render(T, detector), rng=rng, clinical=ClinicalFactors(scatter=True)
        )
        frame = line_integrals_from_transmission(pixels)
        start = perturbed(T, iso, seed=i, angle_deg=3.0, shift_mm=10.0)
        for width in errors:
            result = registrar.register(frame, detector, start, levels=pyramid(width))
            assert result.converged and not result.failure()
            errors[width].append(float(metrics.mtre(result.pose, T, targets)))
    assert sum(errors[256]) < 0.75 * sum(errors[128]), errors
    assert max(errors[256]) < 0.3, errors


def test_a_dense_level_renders_each_pose_once(registrar, truth, target, k128, monkeypatch):
    """The outlier check's DRR at a level's start is the image of the level's first render with its
    Jacobian, not a render of its own: one render per level and one per tried step, nothing else."""
    from diffpose_ros.core.rendering.renderer import Renderer

    T_true, iso = truth
    calls = {"render": 0, "render_jacobian": 0}
    for name in calls:
        original = getattr(Renderer, name)

        def counted(self, *args, _original=original, _name=name, **kw):
            calls[_name] += 1
            return _original(self, *args, **kw)

        monkeypatch.setattr(Renderer, name, counted)
    result = registrar.register(target, k128, perturbed(T_true, iso, seed=5, angle_deg=2.0, shift_mm=5.0))
    assert result.converged and registrar.config.outlier_sigma > 0
    assert calls == {"render": 0, "render_jacobian": len(registrar.config.levels) + result.iterations}


@pytest.mark.slow
def test_recovers_pose_from_a_diffdrr_image(registrar, truth, k128, hu, diffdrr_render):
    # Cross-renderer: the target comes from DiffDRR's Siddon (same attenuation), not our own renderer.
    T_true, iso = truth
    image = diffdrr_render(T_true, k128)
    targets = metrics.grid_targets(hu.center)
    res = registrar.register(image, k128, perturbed(T_true, iso, seed=5))
    assert float(metrics.mtre(res.pose, T_true, targets)) < 1.0
    assert not res.failure()


def test_log_domain_image_with_gain_and_offset(registrar, truth, target, k128, hu):
    # NCC ignores an unknown gain and offset (log I0, detector gain): same answer.
    T_true, iso = truth
    res = registrar.register(2.5 * target + 7.0, k128, perturbed(T_true, iso, seed=7))
    assert float(metrics.mtre(res.pose, T_true, metrics.grid_targets(hu.center))) < 0.5


def test_constant_image_is_refused(registrar, truth, k128):
    with pytest.raises(ValueError, match="constant"):
        registrar.register(torch.full((128, 128), 3.0), k128, truth[0])


def test_noise_image_fails(registrar, truth, k128):
    noise = torch.rand(128, 128, generator=torch.Generator().manual_seed(0))
    short = (Level(32, 4.0, 8), Level(64, 2.0, 5, patch=8))
    res = registrar.register(noise, k128, truth[0], levels=short)
    assert res.failure() and res.similarity < 0.3


def test_register_rejects_bad_images(registrar, truth, k128, target):
    bad = target.clone()
    bad[10, 20] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        registrar.register(bad, k128, truth[0])
    inf = target.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError):
        registrar.register(inf, k128, truth[0])
    with pytest.raises(ValueError):
        registrar.register(target[:, :100], k128, truth[0])
    with pytest.raises(ValueError):
        registrar.register(target[None], k128, truth[0])


def test_resample_image():
    img = torch.arange(16.0).reshape(4, 4)
    torch.testing.assert_close(resample_image(img, 2, 2), torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert resample_image(img, 4, 4) is img
    assert resample_image(img, 8, 6).shape == (6, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0, 0] = False
    # A coarse pixel is valid only if everything it averages is.
    assert resample_mask(mask, 2, 2).tolist() == [[False, True], [True, True]]
    assert resample_mask(mask, 4, 4) is mask


@pytest.mark.slow
def test_a_level_at_its_noise_floor_converges(mu, registrar, truth, detector):
    # At the optimum of a noisy frame, the Gauss-Newton model predicts an improvement below
    # cost_tolerance, so the level ends as converged without rendering the step; a trial step that is
    # rendered changes the cost by the renderer's interpolation noise and may be rejected, and one that
    # changes it by less than cost_tolerance ends the level as converged too (else a good registration
    # that meets its iteration cap there would be refused). The step tolerance is set too small to end
    # it here.
    T_true, _ = truth
    drr = registrar.renderer().render(T_true, detector).reshape(256, 256)
    finest = Level(128, 1.4, 1, patch=13)
    strict = Registrar(mu, RegistrationConfig(levels=(finest,), step_tolerance_mm=1e-4), backend="numba")
    skipped = 0
    for seed in range(6):
        frame = simulate_transmission(drr, rng=np.random.default_rng(seed))
        image = line_integrals_from_transmission(frame)
        optimum = registrar.register(image, detector, T_true, levels=(Level(128, 1.4, 6, patch=13),)).pose
        res = strict.register(image, detector, optimum)
        assert res.converged and res.iterations <= 1, res.history
        if res.iterations == 0:
            skipped += 1
            assert torch.equal(res.pose, optimum) and not res.failure()
    assert skipped > 0  # the case this test is about occurred


def test_cost_is_chosen_by_name(mu, truth, target, k128, hu):
    T_true, iso = truth
    with pytest.raises(ValueError, match="unknown registration cost"):
        RegistrationConfig(cost="ssd")
    gradient = Registrar(mu, RegistrationConfig(cost="gradient_ncc"))
    res = gradient.register(target, k128, perturbed(T_true, iso, seed=3, angle_deg=5.0, shift_mm=15.0))
    assert float(metrics.mtre(res.pose, T_true, metrics.grid_targets(hu.center))) < 0.5
    assert not res.failure() and res.similarity > 0.95


def test_a_mask_keeps_spoiled_pixels_out(registrar, truth, target, k128, hu):
    """A third of the frame replaced by something the CT does not hold (e.g. a retractor): with
    the mask marking it invalid the pose is recovered as from the clean frame."""
    T_true, iso = truth
    spoiled = target.clone()
    spoiled[:, 80:] = spoiled.max() * 1.5
    mask = torch.ones(128, 128, dtype=torch.bool)
    mask[:, 80:] = False
    start = perturbed(T_true, iso, seed=4, angle_deg=5.0, shift_mm=15.0)
    res = registrar.register(spoiled, k128, start, mask=mask)
    assert float(metrics.mtre(res.pose, T_true, metrics.grid_targets(hu.center))) < 0.5
    assert not res.failure()
    with pytest.raises(ValueError, match="mask"):
        registrar.register(target, k128, start, mask=mask[:64])


@pytest.mark.slow
def test_the_robust_cost_ignores_a_rod_that_the_plain_one_follows(mu, truth, hu, detector):
    """Two steel rods (not in the CT) across a frame: with the outlier rejection the pose is the
    clean frame's, without it the rods pull it; the share left out is reported."""
    from diffpose_ros.core.simulation.clinical import metal_rods

    T_true, iso = truth
    renderer = Registrar(mu).renderer()
    clean = renderer.render(T_true, detector).reshape(256, 256)
    rods = metal_rods((1, 256, 256), torch.tensor([3]), torch.Generator().manual_seed(11))[0].float()
    frame = clean + 2 * rods
    start = perturbed(T_true, iso, seed=6, angle_deg=4.0, shift_mm=10.0)
    targets = metrics.grid_targets(hu.center)
    robust = Registrar(mu).register(frame, detector, start)
    plain = Registrar(mu, RegistrationConfig(outlier_sigma=0.0)).register(frame, detector, start)
    robust_error = float(metrics.mtre(robust.pose, T_true, targets))
    plain_error = float(metrics.mtre(plain.pose, T_true, targets))
    assert robust_error < 0.3 and plain_error > 2 * robust_error, (robust_error, plain_error)
    assert 0.01 < robust.outlier_fraction < 0.2 and plain.outlier_fraction == 0.0


def test_feature_patches_take_strong_edges_inside_the_valid_pixels():
    """Greedy, non-overlapping windows of the largest mean gradient, wholly inside the mask."""
    image = torch.zeros(64, 64)
    image[:, 40:] = 1.0  # one strong vertical edge at u = 39.5
    image[10:20, 5:15] += 0.2 * torch.rand(10, 10, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(64, 64, dtype=torch.bool)
    valid[:32] = False  # the upper half is outside the field
    centres = feature_patches(image, valid, 6, 9)
    assert 1 <= len(centres) <= 6
    u, v = centres[0].tolist()
    assert 35 <= u <= 44 and v >= 32 + 4  # the edge, in the valid half
    boxes = [(c[0] - 4, c[1] - 4) for c in centres.tolist()]
    for a in range(len(boxes)):
        assert bool(valid[boxes[a][1] : boxes[a][1] + 9, boxes[a][0] : boxes[a][0] + 9].all())
        for b in range(a):  # no two patches overlap
            assert abs(boxes[a][0] - boxes[b][0]) >= 9 or abs(boxes[a][1] - boxes[b][1]) >= 9
    assert len(feature_patches(image, torch.zeros(64, 64, dtype=torch.bool), 6, 9)) == 0
    with pytest.raises(ValueError, match="sparse level"):
        Level(128, 1.4, sparse=8)


def test_a_sparse_level_refines_a_near_pose_from_a_few_patches(registrar, truth, detector, hu):
    """Tracking's level: 24 feature patches of 13^2 at 128 px (a fifth of the pixels) recover a pose
    2 deg / 3 mm off as well as the dense level does, in as many steps."""
    T_true, iso = truth
    frame = registrar.renderer().render(T_true, detector)
    start = perturbed(T_true, iso, seed=3, angle_deg=1.0, shift_mm=3.0)
    targets = metrics.grid_targets(hu.center)
    sparse = registrar.register(frame, detector, start, levels=(Level(128, 1.4, 10, patch=13, sparse=24),))
    dense = registrar.register(frame, detector, start, levels=(Level(128, 1.4, 10, patch=13),))
    errors = [float(metrics.mtre(r.pose, T_true, targets)) for r in (sparse, dense)]
    assert float(metrics.mtre(start, T_true, targets)) > 3.0
    assert sparse.converged and sparse.similarity > 0.99 and errors[0] < 0.2, errors
    assert sparse.residuals < dense.residuals / 3


def test_a_deadline_stops_stepping_once_the_pose_settles(registrar, truth, detector, hu):
    """A tracking level whose deadline has passed stops after the first accepted step that moves the
    pose by less than ``deadline_step_mm``, trusted (out of time, not converged): from a near start
    that saves steps at a few hundredths of a millimetre; from a far one it steps on until the pose
    settles. A deadline far ahead changes nothing."""
    T_true, iso = truth
    frame = registrar.renderer().render(T_true, detector)
    targets = metrics.grid_targets(hu.center)
    level = (Level(128, 1.4, 10, patch=13, sparse=24),)
    near = perturbed(T_true, iso, seed=5, angle_deg=0.2, shift_mm=0.6)
    free = registrar.register(frame, detector, near, levels=level)
    late = registrar.register(frame, detector, near, levels=level, deadline=0.0)
    assert free.converged and not free.out_of_time
    assert late.out_of_time and not late.converged and late.failure() == ""
    assert late.iterations < free.iterations
    errors = [float(metrics.mtre(T, T_true, targets)) for T in (near, late.pose, free.pose)]
    assert errors[0] > 0.5 and errors[1] < 0.1, errors
    far = perturbed(T_true, iso, seed=3, angle_deg=1.0, shift_mm=3.0)
    settled = registrar.register(frame, detector, far, levels=level, deadline=0.0)
    assert float(metrics.mtre(far, T_true, targets)) > 2.5
    assert settled.iterations >= 3 and float(metrics.mtre(settled.pose, T_true, targets)) < 0.1
    ahead = registrar.register(frame, detector, near, levels=level, deadline=float("inf"))
    assert torch.equal(ahead.pose, free.pose) and not ahead.out_of_time


def test_a_sparse_level_runs_on_the_torch_backend_as_on_numba(mu_coarse, truth, detector):
    """The GPU path (the torch backend, here on the CPU) refines on sparse patches to the pose numba finds."""
    T_true, iso = truth
    config = RegistrationConfig(levels=(Level(64, 2.0, 6, patch=9, sparse=8),))
    k = detector.resized(64)
    start = perturbed(T_true, iso, seed=4, angle_deg=0.5, shift_mm=1.5)
    results = []
    for backend in ("numba", "torch"):
        registrar = Registrar(mu_coarse, config, backend=backend)
        results.append(registrar.register(registrar.renderer().render(T_true, k), k, start))
    assert results[0].residuals == results[1].residuals
    assert float(metrics.mtre(results[0].pose, results[1].pose, metrics.grid_targets(iso))) < 0.05
