"""The node's parts without DDS: the parameter table, the intrinsics policy, the camera_info cache,
TF and pose messages, and the worker driven with plain messages (ROS message classes only)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from ros_harness import CONFIG_YAML, LogLines, flatten_parameters, ros_disabled

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402

from diffpose_ros.core.geometry.camera import Intrinsics  # noqa: E402
from diffpose_ros.core.registration.pipeline import Pipeline  # noqa: E402
from diffpose_ros.ros import conversions as cv  # noqa: E402
from diffpose_ros.ros.camera_info import CameraInfoCache, choose_intrinsics  # noqa: E402
from diffpose_ros.ros.settings import PARAMETERS, Settings, pipeline_config, settings_problems  # noqa: E402
from diffpose_ros.ros.worker import FrameWorker, Mailbox, Received  # noqa: E402

K = Intrinsics.from_detector(1020.0, 256, 256, 1.2)


# ------------------------------------------------------------------------------ parameter table
def test_one_table_gives_settings_and_the_yaml():
    names = [p.name for p in PARAMETERS]
    assert len(set(names)) == len(names)
    assert [p.field for p in PARAMETERS] == [f.name for f in dataclasses.fields(Settings)]
    defaults = Settings.from_parameters({})
    assert settings_problems(defaults) == []
    for p in PARAMETERS:
        assert getattr(defaults, p.field) == p.default, p.name
        assert p.problem(p.default) == "", p.name
    # config/diffpose.yaml shows every parameter with a value at its default (unset arrays, such as
    # intrinsics.principal_point, as commented-out lines).
    yaml_values = dict(flatten_parameters(yaml.safe_load(CONFIG_YAML.read_text())["/**"]["ros__parameters"]))
    assert set(yaml_values) == set(names) - {p.name for p in PARAMETERS if p.default == ()}
    for p in PARAMETERS:
        if p.name in yaml_values:
            assert yaml_values[p.name] == p.default, p.name


def test_out_of_range_and_unknown_values_are_named():
    s = Settings.from_parameters(
        {
            "gate.min_similarity": 1.5,
            "input_kind": "jpeg",
            "registration.cost": "ssd",
            "overlay.width": 4,
            "renderer": "opengl",
        }
    )
    problems = "; ".join(settings_problems(s))
    for name in ("gate.min_similarity", "input_kind", "registration.cost", "overlay.width", "renderer"):
        assert name in problems
    bad_point = Settings.from_parameters({"intrinsics.principal_point": [1.0, 2.0, 3.0]})
    assert "principal_point" in settings_problems(bad_point)[0]


def test_values_of_the_wrong_kind_are_named_and_integers_count_as_floats():
    s = Settings.from_parameters({"intrinsics.sdd_mm": 1020, "field.center_px": [10, 20], "overlay.width": 128})
    assert (s.sdd_mm, s.field_center_px, s.overlay_width) == (1020.0, (10.0, 20.0), 128)
    assert type(s.sdd_mm) is float and settings_problems(s) == []
    wrong = Settings.from_parameters(
        {"intrinsics.sdd_mm": "far", "mirror": 1, "overlay.width": 12.5, "ct_frame": 3, "field.center_px": "1,2"}
    )
    assert settings_problems(wrong) == [
        "ct_frame must be a string (got 3)",
        "mirror must be true or false (got 1)",
        "intrinsics.sdd_mm must be a number (got 'far')",
        "field.center_px must be an array of numbers (got '1,2')",
        "overlay.width must be an integer (got 12.5)",
    ]
    assert {p.name for p in PARAMETERS if p.numeric} >= {"intrinsics.sdd_mm", "intrinsics.principal_point"}
    assert not any(p.numeric for p in PARAMETERS if isinstance(p.default, (bool, int, str)))


def test_pipeline_config_takes_gate_tracking_cost_and_pyramid():
    s = Settings.from_parameters({"gate.min_similarity": 0.7, "registration.cost": "gradient_ncc", "renderer": "torch"})
    config = pipeline_config(s)
    assert config.min_similarity == 0.7 and config.cold.cost == "gradient_ncc" and config.renderer == "torch"
    assert config.tracking_max_age_s == s.tracking_max_age_s and config.multistart_budget_s == 1.0
    assert [level.width for level in config.cold.levels] == [32, 64, 128]
    none = pipeline_config(Settings.from_parameters({"registration.multistart_budget_s": 0.0}))
    assert none.multistart_budget_s == 0.0
    negative = Settings.from_parameters({"registration.multistart_budget_s": -1.0})
    assert any("registration.multistart_budget_s" in problem for problem in settings_problems(negative))
    fine = pipeline_config(Settings.from_parameters({"registration.finest_width": 256}))
    assert [level.width for level in fine.cold.levels] == [32, 64, 128, 256]
    odd = Settings.from_parameters({"registration.finest_width": 200})
    assert settings_problems(odd) == ["registration.finest_width must be one of: 128, 256 (got 200)"]


# ---------------------------------------------------------------------------- intrinsics policy
def test_intrinsics_policy_order_and_messages():
    other = Intrinsics.from_detector(900.0, 256, 256, 1.0)
    assert choose_intrinsics((1, 0), lambda: K, lambda: other, None) == (K, "camera_info")
    assert choose_intrinsics((1, 0), None, lambda: other, (1, 5)) == (other, "parameters")

    def refused():
        raise ValueError("camera_info describes 128x128 pixels")

    k, source = choose_intrinsics((1, 0), refused, lambda: other, None)
    assert k == other and source == "parameters (camera_info refused: camera_info describes 128x128 pixels)"
    with pytest.raises(ValueError, match="128x128"):
        choose_intrinsics((1, 0), refused, lambda: None, None)
    with pytest.raises(ValueError, match=r"stamp 1\.000000000 \(latest camera_info stamp 0\.500000000"):
        choose_intrinsics((1, 0), None, lambda: None, (0, 500_000_000))
    with pytest.raises(ValueError, match="missing camera_info"):
        choose_intrinsics((1, 0), None, lambda: None, None)

    def invalid():
        raise ValueError("sdd must be positive")

    with pytest.raises(ValueError, match="intrinsics parameters are invalid"):
        choose_intrinsics((1, 0), None, invalid, None)


def test_camera_info_cache_waits_for_a_late_message():
    cache = CameraInfoCache(keep=2)
    threading.Timer(0.1, lambda: cache.put((3, 0), "late")).start()
    t0 = time.monotonic()
    assert cache.wait_for((3, 0), 5.0, lambda: True) == "late"
    assert time.monotonic() - t0 < 2.0
    assert cache.wait_for((4, 0), 0.05, lambda: True) is None  # none comes
    assert cache.wait_for((4, 0), 5.0, lambda: False) is None  # nothing to wait for: at once
    for i in range(3):
        cache.put((10 + i, 0), i)
    assert cache.latest_stamp() == (12, 0) and cache.wait_for((10, 0), 0.0, lambda: True) is None


# ------------------------------------------------------------------------------------ messages
def test_transform_and_pose_messages():
    from builtin_interfaces.msg import Time

    from diffpose_ros.core.geometry import se3

    T = se3.exp(torch.tensor([10.0, -20.0, 700.0, 0.1, -0.2, 0.3], dtype=torch.float64))
    stamp = Time(sec=5, nanosec=7)
    tf = cv.transform_stamped(T, stamp, "ct", "cam")
    assert (tf.header.frame_id, tf.child_frame_id, tf.header.stamp.nanosec) == ("ct", "cam", 7)
    np.testing.assert_allclose(cv.transform_to_matrix(tf.transform), T.numpy(), atol=1e-9)
    inverse = cv.transform_stamped(T, stamp, "ct", "cam", invert=True)
    assert (inverse.header.frame_id, inverse.child_frame_id) == ("cam", "ct")
    np.testing.assert_allclose(cv.transform_to_matrix(inverse.transform), np.linalg.inv(T.numpy()), atol=1e-9)
    pose = cv.pose_with_covariance_stamped(T, np.eye(6), stamp, "ct")
    assert pose.header.frame_id == "ct"
    np.testing.assert_allclose(cv.pose_to_matrix(pose.pose.pose), T.numpy(), atol=1e-9)
    assert len(pose.pose.covariance) == 36


# -------------------------------------------------------------------------------------- worker


@pytest.fixture(scope="module")
def worker_case(scene):
    pipeline = Pipeline.from_file(scene.model_path)
    pipeline.warm_up()
    settings = {"value": Settings.from_parameters({"camera_info_wait_s": 0.05})}
    infos = CameraInfoCache()
    worker = FrameWorker(pipeline, lambda: settings["value"], infos, lambda: True, lambda *a: None, LogLines())
    return worker, infos, settings


def _frame(scene, index, sec, info_cache=None, nanosec=0, **image_kw):
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    header = Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id="")
    msg = cv.numpy_to_image(scene.frames[index], "mono16", header=header, **image_kw)
    if info_cache is not None:
        info_cache.put((sec, nanosec), cv.intrinsics_to_camera_info(scene.detector, header=Header(stamp=header.stamp)))
    return Received(msg, time.monotonic())


@pytest.mark.slow
def test_worker_outcomes_without_dds(worker_case, scene):
    from diffpose_ros.core.geometry import metrics

    worker, infos, settings = worker_case
    good = worker.handle(_frame(scene, 0, 100, infos))
    assert good.kind == "published" and good.level == DiagnosticStatus.OK, good.message
    assert good.values["intrinsics_source"] == "camera_info" and good.values["mode"] == "cold"
    assert float(metrics.mtre(good.result.pose, scene.poses[0], scene.targets)) < 2.0
    assert good.frame.intrinsics == scene.detector

    missing = worker.handle(_frame(scene, 1, 101))  # no camera_info, no parameters
    assert missing.kind == "rejected" and "missing camera_info" not in missing.message
    assert "no camera_info with the image's stamp 101.000000000" in missing.message

    broken = _frame(scene, 1, 102, infos)
    broken.msg.data = broken.msg.data[:-10]
    refused = worker.handle(broken)
    assert refused.kind == "rejected" and refused.message.startswith("bad frame: image data is")

    settings["value"] = dataclasses.replace(settings["value"], sdd_mm=1020.0, pixel_spacing_mm=1.2)
    try:
        by_parameters = worker.handle(_frame(scene, 2, 103))
    finally:
        settings["value"] = dataclasses.replace(settings["value"], sdd_mm=0.0, pixel_spacing_mm=0.0)
    assert by_parameters.kind == "published" and by_parameters.values["intrinsics_source"] == "parameters"


def test_the_mailbox_measures_the_stream_and_the_worker_gives_tracking_its_share():
    box = Mailbox()
    walls = [10.0 + 0.1 * i for i in range(4)]
    for wall in walls:
        box.put(Received(None, wall))
    assert box.interval_s() is None  # too few frames to say
    for wall in [10.4, 10.5, 11.5, 11.6, 11.7]:  # a pause of a second in the stream
        box.put(Received(None, wall))
    assert box.interval_s() == pytest.approx(0.1)
    assert box.dropped == 7  # nobody took them: the newest and the one it replaced still wait
    assert box.take(0).wall == 11.7 and box.dropped == 8  # the newest; the one it replaced is let go
    assert box.take(0) is None
    worker = FrameWorker(None, lambda: None, CameraInfoCache(), lambda: False, lambda *a: None, LogLines())
    worker.mailbox = box
    budget = Settings.from_parameters({"tracking.frame_budget": 0.8})
    now = Received(None, time.monotonic())
    assert worker._deadline(now, budget) - time.perf_counter() == pytest.approx(0.08, abs=0.02)
    assert worker._deadline(now, Settings.from_parameters({"tracking.frame_budget": 0.0})) is None
    fresh = FrameWorker(None, lambda: None, CameraInfoCache(), lambda: False, lambda *a: None, LogLines())
    assert fresh._deadline(now, budget) is None  # no frame interval yet


def test_the_mailbox_catches_up_with_the_replaced_frame_only_when_asked():
    box = Mailbox()
    for wall in (1.0, 2.0, 3.0):
        box.put(Received(None, wall))
    assert box.take(0, catch_up=True).wall == 2.0  # the frame the newest replaced; the newest waits
    assert box.take(0, catch_up=True).wall == 3.0  # nothing replaced: the newest
    assert box.dropped == 1  # the first frame: replaced twice
    box.put(Received(None, 4.0))
    assert box.take(0, catch_up=True).wall == 4.0
    for wall in (5.0, 6.0, 7.0):
        box.put(Received(None, wall))
    assert box.take(0, catch_up=True).wall == 6.0
    box.put(Received(None, 8.0))  # 7.0 is now the replaced frame; nothing more was dropped
    assert box.dropped == 2 and box.take(0, catch_up=True).wall == 7.0
    box.put(Received(None, 9.0))
    box.clear()
    assert box.take(0, catch_up=True) is None


def test_the_worker_catches_up_only_while_it_gains_on_the_stream():
    from types import SimpleNamespace

    from diffpose_ros.core import Route

    settings = {"value": Settings.from_parameters({})}
    worker = FrameWorker(None, lambda: settings["value"], CameraInfoCache(), lambda: False, lambda *a: None, LogLines())
    cold, tracked = SimpleNamespace(mode=Route.COLD), SimpleNamespace(mode=Route.TRACKING)
    assert worker._gaining(tracked, 5.0)  # no frame interval yet (a stream's first frames)
    for i in range(6):
        worker.mailbox.put(Received(None, 0.1 * i))
    assert worker._gaining(cold, 0.5)  # at the stream's start: the frames after a cold start are tracked
    worker._after_tracking = False
    assert not worker._gaining(cold, 0.5)  # frames that are never tracked: no catching up
    worker._after_tracking = True
    assert worker._gaining(tracked, 0.06) and not worker._gaining(tracked, 0.12)  # the stream: 10 Hz
    settings["value"] = Settings.from_parameters({"tracking.enabled": False})
    assert not worker._gaining(cold, 0.5)  # every frame starts cold: no catching up


class _HeldWorker:
    """A worker on ``pipeline`` whose first frame is held in ``handle`` (see :meth:`run`), so that
    frames put meanwhile arrive while it is busy, whatever the CPU's speed; ``reports`` lists
    ``(stamp s, kind, mode)``."""

    def __init__(self, pipeline, infos):
        self.reports, self.entered, self.gate = [], threading.Event(), threading.Event()
        settings = Settings.from_parameters({"camera_info_wait_s": 0.05})
        report = lambda item, outcome: self.reports.append(  # noqa: E731
            (
                item.msg.header.stamp.sec + item.msg.header.stamp.nanosec * 1e-9,
                str(outcome.kind),
                outcome.values.get("mode"),
            )
        )
        self.worker = FrameWorker(pipeline, lambda: settings, infos, lambda: True, report, LogLines())
        handle = self.worker.handle

        def held(item):
            if not self.entered.is_set():
                self.entered.set()
                assert self.gate.wait(60)
            return handle(item)

        self.worker.handle = held

    def run(self, first: Received, meanwhile: list[Received], count: int, restart: bool = False) -> None:
        """Start, hand it ``first``, put ``meanwhile`` (and restart the stream) while it is held,
        release it, wait for ``count`` reports (and 0.2 s more for any other), stop."""
        self.worker.start()
        try:
            self.worker.mailbox.put(first)
            assert self.entered.wait(60)
            for item in meanwhile:
                self.worker.mailbox.put(item)
            if restart:
                self.worker.restart_stream()
            self.gate.set()
            deadline = time.monotonic() + 60
            while len(self.reports) < count and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
        finally:
            self.worker.stop()


def test_after_a_cold_start_the_worker_catches_up_and_a_new_stream_starts_with_its_newest_frame(scene):
    pipeline = Pipeline.from_file(scene.model_path)
    pipeline.warm_up()
    infos = CameraInfoCache()

    # A cold start takes longer than a frame interval: the two frames that came meanwhile (7.5 Hz)
    # are both posed, in order, the older one tracked from the cold start.
    held = _HeldWorker(pipeline, infos)
    meanwhile = [_frame(scene, 1, 200, infos, nanosec=133_333_333), _frame(scene, 5, 200, infos, nanosec=266_666_667)]
    held.run(_frame(scene, 0, 200, infos), meanwhile, count=3)
    assert [r[:2] for r in held.reports] == [
        (200.0, "published"),
        (pytest.approx(200.133, abs=1e-3), "published"),
        (pytest.approx(200.267, abs=1e-3), "published"),
    ]
    assert held.reports[0][2] == "cold" and held.reports[1][2] == "tracking"
    assert held.worker.mailbox.dropped == 0

    # A bag that loops: its last frame and the next loop's first (the clock jumped back) come while
    # the worker is busy. The new stream starts with the newest frame, not the one from before.
    held = _HeldWorker(pipeline, infos)
    meanwhile = [_frame(scene, 1, 300, infos, nanosec=133_333_333), _frame(scene, 0, 100, infos)]
    held.run(_frame(scene, 0, 300, infos), meanwhile, count=2, restart=True)
    assert [r[:2] for r in held.reports] == [(300.0, "published"), (100.0, "published")]
    assert held.worker.mailbox.dropped == 1


def test_worker_thread_reports_and_skips_old_stamps(scene):
    pipeline = Pipeline.from_file(scene.model_path)
    infos = CameraInfoCache()
    reports = []
    done = threading.Event()

    def report(item, outcome):
        reports.append((item.msg.header.stamp.sec, outcome.kind))
        if len(reports) == 2:
            done.set()

    settings = Settings.from_parameters({"renderer_threads": 1})
    worker = FrameWorker(pipeline, lambda: settings, infos, lambda: False, report, LogLines())
    assert worker.renderer_threads == 0
    worker.start()
    try:
        worker.mailbox.put(_frame(scene, 0, 200, infos))
        deadline = time.monotonic() + 60
        while not reports and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.mailbox.put(_frame(scene, 1, 199, infos))  # older than the published pose
        assert done.wait(60)
        worker.restart_stream()  # what the node does when its clock jumps back
        _put_and_wait(worker, _frame(scene, 2, 150, infos), reports, 3)
        worker.stop()
        worker.start()  # a new activation: a new stream as well
        _put_and_wait(worker, _frame(scene, 3, 100, infos), reports, 4)
    finally:
        worker.stop()
    assert reports == [(200, "published"), (199, "skipped"), (150, "published"), (100, "published")]
    assert worker.renderer_threads == 1  # the renderer_threads parameter, applied in the worker thread


def _put_and_wait(worker, item, reports, count):
    worker.mailbox.put(item)
    deadline = time.monotonic() + 60
    while len(reports) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_failed_report_does_not_end_the_worker_and_a_running_worker_is_not_started_twice(scene):
    pipeline = Pipeline.from_file(scene.model_path)
    infos = CameraInfoCache()
    calls = []

    def report(item, outcome):  # the first report fails, and so does the report of that failure
        calls.append(outcome.kind)
        if len(calls) <= 2:
            raise RuntimeError("publisher gone")

    log = LogLines()
    worker = FrameWorker(pipeline, lambda: Settings.from_parameters({}), infos, lambda: False, report, log)
    worker.start()
    try:
        with pytest.raises(RuntimeError, match="still running"):
            worker.start()
        _put_and_wait(worker, _frame(scene, 0, 300, infos), calls, 2)
        _put_and_wait(worker, _frame(scene, 1, 301, infos), calls, 3)
    finally:
        worker.stop()
    assert calls == ["published", "failed", "published"]
    assert any("could not report the failed frame" in line for line in log.lines)


def test_camera_info_distortion_is_named(worker_case, scene):
    worker, infos, _ = worker_case
    item = _frame(scene, 0, 400, infos)
    infos.wait_for((400, 0), 0.0, lambda: False).d = [0.1, 0.0, 0.0, 0.0, 0.0]
    worker._logger.lines.clear()
    assert worker.handle(item).kind == "published"
    assert any("distortion coefficients" in line for line in worker._logger.lines)
