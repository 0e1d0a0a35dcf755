"""Patient model: pose sampling, augmentations, the regressor, a few training steps, the bundle file."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import pytest
import roma
import torch
from safetensors.torch import save_file

from diffpose_ros.core.geometry import se3
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
from diffpose_ros.core.model.augment import AugmentConfig, augment
from diffpose_ros.core.model.bundle import PatientModel, PatientModelError, load_patient_model, save_patient_model
from diffpose_ros.core.model.regressor import PoseRegressor
from diffpose_ros.core.model.sampling import ViewRange, sample_views
from diffpose_ros.core.model.train import TrainConfig, Trainer, _turns
from diffpose_ros.core.registration.similarity import ncc


def _view_parameters(poses, center):
    """Recover (alpha, beta, gamma, sod) of contract views: z_src = Rz(a) Rx(b) (0, 1, 0)."""
    R = poses[:, :3, :3]
    z = R[:, :, 2]
    beta = torch.asin(z[:, 2].clamp(-1, 1))
    alpha = torch.atan2(-z[:, 0], z[:, 1])
    x = R[:, :, 0]
    # x_src = M Rz(g) e1 = cos g M e1 + sin g M e2 with M = Rz(a) Rx(b) B,
    # M e1 = Rz(a) e1, M e2 = Rz(a) Rx(b) (0, 0, -1)
    ca, sa, cb, sb = torch.cos(alpha), torch.sin(alpha), torch.cos(beta), torch.sin(beta)
    y_base = torch.stack([-sa * sb, ca * sb, -cb], -1)
    x_base = torch.stack([ca, sa, torch.zeros_like(ca)], -1)
    gamma = torch.atan2((x * y_base).sum(-1), (x * x_base).sum(-1))
    return alpha, beta, gamma


def test_sampling_covers_the_configured_ranges_and_is_deterministic():
    vr = ViewRange((-30, 30), (-20, 20), (-10, 10), (650, 850), (40, 40, 40))
    center = torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)
    poses, params = sample_views(vr, 4000, center, torch.Generator().manual_seed(3))
    again, _ = sample_views(vr, 4000, center, torch.Generator().manual_seed(3))
    torch.testing.assert_close(poses, again)
    deg = torch.rad2deg(params[:, :3])
    for col, (lo, hi) in enumerate([vr.alpha_deg, vr.beta_deg, vr.gamma_deg]):
        assert float(deg[:, col].min()) >= lo and float(deg[:, col].max()) <= hi
        assert float(deg[:, col].min()) < lo + 1 and float(deg[:, col].max()) > hi - 1  # covered to the edges
    assert float(params[:, 3].min()) >= 650 and float(params[:, 3].max()) <= 850
    iso = params[:, 4:] - center
    assert float(iso.abs().max()) <= 40 and float(iso.abs().max()) > 39
    # The poses are the contract's views: recover the angles from the matrices themselves.
    alpha, beta, gamma = _view_parameters(poses, center)
    torch.testing.assert_close(alpha, params[:, 0], atol=1e-9, rtol=0)
    torch.testing.assert_close(beta, params[:, 1], atol=1e-9, rtol=0)
    torch.testing.assert_close(gamma, params[:, 2], atol=1e-9, rtol=0)
    # The isocentre lies on the principal ray at distance SOD from the source.
    src, z = poses[:, :3, 3], poses[:, :3, 2]
    torch.testing.assert_close(src + params[:, 3:4] * z, params[:, 4:], atol=1e-9, rtol=0)


def test_view_range_rejects_bad_config():
    with pytest.raises(ValueError, match="alpha_deg"):
        ViewRange((10, -10), (0, 0), (0, 0), (700, 800), (0, 0, 0))
    with pytest.raises(ValueError, match="unknown"):
        ViewRange.from_dict({"alpha": [0, 1]}, ViewRange((-1, 1), (0, 0), (0, 0), (700, 800), (0, 0, 0)))


def test_augment_is_seeded_and_changes_images():
    x = torch.rand(4, 32, 32) * 3
    a = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    b = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert float((a - x).abs().mean()) > 0.01
    # Without noise, blur, gamma, offsets or occluders the line integrals come back unchanged (up to log/Poisson).
    quiet = AugmentConfig(
        i0=(1e9, 1e9),
        gamma=(1, 1),
        blur_px=(0, 0),
        collimation=(0, 0),
        erase=0.0,
        offset=(0, 0),
        metal=0.0,
        scatter=0.0,
        display=0.0,
        round_field=0.0,
        monotone=0.0,
        local_contrast=0.0,
    )
    torch.testing.assert_close(augment(x, quiet, torch.Generator().manual_seed(0)), x, atol=2e-3, rtol=0)


QUIET = dict(i0=(1e7, 1e7), gamma=(1, 1), blur_px=(0, 0), collimation=(0, 0), erase=0.0, offset=(0, 0))
OFF = dict(metal=0.0, scatter=0.0, display=0.0, round_field=0.0, monotone=0.0, local_contrast=0.0)


@pytest.mark.parametrize("family", ["ii", "fp"])
def test_clinical_augmentations_each_change_what_the_network_sees(family):
    """Each clinical factor of each family, and each randomisation beyond them, alone and always on,
    changes the images (seeded, finite), and a family's factor differs from the other's; a field
    leaves its outside at one value, the inside's mean, as the pipeline fills it before the CNN."""
    x = torch.rand(1, 48, 48).repeat(6, 1, 1) * 2
    plain = augment(x, AugmentConfig(**QUIET, **OFF, families=(family,)), torch.Generator().manual_seed(3))
    other = "fp" if family == "ii" else "ii"
    for factor in OFF:
        config = AugmentConfig(**QUIET, **{**OFF, factor: 1.0}, families=(family,))
        a = augment(x, config, torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, augment(x, config, torch.Generator().manual_seed(3)))
        assert torch.isfinite(a).all() and float((a - plain).abs().mean()) > 0.01, factor
        if factor in ("metal", "scatter", "display", "round_field"):
            elsewhere = augment(x, dataclasses.replace(config, families=(other,)), torch.Generator().manual_seed(3))
            assert float((a - elsewhere).abs().mean()) > 0.01, factor
    field = augment(x, AugmentConfig(**QUIET, **{**OFF, "round_field": 1.0}), torch.Generator().manual_seed(3))
    corners = field[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners, corners[:, :1].expand_as(corners))


