"""Conversions between ROS 2 messages and the core's arrays, intrinsics and poses.

Images follow the distro ``cv_bridge`` semantics (``imgmsg_to_cv2`` / ``cv2_to_imgmsg``): rows are
``step`` bytes apart (padding after ``width * channels * bytes`` is ignored), multi-byte pixels are
big-endian when ``is_bigendian`` is set, and a message whose ``data`` is not ``height * step`` bytes
is refused as wrongly formed. PyPI's ``cv-bridge`` is ROS 1's and broken on numpy 2, so this module
is ours (tested in ``test/ros/test_ros_conversions.py``).

Poses: the core works in millimetres with ``T_ct_source`` (4x4); ROS in metres with a translation
and a unit quaternion ``(x, y, z, w)`` (roma's convention, ``w >= 0`` here). Covariances: the core
gives a 6x6 over the right-perturbation twist ``xi = (rho mm, phi rad)`` in the source frame;
``geometry_msgs/PoseWithCovariance`` wants ``(x, y, z, rot X, rot Y, rot Z)`` about the *parent*
frame's axes, position in metres (:func:`covariance_to_ros`).

Transforms go out through :class:`TransformPublisher`: ``tf2_ros``'s broadcasters where a ROS 2
install has them, else ``tf2_msgs/TFMessage`` on ``/tf`` and ``/tf_static`` with tf2's QoS (the
PyPI wheels have no ``tf2_ros``); the choice is made there and nowhere else.

Message classes are imported inside the functions that build messages, so the module imports
without ROS (only numpy, torch and roma).
"""

from __future__ import annotations

import array
import math

import numpy as np
import roma
import torch

from ..core import se3
from ..core.geometry import Intrinsics
from ..core.navigation import LPS_TO_RAS
from ..core.pipeline import covariance_in_parent
from ..core.preprocess import Frame, prepare_frame

__all__ = [
    "IMAGE_ENCODINGS",
    "frame_kind",
    "image_to_frame",
    "image_to_numpy",
    "numpy_to_image",
    "camera_info_to_intrinsics",
    "intrinsics_to_camera_info",
    "matrix_to_translation_quaternion",
    "translation_quaternion_to_matrix",
    "matrix_to_transform",
    "transform_to_matrix",
    "matrix_to_pose",
    "pose_to_matrix",
    "covariance_to_ros",
    "transform_stamped",
    "pose_with_covariance_stamped",
    "TransformPublisher",
    "input_qos",
    "CT_TO_CT_RAS",
]

MM_PER_M = 1000.0

# encoding -> (numpy dtype, channels), as in sensor_msgs/image_encodings.hpp.
IMAGE_ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgb8": (np.dtype(np.uint8), 3),
}
"""Encodings :func:`numpy_to_image` writes; :func:`image_to_numpy` reads the single-channel ones."""

SINGLE_CHANNEL_ENCODINGS = ("mono8", "8UC1", "mono16", "16UC1", "32FC1")

CT_TO_CT_RAS = LPS_TO_RAS
"""``T_ct_ctras``: maps RAS points (3D Slicer) into ``ct`` (LPS); its own inverse (180 deg about z)."""


# ---------------------------------------------------------------------------------------- images
def image_to_numpy(msg, encodings=SINGLE_CHANNEL_ENCODINGS) -> np.ndarray:
    """``(H, W)`` native-endian array (a copy) of a single-channel ``sensor_msgs/Image``.

    mono8/8UC1 -> uint8, mono16/16UC1 -> uint16, 32FC1 -> float32. ``ValueError`` naming the problem
    for an unsupported encoding, a zero size, ``step`` smaller than one row of pixels, or ``data``
    that is not ``height * step`` bytes.
    """
    encoding = str(msg.encoding)
    if encoding not in encodings or encoding not in IMAGE_ENCODINGS:
        raise ValueError(
            f"unsupported image encoding {encoding!r}: expected one of {', '.join(encodings)} "
            "(single-channel X-ray frames)"
        )
    dtype, channels = IMAGE_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ValueError(f"image step {step} is smaller than one row of {width} {encoding} pixels ({row_bytes} bytes)")
    data = msg.data
    size = len(data) * (data.itemsize if isinstance(data, array.array) else 1)
    if size != height * step:
        what = "shorter" if size < height * step else "longer"
        raise ValueError(f"image data is {size} bytes, {what} than height * step = {height} * {step} = {height * step}")
    buffer = np.frombuffer(data, dtype=np.uint8)
    dt = dtype.newbyteorder(">" if msg.is_bigendian else "<") if dtype.itemsize > 1 else dtype
    shape = (height, width) if channels == 1 else (height, width, channels)
    strides = (step, dt.itemsize) if channels == 1 else (step, channels * dt.itemsize, dt.itemsize)
    view = np.ndarray(shape=shape, dtype=dt, buffer=buffer, strides=strides)
    return view.astype(dtype.newbyteorder("="), copy=True)


