"""CT loading in the ct frame (LPS, mm), attenuation and downsampling (diffpose_ros.core.rendering.volume)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffpose_ros.core.rendering import volume
from diffpose_ros.core.rendering.volume import MU_WATER, Volume, hu_to_mu, load_ct, load_labels

NX, NY, NZ = 20, 16, 12
SPACING = (0.8, 1.3, 2.5)
ORIGIN = (-12.5, 30.25, -101.0)


def _rz(t):
    return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1.0]])


def _rx(t):
    return np.array([[1.0, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])


# An oblique proper rotation (DICOM can only hold these) and an improper one (a flip of k).
DIRECTIONS = {
    "rotated": _rx(math.radians(30)) @ _rz(math.radians(90)),
    "flipped": _rz(math.radians(90)) @ np.diag([1.0, 1.0, -1.0]),
}


def _array():
    """Distinct int16 values (HU-like, -1000..999) so any axis swap or flip shows."""
    return (np.arange(NZ * NY * NX).reshape(NZ, NY, NX) % 2000 - 1000).astype(np.int16)


def _image(direction):
    img = sitk.GetImageFromArray(_array())
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(direction.flatten().tolist())
    return img


def _expected_affine(direction):
    A = np.eye(4)
    A[:3, :3] = direction * np.array(SPACING)
    A[:3, 3] = ORIGIN
    return A


def _write_dicom_series(img, folder):
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(img.GetSize()[2]):
        s = img[:, :, k]
        s.SetMetaData("0008|0060", "CT")
        s.SetMetaData("0020|000d", uid + ".1")
        s.SetMetaData("0020|000e", uid + ".2")
        s.SetMetaData("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])))
        s.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        s.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{(direction name, format): path} of the synthetic volume written in every format."""
    root = tmp_path_factory.mktemp("volumes")
    out = {}
    for name, D in DIRECTIONS.items():
        img = _image(D)
        for ext in ("nii.gz", "nrrd", "mha"):
            path = root / f"{name}.{ext}"
            sitk.WriteImage(img, str(path))
            out[(name, ext)] = path
        if name == "rotated":
            _write_dicom_series(img, root / f"{name}_dicom")
            out[(name, "dicom")] = root / f"{name}_dicom"
    return out


CASES = [("rotated", f) for f in ("nii.gz", "nrrd", "mha", "dicom")] + [
    ("flipped", f) for f in ("nii.gz", "nrrd", "mha")
]