def test_both_families_are_drawn_and_the_families_are_checked():
    x = torch.rand(1, 48, 48).repeat(32, 1, 1) * 2
    display = dict(QUIET, **{**OFF, "display": 1.0})
    both = augment(x, AugmentConfig(**display), torch.Generator().manual_seed(4))
    only = {
        f: augment(x, AugmentConfig(**display, families=(f,)), torch.Generator().manual_seed(4)) for f in ("ii", "fp")
    }
    # the flat panel's chain keeps 10-bit levels, the image intensifier's 8-bit ones: each image is one or the other
    levels = [len(torch.unique(image)) for image in both]
    assert AugmentConfig().families == ("ii", "fp") and min(levels) < max(levels)
    assert not torch.equal(both, only["ii"]) and not torch.equal(both, only["fp"])
    with pytest.raises(ValueError, match="families"):
        AugmentConfig(families=("ct",))
    with pytest.raises(ValueError, match="families"):
        AugmentConfig(families=())
    assert AugmentConfig.from_dict({"families": ["fp"]}).families == ("fp",)


def test_the_random_monotone_map_keeps_the_order_of_line_integrals():
    from diffpose_ros.core.model.augment import _local_contrast, _monotone

    x = torch.rand(8, 32, 32) * 3
    mapped = _monotone(x, torch.ones(8, dtype=torch.bool), torch.Generator().manual_seed(0))
    order = x.flatten(1).argsort(1)
    assert bool((mapped.flatten(1).gather(1, order).diff(dim=1) >= 0).all())
    assert not torch.allclose(mapped, x, atol=0.05)
    torch.testing.assert_close(mapped.flatten(1).amax(1), x.flatten(1).amax(1))  # [0, max] onto itself
    off = torch.zeros(8, dtype=torch.bool)
    assert torch.equal(_monotone(x, off, None), x) and torch.equal(_local_contrast(x, off, None), x)


