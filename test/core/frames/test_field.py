"""The validity mask of clinical frames (diffpose_ros.core.frames.field): round fields, blades, burned-in
text, saturation, and what it does for registration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpose_ros.core.frames.field import FieldSpec, validity_mask
from diffpose_ros.core.frames.prepare import prepare_frame
from diffpose_ros.core.geometry import metrics
from diffpose_ros.core.geometry.camera import Intrinsics
from diffpose_ros.core.simulation.detector import round_field_and_text, simulate_transmission

CAMERA = Intrinsics.from_detector(1020.0, 256, 256, 1.2)


@pytest.fixture(scope="module")
def clean(renderer, clinical_pose):
    with torch.no_grad():
        view = renderer.render(clinical_pose, CAMERA)
    return simulate_transmission(view, rng=np.random.default_rng(3))


def _disk(radius, cx=127.5, cy=127.5):
    v, u = np.mgrid[0:256, 0:256]
    return np.hypot(u - cx, v - cy) <= radius


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_a_clean_full_frame_is_all_valid(clean):
    assert validity_mask(clean).all()


def test_round_field_and_burned_in_text_are_found(clean):
    frame = round_field_and_text(clean, 0.45, text=True)
    mask = validity_mask(frame)
    field = _disk(0.45 * 256)
    assert _iou(mask, _disk(0.45 * 256 - FieldSpec.margin_px)) > 0.97  # the edge's margin left out
    assert not (mask & ~field).any()  # nothing outside the field is used
    text = (frame == 65535) & field
    assert not (mask & text).any()  # text inside the field is masked too
    # The same frame 8-bit, and a field off centre given by hand.
    small = (frame // 257).astype(np.uint8)
    assert _iou(validity_mask(small), _disk(0.45 * 256 - FieldSpec.margin_px)) > 0.97
    given = validity_mask(clean, FieldSpec(radius_px=80.0, center_px=(140.0, 120.0), margin_px=0.0))
    assert _iou(given, _disk(80.0, 140.0, 120.0)) > 0.99
    assert validity_mask(frame, FieldSpec(auto=False)).all()


def test_collimator_blades_are_found(renderer, clinical_pose):
    with torch.no_grad():
        view = renderer.render(clinical_pose, CAMERA)
    frame = simulate_transmission(view, rng=np.random.default_rng(4), collimation=0.15)
    mask = validity_mask(frame)
    inside = np.zeros((256, 256), dtype=bool)
    inside[38:218, 38:218] = True
    assert not (mask & ~inside).any()
    assert _iou(mask, inside) > 0.9


def test_saturated_pixels_are_left_out(clean):
    frame = clean.copy()
    frame[100:140, 60:90] = np.iinfo(frame.dtype).max
    mask = validity_mask(frame)
    assert not mask[100:140, 60:90].any() and mask.mean() > 0.95


def test_prepare_frame_carries_the_mask_through_a_mirror(clean):
    frame = round_field_and_text(clean, 0.4, text=False)
    flipped = np.ascontiguousarray(frame[:, ::-1])
    prepared = prepare_frame(flipped, "transmission", CAMERA.mirrored(), mirror=True)
    torch.testing.assert_close(prepared.mask, torch.from_numpy(validity_mask(frame)))
    assert 0.45 < prepared.valid_fraction < 0.55
    # Line integrals have no field to find unless one is given.
    L = prepare_frame(-np.log(np.maximum(frame, 1) / 65535.0), "line_integrals", CAMERA)
    assert L.mask.all()
    assert not prepare_frame(
        frame.astype(np.float32), "line_integrals", CAMERA, field=FieldSpec(radius_px=60)
    ).mask.all()


@pytest.mark.slow
def test_a_round_field_with_text_registers_only_with_its_mask(mu, renderer, clinical_pose, hu):
    """The issue-19 failure: black corners and text pull NCC away; the mask keeps them out."""
    from diffpose_ros.core.geometry import se3
    from diffpose_ros.core.registration.registrar import Registrar

    registrar = Registrar(mu)
    with torch.no_grad():
        view = renderer.render(clinical_pose, CAMERA)
    pixels = round_field_and_text(simulate_transmission(view, rng=np.random.default_rng(5)), 0.42, text=True)
    start = clinical_pose @ se3.exp(torch.tensor([6.0, -4.0, 10.0, 0.03, -0.02, 0.04], dtype=torch.float64))
    targets = metrics.grid_targets(hu.center)
    masked = prepare_frame(pixels, "transmission", CAMERA)
    result = registrar.register(masked.image, CAMERA, start, mask=masked.mask)
    assert float(metrics.mtre(result.pose, clinical_pose, targets)) < 1.0 and not result.failure()
    unmasked = prepare_frame(pixels, "transmission", CAMERA, field=FieldSpec(auto=False))
    worse = registrar.register(unmasked.image, CAMERA, start, mask=unmasked.mask)
    print(
        f"masked {float(metrics.mtre(result.pose, clinical_pose, targets)):.3f} mm, "
        f"unmasked {float(metrics.mtre(worse.pose, clinical_pose, targets)):.3f} mm ({worse.failure()})"
    )
    assert worse.failure() or float(metrics.mtre(worse.pose, clinical_pose, targets)) > 2.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_flat_grey_outside_a_shutter_is_outside(renderer, clinical_pose, seed):
    """A flat panel's shutter (rectangular with rounded corners, or a clipped round field) with grey
    outside: the grey leaves the mask, and the anatomy inside stays in it."""
    from diffpose_ros.core.simulation.clinical import ClinicalFactors

    with torch.no_grad():
        view = renderer.render(clinical_pose, CAMERA)
    rng = np.random.default_rng(seed)
    raw = simulate_transmission(view, dtype="uint8", rng=rng, clinical=ClinicalFactors.parse("fp:display"))
    shut = simulate_transmission(
        view, dtype="uint8", rng=np.random.default_rng(seed), clinical=ClinicalFactors.parse("fp:display,field")
    )
    border = np.concatenate([shut[0], shut[-1], shut[:, 0], shut[:, -1]])
    values, counts = np.unique(border, return_counts=True)
    grey = (shut == values[counts.argmax()]) & (shut != raw)  # the shutter's flat grey
    mask = validity_mask(shut)
    assert grey.mean() > 0.02 and (mask & grey).sum() <= 0.002 * grey.sum()
    assert mask.mean() > 0.7 * (1 - grey.mean())  # the anatomy stays


@pytest.mark.parametrize("spec", ["", "display", "all", "display,text", "scatter"])
def test_the_image_intensifiers_frames_have_no_flat_grey_border(renderer, clinical_pose, spec):
    """The grey-shutter rule leaves the first family's frames (raw, collimated, with a black round
    field or a display chain) as the dark-field rules alone would."""
    from diffpose_ros.core.frames.field import _grey_outside
    from diffpose_ros.core.simulation.clinical import ClinicalFactors

    with torch.no_grad():
        view = renderer.render(clinical_pose, CAMERA)
    for seed in range(3):
        for collimation in (0.0, 0.1):
            dtype = "uint8" if "display" in spec or spec == "all" else "uint16"
            frame = simulate_transmission(
                view, dtype=dtype, rng=np.random.default_rng(seed), collimation=collimation,
                clinical=ClinicalFactors.parse(spec),
            )  # fmt: skip
            a = frame.astype(np.float32)
            assert not _grey_outside(a, float(np.percentile(a, 99.9))).any(), (spec, seed, collimation)
