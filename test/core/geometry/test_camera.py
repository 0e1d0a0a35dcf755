"""Pinhole intrinsics and the C-arm view parameterisation (diffpose_ros.core.geometry.camera)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from diffpose_ros.core.geometry import se3
from diffpose_ros.core.geometry.camera import BASE_ROTATION, Intrinsics, carm_pose


# ----------------------------------------------------------------------------- Intrinsics
def test_from_detector_contract_values():
    K = Intrinsics.from_detector(1020.0, 256, 256, 1.2)
    assert (K.width, K.height) == (256, 256)
    assert K.fx == pytest.approx(850.0) and K.fy == pytest.approx(850.0)
    assert (K.cx, K.cy) == (127.5, 127.5)
    K2 = Intrinsics.from_detector(1000.0, 300, 200, (0.5, 2.0), principal_point=(140.0, 105.5))
    assert K2.fx == pytest.approx(2000.0) and K2.fy == pytest.approx(500.0)
    assert (K2.cx, K2.cy) == (140.0, 105.5)
    assert K2.sdd(0.5) == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        Intrinsics.from_detector(1020.0, 256, 256, 0.0)
    with pytest.raises(ValueError):
        Intrinsics.from_detector(-5.0, 256, 256, 1.2)


def test_from_K_row_major_and_K_property():
    k = [850.0, 0.0, 130.0, 0.0, 900.0, 120.0, 0.0, 0.0, 1.0]
    K = Intrinsics.from_K(k, 256, 240)
    assert (K.fx, K.fy, K.cx, K.cy, K.width, K.height) == (850.0, 900.0, 130.0, 120.0, 256, 240)
    torch.testing.assert_close(K.K, torch.tensor(k, dtype=torch.float64).reshape(3, 3))
    assert Intrinsics.from_K(np.array(k).reshape(3, 3), 256, 240) == K
    assert Intrinsics.from_K(torch.tensor(k).reshape(3, 3), 256, 240) == K
    with pytest.raises(ValueError):
        Intrinsics.from_K(k[:6], 256, 240)


def test_uncalibrated_camera_is_rejected():
    with pytest.raises(ValueError, match="uncalibrated"):
        Intrinsics.from_K([0.0] * 9, 256, 256)
    with pytest.raises(ValueError, match="uncalibrated"):
        Intrinsics(256, 256, 0.0, 850.0, 127.5, 127.5)
    with pytest.raises(ValueError):
        Intrinsics(256, 256, float("nan"), 850.0, 127.5, 127.5)
    with pytest.raises(ValueError):
        Intrinsics(0, 256, 850.0, 850.0, 127.5, 127.5)


def test_yaml_round_trip(tmp_path):
    K = Intrinsics(512, 480, 1700.25, 1690.5, 260.125, 235.75)
    path = tmp_path / "carm.yaml"
    K.to_yaml(path, camera_name="my_carm")
    doc = yaml.safe_load(path.read_text())
    # camera_info_manager fields
    assert doc["image_width"] == 512 and doc["image_height"] == 480 and doc["camera_name"] == "my_carm"
    assert doc["camera_matrix"]["data"] == [1700.25, 0.0, 260.125, 0.0, 1690.5, 235.75, 0.0, 0.0, 1.0]
    assert len(doc["projection_matrix"]["data"]) == 12 and doc["projection_matrix"]["data"][3] == 0.0
    assert Intrinsics.from_yaml(path) == K
    assert Intrinsics.from_yaml(str(path)) == K


def test_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Intrinsics.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_width: [1, 2\ncamera_matrix: {")
    with pytest.raises(ValueError):
        Intrinsics.from_yaml(bad)
    incomplete = tmp_path / "incomplete.yaml"
    incomplete.write_text("image_width: 256\nimage_height: 256\n")
    with pytest.raises(ValueError, match="camera_matrix"):
        Intrinsics.from_yaml(incomplete)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ValueError):
        Intrinsics.from_yaml(scalar)
    zero = tmp_path / "zero.yaml"
    zero.write_text(yaml.safe_dump({"image_width": 256, "image_height": 256, "camera_matrix": {"data": [0.0] * 9}}))
    with pytest.raises(ValueError, match="uncalibrated"):
        Intrinsics.from_yaml(zero)


@pytest.mark.parametrize(
    "K,size",
    [
        (Intrinsics.from_detector(1020.0, 256, 256, 1.2), (64, None)),
        (Intrinsics.from_detector(1020.0, 256, 256, 1.2, principal_point=(133.2, 121.9)), (128, 96)),
        (Intrinsics(1024, 768, 4000.0, 4100.0, 500.3, 390.1), (300, None)),
    ],
)
def test_resized_keeps_physical_pixel_edges(K, size):
    Kr = K.resized(*size)
    W2 = size[0]
    H2 = size[1] if size[1] is not None else round(K.height * W2 / K.width)
    assert (Kr.width, Kr.height) == (W2, H2)
    # Source-frame points that project onto the image's outer pixel edges stay on them.
    z = 800.0
    edges_u = torch.tensor([-0.5, K.width - 0.5], dtype=torch.float64)
    edges_v = torch.tensor([-0.5, K.height - 0.5], dtype=torch.float64)
    pts = torch.stack(
        [(edges_u - K.cx) / K.fx * z, (edges_v - K.cy) / K.fy * z, torch.full((2,), z, dtype=torch.float64)], -1
    )
    uv = Kr.project(pts)
    torch.testing.assert_close(uv[:, 0], torch.tensor([-0.5, W2 - 0.5], dtype=torch.float64))
    torch.testing.assert_close(uv[:, 1], torch.tensor([-0.5, H2 - 0.5], dtype=torch.float64))
    # The same ray through the resized image: the principal ray still hits the principal point.
    torch.testing.assert_close(
        Kr.project(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)),
        torch.tensor([Kr.cx, Kr.cy], dtype=torch.float64),
    )
    # Resizing back is the identity.
    back = Kr.resized(K.width, K.height)
    for name in ("fx", "fy", "cx", "cy"):
        assert getattr(back, name) == pytest.approx(getattr(K, name), abs=1e-9)


def test_rays_project_round_trip_and_pixel_order():
    K = Intrinsics.from_detector(1020.0, 40, 30, 1.2, principal_point=(21.3, 13.8))
    d = K.rays()
    assert d.shape == (30 * 40, 3)
    torch.testing.assert_close(d[:, 2], torch.ones(1200, dtype=torch.float64))
    # Row-major: entry i * W + j is pixel (row i, column j), i.e. (u, v) = (j, i).
    i, j = 17, 5
    torch.testing.assert_close(K.project(d[i * 40 + j] * 650.0), torch.tensor([j, i], dtype=torch.float64))
    uv = K.project(d * 777.0)
    torch.testing.assert_close(uv, K.pixel_grid(torch.float64))
    # Arbitrary sub-pixel coordinates.
    pix = torch.rand(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [40.0, 30.0]
    )
    depth = torch.linspace(300, 1200, 50, dtype=torch.float64)[:, None]
    torch.testing.assert_close(K.project(K.rays(pix) * depth), pix)
    # The contract's pinhole, written out.
    p = torch.tensor([12.0, -7.0, 900.0], dtype=torch.float64)
    torch.testing.assert_close(
        K.project(p), torch.tensor([K.fx * 12 / 900 + K.cx, K.fy * -7 / 900 + K.cy], dtype=torch.float64)
    )


def test_mirrored():
    K = Intrinsics.from_detector(1020.0, 64, 48, 1.2, principal_point=(35.25, 20.0))
    M = K.mirrored()
    assert (M.fx, M.fy, M.cy, M.width, M.height) == (K.fx, K.fy, K.cy, K.width, K.height)
    assert M.cx == pytest.approx(63 - 35.25)
    assert M.mirrored() == K
    # A centred principal point is its own mirror.
    C = Intrinsics.from_detector(1020.0, 64, 48, 1.2)
    assert C.mirrored() == C
    # Column j of the flipped image shows what column W-1-j showed: a point seen at u maps to W-1-u
    # when the source x axis is reversed (the view from the detector side).
    pts = torch.tensor([[30.0, -12.0, 700.0], [-55.0, 8.0, 900.0]], dtype=torch.float64)
    flip = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    uv, uv_m = K.project(pts), M.project(pts * flip)
    torch.testing.assert_close(uv_m[:, 0], 63 - uv[:, 0])
    torch.testing.assert_close(uv_m[:, 1], uv[:, 1])


# ----------------------------------------------------------------------------- carm_pose
def contract_pose(alpha, beta, gamma, sod, c):
    """The contract's formula, written out with numpy."""

    def Rz(t):
        return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])

    def Rx(t):
        return np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])

    def H(R=None, t=(0, 0, 0)):
        M = np.eye(4)
        M[:3, :3] = np.eye(3) if R is None else R
        M[:3, 3] = t
        return M

    B = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)  # columns (1,0,0), (0,0,-1), (0,1,0)
    return H(t=c) @ H(Rz(alpha)) @ H(Rx(beta)) @ H(B) @ H(Rz(gamma)) @ H(t=(0, 0, -sod))