def test_turning_a_pool_render_is_the_exact_view_of_the_turned_camera(trainer):
    """Roll about the principal ray and aim (tilt about the focal spot) are homographies of the render."""
    poses = trainer._views(4, roll=False)
    big = trainer._render(poses, trainer.pool_camera, trainer.renderers[0])
    # The extreme turns of the configured range: roll +-11 deg, aim 1.5 deg in four directions.
    roll, aim = math.radians(11.0), math.radians(1.5)
    aims = torch.tensor([[aim, 0, 0], [0, aim, 0], [-aim, 0, 0], [0, -aim, 0]], dtype=torch.float64)
    rolls = torch.tensor([[0, 0, roll], [0, 0, -roll], [0, 0, 0.05], [0, 0, -0.1]], dtype=torch.float64)
    R = roma.rotvec_to_rotmat(aims) @ roma.rotvec_to_rotmat(rolls)
    grid = trainer.camera.sampling_grid(trainer.pool_camera, R)
    assert float(grid.abs().max()) < 1, "the pool detector is too small for the configured turns"
    direct = trainer._render(
        poses @ se3.make_pose(R, torch.zeros(4, 3, dtype=torch.float64)), trainer.camera, trainer.renderers[0]
    )
    assert float(ncc(trainer.turned(big, R), direct, dims=2).min()) > 0.995
    assert float(ncc(trainer.turned(big, R.transpose(1, 2)), direct, dims=2).max()) < 0.99
    # Sampled turns stay within the range: roll within gamma_deg, tilt of the principal ray <= aim_deg.
    turns = _turns(1000, (-roll, roll), aim, torch.Generator().manual_seed(0))
    tilt = torch.acos(turns[:, 2, 2].clamp(max=1))
    assert float(tilt.max()) <= aim + 1e-9 and float(tilt.max()) > 0.9 * aim
    assert float(trainer.camera.sampling_grid(trainer.pool_camera, turns).abs().max()) < 1


def test_regressor_zero_head_predicts_the_reference_and_decodes_rigid_poses():
    ref = carm_pose(0.1, -0.2, 0.05, 760.0, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    net = PoseRegressor(ref, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), image_size=32).eval()
    with torch.no_grad():
        T = net(PoseRegressor.prepare(torch.rand(2, 32, 32)))
    torch.testing.assert_close(T.double(), ref.expand(2, 4, 4), atol=1e-3, rtol=0)
    out = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    T = net.decode(out)
    R = T[:, :3, :3]
    # float32 rotations: orthonormal to a few hundred ulps (1.0e-5 was seen on one CPU); a
    # decoder that were not rigid would be off by the head's outputs, order 1.
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.det(R), torch.ones(5), atol=1e-4, rtol=0)


