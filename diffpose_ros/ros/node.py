"""``diffpose_node``: fluoroscopy frames in, the C-arm pose out as TF, in a ROS 2 lifecycle node.

Lifecycle (managed node, ``rclpy.lifecycle``):

- configure: read parameters, load the patient model (``patient_model``) onto ``device`` and warm up.
  A missing or corrupt file makes configure return FAILURE with the reason logged and on
  ``/diagnostics``; the node stays up (unconfigured) and answers its services.
- activate: subscribe to ``image`` and ``camera_info`` (relative names, remap them) and start the
  worker thread; deactivate: unsubscribe, stop the worker; cleanup: release the model.
- ``autostart:=true`` runs configure and activate at start.

Inputs: ``image`` (mono8, mono16, 16UC1, 32FC1; ``step`` padding and ``is_bigendian`` honoured) and
``camera_info``, paired by identical ``header.stamp``. The image QoS is the sensor-data profile
(best effort, volatile) with depth 1 by default (``image_qos: reliable`` for reliable, depth 1); a
best-effort subscription receives from reliable and best-effort publishers alike. camera_info uses the
same reliability with depth 10. A frame uses the camera_info with its exact stamp (waiting up to
``camera_info_wait_s`` for one that is late while a camera_info publisher is matched); without one,
the ``intrinsics.*`` parameters (SDD, pixel spacing, principal point); without those, the frame is
reported on ``/diagnostics`` (ERROR) and skipped.

Newest frame only: the image callback only puts the message in a one-slot mailbox (a frame still
waiting there is replaced and counted as dropped); one worker thread takes the newest frame,
converts it, runs :class:`~diffpose_ros.core.pipeline.Pipeline` (CNN + refinement, tracking when the
last accepted pose is recent) and publishes. There is never a backlog. ``frames_dropped`` on
``/diagnostics`` counts both kinds of skipped frames: replaced in the depth-1 DDS reader queue before
the callback ran (gaps in the publisher's sequence numbers, ``frames_dropped_before_receipt``) and
replaced in the mailbox (``frames_dropped_mailbox``).

Outputs, stamped with the image's stamp, only for strictly newer stamps:

- ``/tf``: ``ct_frame`` -> the image's ``header.frame_id`` (``camera_frame`` when empty),
  ``T_ct_source`` in metres; ``invert:=true`` publishes ``frame_id`` -> ``ct_frame`` instead (for a
  tree where something else already parents the camera frame). ``tf2_ros.TransformBroadcaster`` when
  ``tf2_ros`` imports, else ``tf2_msgs/TFMessage`` on ``/tf`` with the same QoS (reliable, depth 100).
- ``/tf_static``: ``ct_frame`` -> ``ct_ras_frame`` (RAS = diag(-1, -1, 1) of LPS), transient local.
- ``~/pose``: ``geometry_msgs/PoseWithCovarianceStamped`` of the source in ``ct_frame``; covariance =
  the core's Gauss-Newton ``sigma^2 (J^T J)^-1`` of the final similarity, rotations about ``ct`` axes,
  positions in m^2 (a lower bound on the true spread, see :mod:`diffpose_ros.core.pipeline`).
- ``/diagnostics``: a ``<node>: frame`` status per frame (ERROR with the reason for a rejected or
  malformed frame, which publishes no pose) and a ``<node>: pipeline`` summary every
  ``diagnostics.period_s``: rates in/out, latencies receipt->publish (wall clock: processing time)
  and stamp->publish (node clock, so ``use_sim_time`` replays work), drops, similarity, iterations,
  mode, stage times, device, process memory.
- ``~/overlay``: ``bgr8`` X-ray with the DRR's edges at the estimate, only while subscribed.
"""

from __future__ import annotations

import collections
import gc
import math
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np
import rclpy
import rclpy.subscription as _rclpy_subscription
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseWithCovarianceStamped, TransformStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, Image

from ..core import se3
from ..core.bundle import PatientModelError
from ..core.geometry import Intrinsics
from ..core.io import overlay_edges
from ..core.pipeline import Pipeline, PipelineConfig
from ..core.preprocess import check_image, line_integrals_from_transmission
from ..core.register import resample_image
from .conversions import (
    CT_TO_CT_RAS,
    camera_info_to_intrinsics,
    covariance_to_ros,
    image_to_numpy,
    matrix_to_pose,
    matrix_to_transform,
    numpy_to_image,
)
from .diagnostics import RATE_WINDOW_S, FrameStats, key_value, process_rss_bytes, stamp_str
from .settings import TUNABLE_PARAMETERS, Settings, pipeline_config, resolve_device, settings_problems