def test_carm_pose_base_view():
    iso = torch.tensor([10.0, -20.0, -175.0], dtype=torch.float64)
    T = carm_pose(0.0, 0.0, 0.0, 700.0, iso)
    assert T.shape == (4, 4) and T.dtype == torch.float64
    R = T[:3, :3]
    torch.testing.assert_close(R[:, 0], torch.tensor([1.0, 0, 0], dtype=torch.float64))  # columns -> patient left
    torch.testing.assert_close(R[:, 1], torch.tensor([0.0, 0, -1], dtype=torch.float64))  # rows -> feet
    torch.testing.assert_close(R[:, 2], torch.tensor([0.0, 1, 0], dtype=torch.float64))  # beam anterior -> posterior
    torch.testing.assert_close(BASE_ROTATION, R)
    # Source anterior of the isocentre (-y in LPS) by SOD.
    torch.testing.assert_close(T[:3, 3], iso - 700.0 * torch.tensor([0.0, 1, 0], dtype=torch.float64))
    torch.testing.assert_close(T[3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64))


@pytest.mark.parametrize(
    "angles",
    [(0.3, 0.0, 0.0), (0.0, -0.25, 0.0), (0.0, 0.0, 0.15), (-0.5, 0.33, -0.17), (math.pi / 2, 0.0, 0.0)],
)
def test_carm_pose_matches_contract_formula(angles):
    c = (13.6, 7.9, -175.0)
    T = carm_pose(*angles, 812.0, torch.tensor(c, dtype=torch.float64))
    np.testing.assert_allclose(T.numpy(), contract_pose(*angles, 812.0, c), atol=1e-10)