def image_to_frame(msg, intrinsics: Intrinsics, mirror: bool = False, input_kind: str = "transmission") -> Frame:
    """The core :class:`~diffpose_ros.core.preprocess.Frame` of an X-ray ``sensor_msgs/Image``.

    ``intrinsics``: the camera of the delivered pixels; ``input_kind``: what ``32FC1`` frames hold
    (``transmission`` or ``line_integrals``; integer encodings are always transmission).
    ``ValueError`` naming the problem for a malformed message or a frame that cannot be registered.
    """
    return prepare_frame(image_to_numpy(msg), frame_kind(msg.encoding, input_kind), intrinsics, mirror)


def frame_kind(encoding: str, input_kind: str) -> str:
    """What an image's pixels hold: ``line_integrals`` for ``32FC1`` when ``input_kind`` says so,
    else ``transmission`` (every integer encoding is a detector's transmission image)."""
    return "line_integrals" if encoding == "32FC1" and input_kind == "line_integrals" else "transmission"


def numpy_to_image(
    image: np.ndarray,
    encoding: str | None = None,
    header=None,
    step: int | None = None,
    is_bigendian: bool = False,
):
    """A ``sensor_msgs/Image`` holding ``image`` (``(H, W)`` or ``(H, W, 3)``).

    ``encoding`` defaults from the dtype (uint8 -> mono8, uint16 -> mono16, float32 -> 32FC1,
    ``(H, W, 3)`` uint8 -> bgr8); ``step`` (bytes per row, default tight) may add padding and
    ``is_bigendian`` writes multi-byte pixels big-endian (both for testing readers).
    """
    from sensor_msgs.msg import Image

    a = np.asarray(image)
    if encoding is None:
        defaults = {
            (np.dtype(np.uint8), 2): "mono8",
            (np.dtype(np.uint16), 2): "mono16",
            (np.dtype(np.float32), 2): "32FC1",
            (np.dtype(np.uint8), 3): "bgr8",
        }
        encoding = defaults.get((a.dtype, a.ndim))
        if encoding is None:
            raise ValueError(f"no default encoding for a {a.ndim}D {a.dtype} array; pass encoding=")
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}: one of {', '.join(IMAGE_ENCODINGS)}")
    dtype, channels = IMAGE_ENCODINGS[encoding]
    expected_ndim = 2 if channels == 1 else 3
    if a.ndim != expected_ndim or (channels > 1 and a.shape[2] != channels):
        raise ValueError(f"{encoding} needs an array of shape (H, W{'' if channels == 1 else ', 3'}), got {a.shape}")
    height, width = a.shape[:2]
    row_bytes = width * channels * dtype.itemsize
    step = row_bytes if step is None else int(step)
    if step < row_bytes:
        raise ValueError(f"step {step} is smaller than a row ({row_bytes} bytes)")
    dt = dtype.newbyteorder(">" if is_bigendian else "<") if dtype.itemsize > 1 else dtype
    raw = np.ascontiguousarray(a.astype(dt, copy=False)).view(np.uint8).reshape(height, row_bytes)
    if step > row_bytes:
        raw = np.concatenate([raw, np.zeros((height, step - row_bytes), np.uint8)], axis=1)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.encoding, msg.step = int(height), int(width), encoding, step
    msg.is_bigendian = int(bool(is_bigendian) and dtype.itemsize > 1)
    payload = array.array("B")
    payload.frombytes(np.ascontiguousarray(raw).tobytes())
    msg.data = payload
    return msg


