"""Message <-> array/intrinsics/pose conversions (no DDS; the message classes only).

Images are built byte by byte here (not only through our own encoder) to check the distro
cv_bridge semantics: ``step`` padding, ``is_bigendian``, and refusal of malformed messages.
"""

from __future__ import annotations

import array
import math

import numpy as np
import pytest
import torch
from ros_harness import ros_disabled

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from diffpose_ros.core.geometry import se3  # noqa: E402
from diffpose_ros.core.geometry.camera import Intrinsics  # noqa: E402
from diffpose_ros.ros import conversions as cv  # noqa: E402


def _raw_image(a: np.ndarray, encoding: str, step: int, bigendian: bool) -> Image:
    """An Image message assembled by hand: each row's bytes, then zero padding up to ``step``."""
    order = ">" if bigendian else "<"
    rows = []
    for row in a:
        b = row.astype(row.dtype.newbyteorder(order)).tobytes()
        rows.append(b + b"\x00" * (step - len(b)))
    msg = Image(height=a.shape[0], width=a.shape[1], encoding=encoding, is_bigendian=int(bigendian), step=step)
    msg.data = array.array("B", b"".join(rows))
    return msg


@pytest.mark.parametrize(
    "encoding, dtype, bigendian",
    [
        ("mono8", np.uint8, False),
        ("8UC1", np.uint8, False),
        ("mono16", np.uint16, False),
        ("mono16", np.uint16, True),
        ("16UC1", np.uint16, False),
        ("16UC1", np.uint16, True),
        ("32FC1", np.float32, False),
        ("32FC1", np.float32, True),
    ],
)
@pytest.mark.parametrize("padding", [0, 6])
def test_image_to_numpy_step_padding_and_endianness(encoding, dtype, bigendian, padding):
    rng = np.random.default_rng(0)
    a = (rng.random((5, 7)) * (200 if dtype == np.uint8 else 60000)).astype(dtype)
    if dtype == np.float32:
        a = (rng.standard_normal((5, 7)) * 1e3).astype(np.float32)
    step = 7 * a.itemsize + padding
    out = cv.image_to_numpy(_raw_image(a, encoding, step, bigendian))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == (5, 7)
    np.testing.assert_array_equal(out, a)


def test_big_endian_mono16_known_bytes():
    msg = Image(height=1, width=2, encoding="mono16", is_bigendian=1, step=4)
    msg.data = array.array("B", [0x01, 0x02, 0xFF, 0x00])
    np.testing.assert_array_equal(cv.image_to_numpy(msg), [[0x0102, 0xFF00]])
    msg.is_bigendian = 0
    np.testing.assert_array_equal(cv.image_to_numpy(msg), [[0x0201, 0x00FF]])


@pytest.mark.parametrize(
    "encoding, dtype", [("mono8", np.uint8), ("mono16", np.uint16), ("16UC1", np.uint16), ("32FC1", np.float32)]
)
@pytest.mark.parametrize("bigendian", [False, True])
def test_numpy_image_round_trip(encoding, dtype, bigendian):
    a = (np.arange(6 * 9).reshape(6, 9) * 3).astype(dtype)
    msg = cv.numpy_to_image(a, encoding, step=9 * a.itemsize + 3, is_bigendian=bigendian)
    assert msg.encoding == encoding and msg.step == 9 * a.itemsize + 3
    assert len(msg.data) == msg.height * msg.step
    np.testing.assert_array_equal(cv.image_to_numpy(msg), a)


def test_bgr8_round_trip_and_default_encodings():
    a = np.random.default_rng(1).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    msg = cv.numpy_to_image(a)
    assert msg.encoding == "bgr8" and msg.step == 15
    np.testing.assert_array_equal(cv.image_to_numpy(msg, encodings=("bgr8",)), a)
    assert cv.numpy_to_image(np.zeros((2, 2), np.uint16)).encoding == "mono16"
    assert cv.numpy_to_image(np.zeros((2, 2), np.float32)).encoding == "32FC1"
    assert cv.numpy_to_image(np.zeros((2, 2), np.uint8)).encoding == "mono8"
    with pytest.raises(ValueError, match="no default encoding"):
        cv.numpy_to_image(np.zeros((2, 2), np.int64))