@pytest.mark.parametrize("name,fmt", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_load_ct_every_format_honours_direction(written, name, fmt):
    v = load_ct(written[(name, fmt)])
    assert v.data.shape == (NZ, NY, NX) and v.data.dtype == torch.float32
    np.testing.assert_array_equal(v.data.numpy(), _array().astype(np.float32))
    A = _expected_affine(DIRECTIONS[name])
    assert v.index_to_ct.dtype == torch.float64
    np.testing.assert_allclose(v.index_to_ct.numpy(), A, atol=1e-5)
    # A known voxel (i, j, k) = (3, 5, 7), value data[k, j, i], sits at its known LPS point.
    i, j, k = 3, 5, 7
    expected_point = np.array(ORIGIN) + DIRECTIONS[name] @ (np.array(SPACING) * np.array([i, j, k]))
    got = (v.index_to_ct @ torch.tensor([i, j, k, 1.0], dtype=torch.float64))[:3].numpy()
    np.testing.assert_allclose(got, expected_point, atol=1e-5)
    assert float(v.data[k, j, i]) == float(_array()[k, j, i])
    torch.testing.assert_close(v.spacing, torch.tensor(SPACING, dtype=torch.float64), atol=1e-6, rtol=0)
    centre = np.array(ORIGIN) + DIRECTIONS[name] @ (np.array(SPACING) * (np.array([NX, NY, NZ]) - 1) / 2)
    np.testing.assert_allclose(v.center.numpy(), centre, atol=1e-5)
    assert v.shape_xyz == (NX, NY, NZ)


def test_all_formats_agree(written):
    vols = [load_ct(written[c]) for c in CASES if c[0] == "rotated"]
    for v in vols[1:]:
        torch.testing.assert_close(v.data, vols[0].data)
        torch.testing.assert_close(v.index_to_ct, vols[0].index_to_ct, atol=1e-5, rtol=0)


def test_corners_are_voxel_edges(written):
    v = load_ct(written[("rotated", "mha")])
    c = v.corners()
    assert c.shape == (8, 3)
    D = DIRECTIONS["rotated"]
    lo = np.array(ORIGIN) + D @ (np.array(SPACING) * -0.5)
    hi = np.array(ORIGIN) + D @ (np.array(SPACING) * (np.array([NX, NY, NZ]) - 0.5))
    np.testing.assert_allclose(c[0].numpy(), lo, atol=1e-6)
    np.testing.assert_allclose(c[-1].numpy(), hi, atol=1e-6)
    np.testing.assert_allclose(c.mean(0).numpy(), v.center.numpy(), atol=1e-6)


def test_bundled_ct_is_lps(hu, ct_path):
    # NIfTI stores RAS; the ct frame is LPS: index_to_ct = diag(-1, -1, 1) @ the file's RAS affine.
    nib = pytest.importorskip("nibabel")
    ras = torch.from_numpy(np.asarray(nib.load(str(ct_path)).affine, dtype=np.float64))
    torch.testing.assert_close(
        hu.index_to_ct, torch.diag(torch.tensor([-1.0, -1, 1, 1], dtype=torch.float64)) @ ras, atol=1e-4, rtol=0
    )
    assert hu.data.shape == (133, 512, 512)
    # Hounsfield units: plenty of air near -1000 HU, bone above 1000 HU (-2048 marks outside the FOV).
    air = ((hu.data > -1050) & (hu.data < -950)).float().mean()
    assert float(air) > 0.05 and float(hu.data.max()) > 1000 and float(hu.data.min()) >= -3024


# ----------------------------------------------------------------------------- hu_to_mu
def test_hu_to_mu_values():
    hu = Volume(
        torch.tensor([[[-3000.0, -1000.0, -500.0, 0.0, 300.0, 1000.0, 2000.0]]]), torch.eye(4, dtype=torch.float64), "t"
    )
    mu = hu_to_mu(hu)
    expected = MU_WATER * torch.tensor([0.0, 0.0, 0.5, 1.0, 1.3, 2.0, 3.0])
    torch.testing.assert_close(mu.data[0, 0], expected)
    assert mu.data.dtype == torch.float32
    torch.testing.assert_close(mu.index_to_ct, hu.index_to_ct)
    boned = hu_to_mu(hu, bone_scale=3.0)  # threshold 350 HU
    torch.testing.assert_close(boned.data[0, 0], expected * torch.tensor([1.0, 1, 1, 1, 1, 3, 3]))
    custom = hu_to_mu(hu, bone_scale=2.0, bone_threshold=200.0)
    torch.testing.assert_close(custom.data[0, 0], expected * torch.tensor([1.0, 1, 1, 1, 2, 2, 2]))
    assert 0.015 < MU_WATER < 0.03  # 1/mm at diagnostic energies


def test_hu_to_mu_bundled(hu, mu):
    assert float(mu.data.min()) == 0.0
    air = hu.data < -1000
    assert float(mu.data[air].abs().max()) == 0.0
    assert mu.data.shape == hu.data.shape


# ----------------------------------------------------------------------------- downsampling
def _synthetic_volume(shape=(12, 16, 20)):
    D = DIRECTIONS["rotated"]
    A = torch.from_numpy(_expected_affine(D))
    data = torch.from_numpy(_array()[: shape[0], : shape[1], : shape[2]].astype(np.float32) + 1000)
    return Volume(data.contiguous(), A, "synthetic")


def test_downsampled_divisible_keeps_extent_and_centre():
    v = _synthetic_volume()
    c = v.downsampled((2, 4, 3))  # 20/2, 16/4, 12/3
    assert c.data.shape == (4, 4, 10)
    torch.testing.assert_close(c.spacing, v.spacing * torch.tensor([2.0, 4.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(c.center, v.center, atol=1e-9, rtol=0)
    torch.testing.assert_close(c.corners(), v.corners(), atol=1e-9, rtol=0)
    # Each coarse voxel is the mean of its block, and sits at the block's centre.
    block = v.data[3:6, 4:8, 2:4]
    assert float(c.data[1, 1, 1]) == pytest.approx(float(block.mean()), rel=1e-6)
    centre_of_block = (v.index_to_ct @ torch.tensor([2.5, 5.5, 4.0, 1.0], dtype=torch.float64))[:3]
    torch.testing.assert_close(
        (c.index_to_ct @ torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))[:3], centre_of_block
    )
    assert v.downsampled((1, 1, 1)) is v


def test_downsampled_non_divisible_corners_within_half_a_coarse_voxel():
    v = _synthetic_volume()
    f = (3, 3, 5)  # 20, 16, 12 are not multiples
    c = v.downsampled(f)
    # Corner displacement in coarse voxels, per grid axis.
    err = (c.corners() - v.corners()) @ torch.linalg.inv(c.index_to_ct[:3, :3]).T
    assert float(err.abs().max()) <= 0.5 + 1e-9
    centre_err = torch.linalg.inv(c.index_to_ct[:3, :3]) @ (c.center - v.center)
    assert float(centre_err.abs().max()) <= 0.25 + 1e-9


def test_downsampled_non_divisible_conserves_attenuation_mass():
    v = Volume(torch.ones(12, 16, 20), _synthetic_volume().index_to_ct, "ones")
    c = v.downsampled((3, 3, 5))

    def voxel(vol):
        return float(torch.linalg.det(vol.index_to_ct[:3, :3]).abs())

    assert float(c.data.sum()) * voxel(c) == pytest.approx(float(v.data.sum()) * voxel(v), rel=1e-3)


def test_downsampled_non_divisible_covers_the_original():
    # The coarse grid covers the whole original box.
    v = _synthetic_volume()
    f = (3, 3, 5)
    c = v.downsampled(f)
    assert c.data.shape == (math.ceil(12 / 5), math.ceil(16 / 3), math.ceil(20 / 3))
    to_coarse_index = torch.linalg.inv(c.index_to_ct)
    idx = (torch.cat([v.corners(), torch.ones(8, 1, dtype=torch.float64)], 1) @ to_coarse_index.T)[:, :3]
    hi = torch.tensor(c.shape_xyz, dtype=torch.float64) - 0.5
    assert bool((idx >= -0.5 - 1e-9).all()) and bool((idx <= hi + 1e-9).all())


def test_coarsened_to_bundled(mu):
    c = mu.coarsened_to(2.0)  # 0.703 x 0.703 x 2.5 mm -> factors (3, 3, 1)
    torch.testing.assert_close(c.spacing, mu.spacing * torch.tensor([3.0, 3.0, 1.0], dtype=torch.float64))
    assert c.data.shape == (133, 171, 171)
    assert float(c.data.sum()) * 9 == pytest.approx(float(mu.data.sum()), rel=1e-3)
    assert mu.coarsened_to(0.1) is mu


# ----------------------------------------------------------------------------- errors and labels
def test_load_ct_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_ct(tmp_path / "nope.nii.gz")
    fake = tmp_path / "x.nii.gz"
    fake.write_text("this is not an image\n")
    with pytest.raises(ValueError, match="cannot read CT"):
        load_ct(fake)
    empty = tmp_path / "empty_dicom"
    empty.mkdir()
    with pytest.raises(ValueError, match="DICOM"):
        load_ct(empty)
    junk = tmp_path / "junk_dicom"
    junk.mkdir()
    (junk / "a.dcm").write_text("not dicom")
    with pytest.raises(ValueError):
        load_ct(junk)
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.int16)), str(flat))
    with pytest.raises(ValueError, match="3D"):
        load_ct(flat)


def test_load_labels(written, tmp_path):
    ct = load_ct(written[("rotated", "nrrd")])
    lab = sitk.GetImageFromArray((_array() % 7).astype(np.uint8))
    lab.CopyInformation(_image(DIRECTIONS["rotated"]))
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(lab, str(path))
    labels = load_labels(path, ct)
    assert labels.data.dtype == torch.int16
    np.testing.assert_array_equal(labels.data.numpy(), _array() % 7)
    # Same size, different grid (moved origin) -> ValueError.
    moved = sitk.Image(lab)
    moved.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    with pytest.raises(ValueError, match="grid"):
        load_labels(tmp_path / "moved.nii.gz", ct)
    # Different size -> ValueError.
    small = sitk.GetImageFromArray(np.zeros((NZ, NY, NX - 1), np.uint8))
    sitk.WriteImage(small, str(tmp_path / "small.nii.gz"))
    with pytest.raises(ValueError, match="grid"):
        load_labels(tmp_path / "small.nii.gz", ct)
    with pytest.raises(FileNotFoundError):
        load_labels(tmp_path / "none.nii.gz", ct)


def test_default_paths_exist():
    assert volume.default_ct_path().is_file()
    assert volume.default_labels_path().is_file()
