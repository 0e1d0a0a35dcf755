"""Clinical frames: the simulated C-arm factors, the intensity map, and polarity (diffpose_ros.core
.clinical, .simulate, .intensity, and the pipeline's refusal of inverted frames)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpose_ros.core.frames.prepare import prepare_frame
from diffpose_ros.core.geometry import metrics
from diffpose_ros.core.geometry.camera import perturb_pose
from diffpose_ros.core.registration.intensity import match_quantiles, polarity_scores
from diffpose_ros.core.registration.pipeline import Pipeline, PipelineConfig
from diffpose_ros.core.registration.similarity import ncc
from diffpose_ros.core.simulation.clinical import ClinicalFactors
from diffpose_ros.core.simulation.detector import simulate_transmission


@pytest.fixture(scope="module")
def view(renderer, clinical_pose, detector):
    return renderer.render(clinical_pose, detector).reshape(256, 256)


def test_factors_parse_by_name():
    assert ClinicalFactors.parse("") == ClinicalFactors()
    every = ClinicalFactors.parse("all")
    assert every.names() == ["display", "field", "text", "metal", "scatter"] and not every.inverted
    assert ClinicalFactors.parse("display, inverted").names() == ["display", "inverted"]
    with pytest.raises(ValueError, match="unknown clinical factor"):
        ClinicalFactors.parse("display,glare")


def test_each_factor_changes_the_frame_and_clean_frames_stay_as_they_were(view):
    clean = simulate_transmission(view, rng=np.random.default_rng(1))
    assert np.array_equal(clean, simulate_transmission(view, rng=np.random.default_rng(1), clinical=ClinicalFactors()))
    for name in ("metal", "scatter", "field", "text"):
        frame = simulate_transmission(view, rng=np.random.default_rng(1), clinical=ClinicalFactors.parse(name))
        assert frame.dtype == np.uint16 and np.abs(frame.astype(float) - clean).mean() > 50, name
    video = simulate_transmission(
        view, dtype="uint8", rng=np.random.default_rng(1), clinical=ClinicalFactors.parse("display")
    )
    assert video.dtype == np.uint8 and video.min() == 0 and video.max() == 255  # window/level spans the range
    inverted = ClinicalFactors.parse("display,inverted")
    flipped = simulate_transmission(view, dtype="uint8", rng=np.random.default_rng(1), clinical=inverted)
    assert float(ncc(torch.from_numpy(video).float(), torch.from_numpy(flipped).float(), dims=2)) < -0.9
    with pytest.raises(ValueError, match="display chain"):
        simulate_transmission(view, clinical=ClinicalFactors(inverted=True))


def test_quantile_matching_undoes_a_monotone_display_map(view):
    """Line integrals bent by a gamma and clipped like a display chain: the map onto the DRR's
    histogram brings them back close to affine in the DRR (NCC 0.99+), where the raw values are not."""
    bent = (view / view.max()).clamp(0.05, 0.9) ** 3.0
    mask = torch.ones_like(view, dtype=torch.bool)
    assert float(ncc(bent, view, dims=2)) < 0.97
    mapped = match_quantiles(bent, view, mask)
    assert float(ncc(mapped, view, dims=2)) > 0.99
    assert torch.all(mapped.flatten()[bent.flatten().argsort()].diff() >= -1e-6)  # monotone
    # A DRR that shows almost none of the CT (flat between its 1st and 99th percentiles) sets no map.
    mostly_empty = torch.zeros_like(view)
    mostly_empty[:2, :2] = 1.0
    assert match_quantiles(bent, mostly_empty, mask) is bent


@pytest.mark.slow
@pytest.mark.parametrize("factors", ["display", "display,field,text,scatter"])
def test_an_inverted_frame_is_refused_unless_polarity_is_auto(pipeline, detector, mu, factors):
    ref = pipeline.regressor.decode(torch.zeros(1, 9))[0].double()
    truth = perturb_pose(ref, 3.0, 8.0, mu.center, torch.Generator().manual_seed(2))
    drr = pipeline.render(truth, detector)
    targets = metrics.grid_targets(mu.center)
    frames = {}
    for polarity, extra in (("bones_dark", ""), ("bones_bright", ",inverted")):
        pixels = simulate_transmission(
            drr, dtype="uint8", rng=np.random.default_rng(3), clinical=ClinicalFactors.parse(factors + extra)
        )
        frames[polarity] = prepare_frame(pixels, "transmission", detector)
    dark, bright = polarity_scores(
        frames["bones_dark"].image, pipeline.render(truth, detector)[None].repeat(2, 1, 1), frames["bones_dark"].mask
    )
    assert dark > 0.5 > bright
    normal = pipeline.process(frames["bones_dark"], track=False)
    assert normal.accepted and normal.polarity == "bones_dark", normal.reason
    assert float(metrics.mtre(normal.pose, truth, targets)) < 1.0
    refused = pipeline.process(frames["bones_bright"], track=False)
    assert not refused.accepted and refused.reason.startswith("frame polarity looks inverted (refined similarity")
    auto = Pipeline(pipeline.model, config=PipelineConfig(polarity="auto"))
    flipped = auto.process(frames["bones_bright"], track=False)
    assert flipped.accepted and flipped.polarity == "bones_bright", flipped.reason
    assert float(metrics.mtre(flipped.pose, truth, targets)) < 1.0
    with pytest.raises(ValueError, match="polarity"):
        PipelineConfig(polarity="negative")