def test_carm_pose_alpha_sense():
    # alpha = +90 deg about the superior axis turns the beam from posterior (+y) to the patient's right (-x).
    T = carm_pose(math.pi / 2, 0.0, 0.0, 700.0, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(T[:3, 2], torch.tensor([-1.0, 0, 0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(T[:3, 3], torch.tensor([700.0, 0, 0], dtype=torch.float64), atol=1e-9, rtol=0)


def test_carm_pose_isocenter_projects_to_principal_point_batched():
    g = torch.Generator().manual_seed(0)
    n = 25
    alpha = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * math.radians(60)
    beta = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * math.radians(40)
    gamma = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * math.radians(20)
    sod = 650 + 200 * torch.rand(n, generator=g, dtype=torch.float64)
    iso = (
        torch.tensor([13.6, 7.9, -175.0], dtype=torch.float64)
        + (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 80
    )
    T = carm_pose(alpha, beta, gamma, sod, iso)
    assert T.shape == (n, 4, 4)
    R = T[:, :3, :3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(n, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(n, dtype=torch.float64))
    # The isocentre lies on the principal ray at depth SOD, so it projects to (cx, cy).
    p_src = se3.transform_points(se3.inverse(T), iso[:, None, :])[:, 0]
    torch.testing.assert_close(
        p_src, torch.stack([torch.zeros_like(sod), torch.zeros_like(sod), sod], -1), atol=1e-9, rtol=0
    )
    K = Intrinsics.from_detector(1020.0, 256, 256, 1.2, principal_point=(131.0, 124.5))
    uv = K.project(p_src)
    torch.testing.assert_close(uv, torch.tensor([131.0, 124.5], dtype=torch.float64).expand(n, 2))
    for b in (0, 7, 24):
        np.testing.assert_allclose(
            T[b].numpy(),
            contract_pose(float(alpha[b]), float(beta[b]), float(gamma[b]), float(sod[b]), iso[b].tolist()),
            atol=1e-9,
        )


def test_carm_pose_broadcasting():
    a = torch.tensor([[0.1], [0.2], [-0.3], [0.0]], dtype=torch.float64)  # (4, 1)
    b = torch.tensor([0.0, 0.1, -0.2], dtype=torch.float64)  # (3,)
    T = carm_pose(a, b, 0.05, 750.0, torch.zeros(3, dtype=torch.float64))
    assert T.shape == (4, 3, 4, 4)
    np.testing.assert_allclose(T[2, 1].numpy(), contract_pose(-0.3, 0.1, 0.05, 750.0, (0, 0, 0)), atol=1e-10)
    # A per-view isocentre broadcasts against scalar angles.
    T2 = carm_pose(0.0, 0.0, 0.0, 700.0, torch.tensor([[0.0, 0, 0], [5.0, 6, 7]], dtype=torch.float64))
    assert T2.shape == (2, 4, 4)
    torch.testing.assert_close(T2[1, :3, 3] - T2[0, :3, 3], torch.tensor([5.0, 6, 7], dtype=torch.float64))


def test_carm_sweep_orbits_smoothly_and_breathes():
    from diffpose_ros.core.model.sampling import carm_sweep

    center = torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)
    poses = carm_sweep(41, 10.0, center, alpha_deg=(-20.0, 20.0), beta_deg=0.0, breathing_mm=3.0, breathing_hz=0.25)
    assert poses.shape == (41, 4, 4)
    steps = torch.rad2deg(se3.rotation_angle(poses[1:], poses[:-1]))
    assert torch.allclose(steps, torch.full_like(steps, 1.0), atol=1e-9), "alpha advances 1 deg per frame"
    # Isocentre (on the principal ray, SOD ahead of the source) = centre + breathing along +z, +y/2.
    iso = poses[:, :3, 3] + 750.0 * poses[:, :3, 2]
    t = torch.arange(41, dtype=torch.float64) / 10.0
    phase = torch.sin(2 * math.pi * 0.25 * t)
    assert torch.allclose(iso[:, 2] - center[2], 3.0 * phase, atol=1e-9)
    assert torch.allclose(iso[:, 1] - center[1], 1.5 * phase, atol=1e-9)
    assert torch.allclose(iso[:, 0], center[0].expand(41), atol=1e-9)
    with pytest.raises(ValueError):
        carm_sweep(0, 10.0, center)


def test_load_poses_accepts_lists_and_names_the_bad_item(tmp_path):
    import json

    from diffpose_ros.core.io.files import load_poses

    T = carm_pose(0.1, 0.0, 0.0, 700.0, torch.zeros(3, dtype=torch.float64))
    (tmp_path / "a.json").write_text(json.dumps({"poses": [{"T_ct_source": T.tolist()}, T.tolist()]}))
    assert torch.equal(load_poses(tmp_path / "a.json"), torch.stack([T, T]))
    bad = T.clone()
    bad[0, 0] = 2.0
    (tmp_path / "b.json").write_text(json.dumps([T.tolist(), bad.tolist()]))
    with pytest.raises(ValueError, match="pose 1"):
        load_poses(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(ValueError, match="non-empty"):
        load_poses(tmp_path / "c.json")