# ------------------------------------------------------------------------------------ intrinsics
def camera_info_to_intrinsics(info, image_width: int | None = None, image_height: int | None = None) -> Intrinsics:
    """Core :class:`Intrinsics` of the image described by a ``sensor_msgs/CameraInfo``.

    Uses ``K`` (``fx = K[0]``, ``cx = K[2]``, ``fy = K[4]``, ``cy = K[5]``; distortion is ignored:
    a C-arm detector is flat). A region of interest and binning are applied with the core's pixel
    centre convention (``u' = (u - x_offset + 0.5) / binning - 0.5``). ``width``/``height`` of 0 mean
    "the image's size". ``ValueError`` for an uncalibrated camera (``K`` all zeros or ``fx, fy <= 0``),
    non-finite values, or a size that does not match ``image_width x image_height``.
    """
    k = [float(v) for v in info.k]
    if len(k) != 9:
        raise ValueError(f"camera_info K has {len(k)} entries, expected 9")
    if not all(math.isfinite(v) for v in k):
        raise ValueError(f"camera_info K holds NaN/Inf values: {k}")
    if all(v == 0.0 for v in k) or k[0] <= 0 or k[4] <= 0:
        raise ValueError(
            f"camera_info is uncalibrated: K = {k} (K[0] == 0 or fx, fy <= 0); calibrate the camera "
            "or set the intrinsics parameters"
        )
    bx, by = max(1, int(info.binning_x)), max(1, int(info.binning_y))
    roi = info.roi
    x0, y0 = (int(roi.x_offset), int(roi.y_offset)) if roi.width > 0 and roi.height > 0 else (0, 0)
    width = int(roi.width) if roi.width > 0 else int(info.width)
    height = int(roi.height) if roi.height > 0 else int(info.height)
    width, height = width // bx, height // by
    if width <= 0 or height <= 0:
        if image_width is None or image_height is None:
            raise ValueError(f"camera_info has no image size ({info.width}x{info.height})")
        width, height = int(image_width), int(image_height)
    if image_width is not None and (width, height) != (int(image_width), int(image_height)):
        raise ValueError(
            f"camera_info describes {width}x{height} pixels (after ROI/binning) but the image is "
            f"{image_width}x{image_height}"
        )
    return Intrinsics(
        width,
        height,
        k[0] / bx,
        k[4] / by,
        (k[2] - x0 + 0.5) / bx - 0.5,
        (k[5] - y0 + 0.5) / by - 0.5,
    )


def intrinsics_to_camera_info(k: Intrinsics, header=None):
    """A ``sensor_msgs/CameraInfo`` for core intrinsics (plumb_bob, zero distortion, P = [K | 0])."""
    from sensor_msgs.msg import CameraInfo

    info = CameraInfo()
    if header is not None:
        info.header = header
    info.width, info.height = int(k.width), int(k.height)
    info.distortion_model = "plumb_bob"
    info.d = [0.0] * 5
    info.k = [k.fx, 0.0, k.cx, 0.0, k.fy, k.cy, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [k.fx, 0.0, k.cx, 0.0, 0.0, k.fy, k.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


# ----------------------------------------------------------------------------------------- poses
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
    core's :class:`~diffpose_ros.core.pipeline.FrameResult` gives it. Re-expressed about the parent
    (``ct``) axes by :func:`~diffpose_ros.core.pipeline.covariance_in_parent`, then the position rows
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


# --------------------------------------------------------------------------------------- messages
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


class TransformPublisher:
    """``send(tf)`` on ``/tf`` and ``send_static(tf)`` on ``/tf_static`` for ``node``: through
    ``tf2_ros`` when it imports, else as ``tf2_msgs/TFMessage`` with tf2's QoS (``/tf`` reliable,
    depth 100; ``/tf_static`` reliable, transient local, depth 1)."""

    def __init__(self, node):
        try:  # a ROS 2 install has tf2_ros; the PyPI wheels do not
            import tf2_ros
        except ImportError:
            tf2_ros = None
        if tf2_ros is not None:  # pragma: no cover - ROS 2 install
            self.via = "tf2_ros"
            self._dynamic = tf2_ros.TransformBroadcaster(node)
            self._static = tf2_ros.StaticTransformBroadcaster(node)
            return
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from tf2_msgs.msg import TFMessage

        self.via = "tf2_msgs/TFMessage on /tf"
        dynamic_pub = node.create_publisher(
            TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        )
        static_qos = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        static_pub = node.create_publisher(TFMessage, "/tf_static", static_qos)
        self._dynamic = _RawBroadcaster(dynamic_pub, TFMessage)
        self._static = _RawBroadcaster(static_pub, TFMessage)

    def send(self, transform) -> None:
        self._dynamic.sendTransform(transform)

    def send_static(self, transform) -> None:
        self._static.sendTransform(transform)


class _RawBroadcaster:
    """The ``sendTransform`` of a tf2_ros broadcaster over a plain ``TFMessage`` publisher."""

    def __init__(self, publisher, message_type):
        self._publisher, self._type = publisher, message_type

    def sendTransform(self, transform) -> None:  # tf2_ros's method name
        self._publisher.publish(self._type(transforms=[transform]))


def input_qos(reliable: bool, depth: int):
    """QoS of the node's inputs: keep the last ``depth``, volatile; best effort (the sensor-data
    profile, which also receives from reliable publishers) unless ``reliable``."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(
        depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=reliability, durability=DurabilityPolicy.VOLATILE
    )
