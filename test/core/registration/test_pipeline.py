"""The intraoperative pipeline: frame preparation, CNN start, refinement, gate, tracking, covariance,
frame warping, the DRR and overlay at a pose."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffpose_ros.core.frames.prepare import Frame, prepare_frame, warp_to_camera
from diffpose_ros.core.geometry import metrics, se3
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose, perturb_pose
from diffpose_ros.core.registration.pipeline import Pipeline, PipelineConfig, set_torch_threads
from diffpose_ros.core.registration.result import covariance_in_parent
from diffpose_ros.core.simulation.detector import simulate_transmission


@pytest.fixture(scope="module")
def camera():
    return Intrinsics.from_detector(1020, 256, 256, 1.2)


@pytest.fixture(scope="module")
def frames(pipeline, camera, mu):
    """Three consecutive prepared frames (mono16 with noise) near the reference view, and their poses."""
    ref = pipeline.regressor.decode(torch.zeros(1, 9))[0].double()
    g = torch.Generator().manual_seed(4)
    poses = [perturb_pose(ref, 4.0, 12.0, mu.center, g)]
    poses += [perturb_pose(poses[-1], 0.5, 1.5, mu.center, g) for _ in range(2)]
    import numpy as np

    rng = np.random.default_rng(0)
    with torch.no_grad():
        images = [
            prepare_frame(simulate_transmission(pipeline.render(T, camera), rng=rng), "transmission", camera)
            for T in poses
        ]
    return images, poses


def test_cold_then_tracking(pipeline, frames, camera, mu):
    images, poses = frames
    targets = metrics.grid_targets(mu.center)
    pipeline.reset_tracking()
    first = pipeline.process(images[0], stamp=10.0)
    assert first.accepted and first.mode == "cold", first.reason
    assert float(metrics.mtre(first.pose, poses[0], targets)) < 1.0
    second = pipeline.process(images[1], stamp=10.1)
    assert second.accepted and second.mode == "tracking"
    assert float(metrics.mtre(second.pose, poses[1], targets)) < 1.0
    assert second.iterations < first.iterations
    assert (first.start, second.start) == ("cnn", "predicted")
    assert set(first.timings) == {"preprocess", "cnn", "start", "refine", "total"} and second.timings["cnn"] == 0.0
    # Too old for tracking: cold again.
    third = pipeline.process(images[2], stamp=20.0)
    assert third.mode == "cold" and third.accepted


def test_covariance_is_positive_definite_and_grows_with_less_information(pipeline, frames, camera):
    images, _ = frames
    pipeline.reset_tracking()
    full = pipeline.process(images[0], track=False)
    eig = torch.linalg.eigvalsh(full.covariance)
    assert bool(torch.isfinite(full.covariance).all()) and float(eig.min()) > 0
    # A heavily blurred frame constrains the pose less: a larger covariance.
    blurred = torch.nn.functional.avg_pool2d(images[0].image[None, None], 9, stride=1, padding=4)[0, 0]
    vague = pipeline.process(prepare_frame(blurred, "line_integrals", camera), track=False)
    assert float(torch.det(vague.covariance)) > float(torch.det(full.covariance))
    assert torch.equal(full.covariance, full.covariance.T)  # a covariance, not a float32 Gram's rounding
    parent = covariance_in_parent(full.pose, full.covariance)
    # A rotation keeps the eigenvalues; float64 eigvalsh is backward stable, so each one is good to a
    # small multiple of n * eps * |C| (absolute: the smallest are 1e8 times smaller than the largest).
    bound = 64 * torch.finfo(torch.float64).eps * float(eig.max())
    torch.testing.assert_close(torch.linalg.eigvalsh(parent), eig, rtol=0, atol=bound)


def test_gate_rejects_a_frame_of_another_anatomy(pipeline, camera):
    noise = torch.rand(256, 256, generator=torch.Generator().manual_seed(0)) + 1
    result = pipeline.process(prepare_frame(noise, "transmission", camera), track=False)
    assert not result.accepted and result.reason


@pytest.mark.parametrize("cost", ["mixed", "ncc", "gradient_ncc"])
def test_a_frame_with_too_few_valid_pixels_is_refused_with_its_reason(pipeline, frames, camera, cost):
    """A 10x10 valid block of a 256^2 frame vanishes at the 32 px level: refused, tracking ended."""
    images, _ = frames
    mask = torch.zeros(256, 256, dtype=torch.bool)
    mask[120:130, 120:130] = True
    tiny = Frame(images[1].image, camera, mask)
    config = dataclasses.replace(pipeline.config, cold=dataclasses.replace(pipeline.config.cold, cost=cost))
    strict = Pipeline(pipeline.model, config=config)
    assert strict.process(images[0], stamp=1.0).accepted
    result = strict.process(tiny, stamp=1.1)
    assert not result.accepted and result.path == "tracking>cold", result.path
    assert "cannot register this frame" in result.reason and "too few to register" in result.reason
    assert strict.predicted_pose(1.2) is None  # a refused frame ends tracking


def test_bad_frames_raise_value_errors(camera):
    with pytest.raises(ValueError, match="constant"):
        prepare_frame(torch.ones(256, 256), "transmission", camera)
    bad = torch.rand(256, 256)
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prepare_frame(bad, "line_integrals", camera)
    with pytest.raises(ValueError, match="intrinsics"):
        prepare_frame(torch.rand(128, 256), "transmission", camera)
    with pytest.raises(ValueError, match="negative"):
        prepare_frame(torch.rand(256, 256) - 0.5, "transmission", camera)
    with pytest.raises(ValueError, match="unknown frame kind"):
        prepare_frame(torch.rand(256, 256), "jpeg", camera)
    with pytest.raises(ValueError, match="mask"):
        Frame(torch.rand(256, 256), camera, torch.zeros(256, 256, dtype=torch.bool))


def test_prepare_frame_unmirrors_image_and_intrinsics(renderer, clinical_pose):
    """A device that mirrors delivers column j at W - 1 - j and says so in its intrinsics: the
    prepared frame is the unmirrored view with the camera that rendered it, off-centre or not."""
    camera = Intrinsics(160, 120, 700.0, 700.0, 101.0, 47.5)  # principal point 21.5 px right of centre
    with torch.no_grad():
        view = renderer.render(clinical_pose, camera)
    delivered = view.flip(-1)
    frame = prepare_frame(delivered, "line_integrals", camera.mirrored(), mirror=True)
    assert frame.intrinsics == camera
    torch.testing.assert_close(frame.image, view.float())
    assert frame.mask.all() and frame.valid_fraction == 1.0 and frame.prepare_seconds >= 0
    # Transmission frames: -log of the delivered counts, flipped back with the same camera.
    counts = torch.exp(-view).flip(-1) * 4000
    again = prepare_frame(counts.numpy(), "transmission", camera.mirrored(), mirror=True)
    assert again.intrinsics == camera
    assert float(torch.corrcoef(torch.stack([again.image.flatten(), view.float().flatten()]))[0, 1]) > 0.999


def test_render_and_overlay_at_a_pose(pipeline, frames, camera):
    images, poses = frames
    drr = pipeline.render(poses[0], camera)
    assert drr.shape == (256, 256) and drr.device.type == "cpu"
    picture = pipeline.overlay(images[0], poses[0], width=128)
    assert picture.shape == (128, 128, 3) and picture.dtype.name == "uint8"
    green = (picture[..., 1] == 255) & (picture[..., 0] == 0) & (picture[..., 2] == 0)
    assert 0.005 < float(green.mean()) < 0.3  # the DRR's edges are drawn, not the whole image


def test_warp_to_camera_is_exact_for_a_rendered_scene(renderer, clinical_pose):
    # A 200x160 detector with an off-centre principal point and another pixel size, warped into a
    # 64x64 working camera, matches a direct render in that camera.
    device = Intrinsics(200, 160, 900.0, 900.0, 110.0, 70.0)
    work = Intrinsics.from_detector(1020, 256, 256, 1.2).resized(64)
    with torch.no_grad():
        seen = renderer.render(clinical_pose, device)
        direct = renderer.render(clinical_pose, work)
    warped = warp_to_camera(seen, device, work)
    # Compare where the device actually saw the scene (its field of view inside the working camera).
    u = torch.arange(64.0)
    us = device.fx * (u - work.cx) / work.fx + device.cx
    vs = device.fy * (u - work.cy) / work.fy + device.cy
    cols = (us > 1) & (us < device.width - 2)
    rows = (vs > 1) & (vs < device.height - 2)
    a, b = warped[rows][:, cols], direct[rows][:, cols]
    ncc = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std(unbiased=False) * b.std(unbiased=False)))
    assert ncc > 0.99
    assert math.isclose(float(a.mean()), float(b.mean()), rel_tol=0.03)


def _prepared(pipeline, poses, camera, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        return [
            prepare_frame(simulate_transmission(pipeline.render(T, camera), rng=rng), "transmission", camera)
            for T in poses
        ]


@pytest.fixture(scope="module")
def run(pipeline, camera, mu):
    """A C-arm moving at constant velocity, 7.5 frames per second: ``T_i = T_0 exp(i xi)`` (1.2 mm and
    0.4 deg per frame in the source frame), near the reference view; prepared frames and poses."""
    ref = pipeline.regressor.decode(torch.zeros(1, 9))[0].double()
    first = perturb_pose(ref, 3.0, 8.0, mu.center, torch.Generator().manual_seed(5))
    xi = torch.tensor([0.8, -0.6, 0.6, 0.004, -0.005, 0.002], dtype=torch.float64)
    poses = [first @ se3.exp(i * xi) for i in range(6)]
    return _prepared(pipeline, poses, camera, 1), poses


TRACKING_FLOOR_MM = 1.0
"""Largest 3D error of a tracked pose on these noisy frames from any start in the sparse level's basin:
its optimum depends on which 32 patches the start's DRR picks (0.04-0.87 mm, p90 0.46 mm, over 96
frames from the unpredicted start on a Zen 4 under its native, AVX2 and generic code paths)."""


@pytest.mark.slow
def test_prediction_starts_nearer_and_never_makes_an_accepted_pose_worse(pipeline, run, camera, mu, monkeypatch):
    """Three noisy tracks of the same motion: from the third frame on, the predicted start is less than
    half as far off, and the pose refined from it is as good: every one within the sparse level's
    noise floor and no worse than the start without prediction, and their mean within 0.1 mm of the
    unpredicted poses' mean (on 96 frames, 0.182 mm against 0.228 mm; a fixed track of four differs
    by up to +0.16 mm, three tracks by about a third of that)."""
    images, poses = run
    tracks = [images] + [_prepared(pipeline, poses, camera, seed) for seed in (2, 3)]
    targets = metrics.grid_targets(mu.center)
    finals = {True: [], False: []}
    for images in tracks:
        rows = {}
        for predict in (True, False):
            monkeypatch.setattr(pipeline, "config", dataclasses.replace(pipeline.config, predict=predict))
            pipeline.reset_tracking()
            rows[predict] = []
            for i, (frame, T) in enumerate(zip(images, poses)):
                r = pipeline.process(frame, stamp=100.0 + i / 7.5)
                rows[predict].append(
                    (r, float(metrics.mtre(r.initial_pose, T, targets)), float(metrics.mtre(r.pose, T, targets)))
                )
        for i in range(2, len(images)):  # from the third frame, two accepted poses give a velocity
            (rp, start_p, final_p), (ru, start_u, final_u) = rows[True][i], rows[False][i]
            assert rp.accepted and ru.accepted and rp.path == "tracking" and ru.path == "tracking", (
                rp.reason,
                ru.reason,
            )
            assert start_p < 0.5 * start_u, (i, start_p, start_u)
            assert final_p <= start_u and final_p < TRACKING_FLOOR_MM, (i, final_p, final_u, start_u)
            finals[True].append(final_p)
            finals[False].append(final_u)
    mean = {k: sum(v) / len(v) for k, v in finals.items()}
    assert mean[True] < mean[False] + 0.1, finals


@pytest.mark.slow
def test_a_deadline_cuts_tracking_short_and_leaves_cold_starts_alone(pipeline, run, mu):
    """With its deadline passed, each tracked frame stops once its pose settles: fewer steps, about
    the same error as without a deadline (these frames are noisy); the cold start is not cut."""
    images, poses = run
    targets = metrics.grid_targets(mu.center)
    pipeline.reset_tracking()
    dt = 1 / 7.5
    results = [pipeline.process(images[i], stamp=400.0 + i * dt, deadline=0.0) for i in range(4)]
    assert [r.path for r in results] == ["cold", "tracking", "tracking", "tracking"]
    assert not results[0].out_of_time and results[0].converged  # the deadline is for tracking only
    pipeline.reset_tracking()
    free = [pipeline.process(images[i], stamp=500.0 + i * dt) for i in range(4)]
    for r, f, T in zip(results[1:], free[1:], poses[1:4]):
        assert r.accepted and r.out_of_time and not r.converged, r.reason
        late, unhurried = float(metrics.mtre(r.pose, T, targets)), float(metrics.mtre(f.pose, T, targets))
        assert f.accepted and f.converged and late < unhurried + 0.15 and late < 0.6, (late, unhurried)
    assert sum(r.iterations for r in results[1:]) < sum(f.iterations for f in free[1:])


@pytest.mark.slow
def test_tracking_falls_back_after_a_jump_and_starts_cold_after_a_rejected_frame(pipeline, run, camera, mu):
    images, poses = run
    targets = metrics.grid_targets(mu.center)
    ref = pipeline.regressor.decode(torch.zeros(1, 9))[0].double()
    elsewhere = perturb_pose(ref, 4.0, 10.0, mu.center, torch.Generator().manual_seed(9))
    assert float(metrics.mtre(elsewhere, poses[2], targets)) > 15.0
    jump = _prepared(pipeline, [elsewhere], camera, 2)[0]
    pipeline.reset_tracking()
    dt = 1 / 7.5
    assert [pipeline.process(images[i], stamp=300.0 + i * dt).path for i in range(3)] == [
        "cold",
        "tracking",
        "tracking",
    ]
    result = pipeline.process(jump, stamp=300.0 + 3 * dt)
    assert result.accepted and result.path.startswith("tracking>") and result.mode in ("pyramid", "cold"), result.path
    assert float(metrics.mtre(result.pose, elsewhere, targets)) < 1.0
    # A rejected frame ends the track: the next frame starts from the CNN, not from the last pose.
    noise = torch.rand(256, 256, generator=torch.Generator().manual_seed(0)) + 1
    rejected = pipeline.process(prepare_frame(noise, "transmission", camera), stamp=300.0 + 4 * dt)
    assert not rejected.accepted and rejected.path.startswith("tracking>pyramid>cold")  # >multistart if time allows
    after = pipeline.process(images[5], stamp=300.0 + 5 * dt)
    assert after.accepted and after.path == "cold"


def test_torch_threads_for_a_pipeline():
    """One torch thread on the CPU unless asked for more (the renderer has threads of its own);
    torch's own choice left alone for a GPU."""
    before = torch.get_num_threads()
    try:
        assert set_torch_threads("cpu") == 1
        assert set_torch_threads(torch.device("cpu"), 3) == 3
        assert set_torch_threads("cuda") == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_the_renderer_backend_is_a_choice_of_the_config(pipeline):
    assert pipeline.registrar.renderer().backend == "numba"  # auto, on the CPU
    chosen = Pipeline(pipeline.model, config=PipelineConfig(renderer="torch"))
    assert {chosen.registrar.renderer(level.voxel_mm).backend for level in chosen.config.cold.levels} == {"torch"}
    with pytest.raises(ValueError, match="unknown renderer backend"):
        PipelineConfig(renderer="opengl")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Pipeline(pipeline.model, config=PipelineConfig(renderer="cuda"))


