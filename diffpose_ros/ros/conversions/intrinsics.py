"""``sensor_msgs/CameraInfo`` <-> the core's :class:`~diffpose_ros.core.geometry.camera.Intrinsics`.

``sensor_msgs`` is imported only where a message is built.
"""

from __future__ import annotations

import math

from diffpose_ros.core import Intrinsics

__all__ = ["camera_info_to_intrinsics", "intrinsics_to_camera_info"]


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