def test_estimate_means_exactly_turned_copies_each_turned_back(trainer):
    """An oracle network that recognises the views of two cameras rolled about their focal spots
    (rendered, not warped): each copy of a view's image turned by ``t`` is recognised as the view
    rolled by ``t``, and the estimate over the copies, turned back, is the view. A copy turned the
    wrong way, or a pose turned back the wrong way, would be off by twice the turn."""
    views = trainer._views(2, roll=False)
    angles = torch.arange(-12.0, 12.5, 0.5, dtype=torch.float64)
    zero = torch.zeros_like(angles)
    rolls = se3.make_pose(
        roma.rotvec_to_rotmat(torch.stack([zero, zero, torch.deg2rad(angles)], -1)),
        torch.zeros(len(angles), 3, dtype=torch.float64),
    )
    candidates = torch.cat([view @ rolls for view in views])  # view 0's rolls, then view 1's
    library = trainer._render(candidates, trainer.camera, trainer.renderers[0])
    S = trainer.camera.width
    centre = (S - 1) / 2
    rows, cols = torch.meshgrid(torch.arange(S) - centre, torch.arange(S) - centre, indexing="ij")
    inner = torch.hypot(rows, cols) < 0.45 * S  # a turned copy's corners come from outside the image
    picked = []

    def oracle(x, mixed_precision=False):
        best = ncc(x[:, 0, inner][:, None], library[:, inner][None], dims=1).argmax(1)  # (B,)
        picked.append([(int(i) // len(angles), float(angles[int(i) % len(angles)])) for i in best])
        return candidates[best].float()

    net = PoseRegressor(views[0], trainer.center, image_size=S).eval()
    net.forward = oracle
    unturned = [int(k * len(angles) + angles.tolist().index(0.0)) for k in range(2)]
    images = library[unturned]
    once = net.estimate(images, trainer.camera)
    assert once.dtype == torch.float64 and torch.equal(once, candidates[unturned].float().double())
    for turns in ((0.0, 4.0, 8.0), (8.0,)):
        picked.clear()
        mean = net.estimate(images, trainer.camera, turns)
        assert picked == [[(k, t) for k in range(2) for t in turns]], "each copy is the view turned by its turn"
        assert float(torch.rad2deg(se3.rotation_angle(mean, views)).max()) < 0.3
    with pytest.raises(ValueError, match="at least one turn"):
        net.estimate(images, trainer.camera, ())


@pytest.fixture(scope="module")
def trainer(hu):
    targets = torch.stack(
        [hu.center + torch.tensor(d, dtype=torch.float64) for d in ([0, 0, 0], [60, 0, 0], [0, 60, 0], [0, 0, 60])]
    )
    cfg = TrainConfig(
        image_size=64,
        batch_size=8,
        validation_views=8,
        warmup_steps=1,
        learning_rate=3e-4,
        voxel_mm=5.0,
        pool_size=64,
        pool_refresh=8,
        bone_scales=(1.0,),
        aim_deg=1.5,
    )
    return Trainer(hu, targets, cfg)


def test_a_few_training_steps_reduce_the_loss_on_a_fixed_batch(trainer):
    torch.manual_seed(0)
    x, poses = trainer.batch()
    model, opt = trainer.model, trainer.optimizer
    model.train()
    losses = []
    for _ in range(12):
        loss, _ = trainer.loss(model(x).double(), poses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_pool_keeps_the_newest_renders_with_their_poses(trainer):
    size = trainer.config.pool_size
    for _ in range(size // trainer.config.pool_refresh + 3):
        trainer._refresh_pool(trainer.config.pool_refresh)
    assert trainer._pool_count == size
    newest = (trainer._pool_next - 1) % size
    pose = trainer._pool_poses[newest : newest + 1]
    again = trainer._render(pose, trainer.pool_camera, trainer.renderers[0])
    torch.testing.assert_close(trainer._pool_images[newest : newest + 1], again)
    # Every slot holds a distinct view: nothing was duplicated or left unwritten.
    assert len(torch.unique(trainer._pool_poses[:, :3, 3], dim=0)) == size


def test_checkpoint_round_trip(trainer, tmp_path):
    trainer.train_step(0.5)
    trainer._record_validation()
    trainer.save_checkpoint(tmp_path / "ckpt")
    other = Trainer.__new__(Trainer)
    other.__dict__.update({k: v for k, v in trainer.__dict__.items()})
    cfg = trainer.config
    other.model = PoseRegressor(
        torch.eye(4, dtype=torch.float64),
        torch.zeros(3),
        image_size=64,
        channels=cfg.backbone_channels,
        stem=cfg.backbone_stem,
    )
    other.optimizer = torch.optim.AdamW(other.model.parameters())
    other.load_checkpoint(tmp_path / "ckpt")
    for (k, a), b in zip(trainer.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert other.step == trainer.step and other.best == trainer.best
    # A damaged checkpoint is refused by name, not with a library's traceback.
    (tmp_path / "torn").write_bytes((tmp_path / "ckpt").read_bytes()[:100])
    (tmp_path / "torn.json").write_text((tmp_path / "ckpt.json").read_text())
    (tmp_path / "nojson").write_bytes((tmp_path / "ckpt").read_bytes())
    (tmp_path / "nojson.json").write_text("{}")
    for name in ("torn", "nojson", "absent"):
        with pytest.raises(ValueError, match=f"{name} is not a readable training checkpoint"):
            other.load_checkpoint(tmp_path / name)


# ----------------------------------------------------------------------------- bundle
@pytest.fixture(scope="module")
def small_model(mu):
    ref = carm_pose(0.0, 0.0, 0.0, 750.0, mu.center)
    net = PoseRegressor(ref, mu.center, image_size=32)
    with torch.no_grad():
        net.head.bias.copy_(torch.randn(9) * 0.01)
    return PatientModel(
        net, mu.coarsened_to(8.0), Intrinsics.from_detector(1020, 256, 256, 1.2).resized(32), {"note": "test"}
    )


def test_bundle_round_trip_is_bit_exact(small_model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_patient_model(path, small_model)
    loaded = load_patient_model(path)
    for (k, a), b in zip(small_model.regressor.state_dict().items(), loaded.regressor.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(loaded.mu.data, small_model.mu.data.half().float())
    assert torch.equal(loaded.mu.index_to_ct, small_model.mu.index_to_ct)
    assert loaded.intrinsics == small_model.intrinsics and loaded.metadata["note"] == "test"
    # Saving what was loaded gives the same bytes.
    save_patient_model(tmp_path / "again.safetensors", loaded)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_bundle_keeps_custom_backbone_widths_and_stem(mu, tmp_path):
    net = PoseRegressor(
        carm_pose(0.0, 0.0, 0.0, 750.0, mu.center), mu.center, image_size=32, channels=(16, 32, 48, 64), stem="patch"
    )
    assert net.backbone.num_features == 64
    assert net.backbone.conv1.kernel_size == (4, 4) and net.backbone.conv1.stride == (4, 4)
    model = PatientModel(net, mu.coarsened_to(8.0), Intrinsics.from_detector(1020, 256, 256, 1.2).resized(32))
    save_patient_model(tmp_path / "narrow.safetensors", model)
    loaded = load_patient_model(tmp_path / "narrow.safetensors")
    assert loaded.regressor.channels == (16, 32, 48, 64) and loaded.metadata["backbone_channels"] == [16, 32, 48, 64]
    assert loaded.regressor.stem == "patch" and loaded.metadata["backbone_stem"] == "patch"
    for (k, a), b in zip(net.state_dict().items(), loaded.regressor.state_dict().values()):
        assert torch.equal(a, b), k


def test_bundle_refuses_bad_files(small_model, tmp_path):
    good = tmp_path / "good.safetensors"
    save_patient_model(good, small_model)
    with pytest.raises(PatientModelError, match="not found"):
        load_patient_model(tmp_path / "missing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(PatientModelError):
        load_patient_model(truncated)
    corrupt = tmp_path / "corrupt.safetensors"
    data = bytearray(good.read_bytes())
    data[10:40] = b"\xff" * 30
    corrupt.write_bytes(bytes(data))
    with pytest.raises(PatientModelError):
        load_patient_model(corrupt)
    # A pickle must be refused without running anything in it.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PatientModelError):
        load_patient_model(evil)
    assert not marker.exists()
    not_an_object = tmp_path / "list.safetensors"
    save_file({"x": torch.zeros(3)}, str(not_an_object), metadata={"diffpose_ros": "[1]"})
    with pytest.raises(PatientModelError, match="corrupt metadata"):
        load_patient_model(not_an_object)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(PatientModelError, match="not a diffpose_ros patient model"):
        load_patient_model(foreign)
    # Another format version, and mismatched shapes.
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["diffpose_ros"])
    save_file(
        tensors,
        str(tmp_path / "v99.safetensors"),
        metadata={"diffpose_ros": json.dumps({**meta, "format_version": 99})},
    )
    with pytest.raises(PatientModelError, match="version 99"):
        load_patient_model(tmp_path / "v99.safetensors")
    tensors["cnn.head.weight"] = torch.zeros(9, 7)
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata={"diffpose_ros": json.dumps(meta)})
    with pytest.raises(PatientModelError, match="do not match"):
        load_patient_model(tmp_path / "shape.safetensors")
    tensors = load_file(str(good))
    tensors["volume.mu"][0, 0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata={"diffpose_ros": json.dumps(meta)})
    with pytest.raises(PatientModelError, match="NaN"):
        load_patient_model(tmp_path / "nan.safetensors")


def test_train_config_yaml_matches_defaults():
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).parents[3] / "config" / "training.yaml").read_text())
    assert TrainConfig.from_dict(doc["training"]).as_dict() == TrainConfig().as_dict()
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"batchsize": 3})
    assert math.isclose(TrainConfig().intrinsics.fx, 1020 / 1.2 / 4)


def test_device_defaults_and_overrides():
    from diffpose_ros.core.model.train import GPU_PROFILE

    assert TrainConfig.for_device("cpu").as_dict() == TrainConfig().as_dict()
    gpu = TrainConfig.for_device("cuda")
    assert gpu.as_dict() == TrainConfig.from_dict(GPU_PROFILE).as_dict()
    assert gpu.pool_refresh == gpu.batch_size  # every step renders its batch fresh on a GPU
    assert gpu.backbone_channels is None and gpu.trained_views.modes[0].alpha_deg == (-35.0, 35.0)
    mixed = TrainConfig.for_device("cuda", {"seed": 3, "batch_size": 16, "view_range": {"alpha_deg": [-40, 40]}})
    assert (mixed.seed, mixed.batch_size, mixed.pool_refresh) == (3, 16, GPU_PROFILE["pool_refresh"])
    # A box of one's own overrides the preset's widened box key by key: the rest of the GPU's range stays.
    box = mixed.trained_views.modes[0]
    assert box.alpha_deg == (-40.0, 40.0) and box.beta_deg == (-25.0, 25.0) and mixed.view_range.name == ""
    # A backbone named without widths or stem gets its own.
    named = TrainConfig.from_dict({"backbone": "resnet18"})
    assert named.backbone_channels is None and named.backbone_stem is None
    assert TrainConfig().backbone_channels == (64, 128, 192, 256)
    with pytest.raises(ValueError, match="four positive integers"):
        TrainConfig.from_dict({"backbone_channels": [64, 128]})
    with pytest.raises(ValueError, match="backbone_stem must be one of"):
        TrainConfig.from_dict({"backbone_stem": "patch8"})
    with pytest.raises(ValueError, match="aim_deg must be between 0 and 10"):
        TrainConfig.from_dict({"aim_deg": -1})


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
def test_training_and_registration_on_the_device(hu, tmp_path, device):
    """Each device's path end to end: pool, augmentations and loss on it, then the pipeline on it."""
    from diffpose_ros.core.geometry import metrics
    from diffpose_ros.core.registration.pipeline import Pipeline
    from diffpose_ros.core.rendering.volume import hu_to_mu

    targets = hu.center[None].double()
    cfg = TrainConfig.for_device(
        device, {"batch_size": 8, "pool_size": 64, "pool_refresh": 8, "validation_views": 8, "voxel_mm": 5.0}
    )
    trainer = Trainer(hu, targets, cfg, device=device)
    x, _ = trainer.batch()
    assert x.device.type == device and torch.isfinite(x).all()
    assert math.isfinite(trainer.train_step(0.5)["loss"])
    path = tmp_path / "model.safetensors"
    save_patient_model(
        path, PatientModel(trainer.best_model().cpu(), hu_to_mu(hu).coarsened_to(2.0), cfg.intrinsics, {})
    )
    pipeline = Pipeline.from_file(path, device=device)
    camera = Intrinsics.from_detector(1020.0, 128, 128, 2.4)
    truth = carm_pose(0.1, -0.05, 0.02, 750.0, hu.center)
    image = pipeline.registrar.renderer().render(truth, camera)
    assert image.device.type == "cpu"
    start = truth @ se3.exp(torch.tensor([3.0, -2.0, 4.0, 0.02, -0.01, 0.015], dtype=torch.float64))
    result = pipeline.registrar.register(image, camera, start)
    grid = metrics.grid_targets(hu.center)
    assert result.pose.device.type == "cpu"
    assert float(metrics.mtre(start, truth, grid)) > 5 and float(metrics.mtre(result.pose, truth, grid)) < 0.5
