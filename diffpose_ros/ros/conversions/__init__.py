"""Conversions between ROS 2 messages and the core's arrays, intrinsics and poses.

- :mod:`.image`: ``sensor_msgs/Image`` <-> numpy (the distro ``cv_bridge`` semantics) and the core
  ``Frame`` of an X-ray image;
- :mod:`.intrinsics`: ``sensor_msgs/CameraInfo`` <-> the core's ``Intrinsics``;
- :mod:`.geometry`: 4x4 poses in mm <-> ``geometry_msgs`` in metres, covariances about the parent axes.

Message classes are imported inside the functions that build messages, so these modules import
without ROS (numpy, torch and roma only).
"""

from .geometry import (
    CT_TO_CT_RAS,
    MM_PER_M,
    covariance_to_ros,
    matrix_to_pose,
    matrix_to_transform,
    matrix_to_translation_quaternion,
    pose_to_matrix,
    pose_with_covariance_stamped,
    transform_stamped,
    transform_to_matrix,
    translation_quaternion_to_matrix,
)
from .image import IMAGE_ENCODINGS, SINGLE_CHANNEL_ENCODINGS, frame_kind, image_to_frame, image_to_numpy, numpy_to_image
from .intrinsics import camera_info_to_intrinsics, intrinsics_to_camera_info

__all__ = [
    "CT_TO_CT_RAS",
    "IMAGE_ENCODINGS",
    "MM_PER_M",
    "SINGLE_CHANNEL_ENCODINGS",
    "camera_info_to_intrinsics",
    "covariance_to_ros",
    "frame_kind",
    "image_to_frame",
    "image_to_numpy",
    "intrinsics_to_camera_info",
    "matrix_to_pose",
    "matrix_to_transform",
    "matrix_to_translation_quaternion",
    "numpy_to_image",
    "pose_to_matrix",
    "pose_with_covariance_stamped",
    "transform_stamped",
    "transform_to_matrix",
    "translation_quaternion_to_matrix",
]