@pytest.mark.slow
@pytest.mark.parametrize("scores", [(0.05, 0.30), (0.30, 0.25)])
def test_unclear_polarity_scores_leave_the_decision_to_the_refinements(pipeline, camera, mu, monkeypatch, scores):
    """Start scores that cannot be trusted, favouring the other polarity or the configured one within
    the margin (as on a frame the CNN hardly knows): the upright frame is registered as it is, the
    inverted one refused with both refined similarities."""
    import numpy as np

    from diffpose_ros.core.registration import pipeline as module
    from diffpose_ros.core.simulation.clinical import ClinicalFactors

    monkeypatch.setattr(module, "polarity_scores", lambda *args: scores)
    ref = pipeline.regressor.decode(torch.zeros(1, 9))[0].double()
    truth = perturb_pose(ref, 3.0, 8.0, mu.center, torch.Generator().manual_seed(2))
    drr = pipeline.render(truth, camera)
    frames = {}
    for name, factors in (("upright", "display"), ("inverted", "display,inverted")):
        pixels = simulate_transmission(
            drr, dtype="uint8", rng=np.random.default_rng(3), clinical=ClinicalFactors.parse(factors)
        )
        frames[name] = prepare_frame(pixels, "transmission", camera)
    upright = pipeline.process(frames["upright"], track=False)
    assert upright.accepted and upright.polarity == "bones_dark", upright.reason
    assert float(metrics.mtre(upright.pose, truth, metrics.grid_targets(mu.center))) < 1.0
    inverted = pipeline.process(frames["inverted"], track=False)
    assert not inverted.accepted
    assert inverted.reason.startswith("frame polarity looks inverted (refined similarity bones_bright"), inverted.reason
    assert "against bones_dark" in inverted.reason and inverted.polarity_scores == scores