def test_image_to_numpy_refuses_malformed_messages():
    good = cv.numpy_to_image(np.ones((4, 4), np.uint16))
    bad = cv.numpy_to_image(np.ones((4, 4, 3), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="unsupported image encoding 'rgb8'"):
        cv.image_to_numpy(bad)
    odd = cv.numpy_to_image(np.ones((4, 4), np.uint16))
    odd.encoding = "yuv422"
    with pytest.raises(ValueError, match="unsupported image encoding"):
        cv.image_to_numpy(odd)
    empty = Image(height=0, width=4, encoding="mono16", step=8)
    with pytest.raises(ValueError, match="zero size"):
        cv.image_to_numpy(empty)
    short = cv.numpy_to_image(np.ones((4, 4), np.uint16))
    short.data = short.data[:-1]
    with pytest.raises(ValueError, match="shorter than height \\* step"):
        cv.image_to_numpy(short)
    long = cv.numpy_to_image(np.ones((4, 4), np.uint16))
    long.data = array.array("B", bytes(long.data) + b"\x00\x00")
    with pytest.raises(ValueError, match="longer than height \\* step"):
        cv.image_to_numpy(long)
    narrow = cv.numpy_to_image(np.ones((4, 4), np.uint16))
    narrow.step = 6
    narrow.data = narrow.data[:24]
    with pytest.raises(ValueError, match="step 6 is smaller than one row"):
        cv.image_to_numpy(narrow)
    assert cv.image_to_numpy(good).shape == (4, 4)


# ------------------------------------------------------------------------------------ intrinsics
def _info(k: Intrinsics, **changes) -> CameraInfo:
    info = cv.intrinsics_to_camera_info(k)
    for key, value in changes.items():
        setattr(info, key, value)
    return info


def test_camera_info_to_intrinsics():
    k = Intrinsics.from_detector(1020.0, 256, 200, 1.2, (130.5, 97.25))
    out = cv.camera_info_to_intrinsics(_info(k), 256, 200)
    assert out == k
    # Width/height 0 in camera_info: the image's size.
    assert cv.camera_info_to_intrinsics(_info(k, width=0, height=0), 256, 200) == k


def test_camera_info_binning_and_roi_follow_the_pixel_centre_convention():
    full = Intrinsics.from_detector(1020.0, 512, 512, 0.6, (250.0, 260.0))
    binned = cv.camera_info_to_intrinsics(_info(full, binning_x=2, binning_y=2), 256, 256)
    expected = full.resized(256)
    for name in ("width", "height", "fx", "fy", "cx", "cy"):
        assert getattr(binned, name) == pytest.approx(getattr(expected, name)), name
    info = _info(full)
    info.roi.x_offset, info.roi.y_offset, info.roi.width, info.roi.height = 100, 50, 200, 300
    cropped = cv.camera_info_to_intrinsics(info, 200, 300)
    assert (cropped.width, cropped.height, cropped.fx) == (200, 300, full.fx)
    assert (cropped.cx, cropped.cy) == pytest.approx((150.0, 210.0))


@pytest.mark.parametrize("k", [[0.0] * 9, [0.0, 0, 128, 0, 850, 128, 0, 0, 1], [-850.0, 0, 128, 0, 850, 128, 0, 0, 1]])
def test_uncalibrated_camera_info_is_refused(k):
    info = _info(Intrinsics.from_detector(1020.0, 256, 256, 1.2))
    info.k = k
    with pytest.raises(ValueError, match="uncalibrated"):
        cv.camera_info_to_intrinsics(info, 256, 256)


def test_camera_info_size_mismatch_and_nan_are_refused():
    info = _info(Intrinsics.from_detector(1020.0, 256, 256, 1.2))
    with pytest.raises(ValueError, match="the image is 128x128"):
        cv.camera_info_to_intrinsics(info, 128, 128)
    info.k = [float("nan")] + list(info.k)[1:]
    with pytest.raises(ValueError, match="NaN"):
        cv.camera_info_to_intrinsics(info, 256, 256)


# ----------------------------------------------------------------------------------------- poses
def _rot(axis, degrees):
    twist = torch.zeros(6, dtype=torch.float64)
    twist[3 + "xyz".index(axis)] = math.radians(degrees)
    return se3.exp(twist).numpy()


@pytest.mark.parametrize(
    "axis, degrees, quaternion",
    [
        ("x", 0.0, (0, 0, 0, 1)),
        ("x", 90.0, (math.sqrt(0.5), 0, 0, math.sqrt(0.5))),
        ("y", 90.0, (0, math.sqrt(0.5), 0, math.sqrt(0.5))),
        ("z", -90.0, (0, 0, -math.sqrt(0.5), math.sqrt(0.5))),
        ("z", 180.0, (0, 0, 1, 0)),
        ("y", 60.0, (0, 0.5, 0, math.sqrt(0.75))),
    ],
)
def test_quaternion_of_known_rotations(axis, degrees, quaternion):
    T = _rot(axis, degrees)
    T[:3, 3] = [1000.0, -250.0, 12.5]  # mm
    t, q = cv.matrix_to_translation_quaternion(T)
    np.testing.assert_allclose(t, [1.0, -0.25, 0.0125])
    assert q[3] >= 0
    expected = np.asarray(quaternion)
    assert np.allclose(q, expected, atol=1e-12) or (abs(q[3]) < 1e-12 and np.allclose(q, -expected, atol=1e-12))
    np.testing.assert_allclose(cv.translation_quaternion_to_matrix(t, q), T, atol=1e-12)


def test_ct_ras_static_transform():
    t, q = cv.matrix_to_translation_quaternion(cv.CT_TO_CT_RAS)
    np.testing.assert_allclose(t, 0)
    np.testing.assert_allclose(np.abs(q), [0, 0, 1, 0], atol=1e-12)  # 180 deg about z


def test_pose_messages_round_trip_random_poses():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        xi = torch.randn(6, generator=g, dtype=torch.float64) * torch.tensor(
            [300.0] * 3 + [1.5] * 3, dtype=torch.float64
        )
        T = se3.exp(xi).numpy()
        np.testing.assert_allclose(cv.transform_to_matrix(cv.matrix_to_transform(T)), T, atol=1e-9)
        np.testing.assert_allclose(cv.pose_to_matrix(cv.matrix_to_pose(T)), T, atol=1e-9)
        msg = cv.matrix_to_transform(T)
        assert msg.translation.x == pytest.approx(T[0, 3] / 1000)
        assert math.isclose(msg.rotation.x**2 + msg.rotation.y**2 + msg.rotation.z**2 + msg.rotation.w**2, 1.0)
    with pytest.raises(ValueError):
        cv.matrix_to_transform(np.full((4, 4), np.nan))


# ------------------------------------------------------------------------------------ covariance
def test_covariance_scaling_identity_rotation():
    C = np.diag([1.0, 4.0, 9.0, 1e-4, 2e-4, 3e-4])  # mm^2, rad^2
    C[0, 3] = C[3, 0] = 0.005  # mm rad
    out = np.asarray(cv.covariance_to_ros(np.eye(4), C)).reshape(6, 6)
    np.testing.assert_allclose(np.diag(out), [1e-6, 4e-6, 9e-6, 1e-4, 2e-4, 3e-4])
    assert out[0, 3] == pytest.approx(5e-6) and out[3, 0] == pytest.approx(5e-6)


def test_covariance_is_expressed_about_parent_axes():
    # Source x axis = ct y axis (90 deg about z): the source-x spread shows up on ct y.
    T = _rot("z", 90.0)
    T[:3, 3] = [10.0, 20.0, 30.0]
    C = np.diag([1.0, 4.0, 9.0, 1e-4, 2e-4, 3e-4])
    out = np.asarray(cv.covariance_to_ros(T, C)).reshape(6, 6)
    np.testing.assert_allclose(np.diag(out), [4e-6, 1e-6, 9e-6, 2e-4, 1e-4, 3e-4], atol=1e-18)
    np.testing.assert_allclose(out, out.T)
    assert np.linalg.eigvalsh(out).min() > 0


def test_non_finite_covariance_is_marked_unknown():
    out = cv.covariance_to_ros(np.eye(4), np.full((6, 6), np.inf))
    assert out[0] == -1.0 and not any(out[1:])
