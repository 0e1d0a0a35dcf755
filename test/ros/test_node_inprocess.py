"""diffpose_node built in this process (no model loaded): how it declares and takes parameters, and
what a clock jumping back does. The node over DDS, from a process of its own, is test_node.py."""

from __future__ import annotations

import time

import pytest
from ros_harness import LogLines, domain_id, ros_disabled, ros_env

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

import rclpy  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from diffpose_ros.ros.camera_info import CameraInfoCache  # noqa: E402
from diffpose_ros.ros.node import DiffPoseNode, ParameterError  # noqa: E402
from diffpose_ros.ros.settings import PARAMETERS  # noqa: E402
from diffpose_ros.ros.worker import FrameWorker  # noqa: E402

pytestmark = pytest.mark.dds


@pytest.fixture
def context(monkeypatch):
    for key, value in ros_env(domain_id(2)).items():
        monkeypatch.setenv(key, value)
    context = Context()
    rclpy.init(context=context, domain_id=domain_id(2))
    yield context
    context.try_shutdown()


def _node(context, overrides=()) -> DiffPoseNode:
    return DiffPoseNode(context=context, parameter_overrides=list(overrides))


def test_integer_literals_count_for_float_parameters(context):
    """``-p intrinsics.sdd_mm:=1020`` and ``[512, 512]`` (what people type) start the node."""
    node = _node(
        context,
        [
            Parameter("intrinsics.sdd_mm", value=1020),
            Parameter("intrinsics.principal_point", value=[512, 500]),
            Parameter("camera_info_wait_s", value=1),
        ],
    )
    try:
        s = node._settings
        assert (s.sdd_mm, s.principal_point, s.camera_info_wait_s) == (1020.0, (512.0, 500.0), 1.0)
        assert isinstance(s.sdd_mm, float) and isinstance(s.camera_info_wait_s, float)
        results = node.set_parameters([Parameter("gate.min_similarity", value=0)])
        assert results[0].successful and node._settings.min_similarity == 0.0
        results = node.set_parameters([Parameter("gate.min_similarity", value="high")])
        assert not results[0].successful and "gate.min_similarity must be a number" in results[0].reason
        assert node._settings.min_similarity == 0.0
    finally:
        node.destroy_node()


def test_descriptors_carry_the_table_ranges(context):
    node = _node(context)
    try:
        for p in PARAMETERS:
            d = node.describe_parameter(p.name)
            assert d.read_only == p.read_only and d.description == p.description, p.name
            if p.bounds and isinstance(p.default, float):
                (r,) = d.floating_point_range
                assert (r.from_value, r.to_value) == p.bounds, p.name
            elif p.bounds:
                (r,) = d.integer_range
                assert (r.from_value, r.to_value) == p.bounds, p.name
        (result,) = node.set_parameters([Parameter("tracking.frame_budget", value=101.0)])
        assert not result.successful  # rclpy enforces the range itself
    finally:
        node.destroy_node()


@pytest.mark.parametrize(
    "override, named",
    [
        (Parameter("input_kind", value="jpeg"), "input_kind must be one of"),
        (Parameter("gate.max_source_distance_mm", value="far"), "gate.max_source_distance_mm must be a number"),
        (Parameter("field.center_px", value=[1.0, 2.0, 3.0]), "field.center_px must be [] or [cx, cy]"),
    ],
)
def test_a_bad_start_value_is_refused_by_name(context, override, named):
    with pytest.raises(ParameterError, match=named.replace("[", r"\[").replace("]", r"\]")):
        _node(context, [override])


def test_without_post_set_callbacks_runtime_values_still_apply(context, monkeypatch):
    """rclpy before Iron (Humble) has no post-set parameter callbacks: values apply when validated."""
    monkeypatch.delattr(rclpy.node.Node, "add_post_set_parameters_callback")
    node = _node(context)
    try:
        assert node._apply_when_validated
        (result,) = node.set_parameters([Parameter("tracking.frame_budget", value=0.5)])
        assert result.successful and node._settings.tracking_frame_budget == 0.5
        (result,) = node.set_parameters([Parameter("tracking.frame_budget", value=-1.0)])
        assert not result.successful and node._settings.tracking_frame_budget == 0.5
    finally:
        node.destroy_node()


def test_a_clock_jumping_back_starts_a_new_stream(context):
    """With simulated time, /clock going back (a replay started over) restarts the worker's stream."""
    from rclpy.executors import SingleThreadedExecutor
    from rosgraph_msgs.msg import Clock

    node = _node(context, [Parameter("use_sim_time", value=True)])
    clock_node = rclpy.create_node("diffpose_clock_test", context=context)
    executor = SingleThreadedExecutor(context=context)
    try:
        worker = FrameWorker(
            None, lambda: node._settings, CameraInfoCache(), lambda: False, lambda *a: None, LogLines()
        )
        node._worker = worker  # as configure leaves it (never started here)
        executor.add_node(node)
        pub = clock_node.create_publisher(Clock, "/clock", 10)

        def publish_until(sec, predicate):
            deadline = time.monotonic() + 20.0
            while not predicate() and time.monotonic() < deadline:
                msg = Clock()
                msg.clock.sec = sec
                pub.publish(msg)
                executor.spin_once(timeout_sec=0.05)
            return predicate()

        assert publish_until(100, lambda: node.get_clock().now().nanoseconds == 100 * 10**9)
        worker._restart.clear()  # the switch to simulated time counted as a new stream
        jumps = node._stats.summary("n", "cpu", "active", "", 0, {}).values
        before = int(next(kv.value for kv in jumps if kv.key == "clock_jumps_back"))
        assert publish_until(200, lambda: node.get_clock().now().nanoseconds == 200 * 10**9)
        assert not worker._restart.is_set()  # forward: nothing happens
        assert publish_until(50, worker._restart.is_set)
        values = {kv.key: kv.value for kv in node._stats.summary("n", "cpu", "active", "", 0, {}).values}
        assert int(values["clock_jumps_back"]) == before + 1
    finally:
        executor.shutdown()
        clock_node.destroy_node()
        node.destroy_node()


def test_camera_info_without_images_is_reported_as_frames_lost_in_transport():
    """An active node that gets camera_info and no image (large frames dropped by DDS) says so."""
    from diffpose_ros.ros.diagnostics import LOST_FRAMES, RATE_WINDOW_S, FrameStats

    stats = FrameStats()
    assert stats.summary("n", "cpu", "active", "", 0, {}).message == "waiting for frames"
    now = time.monotonic()
    for dt in (0.2, 0.1):
        stats.camera_info(now - dt)
    summary = stats.summary("n", "cpu", "active", "", 0, {})
    assert summary.level == b"\x01" and summary.message == LOST_FRAMES
    assert stats.summary("n", "cpu", "inactive", "", 0, {}).message == "lifecycle state inactive"
    stats.received(time.monotonic())
    assert stats.summary("n", "cpu", "active", "", 0, {}).level == b"\x00"
    stats.reset()
    stats.camera_info(time.monotonic() - RATE_WINDOW_S - 1)  # too old to count
    assert stats.summary("n", "cpu", "active", "", 0, {}).level == b"\x00"