@pytest.mark.slow
@pytest.mark.parametrize(
    "far",
    [(0.0, 0.0, 0.0, 0.0, 0.0, 0.6), (0.0, 0.0, 120.0, 0.15, 0.0, 0.0)],
    ids=["roll 34 deg: no convergence", "depth 120 mm: polarity unclear"],
)
def test_a_cold_start_from_a_poor_estimate_recovers_through_the_multistart(pipeline, camera, mu, monkeypatch, far):
    """A CNN estimate outside the pyramid's basin (an upright frame then fails to converge, or is even
    taken for inverted) gets a second chance: the multistart ranks its starts (here the failed
    refinement's pose and one move that leads back to the truth) and the frame is posed, saying which
    start won. Without a budget there is no second chance."""
    import numpy as np

    from diffpose_ros.core.registration import multistart

    ref = pipeline.regressor.decode(torch.zeros(1, 9))[0].double()
    truth = perturb_pose(ref, 2.0, 5.0, mu.center, torch.Generator().manual_seed(6))
    far = torch.tensor(far, dtype=torch.float64)
    poor = truth @ se3.exp(-far)
    monkeypatch.setattr(pipeline, "_cnn", lambda frame: torch.stack([poor, poor]))
    monkeypatch.setattr(multistart, "OFFSETS", (("back to the truth", tuple(far.tolist())),))
    pixels = simulate_transmission(pipeline.render(truth, camera), rng=np.random.default_rng(1))
    frame = prepare_frame(pixels, "transmission", camera)
    monkeypatch.setattr(pipeline, "config", dataclasses.replace(pipeline.config, multistart_budget_s=0.0))
    alone = pipeline.process(frame, track=False)
    assert not alone.accepted and alone.path == "cold" and alone.start == "cnn"
    monkeypatch.setattr(pipeline, "config", dataclasses.replace(pipeline.config, multistart_budget_s=60.0))
    rescued = pipeline.process(frame, track=False)
    assert rescued.accepted, rescued.reason
    assert rescued.path == "cold>multistart" and rescued.mode == "multistart" and rescued.polarity == "bones_dark"
    assert rescued.start == "back to the truth" and rescued.as_dict()["start"] == rescued.start
    assert float(metrics.mtre(rescued.pose, truth, metrics.grid_targets(mu.center))) < 2.0


