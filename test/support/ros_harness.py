"""Helpers for the ROS 2 tests: the test scene, node processes and a DDS probe (fixtures: conftest.py).

Every DDS test runs ``diffpose_node`` as its own process (``.venv/bin/diffpose_node``) and talks to
it from this process over real DDS: a unique ``ROS_DOMAIN_ID`` per module (derived from the pid),
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` and the large-frame Fast DDS profile. Nothing waits a
fixed time: every wait is on a condition with a timeout (generous: the CPU is shared).

The patient model is small but real and written by the real save path: an untrained
``PoseRegressor`` (its zero head predicts the reference pose ``carm_pose(0, 0, 0, 750, centre)``) on
the bundled CT's attenuation at ~2 mm, CNN camera 64^2. Test frames are DRRs of the full-resolution
CT (256^2 detector, 1.2 mm, SDD 1020) at known poses within ~5 deg / 15 mm of the reference, turned
into mono16 transmission frames by ``simulate_transmission``; refinement converges from the
reference start.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffpose_ros.core.navigation.stamps import split_stamp, stamp_from_ns, stamp_ns

REPO = Path(__file__).resolve().parents[2]
FASTDDS_PROFILE = REPO / "config" / "fastdds_large_frames.xml"
CONFIG_YAML = REPO / "config" / "diffpose.yaml"
NODE_EXE = Path(sys.executable).parent / "diffpose_node"
SDD, DETECTOR, SPACING = 1020.0, 256, 1.2

# (alpha, beta, gamma) deg, SOD mm, isocentre offset mm from the CT centre.
FRAME_POSES = [
    ((3.0, -2.0, 1.0), 760.0, (5.0, -5.0, 4.0)),
    ((3.5, -1.5, 1.5), 757.0, (6.0, -4.0, 5.0)),
    ((-4.0, 3.0, -2.0), 742.0, (-8.0, 6.0, -5.0)),
    ((2.0, 4.0, 0.0), 750.0, (0.0, 8.0, -6.0)),
    ((-2.0, -3.0, 2.0), 755.0, (10.0, 0.0, 5.0)),
    ((1.0, 1.0, -1.0), 748.0, (-5.0, -6.0, 3.0)),
]


def flatten_parameters(d: dict, prefix: str = ""):
    """``(name, value)`` of a ``ros__parameters`` mapping, nested groups joined with dots."""
    for key, value in d.items():
        if isinstance(value, dict):
            yield from flatten_parameters(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class LogLines:
    """An rclpy-style logger that keeps what it is told (``lines``), for the node's parts run without DDS."""

    def __init__(self):
        self.lines = []

    def warning(self, text, **kw):
        self.lines.append(text)

    error = warning


def ros_disabled() -> bool:
    return os.environ.get("DIFFPOSE_NO_ROS") == "1"


def domain_id(offset: int) -> int:
    """A ROS_DOMAIN_ID for this process and module (110..229; 0..2 offsets per process)."""
    return 110 + (os.getpid() % 40) * 3 + offset


def ros_env(domain: int) -> dict[str, str]:
    return {
        "ROS_DOMAIN_ID": str(domain),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(FASTDDS_PROFILE),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        "AMENT_PREFIX_PATH": os.environ.get("AMENT_PREFIX_PATH", str(Path(sys.executable).parents[1])),
        "PYTHONUNBUFFERED": "1",
        "RCUTILS_COLORIZED_OUTPUT": "0",
    }


# ------------------------------------------------------------------------------------ scene
@dataclass
class Scene:
    model_path: Path
    center: object  # torch.Tensor (3,), CT centre (LPS, mm)
    targets: object  # torch.Tensor (27, 3), mTRE targets around the centre
    detector: object  # core Intrinsics of the frames (256^2)
    poses: list = field(default_factory=list)  # T_ct_source (4x4 float64, mm) per frame
    frames: list = field(default_factory=list)  # mono16 transmission frames (256, 256) uint16
    line_integrals: list = field(default_factory=list)  # the DRRs (256, 256) float32 tensors


def mtre_mm(scene: Scene, T_est_mm: np.ndarray, index: int) -> float:
    import torch

    from diffpose_ros.core.geometry import metrics

    return float(metrics.mtre(torch.as_tensor(T_est_mm, dtype=torch.float64), scene.poses[index], scene.targets))


