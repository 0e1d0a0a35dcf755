"""Ranges of views and procedure presets: what they draw, what they contain, how they are named and recorded."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from diffpose_ros.core.geometry.camera import Intrinsics, carm_parameters, carm_pose
from diffpose_ros.core.model.bundle import PatientModel
from diffpose_ros.core.model.regressor import PoseRegressor
from diffpose_ros.core.model.sampling import sample_views
from diffpose_ros.core.model.train import TrainConfig
from diffpose_ros.core.model.views import CLINICAL_RANGE, PRESETS, Margin, ViewRange, ViewSet

CENTER = torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)


def test_carm_parameters_invert_carm_pose_over_every_preset():
    poses, params = sample_views(PRESETS["orbit"], 500, CENTER, torch.Generator().manual_seed(1))
    more, more_params = sample_views(PRESETS["pelvis"], 500, CENTER, torch.Generator().manual_seed(2))
    poses, params = torch.cat([poses, more]), torch.cat([params, more_params])
    found = carm_parameters(poses, CENTER)
    torch.testing.assert_close(found[:, :3], params[:, :3], atol=1e-9, rtol=0)  # the angles are unique
    # SOD and isocentre slide along the principal ray; either way they give the same pose.
    torch.testing.assert_close(carm_pose(*found[:, :4].unbind(-1), found[:, 4:]), poses, atol=1e-9, rtol=0)
    along = ((found[:, 4:] - CENTER) * poses[:, :3, 2]).sum(-1)
    torch.testing.assert_close(along, torch.zeros_like(along), atol=1e-9, rtol=0)  # nearest the centre


def test_a_set_of_one_mode_draws_what_its_range_draws():
    for views in (PRESETS["ap"], PRESETS["ap"].widened(Margin())):
        alone = sample_views(views.modes[0], 64, CENTER, torch.Generator().manual_seed(5))
        in_set = sample_views(views, 64, CENTER, torch.Generator().manual_seed(5))
        assert all(torch.equal(a, b) for a, b in zip(alone, in_set))
    # The CPU training default is the ap preset widened by the default margin: the box of before presets.
    assert TrainConfig().trained_views.modes == (ViewRange((-32, 32), (-22, 22), (-11, 11), (640, 860), (42, 42, 42)),)
    assert PRESETS["ap"].modes == (CLINICAL_RANGE,)
    assert sample_views(PRESETS["spine"], 0, CENTER)[0].shape == (0, 4, 4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_draws_its_modes_by_weight_and_contains_what_it_draws(name):
    views = PRESETS[name]
    n = 4000
    poses, params = sample_views(views, n, CENTER, torch.Generator().manual_seed(3))
    assert bool(views.contains(poses, CENTER).all())
    assert not bool(views.contains(carm_pose(math.pi, 0.0, 0.0, 750.0, CENTER), CENTER))  # PA: in none
    # Modes do not overlap here, so each draw belongs to one: the counts follow the weights
    # (binomial, within 5 standard deviations).
    members = torch.stack([mode.contains(poses, CENTER) for mode in views.modes], -1)
    assert bool((members.sum(-1) == 1).all())
    p = torch.tensor(views.weights) / sum(views.weights)
    counts = members.sum(0).double()
    assert bool(((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1).all()), counts


def test_a_view_between_the_modes_is_outside_the_set():
    lateral = PRESETS["lateral"]
    assert bool(lateral.contains(carm_pose(math.radians(90), 0.0, 0.0, 750.0, CENTER), CENTER))
    assert bool(lateral.contains(carm_pose(math.radians(-90), 0.0, 0.0, 750.0, CENTER), CENTER))
    assert not bool(lateral.contains(carm_pose(math.radians(50), 0.0, 0.0, 750.0, CENTER), CENTER))
    assert not bool(lateral.contains(carm_pose(0.0, 0.0, 0.0, 750.0, CENTER), CENTER))
    assert bool(PRESETS["spine"].contains(carm_pose(math.radians(50), 0.0, 0.0, 750.0, CENTER), CENTER))
    far = carm_pose(0.0, 0.0, 0.0, 750.0, CENTER + torch.tensor([60.0, 0.0, 0.0], dtype=torch.float64))
    assert not bool(PRESETS["ap"].contains(far, CENTER))  # the isocentre box counts too


def test_view_sets_are_named_as_presets_files_or_boxes(tmp_path):
    assert ViewSet.from_spec("spine") is PRESETS["spine"] and PRESETS["spine"].as_spec() == "spine"
    widened = PRESETS["spine"].trained(Margin())
    assert widened.name == "" and widened.modes[1].alpha_deg == (73.0, 107.0)  # no longer the preset
    box = ViewSet.from_spec({"alpha_deg": [-50, 50]}, Margin())
    assert box.modes[0].alpha_deg == (-50.0, 50.0) and box.modes[0].beta_deg == (-22.0, 22.0) and box.name == ""
    own = [{"alpha_deg": [80, 100], "weight": 3}, {"alpha_deg": [-10, 10]}]
    path = tmp_path / "views.yaml"
    path.write_text(yaml.safe_dump({"view_range": own}))
    from_file = ViewSet.from_spec(str(path))
    assert from_file.weights == (3.0, 1.0) and from_file.modes[0].alpha_deg == (80.0, 100.0)
    assert ViewSet.from_spec(from_file.as_spec()) == from_file  # what a model records reads back
    with pytest.raises(ValueError, match="neither a preset"):
        ViewSet.from_spec("sideways")
    path.write_text("view_range: spine\n")
    assert ViewSet.from_spec(str(path)) is PRESETS["spine"]
    path.write_text("view_range: views.yaml\n")
    with pytest.raises(ValueError, match="not a preset"):
        ViewSet.from_spec(str(path))
    path.write_text("view_range: [unclosed\n")
    with pytest.raises(ValueError, match="not a YAML file"):
        ViewSet.from_spec(str(path))
    path.write_bytes(b"\x89\xff\xfe binary")
    with pytest.raises(ValueError, match="not a YAML file"):
        ViewSet.from_spec(str(path))
    with pytest.raises(ValueError, match="weight"):
        ViewSet.from_spec([{"alpha_deg": [0, 1], "weight": 0}])
    with pytest.raises(ValueError, match="unknown view-range keys"):
        ViewSet.from_spec({"alpha": [0, 1]})
    with pytest.raises(ValueError, match="alpha_deg must lie"):
        ViewRange((-200, 0), (0, 0), (0, 0), (700, 800), (0, 0, 0))
    with pytest.raises(ValueError, match="non-negative"):
        Margin(angle_deg=-1)


def test_training_config_takes_a_preset_and_records_it():
    spine = TrainConfig.from_dict({"view_range": "spine"})
    assert spine.view_range is PRESETS["spine"] and spine.trained_views == PRESETS["spine"].widened(Margin())
    assert spine.as_dict()["view_range"] == "spine"
    assert TrainConfig.from_dict(spine.as_dict()).as_dict() == spine.as_dict()
    wide = TrainConfig.from_dict({"view_range": "lateral", "view_margin": {"angle_deg": 5}}).trained_views
    assert wide.modes[0].alpha_deg == (70.0, 110.0) and wide.modes[0].gamma_deg == (-11, 11)
    own = TrainConfig.from_dict({"view_range": [{"alpha_deg": [80, 100]}]})
    assert own.trained_views is own.view_range  # boxes of one's own are trained on as given
    assert TrainConfig().view_range.centre == (0.0, 0.0, 750.0) and spine.view_range.centre == (0.0, 0.0, 750.0)


def _model(mu, metadata):
    ref = carm_pose(0.0, 0.0, 0.0, 750.0, mu.center)
    camera = Intrinsics.from_detector(1020, 256, 256, 1.2).resized(64)
    return PatientModel(PoseRegressor(ref, mu.center, image_size=64), mu, camera, metadata)


def test_a_patient_model_says_which_views_it_is_for(mu):
    spine = _model(mu, {"training": TrainConfig.from_dict({"view_range": "spine"}).as_dict()})
    assert spine.views is PRESETS["spine"] and spine.trained_views == PRESETS["spine"].widened(Margin())
    own = TrainConfig.from_dict({"view_range": [{"alpha_deg": [80, 100]}]}).as_dict()
    assert _model(mu, {"training": own}).views.modes[0].alpha_deg == (80.0, 100.0)
    # Models from before presets recorded their box (the default one): they are ap models.
    box = TrainConfig().trained_views.modes[0]
    old = {"training": {"view_range": box.as_dict()}}
    assert _model(mu, old).views is PRESETS["ap"] and _model(mu, old).trained_views.modes == (box,)
    assert _model(mu, {}).views is PRESETS["ap"]