def test_the_multistart_ranks_what_its_budget_allows(registrar, mu, camera):
    """No start when the budget cannot hold one more pyramid; with a generous one, the failed
    refinement's own pose and every move are ranked, and the winner is refined through the pyramid."""
    from diffpose_ros.core.registration.multistart import OFFSETS, multistart
    from diffpose_ros.core.registration.registrar import RegistrationResult

    truth = carm_pose(math.radians(10.0), math.radians(-5.0), 0.0, 760.0, mu.center)
    image = registrar.renderer().render(truth, camera)
    poor = truth @ se3.exp(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5], dtype=torch.float64))
    failed = RegistrationResult(truth, 0.2, 10, 1.0, False, torch.zeros(6, 6, dtype=torch.float64))
    assert multistart(registrar, image, camera, None, poor, failed, budget_s=1.0) is None
    generous = multistart(registrar, image, camera, None, poor, failed, budget_s=600.0)
    assert generous.tried == 1 + len(OFFSETS) and generous.name in ("refined", *dict(OFFSETS))
    assert float(metrics.mtre(generous.result.pose, truth, metrics.grid_targets(mu.center))) < 0.1
    unrefined = multistart(registrar, image, camera, None, poor, None, budget_s=600.0)
    assert unrefined.tried == len(OFFSETS) and unrefined.name in dict(OFFSETS)


