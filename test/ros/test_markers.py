"""``~/markers`` (diffpose_ros.ros.markers): the MarkerArrays without DDS, the colour by validity, and
the two latched writers over DDS; and the RViz config that shows them."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from ros_harness import REPO, rclpy_context, ros_disabled

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

from builtin_interfaces.msg import Time  # noqa: E402
from visualization_msgs.msg import Marker  # noqa: E402

from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose  # noqa: E402
from diffpose_ros.core.navigation import scene  # noqa: E402
from diffpose_ros.core.rendering import volume
from diffpose_ros.ros.markers import COLOURS, MarkerPublisher, carm_markers, scene_markers  # noqa: E402

pytestmark = pytest.mark.dds

K = Intrinsics.from_detector(1020.0, 256, 200, 1.2)
STAMP = Time(sec=12, nanosec=345)


def _pose(alpha_deg: float = 10.0) -> torch.Tensor:
    return carm_pose(math.radians(alpha_deg), 0.2, -0.1, 750.0, torch.tensor([5.0, -20.0, -150.0], dtype=torch.float64))


def _xyz(points) -> np.ndarray:
    return np.array([(p.x, p.y, p.z) for p in points])


def _rgba(marker) -> tuple:
    c = marker.color
    return c.r, c.g, c.b, c.a


@pytest.fixture(scope="module")
def ball() -> volume.Volume:
    """A 40 mm grid (1 mm voxels) holding a ball of bone, radius 10 mm."""
    k, j, i = np.mgrid[:40, :40, :40]
    d = np.where((i - 20) ** 2 + (j - 20) ** 2 + (k - 20) ** 2 < 100, 0.06, 0.0).astype(np.float32)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, 3] = torch.tensor([-20.0, -20.0, -20.0])
    return volume.Volume(torch.from_numpy(d), affine)


def test_carm_markers_are_the_frustum_in_metres():
    frustum = scene.carm_frustum(_pose(), K, 1020.0)
    array = carm_markers(frustum, "accepted", "ct", STAMP)
    source, detector, rays = array.markers
    for marker, kind, marker_id in (
        (source, Marker.SPHERE, 0),
        (detector, Marker.LINE_STRIP, 1),
        (rays, Marker.LINE_LIST, 2),
    ):
        assert (marker.ns, marker.id, marker.type, marker.action) == ("carm", marker_id, kind, Marker.ADD)
        assert marker.header.frame_id == "ct" and marker.header.stamp == STAMP
        assert _rgba(marker) == pytest.approx(COLOURS["accepted"])
        assert marker.pose.orientation.w == 1.0
    p = source.pose.position
    np.testing.assert_allclose([p.x, p.y, p.z], _pose()[:3, 3].numpy() / 1000, atol=1e-12)
    np.testing.assert_allclose(_xyz(detector.points), np.vstack([frustum.corners, frustum.corners[:1]]) / 1000)
    np.testing.assert_allclose(_xyz(rays.points), frustum.rays.reshape(-1, 3) / 1000)
    assert 0.0 < detector.scale.x < 0.01 and source.scale.x == source.scale.y == source.scale.z > 0.01


def test_scene_markers_are_the_box_and_a_bounded_mesh_in_metres(ball):
    surface = scene.bone_surface(ball, max_triangles=500)
    box, bone = scene_markers(scene.box_edges(ball), surface, "patient_ct").markers
    assert (box.ns, box.id, box.type) == ("ct", 0, Marker.LINE_LIST)
    assert (bone.ns, bone.id, bone.type) == ("ct", 1, Marker.TRIANGLE_LIST)
    for marker in (box, bone):
        assert marker.header.frame_id == "patient_ct" and marker.header.stamp == Time()
    np.testing.assert_allclose(_xyz(box.points), scene.box_edges(ball).reshape(-1, 3) / 1000)
    assert np.abs(_xyz(box.points)).max() == pytest.approx(0.0205)  # the grid's edge, 20.5 mm
    points = _xyz(bone.points)
    assert len(points) == 3 * len(surface.faces) and 0 < len(surface.faces) <= 500
    np.testing.assert_allclose(points, surface.vertices[surface.faces].reshape(-1, 3) / 1000)
    assert 0.008 < np.linalg.norm(points, axis=1).min() and np.linalg.norm(points, axis=1).max() < 0.011


class _Recorder:
    def __init__(self):
        self.sent = []

    def publish(self, msg):
        self.sent.append(msg)


class _Node:
    """What MarkerPublisher uses of a node: publishers that record, and a logger."""

    def __init__(self):
        self.publishers, self.warnings = [], []

    def create_publisher(self, msg_type, topic, qos):
        assert topic == "~/markers" and qos.depth == 1
        self.publishers.append(_Recorder())
        return self.publishers[-1]

    def destroy_publisher(self, pub):
        self.publishers.remove(pub)

    def get_logger(self):
        return SimpleNamespace(warning=self.warnings.append)


def _outcome(kind: str, pose=None):
    result = None if pose is None else SimpleNamespace(pose=pose)
    frame = None if pose is None else SimpleNamespace(intrinsics=K)
    return SimpleNamespace(kind=kind, result=result, frame=frame)


def test_carm_colour_follows_validity_and_stays_at_the_last_estimate(ball):
    node = _Node()
    markers = MarkerPublisher(node, "ct")
    scene_pub, carm_pub = node.publishers
    assert "triangles" in markers.publish_scene(ball) and len(scene_pub.sent) == 1

    def last():
        source = carm_pub.sent[-1].markers[0]
        p = source.pose.position
        return np.array([p.x, p.y, p.z]) * 1000, pytest.approx(_rgba(source))

    markers.publish_carm(_outcome("rejected"), STAMP, 0.0)  # nothing drawn yet: nothing to recolour
    markers.show_stale()
    assert carm_pub.sent == []
    markers.publish_carm(_outcome("published", _pose(10.0)), STAMP, 0.0)
    np.testing.assert_allclose(last()[0], _pose(10.0)[:3, 3].numpy())
    assert last()[1] == COLOURS["accepted"]
    markers.show_stale()
    assert last()[1] == COLOURS["stale"] and len(carm_pub.sent) == 2
    markers.show_stale()  # no change, nothing sent
    assert len(carm_pub.sent) == 2
    markers.publish_carm(_outcome("rejected", _pose(30.0)), STAMP, 900.0)  # the gate's refused estimate
    np.testing.assert_allclose(last()[0], _pose(30.0)[:3, 3].numpy())
    assert last()[1] == COLOURS["rejected"]
    markers.show_stale()  # a rejected C-arm stays red
    markers.publish_carm(_outcome("skipped"), STAMP, 0.0)
    assert len(carm_pub.sent) == 3
    markers.publish_carm(_outcome("failed"), STAMP, 0.0)  # no estimate: red where it was
    np.testing.assert_allclose(last()[0], _pose(30.0)[:3, 3].numpy())
    # intrinsics.sdd_mm (900 mm) places the detector; the contract's 1020 mm when it is unset.
    corner = _xyz(carm_pub.sent[-1].markers[1].points[:1])[0] * 1000
    expected = scene.carm_frustum(_pose(30.0), K, 900.0).corners[0]
    np.testing.assert_allclose(corner, expected, atol=1e-6)
    markers.destroy()
    assert node.publishers == []


def test_a_scene_that_fails_is_left_out_with_a_warning():
    node = _Node()
    flat = volume.Volume(torch.zeros(2, 2, 2), torch.eye(4, dtype=torch.float64) * float("nan"))
    assert MarkerPublisher(node, "ct").publish_scene(flat) == "none"
    assert node.publishers[0].sent == [] and "no CT box and bone surface" in node.warnings[0]


def test_late_subscriber_gets_the_scene_and_the_carm(ball, monkeypatch):
    """Over DDS: both writers' last arrays reach a subscriber that joins after they were sent."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from visualization_msgs.msg import MarkerArray

    with rclpy_context(monkeypatch) as context:
        node = rclpy.create_node("diffpose_markers_test", context=context)
        listener = rclpy.create_node("diffpose_markers_listener", context=context)
        markers = MarkerPublisher(node, "ct")
        markers.publish_scene(ball)
        markers.publish_carm(_outcome("published", _pose()), STAMP, 0.0)
        got = {}
        listener.create_subscription(
            MarkerArray,
            "/diffpose_markers_test/markers",
            lambda msg: got.update({m.ns: msg for m in msg.markers}),
            # Depth 2 or more: the two writers' last arrays wait side by side (RViz: 10, config/diffpose.rviz).
            QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL),
        )
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(listener)
        deadline = time.monotonic() + 20.0
        while set(got) != {"ct", "carm"} and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
        assert set(got) == {"ct", "carm"}
        assert [m.type for m in got["carm"].markers] == [Marker.SPHERE, Marker.LINE_STRIP, Marker.LINE_LIST]
        assert [m.type for m in got["ct"].markers] == [Marker.LINE_LIST, Marker.TRIANGLE_LIST]
        executor.shutdown()
        listener.destroy_node()
        node.destroy_node()


def test_rviz_config_shows_markers_tf_and_the_overlay():
    doc = yaml.safe_load((REPO / "config" / "diffpose.rviz").read_text())
    manager = doc["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "ct"
    displays = {d["Class"]: d for d in manager["Displays"]}
    assert {"rviz_default_plugins/TF", "rviz_default_plugins/MarkerArray", "rviz_default_plugins/Image"} <= set(
        displays
    )
    topic = displays["rviz_default_plugins/MarkerArray"]["Topic"]
    assert topic["Value"] == "/diffpose_node/markers"
    assert (topic["Durability Policy"], topic["Reliability Policy"]) == ("Transient Local", "Reliable")
    assert topic["Depth"] >= 2  # the last array of each of the two writers
    assert displays["rviz_default_plugins/Image"]["Topic"]["Value"] == "/diffpose_node/overlay"