# ---------------------------------------------------------------------------------- processes
class NodeProcess:
    """``diffpose_node`` (or ``command``) running in its own process, output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, command: list[str] | None = None):
        if command is None:
            assert NODE_EXE.is_file(), f"{NODE_EXE} is missing: pip install -e . (console script diffpose_node)"
            command = [str(NODE_EXE)]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [*command, "--ros-args", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=str(REPO),
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# -------------------------------------------------------------------------------------- probe
def stamp_now():
    from builtin_interfaces.msg import Time

    sec, nanosec = split_stamp(time.time_ns())
    return Time(sec=sec, nanosec=nanosec)


def stamp_key(stamp) -> str:
    """The ``sec.nanosec`` text diagnostics and statuses give a stamp."""
    return stamp_from_ns(stamp_ns(stamp))


@contextlib.contextmanager
def rclpy_context(monkeypatch, offset: int = 2):
    """An rclpy context on the test's own DDS domain (:func:`domain_id` of ``offset``), shut down on exit."""
    import rclpy
    from rclpy.context import Context

    for key, value in ros_env(domain_id(offset)).items():
        monkeypatch.setenv(key, value)
    context = Context()
    rclpy.init(context=context, domain_id=domain_id(offset))
    try:
        yield context
    finally:
        context.try_shutdown()


def status_values(status) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


class Probe:
    """This process's side of the DDS tests: publishes frames, records outputs, calls services.

    Spun only from the calling thread, while waiting (``spin_until``), so nothing races.
    """

    def __init__(
        self, domain: int, image_topic="/xray/image", info_topic="/xray/camera_info", reliable_images: bool = True
    ):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image
        from tf2_msgs.msg import TFMessage

        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node("diffpose_test_probe", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.tf, self.tf_static, self.poses, self.frames, self.summaries, self.overlays = [], [], [], [], [], []
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.tf_sub = self.node.create_subscription(TFMessage, "/tf", lambda m: self.tf.extend(m.transforms), reliable)
        self.tf_static_sub = None
        self._latched = latched
        self.node.create_subscription(PoseWithCovarianceStamped, "/diffpose_node/pose", self.poses.append, reliable)
        self.diag_sub = self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, reliable)
        pub_qos = QoSProfile(
            depth=5, reliability=ReliabilityPolicy.RELIABLE if reliable_images else ReliabilityPolicy.BEST_EFFORT
        )
        self.image_pub = self.node.create_publisher(Image, image_topic, pub_qos)
        self.info_pub = self.node.create_publisher(CameraInfo, info_topic, pub_qos)
        self._clients = {}
        self.owner: NodeProcess | None = None

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith(": frame"):
                self.frames.append(status)
            elif status.name.endswith(": pipeline"):
                self.summaries.append(status)

    def subscribe_tf_static(self):
        from tf2_msgs.msg import TFMessage

        self.tf_static_sub = self.node.create_subscription(
            TFMessage, "/tf_static", lambda m: self.tf_static.extend(m.transforms), self._latched
        )

    def subscribe_overlay(self, topic="/diffpose_node/overlay"):
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        return self.node.create_subscription(
            Image, topic, self.overlays.append, QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        )

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.context.try_shutdown()

    # -- waiting
    def spin_until(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + self._owner_log())
            if self.owner is not None and not self.owner.alive():
                raise AssertionError(
                    f"diffpose_node exited ({self.owner.proc.returncode}) while waiting for {what}" + self._owner_log()
                )
            self.executor.spin_once(timeout_sec=0.02)

    def _owner_log(self) -> str:
        return f"\n--- node log ---\n{self.owner.log()}" if self.owner is not None else ""

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        self.spin_until(
            lambda: self.image_pub.get_subscription_count() > 0 and self.info_pub.get_subscription_count() > 0,
            timeout,
            "the node's image and camera_info subscriptions",
        )

    # -- frames
    def frame_status(self, stamp):
        key = stamp_key(stamp)
        for status in self.frames:
            if status_values(status).get("stamp") == key:
                return status
        return None

    def tf_at(self, stamp, child=None):
        return [t for t in self.tf if t.header.stamp == stamp and (child is None or t.child_frame_id == child)]

    def send(self, image, info=None, timeout: float = 120.0, resend_after: float = 20.0):
        """Publish ``info`` (if any) and ``image``; wait for the node's frame status for the image's stamp.

        Re-publishes after ``resend_after`` s without an answer (a best-effort sample can be lost).
        """
        self.wait_subscribed()
        deadline = time.monotonic() + timeout
        while True:
            if info is not None:
                self.info_pub.publish(info)
            self.image_pub.publish(image)
            try:
                return self.spin_until(
                    lambda: self.frame_status(image.header.stamp),
                    min(resend_after, max(0.1, deadline - time.monotonic())),
                    f"the frame status of stamp {stamp_key(image.header.stamp)}",
                )
            except AssertionError:
                if time.monotonic() > deadline or (self.owner is not None and not self.owner.alive()):
                    raise

    # -- services
    def call(self, srv_type, name: str, request, timeout: float = 30.0):
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = self.node.create_client(srv_type, name)
        self.spin_until(lambda: client.service_is_ready(), timeout, f"service {name}")
        future = client.call_async(request)
        self.spin_until(lambda: future.done(), timeout, f"the answer of {name}")
        return future.result()

    def get_state(self, node="/diffpose_node") -> str:
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, f"{node}/get_state", GetState.Request()).current_state.label

    def change_state(self, transition: int, node="/diffpose_node", timeout: float = 120.0) -> bool:
        from lifecycle_msgs.srv import ChangeState

        request = ChangeState.Request()
        request.transition.id = transition
        return self.call(ChangeState, f"{node}/change_state", request, timeout).success

    def get_parameters(self, names: list[str], node="/diffpose_node") -> dict:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        response = self.call(GetParameters, f"{node}/get_parameters", GetParameters.Request(names=names))
        return {n: parameter_value_to_python(v) for n, v in zip(names, response.values)}

    def set_parameters(self, parameters, node="/diffpose_node"):
        from rcl_interfaces.srv import SetParameters

        request = SetParameters.Request(parameters=[p.to_parameter_msg() for p in parameters])
        return self.call(SetParameters, f"{node}/set_parameters", request).results

    def pause(self, seconds: float) -> None:
        """Spin for ``seconds`` (between polls of a condition; never instead of one)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.02)

    def wait_state(self, label: str, node="/diffpose_node", timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.get_state(node)
            if state == label:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{node} is {state!r}, not {label!r}, after {timeout:.0f} s" + self._owner_log())
            if self.owner is not None and not self.owner.alive():
                raise AssertionError(f"diffpose_node exited while waiting for state {label!r}" + self._owner_log())
            self.pause(0.25)


def make_frame(scene: Scene, index: int, stamp=None, frame_id: str = "", with_info: bool = True):
    """``(Image, CameraInfo | None)`` of test frame ``index`` with a fresh (or given) stamp."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    from diffpose_ros.ros.conversions import intrinsics_to_camera_info, numpy_to_image

    stamp = stamp or stamp_now()

    def header():  # one Header object per message: rclpy message fields hold references
        return Header(stamp=Time(sec=stamp.sec, nanosec=stamp.nanosec), frame_id=frame_id)

    image = numpy_to_image(scene.frames[index], "mono16", header=header())
    info = intrinsics_to_camera_info(scene.detector, header=header()) if with_info else None
    return image, info


