"""DICOM X-rays: frames, polarity, geometry and times from the tags, and diffpose-register on them.

Three synthetic files of the common kinds, DRRs of the bundled CT at known poses:
XA 8-bit MONOCHROME2 cine with a round field and burned-in text, DX 16-bit MONOCHROME1 raw counts
"FOR PROCESSING" with a rescale, DX 12-bit MONOCHROME2 "FOR PRESENTATION" (log-like, bones bright).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dicom_files import write_dicom

from diffpose_ros.cli import register
from diffpose_ros.core.geometry import metrics
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose, perturb_pose
from diffpose_ros.core.io.dicom import read_dicom, read_dicom_series
from diffpose_ros.core.io.files import read_xray, save_json
from diffpose_ros.core.simulation.detector import round_field_and_text, simulate_transmission

pytest.importorskip("pydicom")

XA = dict(sdd=1020.0, width=128, height=128, spacing=(2.4, 2.4))  # spacing: (row dy, column dx) as in DICOM
DX_RAW = dict(sdd=1100.0, width=128, height=112, spacing=(2.2, 2.6))
DX_SHOWN = dict(sdd=1000.0, width=112, height=128, spacing=(2.4, 2.4))
FIELD = 0.45  # round field radius / smaller side


def camera(g: dict) -> Intrinsics:
    dy, dx = g["spacing"]
    return Intrinsics.from_detector(g["sdd"], g["width"], g["height"], (dx, dy))


def same_camera(a: Intrinsics, b: Intrinsics) -> bool:
    return (a.width, a.height) == (b.width, b.height) and np.allclose(
        [a.fx, a.fy, a.cx, a.cy], [b.fx, b.fy, b.cx, b.cy], rtol=1e-12, atol=0
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory, hu, renderer):
    d = tmp_path_factory.mktemp("dicom")
    iso = hu.center + torch.tensor([10.0, -5.0, 8.0], dtype=torch.float64)
    truths = {
        "xa": [carm_pose(0.2, -0.1, 0.05, 760.0, iso), carm_pose(0.25, -0.1, 0.05, 760.0, iso)],
        "dx_raw": [carm_pose(-0.15, 0.1, 0.0, 800.0, iso)],
        "dx_shown": [carm_pose(0.05, 0.05, -0.05, 740.0, iso)],
    }
    rng = np.random.default_rng(0)

    def drr(name, g, i=0):
        with torch.no_grad():
            return renderer.render(truths[name][i], camera(g))

    # XA: 8-bit transmission video, round field and text, 15 frames/s, acquisition date-time.
    xa = np.stack(
        [
            round_field_and_text(simulate_transmission(drr("xa", XA, i), 1e4, dtype="uint8", rng=rng), FIELD)
            for i in (0, 1)
        ]
    )
    diameter_mm = 2 * FIELD * 128 * 2.4
    write_dicom(
        d / "xa.dcm",
        xa,
        "XA",
        tags=dict(
            DistanceSourceToDetector=XA["sdd"],
            ImagerPixelSpacing=list(XA["spacing"]),
            FrameTime=1000 / 15,
            FieldOfViewShape="ROUND",
            FieldOfViewDimensions=[round(diameter_mm)],
            AcquisitionDateTime="20250314101500.250",
        ),
    )
    # DX for processing: raw counts (high = much dose) shown inverted (MONOCHROME1), stored = (counts - 100) / 2.
    counts = simulate_transmission(drr("dx_raw", DX_RAW), 1e4, gain=6.0, dtype="uint16", rng=rng).astype(np.int64)
    stored = np.clip((counts - 100) // 2, 0, 65535).astype(np.uint16)
    write_dicom(
        d / "dx_raw.dcm",
        stored,
        "DX",
        "MONOCHROME1",
        16,
        "FOR PROCESSING",
        tags=dict(
            DistanceSourceToDetector=DX_RAW["sdd"],
            ImagerPixelSpacing=list(DX_RAW["spacing"]),
            RescaleSlope=2,
            RescaleIntercept=100,
        ),
    )
    # DX for presentation: a log-like display with bones bright, 12 bits in 16; spacing calibrated at the
    # patient (PixelSpacing) with the magnification that takes it back to the detector.
    L = drr("dx_shown", DX_SHOWN).numpy()
    shown = np.rint(4095 * (0.05 + 0.9 * L / L.max())).astype(np.uint16)
    write_dicom(
        d / "dx_shown.dcm",
        shown,
        "DX",
        "MONOCHROME2",
        12,
        "FOR PRESENTATION",
        tags=dict(
            DistanceSourceToDetector=DX_SHOWN["sdd"],
            PixelSpacing=[1.6, 1.6],
            EstimatedRadiographicMagnificationFactor=1.5,
        ),
    )
    for name, poses in truths.items():
        for i, T in enumerate(poses):
            save_json(d / f"{name}_truth{i}.json", {"T_ct_source": T})
            start = perturb_pose(T, 4.0, 8.0, hu.center, torch.Generator().manual_seed(i + 5))
            save_json(d / f"{name}_init{i}.json", {"T_ct_source": start})
    return d, truths, {"xa": xa, "dx_raw": (stored, counts), "dx_shown": shown}


def test_the_three_kinds_read_with_their_geometry_polarity_and_times(files):
    d, _, raw = files
    xa = read_dicom(d / "xa.dcm")
    assert (xa.modality, xa.photometric, xa.bits_stored, xa.frame_count) == ("XA", "MONOCHROME2", 8, 2)
    assert xa.frames.dtype == np.uint8 and np.array_equal(xa.frames, raw["xa"]), "fluoroscopy is kept as it is"
    assert xa.intrinsics == camera(XA)
    np.testing.assert_allclose(xa.frame_times_s, [0.0, 1 / 15])
    assert xa.acquired.isoformat() == "2025-03-14T10:15:00.250000"
    assert xa.field_radius_px == pytest.approx(round(2 * FIELD * 128 * 2.4) / 2 / 2.4)

    dx = read_dicom(d / "dx_raw.dcm")
    assert (dx.modality, dx.photometric, dx.presentation_intent) == ("DX", "MONOCHROME1", "FOR PROCESSING")
    stored, _ = raw["dx_raw"]
    # Rescale applied; MONOCHROME1 -> MONOCHROME2 and radiograph -> transmission cancel: the raw counts.
    np.testing.assert_array_equal(dx.frames[0], 2 * stored.astype(np.float64) + 100)
    k = dx.intrinsics  # rows 2.2 mm apart, columns 2.6 mm: fx = SDD / column spacing
    assert (k.width, k.height) == (128, 112)
    assert (k.fx, k.fy, k.cx, k.cy) == pytest.approx((1100 / 2.6, 1100 / 2.2, 63.5, 55.5))
    assert dx.frame_times_s.tolist() == [0.0] and dx.field_radius_px is None

    shown = read_dicom(d / "dx_shown.dcm")
    assert shown.presentation_intent == "FOR PRESENTATION" and shown.bits_stored == 12
    np.testing.assert_array_equal(shown.frames[0], 4095 - raw["dx_shown"].astype(np.int64)), "bones made dark"
    assert same_camera(shown.intrinsics, camera(DX_SHOWN)) and shown.sdd_mm == 1000.0
    assert shown.pixel_spacing_mm == pytest.approx((2.4, 2.4))

    xray = read_xray(d / "xa.dcm")
    assert xray.kind == "transmission" and xray.frame_count == 2 and xray.intrinsics() == camera(XA)
    with pytest.raises(ValueError, match="has 2 frame"):
        xray.frame(2)


@pytest.mark.parametrize(
    "name, extra",
    [("xa", ["--frame", "1"]), ("dx_raw", []), ("dx_shown", [])],
)
def test_register_dicom_without_camera_info(files, hu, capsys, name, extra):
    d, truths, _ = files
    i = 1 if name == "xa" else 0
    out = d / f"result_{name}.json"
    args = ["--image", str(d / f"{name}.dcm"), "--init", str(d / f"{name}_init{i}.json"), "--out", str(out), *extra]
    assert register.main(args) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["intrinsics_source"] == "DICOM tags"
    init = torch.tensor(json.loads((d / f"{name}_init{i}.json").read_text())["T_ct_source"])
    targets = metrics.grid_targets(hu.center)
    before = float(metrics.mtre(init, truths[name][i], targets))
    after = float(metrics.mtre(torch.tensor(result["T_ct_source"]), truths[name][i], targets))
    assert after < 2.0, (name, before, after)
    if name == "xa":
        assert (result["frame"], result["frames"]) == (1, 2)


@pytest.mark.slow
def test_camera_info_overrides_the_tags(files, tmp_path, capsys):
    d, _, _ = files
    other = Intrinsics(128, 128, 900.0, 910.0, 60.0, 66.0)
    other.to_yaml(tmp_path / "cam.yaml")
    args = [
        "--image",
        str(d / "xa.dcm"),
        "--camera-info",
        str(tmp_path / "cam.yaml"),
        "--init",
        str(d / "xa_init0.json"),
    ]
    assert register.main([*args, "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["intrinsics_source"] == f"camera-info {tmp_path / 'cam.yaml'}"
    assert result["intrinsics"] == {"width": 128, "height": 128, "fx": 900.0, "fy": 910.0, "cx": 60.0, "cy": 66.0}


def test_missing_geometry_is_refused_naming_the_tags(tmp_path, capsys):
    frame = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    path = write_dicom(tmp_path / "bare.dcm", frame, "DX", "MONOCHROME2", 12)
    x = read_dicom(path)
    assert x.intrinsics is None
    assert x.missing_tags == (
        "(0018,1110) DistanceSourceToDetector",
        "(0018,1164) ImagerPixelSpacing (or (0028,0030) PixelSpacing)",
    )
    pose = tmp_path / "p.json"
    save_json(pose, {"T_ct_source": torch.eye(4)})
    assert register.main(["--image", str(path), "--init", str(pose)]) == 2
    err = capsys.readouterr().err
    assert "(0018,1110) DistanceSourceToDetector" in err and "(0018,1164) ImagerPixelSpacing" in err
    assert "--camera-info" in err and str(path) in err
    write_dicom(
        tmp_path / "half.dcm", frame, "DX", tags=dict(ImagerPixelSpacing=[0.2, 0.2], DistanceSourceToDetector=0)
    )
    assert read_dicom(tmp_path / "half.dcm").missing_tags == ("(0018,1110) DistanceSourceToDetector (invalid: 0.0)",)


def test_series_folder_ordered_by_time_then_instance(tmp_path):
    frame = np.full((8, 10), 7, dtype=np.uint8)
    geometry = dict(DistanceSourceToDetector=1000, ImagerPixelSpacing=[0.3, 0.3])
    times = ["101500.5", "101500", "101501.25"]
    for i, t in enumerate(times):
        tags = dict(geometry, InstanceNumber=3 - i, AcquisitionDate="20250314", AcquisitionTime=t)
        write_dicom(tmp_path / f"f{i}.dcm", frame + i, "XA", tags=tags)
    (tmp_path / "DICOMDIR").write_bytes(b"")
    series = read_dicom_series(tmp_path)
    assert [int(f[0, 0]) for f in series.frames] == [8, 7, 9]
    np.testing.assert_allclose(series.frame_times_s, [0.0, 0.5, 1.25])
    untimed = tmp_path / "untimed"
    untimed.mkdir()
    for i in range(3):
        write_dicom(untimed / f"f{i}.dcm", frame + i, "XA", tags=dict(geometry, InstanceNumber=3 - i))
    series = read_dicom_series(untimed)
    assert [int(f[0, 0]) for f in series.frames] == [9, 8, 7] and series.frame_times_s is None


@pytest.mark.parametrize(
    "syntax, message",
    [
        ("1.2.840.10008.1.2.4.100", "no decoder exists in pydicom for MPEG2 Main Profile / Main Level"),
        ("1.2.840.10008.1.2.4.90", "JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90)"),
        ("1.2.840.10008.1.2.4.70", "(1.2.840.10008.1.2.4.70) needs a decoder that is not installed here"),
    ],
)
def test_undecodable_transfer_syntax_is_refused(tmp_path, syntax, message):
    from pydicom.pixels import get_decoder

    if "not installed" in message and get_decoder(syntax).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    frame = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = write_dicom(tmp_path / "c.dcm", frame, "XA", transfer_syntax=syntax)  # raw bytes, not that codec
    with pytest.raises(ValueError, match="cannot decode the pixel data") as err:
        read_dicom(path)
    assert message in str(err.value) and str(path) in str(err.value)
    if "not installed" in message:
        assert "pylibjpeg-libjpeg" in str(err.value)


def test_non_dicom_colour_and_no_pixels_are_refused(tmp_path):
    (tmp_path / "x.dcm").write_text("not dicom")
    with pytest.raises(ValueError, match="not a readable DICOM file"):
        read_xray(tmp_path / "x.dcm")
    colour = write_dicom(tmp_path / "rgb.dcm", np.zeros((4, 4), np.uint8), "XA", tags=dict(SamplesPerPixel=3))
    with pytest.raises(ValueError, match="3 samples per pixel"):
        read_dicom(colour)
    import pydicom

    ds = pydicom.dcmread(colour)
    del ds.PixelData
    ds.save_as(tmp_path / "empty.dcm")
    with pytest.raises(ValueError, match=r"no pixel data: \(7FE0,0010\) PixelData is absent"):
        read_dicom(tmp_path / "empty.dcm")


def test_dicom_preamble_is_recognised_without_suffix(files, tmp_path):
    d, _, _ = files
    (tmp_path / "IMG0001").write_bytes((d / "dx_shown.dcm").read_bytes())
    x = read_xray(tmp_path / "IMG0001")
    assert x.dicom is not None and math.isclose(x.intrinsics().fx, 1000 / 2.4)


def test_modality_lut_outputs_are_shifted_non_negative_and_kept_exact(tmp_path):
    stored = np.array([[0, 100], [2000, 4095]], dtype=np.uint16)
    geometry = dict(DistanceSourceToDetector=1000, ImagerPixelSpacing=[0.2, 0.2])
    path = write_dicom(
        tmp_path / "a.dcm", stored, "RF", bits_stored=12, tags=dict(geometry, RescaleIntercept=-1000, RescaleSlope=1)
    )
    x = read_dicom(path)  # range -1000..3095 shifted by +1000: the stored values, still integers
    assert x.frames.dtype == np.uint16 and np.array_equal(x.frames[0], stored)
    path = write_dicom(
        tmp_path / "b.dcm", stored, "CR", bits_stored=12, tags=dict(geometry, RescaleIntercept=0, RescaleSlope=0.5)
    )
    x = read_dicom(path)  # a radiograph: inverted within the LUT's range 0..2047.5
    assert x.frames.dtype == np.float32 and np.allclose(x.frames[0], 2047.5 - 0.5 * stored)
