"""The command-line tools, run in-process through their ``main`` functions."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from diffpose_ros.cli import demo, drr, register
from diffpose_ros.core.geometry import metrics
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose, perturb_pose
from diffpose_ros.core.io.files import save_json
from diffpose_ros.core.model.bundle import PatientModel, save_patient_model
from diffpose_ros.core.model.regressor import PoseRegressor
from diffpose_ros.core.simulation.detector import simulate_transmission


@pytest.fixture(scope="module")
def case(tmp_path_factory, hu):
    d = tmp_path_factory.mktemp("cli")
    camera = Intrinsics.from_detector(1020.0, 128, 128, 2.4)
    camera.to_yaml(d / "camera.yaml")
    truth = carm_pose(0.2, -0.1, 0.05, 760.0, hu.center + torch.tensor([10.0, -5.0, 8.0], dtype=torch.float64))
    save_json(d / "truth.json", {"T_ct_source": truth})
    start = perturb_pose(truth, 8.0, 20.0, hu.center, torch.Generator().manual_seed(2))
    save_json(d / "init.json", {"T_ct_source": start})
    return d, camera, truth


def test_drr_writes_npy_and_png(case, capsys):
    d, camera, _ = case
    assert (
        drr.main(["--camera-info", str(d / "camera.yaml"), "--pose", str(d / "truth.json"), "--out", str(d / "view")])
        == 0
    )
    image = np.load(d / "view.npy")
    assert image.shape == (128, 128) and image.dtype == np.float32 and image.max() > 1
    assert cv2.imread(str(d / "view.png"), cv2.IMREAD_UNCHANGED).shape == (128, 128)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_register_npy_and_png_recover_the_pose(case, hu, capsys):
    d, camera, truth = case
    if not (d / "view.npy").exists():
        drr.main(["--camera-info", str(d / "camera.yaml"), "--pose", str(d / "truth.json"), "--out", str(d / "view")])
        capsys.readouterr()  # what the DRR tool printed is not the result document
    frame = simulate_transmission(torch.from_numpy(np.load(d / "view.npy")), i0=1e4, rng=np.random.default_rng(0))
    cv2.imwrite(str(d / "frame.png"), frame)
    targets = metrics.grid_targets(hu.center)
    for image in ("view.npy", "frame.png"):
        out = d / f"result_{image}.json"
        code = register.main(
            [
                "--camera-info",
                str(d / "camera.yaml"),
                "--image",
                str(d / image),
                "--init",
                str(d / "init.json"),
                "--out",
                str(out),
                "--overlay",
                str(d / "overlay.png"),
            ]
        )
        assert code == 0
        printed = json.loads(capsys.readouterr().out)
        result = json.loads(out.read_text())
        assert printed == result
        assert {"T_ct_source", "similarity", "iterations", "seconds", "converged"} <= set(result)
        assert float(metrics.mtre(torch.tensor(result["T_ct_source"]), truth, targets)) < 0.5, image
    assert cv2.imread(str(d / "overlay.png")).shape == (128, 128, 3)


def test_register_with_a_model_needs_no_init(case, mu, tmp_path, capsys):
    d, camera, truth = case
    model = PatientModel(PoseRegressor(truth, mu.center, image_size=32), mu.coarsened_to(3.0), camera.resized(32))
    save_patient_model(tmp_path / "m.safetensors", model)
    if not (d / "view.npy").exists():
        drr.main(["--camera-info", str(d / "camera.yaml"), "--pose", str(d / "truth.json"), "--out", str(d / "view")])
    code = register.main(
        [
            "--model",
            str(tmp_path / "m.safetensors"),
            "--camera-info",
            str(d / "camera.yaml"),
            "--image",
            str(d / "view.npy"),
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["initialisation"] == "CNN"
    # The untrained CNN predicts its reference pose, here the truth itself.
    torch.testing.assert_close(torch.tensor(result["T_ct_source_init"], dtype=torch.float64), truth, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--camera-info", "missing.yaml", "--image", "x.npy", "--init", "i.json"], "camera-info file not found"),
        (["--camera-info", "{camera}", "--image", "missing.png", "--init", "{init}"], "image not found"),
        (["--camera-info", "{camera}", "--image", "{bad_png}", "--init", "{init}"], "cannot read"),
        (["--camera-info", "{camera}", "--image", "{wrong_size}", "--init", "{init}"], "but the intrinsics say"),
        (["--camera-info", "{camera}", "--image", "{view}", "--init", "{bad_pose}"], "proper rotation"),
        (["--model", "{bad_png}", "--camera-info", "{camera}", "--image", "{view}"], "not a readable patient model"),
    ],
)
def test_register_bad_inputs_exit_2_with_a_message(case, tmp_path, capsys, args, message):
    d, _, _ = case
    if not (d / "view.npy").exists():
        drr.main(["--camera-info", str(d / "camera.yaml"), "--pose", str(d / "truth.json"), "--out", str(d / "view")])
    (tmp_path / "bad.png").write_text("not a png")
    np.save(tmp_path / "wrong.npy", np.ones((10, 12), dtype=np.float32) + np.arange(12, dtype=np.float32))
    save_json(tmp_path / "bad_pose.json", {"T_ct_source": (2 * torch.eye(4)).tolist()})
    names = {
        "camera": d / "camera.yaml",
        "init": d / "init.json",
        "bad_png": tmp_path / "bad.png",
        "wrong_size": tmp_path / "wrong.npy",
        "view": d / "view.npy",
        "bad_pose": tmp_path / "bad_pose.json",
    }
    args = [a.format(**{k: str(v) for k, v in names.items()}) for a in args]
    assert register.main(args) == 2
    assert message in capsys.readouterr().err


def test_register_refuses_a_ct_beside_a_model(tmp_path, capsys):
    args = ["--model", "m.safetensors", "--ct", "ct.nii", "--image", "x.npy", "--camera-info", "c.yaml"]
    with pytest.raises(SystemExit) as exit_info:
        register.main(args)
    assert exit_info.value.code == 2
    assert "--model brings its own CT" in capsys.readouterr().err


def test_demo_refuses_a_node_parameter_without_a_value_before_doing_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path / "demo"), "--param", "renderer_threads"])
    assert exit_info.value.code == 2
    assert "--param takes NAME:=VALUE, not 'renderer_threads'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_the_evaluation_counts_a_refused_frame_as_lost():
    from diffpose_ros.cli.evaluate import summarize

    def frame(accepted, mtre, reason=""):
        keys = ("cnn_mtre_mm", "mpe_mm", "rotation_deg", "translation_mm", "iterations")
        return {"accepted": accepted, "mtre_mm": mtre, "reason": reason, **dict.fromkeys(keys, 1.0)} | {
            f"{stage}_s": 0.1 for stage in ("cnn", "start", "refine", "total")
        }

    frames = [frame(True, 0.5), frame(True, 3.0), frame(False, 0.4, "frame polarity looks inverted (...)")]
    s = summarize(frames)
    assert s["accepted"] == 2 and s["posed_under_2mm"] == pytest.approx(1 / 3) and s["worst_accepted_mm"] == 3.0
    assert s["polarity_refusals"] == 1 and s["success_rate"]["<2mm"] == pytest.approx(2 / 3)


def test_bags_and_training_take_a_views_range(hu, mu, tmp_path):
    """``--views-range`` names where random views come from (a preset, a file, a patient model),
    ``--sweep-alpha`` where a sweep goes; ``diffpose-train --views-range`` sets the training views."""
    import argparse
    import math

    from diffpose_ros.cli.make_bag import add_arguments, poses_from_arguments
    from diffpose_ros.cli.train import load_config
    from diffpose_ros.core.geometry.camera import carm_parameters
    from diffpose_ros.core.model.train import TrainConfig
    from diffpose_ros.core.model.views import PRESETS, Margin

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    lateral, _ = poses_from_arguments(parser.parse_args(["--views", "20", "--views-range", "lateral"]), hu.center)
    assert bool(PRESETS["lateral"].contains(lateral, hu.center).all())
    ap, description = poses_from_arguments(parser.parse_args(["--views", "20"]), hu.center)
    assert bool(PRESETS["ap"].contains(ap, hu.center).all()) and "ap range" in description
    config = TrainConfig.from_dict({"view_range": "spine"})
    model = tmp_path / "spine.safetensors"
    ref = carm_pose(0.0, 0.0, 0.0, 750.0, mu.center)
    metadata = {"training": config.as_dict()}
    save_patient_model(
        model, PatientModel(PoseRegressor(ref, mu.center, image_size=64), mu, config.intrinsics, metadata)
    )
    spine, _ = poses_from_arguments(parser.parse_args(["--views", "60", "--views-range", str(model)]), hu.center)
    alpha = torch.rad2deg(carm_parameters(spine, hu.center)[:, 0])
    assert bool(PRESETS["spine"].contains(spine, hu.center).all()) and float(alpha.abs().max()) > 75
    swing, description = poses_from_arguments(
        parser.parse_args(["--sweep", "16", "--fps", "7.5", "--sweep-alpha", "0", "90"]), hu.center
    )
    alpha = torch.rad2deg(carm_parameters(swing, hu.center)[:, 0])
    assert math.isclose(float(alpha[0]), 0.0, abs_tol=1e-9) and math.isclose(float(alpha[-1]), 90.0, abs_tol=1e-9)
    assert "0..90 deg" in description
    with pytest.raises(ValueError, match="give --views N"):
        poses_from_arguments(parser.parse_args(["--sweep", "4", "--views-range", "spine"]), hu.center)
    assert load_config(None, "cpu", "spine").trained_views == PRESETS["spine"].widened(Margin())
    assert load_config(None, "cuda", "spine").trained_views == PRESETS["spine"].widened(Margin(5, 2, 20, 5))
    with pytest.raises(ValueError, match="--sweep-alpha says where a --sweep goes"):
        poses_from_arguments(parser.parse_args(["--views", "4", "--sweep-alpha", "0", "90"]), hu.center)
