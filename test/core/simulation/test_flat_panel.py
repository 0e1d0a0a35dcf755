"""The second family of clinical frames (a flat panel's look): each factor, the family's parsing, and
that its inverted frames are never registered as upright."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpose_ros.core.frames.prepare import prepare_frame
from diffpose_ros.core.geometry.camera import perturb_pose
from diffpose_ros.core.simulation import flat_panel
from diffpose_ros.core.simulation.clinical import ClinicalFactors
from diffpose_ros.core.simulation.detector import simulate_transmission


@pytest.fixture(scope="module")
def view(mu, detector):
    from diffpose_ros.core.geometry.camera import carm_pose
    from diffpose_ros.core.rendering.renderer import Renderer

    return Renderer(mu.coarsened_to(2.0)).render(carm_pose(0.0, 0.0, 0.0, 750.0, mu.center), detector)


def test_the_family_is_part_of_the_factors():
    assert ClinicalFactors.parse("fp:all") == ClinicalFactors(True, 0.45, True, 2, True, False, "fp")
    assert ClinicalFactors.parse("fp:all").names() == ["display", "field", "text", "metal", "scatter"]
    assert ClinicalFactors.parse("display").family == "ii" and ClinicalFactors.parse("ii:display").family == "ii"
    with pytest.raises(ValueError, match="family"):
        ClinicalFactors.parse("ct:display")


def test_the_voi_lut_is_a_monotone_sigmoid():
    x = np.linspace(-5.0, 5.0, 1001)
    y = flat_panel.voi_lut(x, 0.5, 2.0)
    assert np.all(np.diff(y) > 0) and 0.0 < y.min() and y.max() < 1.0
    assert flat_panel.voi_lut(np.array([0.5]), 0.5, 2.0)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="width"):
        flat_panel.voi_lut(x, 0.0, 0.0)


def test_inverting_the_display_mirrors_its_values():
    v, u = np.mgrid[0:64, 0:64]
    counts = 100.0 + 4000.0 * np.exp(-((u - 20.0) ** 2 + (v - 40.0) ** 2) / 300.0) + 30.0 * u  # smooth, as anatomy
    upright = flat_panel.display(counts, np.random.default_rng(1))
    inverted = flat_panel.display(counts, np.random.default_rng(1), inverted=True)
    assert np.array_equal(inverted, 1.0 - upright) and 0.0 <= upright.min() and upright.max() <= 1.0
    assert np.mean((upright == 0.0) | (upright == 1.0)) < 0.05 and upright.std() > 0.1  # spread, not clipped


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_every_factor_on_every_frame_type(view, dtype):
    frame = simulate_transmission(
        view, dtype=dtype, rng=np.random.default_rng(3), clinical=ClinicalFactors.parse("fp:all")
    )
    assert frame.dtype == np.dtype(dtype) and frame.shape == tuple(view.shape) and np.isfinite(frame).all()


@pytest.mark.parametrize("factor", ["display", "field", "text", "metal", "scatter"])
def test_each_factor_changes_the_frame_reproducibly(view, factor):
    def frame(spec):
        return simulate_transmission(
            view, dtype="uint8", rng=np.random.default_rng(5), clinical=ClinicalFactors.parse(spec)
        )

    base = {"display": "fp:", "text": "fp:display,field"}.get(factor, "fp:display")  # text shows on the grey
    raw, changed = frame(base), frame(f"{base},{factor}")
    assert changed.dtype == np.uint8 and changed.shape == raw.shape
    assert np.array_equal(changed, frame(f"{base},{factor}"))
    assert np.abs(changed.astype(float) - raw.astype(float)).mean() > 1.0
    if factor in ("display", "metal", "scatter"):  # the same factor of the image intensifier's family differs
        other = simulate_transmission(
            view, dtype="uint8", rng=np.random.default_rng(5), clinical=ClinicalFactors.parse(f"ii:{base[3:]},{factor}")
        )
        assert not np.array_equal(changed, other)


def test_the_shutter_leaves_grey_outside(view):
    frame = simulate_transmission(
        view, dtype="uint16", rng=np.random.default_rng(2), clinical=ClinicalFactors.parse("fp:field")
    )
    corner, bright = frame[:4, :4].astype(float), float(np.percentile(frame, 99.9))
    assert corner.min() == corner.max() and 0.05 * bright < corner.min() < 0.26 * bright  # flat and darkish


@pytest.mark.slow
def test_an_inverted_flat_panel_frame_is_never_registered_as_upright(pipeline, detector, mu):
    ref = pipeline.regressor.decode(torch.zeros(1, 9))[0].double()
    truth = perturb_pose(ref, 3.0, 8.0, mu.center, torch.Generator().manual_seed(2))
    drr = pipeline.render(truth, detector)
    for seed in range(3):
        pixels = simulate_transmission(
            drr, dtype="uint8", rng=np.random.default_rng(seed), clinical=ClinicalFactors.parse("fp:all,inverted")
        )
        result = pipeline.process(prepare_frame(pixels, "transmission", detector), track=False)
        assert not result.accepted, seed


def test_the_recursive_filter_keeps_a_still_scene_and_lags_behind_a_change():
    lag = flat_panel.RecursiveFilter(0.5)
    still, moved = np.full((4, 4), 1000, np.uint16), np.full((4, 4), 3000, np.uint16)
    assert np.array_equal(lag(still), still) and np.array_equal(lag(still), still)
    assert np.all(lag(moved) == 2000) and np.all(lag(moved) == 2500)  # half the way each frame
    assert lag(moved).dtype == np.uint16
    with pytest.raises(ValueError, match="sequence"):
        lag(np.zeros((4, 5), np.uint16))
    for weight in (0.0, 1.5):
        with pytest.raises(ValueError, match="weight"):
            flat_panel.RecursiveFilter(weight)
    assert np.array_equal(flat_panel.RecursiveFilter(1.0)(moved), moved)
