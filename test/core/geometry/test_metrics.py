"""Registration error measures in mm and degrees (diffpose_ros.core.geometry.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffpose_ros.core.geometry import metrics, se3
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose

CENTRE = torch.tensor([13.6, 7.9, -175.0], dtype=torch.float64)


@pytest.fixture
def T():
    return carm_pose(
        math.radians(20),
        math.radians(-10),
        math.radians(5),
        750.0,
        CENTRE + torch.tensor([5.0, -3.0, 8.0], dtype=torch.float64),
    )


def test_grid_targets():
    g = metrics.grid_targets(CENTRE)
    assert g.shape == (27, 3) and g.dtype == torch.float64
    torch.testing.assert_close(g.mean(0), CENTRE)
    torch.testing.assert_close(g.min(0).values, CENTRE - 60)
    torch.testing.assert_close(g.max(0).values, CENTRE + 60)
    assert metrics.grid_targets(CENTRE, 10.0, 5).shape == (125, 3)


def test_mtre_identical_and_translated(T):
    targets = metrics.grid_targets(CENTRE)
    assert float(metrics.mtre(T, T, targets)) == 0.0
    d = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)  # |d| = 13
    shifted = se3.make_pose(torch.eye(3, dtype=torch.float64), d) @ T  # the source moved by d in ct
    torch.testing.assert_close(metrics.mtre(shifted, T, targets), torch.tensor(13.0, dtype=torch.float64))
    torch.testing.assert_close(
        metrics.mtre(T @ se3.make_pose(torch.eye(3, dtype=torch.float64), d), T, targets),
        torch.tensor(13.0, dtype=torch.float64),
    )
    # Batched over poses.
    both = metrics.mtre(torch.stack([T, shifted]), torch.stack([T, T]), targets)
    torch.testing.assert_close(both, torch.tensor([0.0, 13.0], dtype=torch.float64))


def test_mtre_rotation_about_principal_ray(T):
    # Rolling the source about its own z axis moves a target at distance r from that axis by 2 r sin(t/2):
    # this only holds when targets are mapped into the source frame (T^-1 p), as the definition says.
    targets = metrics.grid_targets(CENTRE, 40.0, 3)
    t = math.radians(4)
    rolled = T @ se3.exp(torch.tensor([0, 0, 0, 0, 0, t], dtype=torch.float64))
    p_src = (torch.linalg.inv(T) @ torch.cat([targets, torch.ones(27, 1, dtype=torch.float64)], 1).T).T[:, :3]
    r = p_src[:, :2].norm(dim=-1)
    expected = (2 * r * math.sin(t / 2)).mean()
    torch.testing.assert_close(metrics.mtre(rolled, T, targets), expected)


def test_mpe_shift_along_optical_axis(T):
    K = Intrinsics.from_detector(1020.0, 256, 256, 1.2)
    targets = metrics.grid_targets(CENTRE, 50.0, 3)
    dz = 40.0
    moved = T @ se3.make_pose(torch.eye(3, dtype=torch.float64), torch.tensor([0.0, 0.0, dz], dtype=torch.float64))
    # Written out with numpy: source-frame coordinates, pinhole projection, distance on the detector.
    Ti = np.linalg.inv(T.numpy())
    P = (Ti[:3, :3] @ targets.numpy().T).T + Ti[:3, 3]
    Q = P - np.array([0.0, 0.0, dz])
    uv_a = np.stack([850 * P[:, 0] / P[:, 2], 850 * P[:, 1] / P[:, 2]], -1)
    uv_b = np.stack([850 * Q[:, 0] / Q[:, 2], 850 * Q[:, 1] / Q[:, 2]], -1)
    expected = np.linalg.norm(uv_a - uv_b, axis=-1).mean() * 1.2
    got = float(metrics.mpe(moved, T, targets, K, 1.2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert got > 1.0
    # The isocentre is on the optical axis: a shift along the axis does not move its projection.
    iso = T[:3, 3] + 750.0 * T[:3, 2]
    assert float(metrics.mpe(moved, T, iso[None], K, 1.2)) < 1e-9
    # But its 3D error is the full shift.
    assert float(metrics.mtre(moved, T, iso[None])) == pytest.approx(dz)
    # mPE scales with the pixel size given.
    assert float(metrics.mpe(moved, T, targets, K, 0.6)) == pytest.approx(expected / 2, rel=1e-9)


def test_pose_errors(T):
    moved = se3.make_pose(torch.eye(3, dtype=torch.float64), torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)) @ T
    moved = moved @ se3.exp(torch.tensor([0, 0, 0, 0, math.radians(5), 0], dtype=torch.float64))
    e = metrics.pose_errors(moved, T, 510.0)
    assert set(e) == {"rotation_deg", "translation_mm", "double_geodesic_mm"}
    assert e["rotation_deg"] == pytest.approx(5.0, abs=1e-9)
    assert e["translation_mm"] == pytest.approx(5.0, abs=1e-9)
    assert e["double_geodesic_mm"] == pytest.approx(math.hypot(510.0 * math.radians(5), 5.0), abs=1e-9)
    z = metrics.pose_errors(T, T, 510.0)
    assert z["rotation_deg"] == pytest.approx(0.0, abs=1e-6) and z["translation_mm"] == 0.0