try:  # A ROS 2 install has tf2_ros; the PyPI wheels do not (publish TFMessage ourselves then).
    import tf2_ros  # type: ignore

    _TF2_ROS_ERROR: Exception | None = None
except ImportError as _err:  # pragma: no cover - depends on the environment
    tf2_ros = None
    _TF2_ROS_ERROR = _err

# rclpy >= Iron passes MessageInfo (sequence numbers) to two-argument subscription callbacks.
_MESSAGE_INFO = hasattr(_rclpy_subscription, "MessageInfo")

__all__ = ["DiffPoseNode", "main"]

NODE_NAME = "diffpose_node"
TF_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
TF_STATIC_QOS = QoSProfile(
    depth=1,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
CAMERA_INFO_KEEP = 16


@dataclass
class _Frame:
    msg: Image
    received_wall: float  # time.monotonic() at receipt


class _Mailbox:
    """One slot holding the newest frame; putting over an unprocessed frame counts a drop."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: _Frame | None = None
        self.received = 0
        self.dropped = 0

    def put(self, item: _Frame) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self.received += 1
            self._cond.notify_all()

    def take(self, timeout: float) -> _Frame | None:
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None, timeout)
            item, self._item = self._item, None
            return item

    def clear(self) -> None:
        with self._cond:
            self._item = None


class DiffPoseNode(LifecycleNode):
    """The lifecycle node ``diffpose_node`` (see the module docstring for topics and parameters)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        self._settings = self._read_settings()
        self._settings_lock = threading.Lock()
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._io_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self._pipeline: Pipeline | None = None
        self._device = "unconfigured"
        self._config_error = ""
        self._warm_up_s = float("nan")
        self._mailbox = _Mailbox()
        self._stats = FrameStats()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_stamp_ns: int | None = None
        self._infos: collections.OrderedDict[tuple[int, int], CameraInfo] = collections.OrderedDict()
        self._infos_cond = threading.Condition()
        self._image_sub = None
        self._info_sub = None
        self._pose_pub = None
        self._overlay_pub = None

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_name = self.get_fully_qualified_name().lstrip("/")
        self._ct_frame = self.get_parameter("ct_frame").value
        if tf2_ros is not None:  # pragma: no cover - ROS 2 install
            self._tf_broadcaster = tf2_ros.TransformBroadcaster(self)
            self._static_broadcaster = tf2_ros.StaticTransformBroadcaster(self)
            self._tf_pub = None
        else:
            from tf2_msgs.msg import TFMessage

            self._tf_broadcaster = self._static_broadcaster = None
            self._tf_message = TFMessage
            self._tf_pub = self.create_publisher(TFMessage, "/tf", TF_QOS)
            self._tf_static_pub = self.create_publisher(TFMessage, "/tf_static", TF_STATIC_QOS)
        self._publish_static_transform()
        period = float(self.get_parameter("diagnostics.period_s").value)
        self._diag_timer = self.create_timer(
            max(period, 0.05), self._on_diagnostics_timer, callback_group=self._timer_group
        )
        self.get_logger().info(
            f"{self.get_fully_qualified_name()} up (unconfigured); "
            f"TF via {'tf2_ros' if tf2_ros is not None else 'tf2_msgs/TFMessage on /tf'}"
        )

    # ------------------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        ro = dict(read_only=True)

        def declare(name, default, description, read_only=False):
            self.declare_parameter(
                name, default, ParameterDescriptor(description=description, **(ro if read_only else {}))
            )

        declare("patient_model", "", "path of the patient model file (.safetensors)", True)
        declare("device", "auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N", True)
        declare("num_threads", 0, "torch CPU threads (0: torch's default)", True)
        declare("autostart", False, "configure and activate at start", True)
        declare("ct_frame", "ct", "TF frame of the CT (LPS); parent of the published transform", True)
        declare("ct_ras_frame", "ct_ras", "static RAS frame under ct_frame (empty: not published)", True)
        declare("image_qos", "sensor_data", "sensor_data (best effort) or reliable, depth 1", True)
        declare("diagnostics.period_s", 1.0, "period of the /diagnostics summary (s)", True)
        declare("camera_frame", "carm_source_optical", "child frame when the image's header.frame_id is empty")
        declare("invert", False, "publish frame_id -> ct_frame (the inverse) instead of ct_frame -> frame_id")
        declare("mirror", False, "frames are mirrored left-right (seen from the detector side)")
        declare("input_kind", "transmission", "32FC1 frames are transmission or line_integrals")
        declare("camera_info_wait_s", 0.5, "how long a frame waits for its camera_info (s)")
        declare("intrinsics.sdd_mm", 0.0, "source-to-detector distance (mm) when no camera_info; 0: unset")
        declare("intrinsics.pixel_spacing_mm", 0.0, "detector pixel spacing (mm) when no camera_info; 0: unset")
        self.declare_parameter(
            "intrinsics.principal_point",
            Parameter.Type.DOUBLE_ARRAY,
            ParameterDescriptor(description="[cx, cy] in pixels when no camera_info; unset or empty: image centre"),
        )
        declare(
            "gate.min_similarity",
            PipelineConfig.min_similarity,
            "smallest accepted final similarity (0.5 NCC + 0.5 patch NCC)",
        )
        declare("gate.max_source_distance_mm", 2000.0, "largest plausible source distance from the CT centre (mm)")
        declare("tracking.enabled", True, "start from the last accepted pose when it is recent")
        declare("tracking.max_age_s", 1.0, "tracking when the last accepted pose is younger than this (stamps, s)")
        declare("overlay.width", 256, "width (pixels) of ~/overlay")

    def _param(self, name: str):
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:
            return None

    def _read_settings(self, overrides: dict | None = None) -> Settings:
        values = {}
        for name, field_name in TUNABLE_PARAMETERS.items():
            value = overrides[name] if overrides and name in overrides else self._param(name)
            if field_name == "principal_point":
                value = tuple(float(v) for v in (value or ()))
            values[field_name] = value
        return Settings(**values)

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        try:
            overrides = {p.name: p.value for p in parameters if p.name in TUNABLE_PARAMETERS}
            problems = settings_problems(self._read_settings(overrides), str(self._param("image_qos")))
            return SetParametersResult(successful=not problems, reason="; ".join(problems))
        except Exception as err:  # a malformed request must not kill the node
            return SetParametersResult(successful=False, reason=f"invalid parameters: {err}")

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        try:
            if not any(p.name in TUNABLE_PARAMETERS for p in parameters):
                return
            settings = self._read_settings()
            with self._settings_lock:
                self._settings = settings
            pipeline = self._pipeline
            if pipeline is not None:
                pipeline.config = pipeline_config(settings, pipeline.config)
            self.get_logger().info("parameters updated: " + ", ".join(p.name for p in parameters))
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().error(f"could not apply parameters: {err!r}")

    # ------------------------------------------------------------------------------- lifecycle
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            path = str(self.get_parameter("patient_model").value or "")
            if not path:
                return self._configure_failed(
                    "the patient_model parameter is empty: pass -p patient_model:=/path/model.safetensors"
                )
            threads = int(self.get_parameter("num_threads").value)
            if threads > 0:
                torch.set_num_threads(threads)
            device = resolve_device(str(self.get_parameter("device").value))
            with self._settings_lock:
                settings = self._settings
            problems = settings_problems(settings, str(self._param("image_qos")))
            if problems:
                return self._configure_failed("invalid parameters: " + "; ".join(problems))
            self.get_logger().info(f"loading patient model {path} on {device}")
            pipeline = Pipeline.from_file(path, device=device, config=pipeline_config(settings))
            self._warm_up_s = pipeline.warm_up()
        except PatientModelError as err:
            return self._configure_failed(f"cannot load the patient model: {err}")
        except Exception as err:
            self.get_logger().error(traceback.format_exc())
            return self._configure_failed(f"configure failed: {type(err).__name__}: {err}")
        self._pipeline = pipeline
        self._device = device
        self._config_error = ""
        self._pose_pub = self.create_lifecycle_publisher(PoseWithCovarianceStamped, "~/pose", 10)
        self._overlay_pub = self.create_lifecycle_publisher(Image, "~/overlay", 1)
        self.get_logger().info(
            f"configured: patient model {path} ({tuple(pipeline.model.mu.data.shape[::-1])} voxels, "
            f"CNN {pipeline.model.metadata.get('backbone', '?')}) on {device}, warm-up {self._warm_up_s:.2f} s"
        )
        return super().on_configure(state)

    def _configure_failed(self, reason: str) -> TransitionCallbackReturn:
        self._config_error = reason
        self.get_logger().error(reason)
        self._publish_diagnostics([self._summary_status()])
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        try:
            reliable = self.get_parameter("image_qos").value == "reliable"
            reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
            image_qos = QoSProfile(
                depth=1, history=HistoryPolicy.KEEP_LAST, reliability=reliability, durability=DurabilityPolicy.VOLATILE
            )
            info_qos = QoSProfile(
                depth=10, history=HistoryPolicy.KEEP_LAST, reliability=reliability, durability=DurabilityPolicy.VOLATILE
            )
            self._mailbox.clear()
            with self._infos_cond:
                self._infos.clear()
            self._stop = threading.Event()
            self._worker = threading.Thread(
                target=self._worker_loop, args=(self._stop,), name="diffpose_worker", daemon=True
            )
            self._worker.start()
            self._info_sub = self.create_subscription(
                CameraInfo, "camera_info", self._on_camera_info, info_qos, callback_group=self._io_group
            )
            if _MESSAGE_INFO:  # exactly two parameters: rclpy then passes the MessageInfo

                def callback(msg, msg_info):
                    self._on_image(msg, msg_info)
            else:  # pragma: no cover - older rclpy

                def callback(msg):
                    self._on_image(msg)

            self._image_sub = self.create_subscription(
                Image, "image", callback, image_qos, callback_group=self._io_group
            )
            self.get_logger().info(
                f"active: image {self._image_sub.topic_name} and {self._info_sub.topic_name} "
                f"({'reliable' if reliable else 'best effort'}, depth 1)"
            )
        except Exception as err:
            self.get_logger().error(f"activate failed: {err!r}\n{traceback.format_exc()}")
            self._stop_worker()
            return TransitionCallbackReturn.FAILURE
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._unsubscribe()
        self._stop_worker()
        self.get_logger().info("inactive")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("cleaned up (unconfigured)")
        return super().on_cleanup(state)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.stop()
        return super().on_shutdown(state)

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error(f"error during a transition from {state.label}: releasing everything")
        self.stop()
        return TransitionCallbackReturn.SUCCESS

    def _unsubscribe(self) -> None:
        for sub in (self._image_sub, self._info_sub):
            if sub is not None:
                self.destroy_subscription(sub)
        self._image_sub = self._info_sub = None

    def _stop_worker(self, timeout: float = 60.0) -> None:
        self._stop.set()
        worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
        self._mailbox.clear()

    def _release(self) -> None:
        for pub in (self._pose_pub, self._overlay_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._pose_pub = self._overlay_pub = None
        self._pipeline = None
        self._device = "unconfigured"
        self._last_stamp_ns = None
        with self._stats.lock:
            self._stats.reset()
        gc.collect()
        if torch.cuda.is_available():  # pragma: no cover - GPU machines
            torch.cuda.empty_cache()

    def stop(self) -> None:
        """Unsubscribe, stop the worker and release the model (any state; used at shutdown)."""
        self._unsubscribe()
        self._stop_worker()
        self._release()

    def autostart(self) -> bool:
        """Configure and activate when the ``autostart`` parameter is true; True if active afterwards."""
        if not self.get_parameter("autostart").value:
            return False
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            self.get_logger().error("autostart: configure failed; the node stays unconfigured")
            return False
        if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            self.get_logger().error("autostart: activate failed")
            return False
        return True

    # ------------------------------------------------------------------------------- callbacks
    def _on_image(self, msg: Image, msg_info=None) -> None:
        try:
            now = time.monotonic()
            self._mailbox.put(_Frame(msg, now))
            with self._stats.lock:
                self._stats.received_times.append(now)
                self._count_missed(msg_info)
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().warning(f"image callback: {err!r}")

    def _count_missed(self, msg_info) -> None:
        """Frames a publisher sent that never reached this callback (replaced in the depth-1 reader
        queue while the node was busy, or lost): gaps in its publication sequence numbers."""
        if not msg_info:
            return
        seq = msg_info.get("publication_sequence_number")
        gid = msg_info.get("publisher_gid")
        if seq is None or gid is None:
            return
        key = repr(gid)
        last = self._stats.last_sequence.get(key)
        if last is not None and seq > last + 1:
            self._stats.missed_before_receipt += seq - last - 1
        self._stats.last_sequence[key] = seq

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            key = (int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
            with self._infos_cond:
                self._infos[key] = msg
                self._infos.move_to_end(key)
                while len(self._infos) > CAMERA_INFO_KEEP:
                    self._infos.popitem(last=False)
                self._infos_cond.notify_all()
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().warning(f"camera_info callback: {err!r}")

    def _on_diagnostics_timer(self) -> None:
        try:
            self._publish_diagnostics([self._summary_status()])
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().warning(f"diagnostics: {err!r}")

    # --------------------------------------------------------------------------------- worker
    def _worker_loop(self, stop: threading.Event) -> None:
        while not stop.is_set() and rclpy.ok(context=self.context):
            frame = self._mailbox.take(0.1)
            if frame is None or stop.is_set():
                continue
            try:
                self._process(frame, stop)
            except Exception as err:
                self.get_logger().error(f"frame failed: {err!r}\n{traceback.format_exc()}")
                self._frame_status(frame, DiagnosticStatus.ERROR, f"internal error: {type(err).__name__}: {err}", {})

    def _camera_info_for(self, key: tuple[int, int], stop: threading.Event, wait_s: float) -> CameraInfo | None:
        deadline = time.monotonic() + wait_s
        with self._infos_cond:
            while key not in self._infos:
                remaining = deadline - time.monotonic()
                sub = self._info_sub
                if remaining <= 0 or stop.is_set() or sub is None or sub.get_publisher_count() == 0:
                    return None
                self._infos_cond.wait(min(remaining, 0.05))
            return self._infos[key]

    def _intrinsics(self, msg: Image, width: int, height: int, s: Settings, stop) -> tuple[Intrinsics, str]:
        key = (int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
        info = self._camera_info_for(key, stop, s.camera_info_wait_s)
        info_problem = ""
        if info is not None:
            try:
                return camera_info_to_intrinsics(info, width, height), "camera_info"
            except ValueError as err:
                info_problem = str(err)
        try:
            from_params = s.parameter_intrinsics(width, height)
        except ValueError as err:
            raise ValueError(f"intrinsics parameters are invalid: {err}") from err
        if from_params is not None:
            return from_params, "parameters" + (f" (camera_info refused: {info_problem})" if info_problem else "")
        if info_problem:
            raise ValueError(info_problem)
        with self._infos_cond:
            latest = next(reversed(self._infos), None)
        if latest is not None:
            raise ValueError(
                f"no camera_info with the image's stamp {key[0]}.{key[1]:09d} (latest camera_info stamp "
                f"{latest[0]}.{latest[1]:09d}: image and camera_info stamps must be identical) and no "
                "intrinsics parameters"
            )
        raise ValueError(
            "missing camera_info: none received and no intrinsics parameters "
            "(intrinsics.sdd_mm, intrinsics.pixel_spacing_mm)"
        )

    def _process(self, frame: _Frame, stop: threading.Event) -> None:
        msg = frame.msg
        pipeline = self._pipeline
        if pipeline is None:
            return
        with self._settings_lock:
            s = self._settings
        stamp_ns = Time.from_msg(msg.header.stamp).nanoseconds
        info = {
            "encoding": msg.encoding,
            "size": f"{msg.width}x{msg.height}",
            "t_in_mailbox_s": time.monotonic() - frame.received_wall,
        }
        if self._last_stamp_ns is not None and stamp_ns <= self._last_stamp_ns:
            with self._stats.lock:
                self._stats.skipped_stamps += 1
            self._frame_status(
                frame, DiagnosticStatus.WARN, "stamp not newer than the last published pose: frame skipped", info
            )
            return
        try:
            array = image_to_numpy(msg)
            height, width = array.shape
            t0 = time.perf_counter()
            k, info["intrinsics_source"] = self._intrinsics(msg, width, height, s, stop)
            info["t_camera_info_wait_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if msg.encoding == "32FC1" and s.input_kind == "line_integrals":
                L = check_image(array, "line-integral image")
                if s.mirror:
                    L = L.flip(-1)
            else:
                L = line_integrals_from_transmission(array, mirror=s.mirror)
            if s.mirror:
                k = k.mirrored()
            info["t_convert_s"] = time.perf_counter() - t0
            if stop.is_set():
                return
            result = pipeline.process(L, k, stamp=stamp_ns * 1e-9, track=s.tracking_enabled)
        except ValueError as err:
            self.get_logger().warning(f"frame {stamp_str(msg.header.stamp)} refused: {err}", throttle_duration_sec=1.0)
            self._frame_status(frame, DiagnosticStatus.ERROR, f"bad frame: {err}", info)
            with self._stats.lock:
                self._stats.processed += 1
                self._stats.rejected += 1
            return
        info.update(
            mode=result.mode,
            similarity=float(result.similarity),
            iterations=int(result.iterations),
            converged=bool(result.converged),
            **{f"t_{name}_s": float(v) for name, v in result.timings.items()},
        )
        if not result.accepted:
            with self._stats.lock:
                self._stats.processed += 1
                self._stats.rejected += 1
            self._frame_status(frame, DiagnosticStatus.ERROR, f"rejected by the gate: {result.reason}", info)
            return
        if stop.is_set():
            return
        self._publish_result(msg, result, s)
        self._last_stamp_ns = stamp_ns
        now_wall = time.monotonic()
        latency_receipt = now_wall - frame.received_wall
        latency_stamp = (self.get_clock().now().nanoseconds - stamp_ns) * 1e-9
        info.update(latency_receipt_to_publish_s=latency_receipt, latency_stamp_to_publish_s=latency_stamp)
        with self._stats.lock:
            self._stats.processed += 1
            self._stats.published += 1
            self._stats.published_times.append(now_wall)
            self._stats.latency_receipt.append(latency_receipt)
            self._stats.latency_stamp.append(latency_stamp)
        if self._overlay_pub is not None and self._overlay_pub.get_subscription_count() > 0:
            try:
                self._publish_overlay(msg, L, k, result.pose, s)
            except Exception as err:
                self.get_logger().warning(f"overlay failed: {err!r}", throttle_duration_sec=5.0)
        self._frame_status(frame, DiagnosticStatus.OK, "pose published", info)

    def _publish_result(self, msg: Image, result, s: Settings) -> None:
        T = result.pose.detach().cpu().double()
        child = msg.header.frame_id or s.camera_frame
        tf = TransformStamped()
        tf.header.stamp = msg.header.stamp
        if s.invert:
            tf.header.frame_id, tf.child_frame_id = child, self._ct_frame
            tf.transform = matrix_to_transform(se3.inverse(T))
        else:
            tf.header.frame_id, tf.child_frame_id = self._ct_frame, child
            tf.transform = matrix_to_transform(T)
        if self._tf_broadcaster is not None:  # pragma: no cover - ROS 2 install
            self._tf_broadcaster.sendTransform(tf)
        else:
            self._tf_pub.publish(self._tf_message(transforms=[tf]))
        pose = PoseWithCovarianceStamped()
        pose.header.stamp = msg.header.stamp
        pose.header.frame_id = self._ct_frame
        pose.pose.pose = matrix_to_pose(T)
        pose.pose.covariance = covariance_to_ros(T, result.covariance)
        if self._pose_pub is not None:
            self._pose_pub.publish(pose)

    def _publish_overlay(self, msg: Image, L: torch.Tensor, k: Intrinsics, pose: torch.Tensor, s: Settings) -> None:
        width = min(int(s.overlay_width), k.width)
        small = k.resized(width)
        xray = resample_image(L, small.width, small.height)
        with torch.no_grad():
            drr = self._pipeline.registrar.renderer().render(pose.double(), small).cpu()
        picture = overlay_edges(xray, drr)
        out = numpy_to_image(np.ascontiguousarray(picture), "bgr8", header=msg.header)
        if not out.header.frame_id:
            out.header.frame_id = s.camera_frame
        self._overlay_pub.publish(out)

    def _publish_static_transform(self) -> None:
        child = str(self.get_parameter("ct_ras_frame").value or "")
        if not child:
            return
        tf = TransformStamped()
        tf.header.stamp = self.get_clock().now().to_msg()
        tf.header.frame_id = self._ct_frame
        tf.child_frame_id = child
        tf.transform = matrix_to_transform(CT_TO_CT_RAS)
        if self._static_broadcaster is not None:  # pragma: no cover - ROS 2 install
            self._static_broadcaster.sendTransform(tf)
        else:
            self._tf_static_pub.publish(self._tf_message(transforms=[tf]))

    # ---------------------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self, statuses: list[DiagnosticStatus]) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = statuses
        self._diag_pub.publish(array)

    def _frame_status(self, frame: _Frame, level: bytes, message: str, values: dict) -> None:
        status = DiagnosticStatus()
        status.level = level
        status.name = f"{self._diag_name}: frame"
        status.message = message
        status.hardware_id = self._device
        header = frame.msg.header
        pairs = {"stamp": stamp_str(header.stamp), "frame_id": header.frame_id, **values}
        status.values = [key_value(key, value) for key, value in pairs.items()]
        with self._stats.lock:
            self._stats.last_frame = status
            self._stats.last_frame_wall = time.monotonic()
        self._publish_diagnostics([status])

    def _summary_status(self) -> DiagnosticStatus:
        now = time.monotonic()
        state = self._state_machine.current_state[1] if hasattr(self, "_state_machine") else "?"
        st = self._stats
        with st.lock:
            rate_in = st.rate(st.received_times, now)
            rate_out = st.rate(st.published_times, now)
            lr = list(st.latency_receipt)
            ls = list(st.latency_stamp)
            last = st.last_frame
            last_age = now - st.last_frame_wall if last is not None else math.inf
            counters = dict(
                frames_processed=st.processed,
                frames_published=st.published,
                frames_rejected=st.rejected,
                frames_skipped_old_stamp=st.skipped_stamps,
                frames_dropped_before_receipt=st.missed_before_receipt,
            )
        status = DiagnosticStatus()
        status.name = f"{self._diag_name}: pipeline"
        status.hardware_id = self._device
        if self._config_error and self._pipeline is None:
            status.level, status.message = DiagnosticStatus.ERROR, self._config_error
        elif state != "active":
            status.level, status.message = DiagnosticStatus.WARN, f"lifecycle state {state}"
        elif last is not None and last_age < 2 * RATE_WINDOW_S and last.level != DiagnosticStatus.OK:
            status.level, status.message = last.level, last.message
        else:
            status.level, status.message = DiagnosticStatus.OK, "ok" if last is not None else "waiting for frames"
        values = {
            "state": state,
            "device": self._device,
            "patient_model": self._param("patient_model"),
            "rate_in_hz": rate_in,
            "rate_out_hz": rate_out,
            "frames_received": self._mailbox.received,
            "frames_dropped": self._mailbox.dropped + counters["frames_dropped_before_receipt"],
            "frames_dropped_mailbox": self._mailbox.dropped,
            **counters,
            "latency_receipt_to_publish_last_s": lr[-1] if lr else float("nan"),
            "latency_receipt_to_publish_median_s": float(np.median(lr)) if lr else float("nan"),
            "latency_stamp_to_publish_last_s": ls[-1] if ls else float("nan"),
            "latency_stamp_to_publish_median_s": float(np.median(ls)) if ls else float("nan"),
            "warm_up_s": self._warm_up_s,
            "rss_mb": process_rss_bytes() / 2**20,
            "torch_threads": torch.get_num_threads(),
        }
        if self._device.startswith("cuda"):  # pragma: no cover - GPU machines
            values["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        if last is not None:
            for kv in last.values:
                if kv.key in (
                    "stamp",
                    "similarity",
                    "iterations",
                    "mode",
                    "t_preprocess_s",
                    "t_cnn_s",
                    "t_refine_s",
                    "t_total_s",
                ):
                    values[f"last_{kv.key}"] = kv.value
            values["last_result"] = last.message
        status.values = [key_value(k, v) for k, v in values.items()]
        return status


def main(args=None) -> int:
    """Entry point of ``diffpose_node`` (``ros2 run diffpose_ros diffpose_node``)."""
    rclpy.init(args=args)  # installs SIGINT/SIGTERM handlers that shut the context down
    node = None
    executor = MultiThreadedExecutor(num_threads=4)
    try:
        node = DiffPoseNode()
        executor.add_node(node)
        try:
            node.autostart()
        except Exception as err:  # e.g. interrupted by SIGINT/SIGTERM while configuring
            if rclpy.ok():
                node.get_logger().error(f"autostart failed: {err!r}")
        if rclpy.ok():
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()
        executor.shutdown(timeout_sec=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
