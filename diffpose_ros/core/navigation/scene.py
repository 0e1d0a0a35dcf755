"""What a 3D view shows of a registration, ROS-free (numpy): the CT's bounding box and bone surface,
and the C-arm's source, detector rectangle and corner rays at a pose. Everything in ``ct`` (LPS, mm).

The detector is placed with :func:`~.status.fluoro_ijk_to_world` (the frame's pixel grid on the
plane ``z = sdd_mm`` of the source frame), so the rectangle drawn is the image the navigator gets.
Used by the node's ``~/markers`` (``diffpose_ros/ros/markers.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage.measure import label, marching_cubes

from diffpose_ros.core.geometry.camera import Intrinsics
from diffpose_ros.core.geometry.conventions import fluoro_ijk_to_world
from diffpose_ros.core.rendering.volume import Volume, mu_of_hu

__all__ = ["BONE_HU", "MAX_TRIANGLES", "Frustum", "Surface", "bone_surface", "box_edges", "carm_frustum"]

BONE_HU = 200.0
"""Default bone threshold (Hounsfield units): cancellous bone is about 150-300, cortical bone more (and
contrast-filled vessels, e.g. the heart and aorta of the bundled CT, about 300-400)."""
MAX_TRIANGLES = 40_000
"""Default bound on the bone surface's triangles (under 3 MB as a ``TRIANGLE_LIST`` marker)."""


@dataclass(frozen=True)
class Surface:
    """A triangle mesh in ``ct`` (mm): ``vertices`` ``(V, 3)`` float64, ``faces`` ``(F, 3)`` vertex
    indices, counter-clockwise seen from outside the bone; ``voxel_mm``: the largest voxel edge of the
    grid it was extracted from (the mesh's resolution)."""

    vertices: np.ndarray
    faces: np.ndarray
    voxel_mm: float


@dataclass(frozen=True)
class Frustum:
    """The C-arm at one pose, in ``ct`` (mm): ``source`` ``(3,)``, the focal spot; ``corners``
    ``(4, 3)``, the detector's outer corners at pixel coordinates ``(u, v)`` = ``(-0.5, -0.5)``,
    ``(W - 0.5, -0.5)``, ``(W - 0.5, H - 0.5)``, ``(-0.5, H - 0.5)`` (in order around the rectangle)."""

    source: np.ndarray
    corners: np.ndarray

    @property
    def rays(self) -> np.ndarray:
        """``(4, 2, 3)`` segments from the source to each corner."""
        return np.stack([np.broadcast_to(self.source, self.corners.shape), self.corners], axis=1)


def box_edges(volume: Volume) -> np.ndarray:
    """``(12, 2, 3)`` edges of the voxel grid's outer box (voxel edges, not centres) in ``ct`` (mm)."""
    corners = volume.corners().cpu().numpy()  # index 4a + 2b + c for the (i, j, k) ends a, b, c
    pairs = [(n, n | bit) for n in range(8) for bit in (1, 2, 4) if not n & bit]
    return np.stack([corners[[a, b]] for a, b in pairs])


def carm_frustum(T_ct_source, intrinsics: Intrinsics, sdd_mm: float) -> Frustum:
    """The C-arm at the pose ``T_ct_source`` (4x4, mm) for a frame with ``intrinsics`` (of its
    un-mirrored pixels); the detector lies ``sdd_mm`` from the source along the principal ray."""
    k = intrinsics
    ijk_to_ct = fluoro_ijk_to_world(T_ct_source, k.fx, k.fy, k.cx, k.cy, sdd_mm)
    u0, v0, u1, v1 = -0.5, -0.5, k.width - 0.5, k.height - 0.5
    pixels = np.array([[u0, v0, 0.0, 1.0], [u1, v0, 0.0, 1.0], [u1, v1, 0.0, 1.0], [u0, v1, 0.0, 1.0]])
    source = np.asarray(T_ct_source, dtype=np.float64)[:3, 3]
    return Frustum(source=source.copy(), corners=(pixels @ ijk_to_ct.T)[:, :3])


def bone_surface(
    mu: Volume, bone_hu: float = BONE_HU, max_triangles: int = MAX_TRIANGLES, min_blob_mm3: float = 1000.0
) -> Surface:
    """The bone surface of the attenuation volume ``mu`` (1/mm, as in the patient model) in ``ct`` (mm).

    Marching cubes at the attenuation of ``bone_hu`` (:func:`~diffpose_ros.core.rendering.volume.mu_of_hu`;
    a ``bone_scale`` above 1 only raises bone further above it) on ``mu`` averaged to voxels of about
    2 mm, coarser until the mesh has at most ``max_triangles``; blobs smaller than ``min_blob_mm3``
    (noise, small calcifications) are left out.
    """
    if max_triangles < 100:
        raise ValueError(f"max_triangles must be at least 100, got {max_triangles}")
    level = float(mu_of_hu(bone_hu))
    voxel_mm = 2.0
    while True:
        grid = mu.coarsened_to(voxel_mm)
        vertices, faces = _isosurface(grid, level, min_blob_mm3)
        if len(faces) <= max_triangles:
            return Surface(vertices, faces, float(grid.spacing.max()))
        voxel_mm *= min(1.25, max(1.1, math.sqrt(len(faces) / max_triangles)))  # triangles ~ 1 / voxel^2


def _isosurface(grid: Volume, level: float, min_blob_mm3: float) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of ``grid`` at ``level`` without the blobs above it smaller than ``min_blob_mm3``."""
    data = grid.data.detach().float().cpu().numpy()
    blobs = label(data > level)
    voxel_mm3 = float(grid.spacing.prod())
    small = np.bincount(blobs.ravel()) * voxel_mm3 < min_blob_mm3
    small[0] = False  # below the level
    data = np.where(small[blobs], 0.0, data)
    if not (data > level).any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    # Padded by one empty voxel so that bone cut by the grid's faces gets a closed surface.
    kji, faces, _, _ = marching_cubes(np.pad(data, 1), level=level, allow_degenerate=False)
    affine = grid.index_to_ct.cpu().numpy()
    vertices = (kji[:, ::-1] - 1.0) @ affine[:3, :3].T + affine[:3, 3]
    # marching_cubes' faces, read with the axes reversed to (i, j, k), wind counter-clockwise seen from
    # outside; a left-handed affine mirrors that.
    if np.linalg.det(affine[:3, :3]) < 0:
        faces = faces[:, ::-1]
    return vertices, faces.astype(np.int64)
