"""Poses as ``geometry_msgs`` (``Transform``, ``Pose``, ``TransformStamped``, ``PoseWithCovarianceStamped``).

The core works in millimetres with 4x4 poses such as ``T_ct_source``; ROS in metres with a translation
and a unit quaternion ``(x, y, z, w)`` (roma's convention, ``w >= 0`` here). Covariances: the core
gives a 6x6 over the right-perturbation twist ``xi = (rho mm, phi rad)`` in the source frame;
``geometry_msgs/PoseWithCovariance`` wants ``(x, y, z, rot X, rot Y, rot Z)`` about the *parent*
frame's axes, position in metres (:func:`covariance_to_ros`). ``geometry_msgs`` is imported only
where a message is built.
"""

from __future__ import annotations

import numpy as np
import roma
import torch

from diffpose_ros.core import LPS_TO_RAS, covariance_in_parent
from diffpose_ros.core.geometry import se3

__all__ = [
    "CT_TO_CT_RAS",
    "MM_PER_M",
    "covariance_to_ros",
    "matrix_to_pose",
    "matrix_to_transform",
    "matrix_to_translation_quaternion",
    "pose_to_matrix",
    "pose_with_covariance_stamped",
    "transform_stamped",
    "transform_to_matrix",
    "translation_quaternion_to_matrix",
]

MM_PER_M = 1000.0

CT_TO_CT_RAS = LPS_TO_RAS
"""``T_ct_ctras``: maps RAS points (3D Slicer) into ``ct`` (LPS); its own inverse (180 deg about z)."""


def _as_matrix(T) -> np.ndarray:
    M = np.asarray(T.detach().cpu().double() if isinstance(T, torch.Tensor) else T, dtype=np.float64)
    if M.shape != (4, 4) or not np.isfinite(M).all():
        raise ValueError(f"a pose must be a finite 4x4 matrix, got shape {M.shape}")
    return M


def matrix_to_translation_quaternion(T_mm) -> tuple[np.ndarray, np.ndarray]:
    """Translation (m) and unit quaternion ``(x, y, z, w)`` with ``w >= 0`` of a 4x4 pose in mm."""
    M = _as_matrix(T_mm)
    q = roma.rotmat_to_unitquat(torch.from_numpy(M[:3, :3].copy())).numpy()
    q = q / np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    return M[:3, 3] / MM_PER_M, q


def translation_quaternion_to_matrix(translation_m, quaternion_xyzw) -> np.ndarray:
    """4x4 pose in mm from a translation (m) and a quaternion ``(x, y, z, w)`` (normalised here)."""
    q = np.asarray(quaternion_xyzw, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(q).all() or n < 1e-9:
        raise ValueError(f"invalid quaternion {q.tolist()}")
    M = np.eye(4)
    M[:3, :3] = roma.unitquat_to_rotmat(torch.from_numpy(q / n)).numpy()
    M[:3, 3] = np.asarray(translation_m, dtype=np.float64) * MM_PER_M
    return M


def matrix_to_transform(T_mm):
    """``geometry_msgs/Transform`` (m, quaternion) of a 4x4 pose in mm."""
    from geometry_msgs.msg import Transform

    t, q = matrix_to_translation_quaternion(T_mm)
    msg = Transform()
    msg.translation.x, msg.translation.y, msg.translation.z = (float(v) for v in t)
    msg.rotation.x, msg.rotation.y, msg.rotation.z, msg.rotation.w = (float(v) for v in q)
    return msg


def transform_to_matrix(msg) -> np.ndarray:
    """4x4 pose in mm of a ``geometry_msgs/Transform``."""
    t, r = msg.translation, msg.rotation
    return translation_quaternion_to_matrix((t.x, t.y, t.z), (r.x, r.y, r.z, r.w))


def matrix_to_pose(T_mm):
    """``geometry_msgs/Pose`` (m, quaternion) of a 4x4 pose in mm."""
    from geometry_msgs.msg import Pose

    t, q = matrix_to_translation_quaternion(T_mm)
    msg = Pose()
    msg.position.x, msg.position.y, msg.position.z = (float(v) for v in t)
    msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w = (float(v) for v in q)
    return msg


def pose_to_matrix(msg) -> np.ndarray:
    """4x4 pose in mm of a ``geometry_msgs/Pose``."""
    p, r = msg.position, msg.orientation
    return translation_quaternion_to_matrix((p.x, p.y, p.z), (r.x, r.y, r.z, r.w))


def covariance_to_ros(T_ct_source_mm, covariance_xi) -> list[float]:
    """Row-major 36 floats for ``geometry_msgs/PoseWithCovariance.covariance``.

    ``covariance_xi``: 6x6 over ``xi = (rho mm, phi rad)`` of ``T exp(xi)`` (source frame), as the
    core's :class:`~diffpose_ros.core.registration.result.FrameResult` gives it. Re-expressed about the parent
    (``ct``) axes by :func:`~diffpose_ros.core.registration.result.covariance_in_parent`, then the position rows
    and columns are scaled mm -> m (position block x 1e-6, position-rotation blocks x 1e-3) and the
    result is symmetrised. A non-finite covariance becomes the ROS "unknown" marker: all zeros with
    ``-1`` in the first entry.
    """
    T = torch.as_tensor(_as_matrix(T_ct_source_mm))
    C = torch.as_tensor(np.asarray(covariance_xi, dtype=np.float64))
    if C.shape != (6, 6):
        raise ValueError(f"covariance must be 6x6, got {tuple(C.shape)}")
    if not torch.isfinite(C).all():
        unknown = [0.0] * 36
        unknown[0] = -1.0
        return unknown
    P = covariance_in_parent(T, C)
    s = torch.tensor([1 / MM_PER_M] * 3 + [1.0] * 3, dtype=torch.float64)
    P = s[:, None] * P * s[None, :]
    P = 0.5 * (P + P.T)
    return [float(v) for v in P.flatten().tolist()]


def transform_stamped(T_parent_child_mm, stamp, parent: str, child: str, invert: bool = False):
    """``geometry_msgs/TransformStamped`` ``parent`` -> ``child`` at ``stamp`` (m); ``invert``
    publishes the same relation the other way round (``child`` -> ``parent``, the inverse pose)."""
    from geometry_msgs.msg import TransformStamped

    T = torch.as_tensor(_as_matrix(T_parent_child_mm))
    msg = TransformStamped()
    msg.header.stamp = stamp
    if invert:
        msg.header.frame_id, msg.child_frame_id = child, parent
        msg.transform = matrix_to_transform(se3.inverse(T))
    else:
        msg.header.frame_id, msg.child_frame_id = parent, child
        msg.transform = matrix_to_transform(T)
    return msg


def pose_with_covariance_stamped(T_ct_source_mm, covariance_xi, stamp, frame_id: str):
    """``geometry_msgs/PoseWithCovarianceStamped`` of the source in ``frame_id`` (see :func:`covariance_to_ros`)."""
    from geometry_msgs.msg import PoseWithCovarianceStamped

    msg = PoseWithCovarianceStamped()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.pose.pose = matrix_to_pose(T_ct_source_mm)
    msg.pose.covariance = covariance_to_ros(T_ct_source_mm, covariance_xi)
    return msg
