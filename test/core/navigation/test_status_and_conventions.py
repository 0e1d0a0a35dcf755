"""Navigation outputs (core.geometry.conventions, core.navigation): CT RAS, the frame on its detector, status
JSON, staleness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
from diffpose_ros.core.geometry.conventions import LPS_TO_RAS, carm_to_ras, fluoro_ijk_to_world, ras_to_carm
from diffpose_ros.core.navigation.stamps import stamp_from_ns
from diffpose_ros.core.navigation.status import PoseStatus, StaleTimer

SDD = 1020.0


def _pose() -> np.ndarray:
    centre = torch.tensor([12.0, -30.0, 250.0], dtype=torch.float64)
    return carm_pose(math.radians(17.0), math.radians(-8.0), math.radians(4.0), 760.0, centre).numpy()


def _corners_and_centre(width: int, height: int):
    return [(0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1), ((width - 1) / 2, (height - 1) / 2)]


@pytest.mark.parametrize("mirror", [False, True])
def test_pixel_centres_lie_on_their_rays_on_the_detector_plane(mirror):
    T_world_source = carm_to_ras(_pose())
    width, height = 300, 220
    # Delivered intrinsics (off-centre principal point, non-square pixels); a mirrored frame's
    # camera_info describes the flipped image, the true one is its mirror (as the node reads it).
    delivered = Intrinsics.from_detector(SDD, width, height, (0.9, 1.1), principal_point=(160.0, 100.5))
    true = delivered.mirrored() if mirror else delivered
    M = fluoro_ijk_to_world(T_world_source, delivered.fx, delivered.fy, delivered.cx, delivered.cy, SDD, mirror)
    source = T_world_source[:3, 3]
    principal = T_world_source[:3, 2]
    K_inv = np.linalg.inv(true.K.numpy())
    for i, j in _corners_and_centre(width, height):
        p = (M @ [i, j, 0.0, 1.0])[:3]
        u = width - 1 - i if mirror else i
        expected = (T_world_source @ np.append(SDD * (K_inv @ [u, j, 1.0]), 1.0))[:3]
        np.testing.assert_allclose(p, expected, atol=0.1)
        # On the pixel's ray: the source-frame point projects back to that pixel...
        q = (np.linalg.inv(T_world_source) @ np.append(p, 1.0))[:3]
        assert true.fx * q[0] / q[2] + true.cx == pytest.approx(u, abs=1e-6)
        assert true.fy * q[1] / q[2] + true.cy == pytest.approx(j, abs=1e-6)
        # ...on the plane perpendicular to the principal ray at the SDD.
        assert np.dot(p - source, principal) == pytest.approx(SDD, abs=0.1)
    # The k axis is the detector normal, (i, j, k) right-handed; spacing along i and j as on the detector.
    assert np.linalg.det(M[:3, :3]) > 0
    assert abs(np.dot(M[:3, 2], principal)) == pytest.approx(np.linalg.norm(M[:3, 2]))
    assert np.linalg.norm(M[:3, 0]) == pytest.approx(SDD / delivered.fx)
    assert np.linalg.norm(M[:3, 1]) == pytest.approx(SDD / delivered.fy)


def test_mirrored_frame_is_the_flipped_frame():
    T = carm_to_ras(_pose())
    k = Intrinsics.from_detector(SDD, 256, 256, 1.2, principal_point=(140.0, 127.5))
    plain = fluoro_ijk_to_world(T, k.fx, k.fy, k.cx, k.cy, SDD)
    m = k.mirrored()
    mirrored = fluoro_ijk_to_world(T, m.fx, m.fy, m.cx, m.cy, SDD, mirror=True)
    for i, j in _corners_and_centre(256, 256):
        np.testing.assert_allclose(mirrored @ [255 - i, j, 0, 1], plain @ [i, j, 0, 1], atol=1e-9)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError):
        fluoro_ijk_to_world(np.eye(4), 850.0, 850.0, 127.5, 127.5, 0.0)


def test_carm_to_ras_is_ct_to_ct_ras_applied_to_the_pose():
    from diffpose_ros.ros.conversions import CT_TO_CT_RAS

    T = _pose()
    np.testing.assert_allclose(carm_to_ras(T), CT_TO_CT_RAS @ T, atol=1e-12)
    np.testing.assert_allclose(carm_to_ras(T, CT_TO_CT_RAS), LPS_TO_RAS @ T, atol=1e-12)
    # A point 100 mm along the principal ray: LPS x and y change sign, z stays.
    p_ct = T @ [0, 0, 100, 1]
    np.testing.assert_allclose(carm_to_ras(T) @ [0, 0, 100, 1], p_ct * [-1, -1, 1, 1], atol=1e-9)


def test_ras_to_carm_undoes_carm_to_ras():
    T, T_ct_ctras = _pose(), np.diag([-1.0, 1.0, -1.0, 1.0])
    np.testing.assert_allclose(ras_to_carm(carm_to_ras(T)), T, atol=1e-12)
    np.testing.assert_allclose(ras_to_carm(carm_to_ras(T, T_ct_ctras), T_ct_ctras), T, atol=1e-12)


def test_pose_status_json_round_trip():
    status = PoseStatus(True, "", 0.83, 0.42, "1712345678.000000042", "cnn", "carm_source_optical", False)
    doc = json.loads(status.to_json())
    assert doc == {
        "valid": True,
        "reason": "",
        "similarity": 0.83,
        "latency_s": 0.42,
        "stamp": "1712345678.000000042",
        "source": "cnn",
        "frame_id": "carm_source_optical",
        "in_view_range": False,
    }
    assert PoseStatus.from_json(status.to_json()) == status
    del doc["in_view_range"]  # a status from before the key: unknown
    assert PoseStatus.from_json(json.dumps(doc)).in_view_range is None
    assert status.stamp_ns == 1712345678_000000042
    assert stamp_from_ns(status.stamp_ns) == status.stamp
    rejected = PoseStatus(False, "rejected by the gate: similarity 0.2", float("nan"), None, "5.000000000", None)
    doc = json.loads(rejected.to_json())  # strict JSON: no NaN
    assert doc["similarity"] is None and doc["source"] is None and doc["valid"] is False
    for bad in ("", "[]", '{"valid": true}', '{"valid":true,"reason":"","stamp":"12.5"}'):
        with pytest.raises(ValueError):
            PoseStatus.from_json(bad)


def test_stale_timer():
    timer = StaleTimer(1.0, start=100.0)
    assert not timer.stale(100.5) and timer.stale(101.01) and not timer.ever_accepted
    timer.accepted(101.2)
    assert timer.ever_accepted and not timer.stale(102.1) and timer.stale(102.3)
    assert timer.age(102.2) == pytest.approx(1.0)