def test_a_pose_outside_the_models_views_is_flagged_and_still_gated(pipeline, camera, mu):
    """The fixture's model records no views, so it is an ``ap`` model: a lateral frame registered
    from its truth is posed, and flagged as outside the views its CNN was trained on."""
    import math

    import numpy as np

    from diffpose_ros.core.geometry.camera import carm_pose

    assert pipeline.model.views.name == "ap"
    for alpha, inside in ((10.0, True), (90.0, False)):
        truth = carm_pose(math.radians(alpha), math.radians(5.0), 0.0, 750.0, mu.center)
        pixels = simulate_transmission(pipeline.render(truth, camera), rng=np.random.default_rng(2))
        result = pipeline.process(prepare_frame(pixels, "transmission", camera), initial_pose=truth)
        assert result.accepted, result.reason
        assert result.in_view_range is inside and result.as_dict()["in_view_range"] is inside


@pytest.mark.slow
def test_tracking_follows_a_swing_of_eight_degrees_a_frame(pipeline, camera, mu):
    """A C-arm swung fast about the patient (8 deg of orbit per frame at 7.5 Hz: 90 deg in 1.5 s):
    after the cold start every frame is tracked from the predicted pose (the second frame's is the
    last pose: no velocity yet), none falls back to the CNN, and every pose is within the tracking
    floor."""
    import math

    from diffpose_ros.core.geometry.camera import carm_pose

    alphas = [0.0, 8.0, 16.0, 24.0, 32.0]
    poses = [carm_pose(math.radians(a), math.radians(5.0), 0.0, 750.0, mu.center) for a in alphas]
    frames = _prepared(pipeline, poses, camera, 3)
    targets = metrics.grid_targets(mu.center)
    pipeline.reset_tracking()
    results = [pipeline.process(frame, stamp=100.0 + i / 7.5) for i, frame in enumerate(frames)]
    assert [r.accepted for r in results] == [True] * len(alphas), [r.reason for r in results]
    assert results[0].mode == "cold" and all(r.mode in ("tracking", "pyramid") for r in results[1:])
    assert all(r.start == "predicted" for r in results[1:])
    errors = [float(metrics.mtre(r.pose, T, targets)) for r, T in zip(results, poses)]
    assert max(errors) < TRACKING_FLOOR_MM, errors