def build_scene(directory: Path) -> Scene:
    import torch

    from diffpose_ros.core.geometry import camera as geometry
    from diffpose_ros.core.geometry import metrics
    from diffpose_ros.core.model import bundle, regressor
    from diffpose_ros.core.rendering import renderer as render
    from diffpose_ros.core.rendering import volume
    from diffpose_ros.core.simulation import detector as simulate

    hu = volume.load_ct(volume.default_ct_path())
    mu_full = volume.hu_to_mu(hu)
    mu = mu_full.coarsened_to(2.0)
    center = hu.center
    reference = geometry.carm_pose(0.0, 0.0, 0.0, 750.0, center)
    model = bundle.PatientModel(
        regressor.PoseRegressor(reference, center),
        mu,
        geometry.Intrinsics.from_detector(SDD, DETECTOR, DETECTOR, SPACING).resized(64),
        {"purpose": "diffpose_ros ROS tests (untrained CNN)"},
    )
    path = Path(directory) / "patient_model.safetensors"
    bundle.save_patient_model(path, model)
    k = geometry.Intrinsics.from_detector(SDD, DETECTOR, DETECTOR, SPACING)
    renderer = render.Renderer(mu_full)
    rng = np.random.default_rng(1234)
    out = Scene(path, center, metrics.grid_targets(center), k)
    for (a, b, g), sod, offset in FRAME_POSES:
        T = geometry.carm_pose(
            math.radians(a), math.radians(b), math.radians(g), sod, center + torch.tensor(offset, dtype=torch.float64)
        )
        with torch.no_grad():
            L = renderer.render(T, k)
        out.poses.append(T)
        out.line_integrals.append(L.float())
        out.frames.append(simulate.simulate_transmission(L, rng=rng))
    return out
