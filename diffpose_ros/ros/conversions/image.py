"""``sensor_msgs/Image`` <-> numpy arrays, and the core ``Frame`` of an X-ray image.

Follows the distro ``cv_bridge`` semantics (``imgmsg_to_cv2`` / ``cv2_to_imgmsg``): rows are ``step``
bytes apart (padding after ``width * channels * bytes`` is ignored), multi-byte pixels are big-endian
when ``is_bigendian`` is set, and a message whose ``data`` is not ``height * step`` bytes is refused
as wrongly formed. Ours because PyPI's ``cv-bridge`` is ROS 1's and does not work with numpy 2.
``sensor_msgs`` is imported only where a message is built.
"""

from __future__ import annotations

import array

import numpy as np

from diffpose_ros.core import Frame, Intrinsics, prepare_frame

__all__ = [
    "IMAGE_ENCODINGS",
    "SINGLE_CHANNEL_ENCODINGS",
    "frame_kind",
    "image_to_frame",
    "image_to_numpy",
    "numpy_to_image",
]

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
    """The core :class:`~diffpose_ros.core.frames.prepare.Frame` of an X-ray ``sensor_msgs/Image``.

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
