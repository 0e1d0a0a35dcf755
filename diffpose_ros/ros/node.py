"""``diffpose_node``: fluoroscopy frames in, the C-arm pose out as TF, in a ROS 2 lifecycle node.

Lifecycle (managed node, ``rclpy.lifecycle``):

- configure: read parameters, load the patient model (``patient_model``) onto ``device`` and warm up.
  A missing or corrupt file makes configure return FAILURE with the reason logged and on
  ``/diagnostics``; the node stays up (unconfigured) and answers its services.
- activate: subscribe to ``image`` and ``camera_info`` (relative names, remap them) and start the
  worker thread; deactivate: unsubscribe, stop the worker; cleanup: release the model.
- ``autostart:=true`` runs configure and activate at start.

Parameters: declared once, in :class:`~diffpose_ros.ros.settings.Settings` (``config/diffpose.yaml``
mirrors them); the read-only ones are fixed at start, the others change at runtime.

Inputs: ``image`` (mono8, mono16, 16UC1, 32FC1; ``step`` padding and ``is_bigendian`` honoured) and
``camera_info``, paired by identical ``header.stamp``. Image QoS: sensor data (best effort, which
also receives from reliable publishers), or ``image_qos: reliable``; depth 1. camera_info: the same
reliability, depth 10. A frame's intrinsics: the camera_info with its stamp (waiting up to
``camera_info_wait_s``), else the ``intrinsics.*`` parameters, else an ERROR (:mod:`.camera_info`).

The newest frame, with one frame of catch-up: the image callback puts the message in a mailbox that
keeps the newest frame and the one it replaced; one worker thread (:mod:`.worker`) takes the newest
frame (the replaced one first while it gains on the stream), prepares it (the core's
``prepare_frame``) and runs the :class:`~diffpose_ros.core.registration.pipeline.Pipeline` (CNN +
refinement, tracking when the last accepted pose is recent); :class:`~.outputs.NodeOutputs`
publishes what it made of it. ``frames_dropped`` counts frames replaced in the depth-1 DDS reader
queue (``frames_dropped_before_receipt``) and frames the mailbox replaced twice or passed over.

Outputs, stamped with the image's stamp, only for strictly newer stamps:

- ``/tf`` (:mod:`.tf_publisher`): ``ct_frame`` -> the image's ``header.frame_id`` (``camera_frame``
  when empty), ``T_ct_source`` in metres; ``invert:=true`` publishes ``frame_id`` -> ``ct_frame``
  instead (for a tree where something else already parents the camera frame).
- ``/tf_static``: ``ct_frame`` -> ``ct_ras_frame`` (RAS = diag(-1, -1, 1) of LPS), transient local.
- ``~/pose``: ``geometry_msgs/PoseWithCovarianceStamped`` of the source in ``ct_frame``; covariance =
  the core's Gauss-Newton ``sigma^2 (J^T J)^-1`` of the final similarity, rotations about ``ct`` axes,
  positions in m^2 (a lower bound on the true spread, see :mod:`diffpose_ros.core.registration.result`).
- ``~/status``: ``std_msgs/String``, JSON of the frame's validity (``valid``, ``reason``,
  ``similarity``, ``latency_s``, ``stamp``, ``source``, ``frame_id``) for every frame, accepted or
  not; reliable, transient local (:mod:`.status`).
- ``/diagnostics`` (:mod:`.diagnostics`): a ``<node>: frame`` status per frame (ERROR with the reason
  for a rejected or malformed frame, which publishes no pose) and a ``<node>: pipeline`` summary
  every ``diagnostics.period_s`` (WARN when no pose was accepted for ``diagnostics.stale_after_s``):
  rates, latencies receipt->publish (wall clock) and stamp->publish (node clock, so ``use_sim_time``
  replays work), drops, the last frame's results and stage times, device, process memory.
- ``~/overlay``: ``bgr8`` X-ray with the DRR's edges at the estimate, only while subscribed.
- ``~/markers``: ``visualization_msgs/MarkerArray`` in ``ct_frame`` (m) for RViz: the CT's bounding
  box and bone surface (computed at configure) and the C-arm's source, detector and corner rays at
  the current estimate, green accepted, orange stale, red rejected; reliable, transient local, so a
  late RViz gets the whole scene (:mod:`.markers`; ``config/diffpose.rviz``).
"""

from __future__ import annotations

import gc
import sys
import time
import traceback

import rclpy
import rclpy.subscription as _rclpy_subscription
import torch
from diagnostic_msgs.msg import DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import JumpThreshold
from rclpy.duration import Duration
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image

from diffpose_ros.core import PatientModelError, Pipeline, set_torch_threads

from .camera_info import CameraInfoCache
from .diagnostics import FrameStats
from .outputs import NodeOutputs
from .parameters import declare_parameters, parameter_values
from .qos import input_qos
from .runtime import GIL_SWITCH_INTERVAL_S, NODE_PROFILE_NAME, spin_until_shutdown, use_large_frame_profile
from .settings import PARAMETERS, Settings, pipeline_config, resolve_device, settings_problems
from .worker import FrameWorker, Outcome, Received

# rclpy >= Iron passes MessageInfo (sequence numbers) to two-argument subscription callbacks.
_MESSAGE_INFO = hasattr(_rclpy_subscription, "MessageInfo")

__all__ = ["DiffPoseNode", "main"]

NODE_NAME = "diffpose_node"
_TUNABLE = {p.name for p in PARAMETERS if not p.read_only}


class ParameterError(ValueError):
    """Parameters given at start that the node cannot run with (each one named)."""


class DiffPoseNode(LifecycleNode):
    """The lifecycle node ``diffpose_node`` (see the module docstring for topics and parameters)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        declare_parameters(self, PARAMETERS)
        self._settings = self._read_settings()
        problems = settings_problems(self._settings)
        if problems:
            raise ParameterError("invalid parameters: " + "; ".join(problems))
        self.add_on_set_parameters_callback(self._validate_parameters)
        # rclpy before Iron (Humble) has no post-set callbacks: new values are applied as they are accepted.
        self._apply_when_validated = not hasattr(self, "add_post_set_parameters_callback")
        if not self._apply_when_validated:
            self.add_post_set_parameters_callback(self._apply_parameters)

        # Each input in a group of its own: its callbacks (microseconds) run one at a time, in order.
        self._image_group, self._info_group = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        self._state = "unconfigured"
        self._device = "unconfigured"
        self._config_error = ""
        self._warm_up_s = float("nan")
        self._stats = FrameStats()
        self._infos = CameraInfoCache()
        self._worker: FrameWorker | None = None  # from configure to cleanup
        self._image_sub = self._info_sub = None
        self._outputs = NodeOutputs(self, self._settings, self._stats)
        self._diag_timer = self.create_timer(
            max(self._settings.diagnostics_period_s, 0.05), self._on_diagnostics_timer, MutuallyExclusiveCallbackGroup()
        )
        # A clock that jumps back (a replay started over, with use_sim_time) starts a new stream.
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1), on_clock_change=True),
            post_callback=self._on_time_jump,
        )
        self.get_logger().info(f"{self.get_fully_qualified_name()} up (unconfigured); TF via {self._outputs.tf.via}")

    # ------------------------------------------------------------------------------ parameters
    def _read_settings(self, overrides: dict | None = None) -> Settings:
        values = parameter_values(self, PARAMETERS)
        return Settings.from_parameters({**values, **(overrides or {})})

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        try:
            settings = self._read_settings({p.name: p.value for p in parameters})
            problems = settings_problems(settings)
        except Exception as err:  # a malformed request must not kill the node
            return SetParametersResult(successful=False, reason=f"invalid parameters: {err}")
        if not problems and self._apply_when_validated:
            self._apply(settings, parameters)
        return SetParametersResult(successful=not problems, reason="; ".join(problems))

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        self._apply(self._read_settings(), parameters)

    def _apply(self, settings: Settings, parameters: list[Parameter]) -> None:
        """Make ``settings`` (which ``parameters`` changed) the node's and the pipeline's."""
        try:
            if not any(p.name in _TUNABLE for p in parameters):
                return
            self._settings = settings  # one immutable snapshot, swapped by a single assignment
            worker = self._worker
            if worker is not None:
                worker.pipeline.config = pipeline_config(settings, worker.pipeline.config)
            self.get_logger().info("parameters updated: " + ", ".join(p.name for p in parameters))
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().error(f"could not apply parameters: {err!r}")

    # ------------------------------------------------------------------------------- lifecycle
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        s = self._settings
        try:
            if not s.patient_model:
                return self._configure_failed(
                    "the patient_model parameter is empty: pass -p patient_model:=/path/model.safetensors"
                )
            device = resolve_device(s.device)
            set_torch_threads(device, s.num_threads)
            problems = settings_problems(s)
            if problems:
                return self._configure_failed("invalid parameters: " + "; ".join(problems))
            self.get_logger().info(f"loading patient model {s.patient_model} on {device}")
            pipeline = Pipeline.from_file(s.patient_model, device=device, config=pipeline_config(s))
            self._warm_up_s = pipeline.warm_up()
        except PatientModelError as err:
            return self._configure_failed(f"cannot load the patient model: {err}")
        except Exception as err:
            self.get_logger().error(traceback.format_exc())
            return self._configure_failed(f"configure failed: {type(err).__name__}: {err}")
        self._worker = FrameWorker(
            pipeline, lambda: self._settings, self._infos, self._camera_info_matched, self._report, self.get_logger()
        )
        self._device, self._config_error = device, ""
        bone = self._outputs.open(s.ct_frame, pipeline.model.mu)
        self.get_logger().info(
            f"configured: patient model {s.patient_model} ({tuple(pipeline.model.mu.data.shape[::-1])} voxels, "
            f"CNN {pipeline.model.metadata.get('backbone', '?')}, cost {s.cost}) on {device}, "
            f"warm-up {self._warm_up_s:.2f} s, bone surface for ~/markers: {bone}"
        )
        return self._entered("inactive", super().on_configure(state))

    def _entered(self, label: str, result: TransitionCallbackReturn) -> TransitionCallbackReturn:
        """Remember the state a successful transition leads to (rclpy keeps it private)."""
        if result == TransitionCallbackReturn.SUCCESS:
            self._state = label
        return result

    def _configure_failed(self, reason: str) -> TransitionCallbackReturn:
        self._config_error = reason
        self.get_logger().error(reason)
        self._outputs.diagnostics([self._summary_status()])
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        try:
            reliable = self._settings.image_qos == "reliable"
            self._infos.clear()
            self._worker.start(keep_running=lambda: rclpy.ok(context=self.context))
            info_qos = input_qos(reliable, 10)
            self._info_sub = self.create_subscription(
                CameraInfo, "camera_info", self._on_camera_info, info_qos, callback_group=self._info_group
            )
            # Two required parameters: rclpy (Iron and later) then passes the MessageInfo too.
            callback = (lambda msg, info: self._on_image(msg, info)) if _MESSAGE_INFO else self._on_image
            self._image_sub = self.create_subscription(
                Image, "image", callback, input_qos(reliable, 1), callback_group=self._image_group
            )
            self.get_logger().info(
                f"active: image {self._image_sub.topic_name} (depth 1) and {self._info_sub.topic_name} "
                f"(depth 10), {'reliable' if reliable else 'best effort'}"
            )
        except Exception as err:
            self.get_logger().error(f"activate failed: {err!r}\n{traceback.format_exc()}")
            self._stop_worker()
            return TransitionCallbackReturn.FAILURE
        return self._entered("active", super().on_activate(state))

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._unsubscribe()
        self._stop_worker()
        self.get_logger().info("inactive")
        return self._entered("inactive", super().on_deactivate(state))

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("cleaned up (unconfigured)")
        return self._entered("unconfigured", super().on_cleanup(state))

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.stop()
        return self._entered("finalized", super().on_shutdown(state))

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error(f"error during a transition from {state.label}: releasing everything")
        self.stop()
        return self._entered("unconfigured", TransitionCallbackReturn.SUCCESS)

    def _unsubscribe(self) -> None:
        for sub in (self._image_sub, self._info_sub):
            if sub is not None:
                self.destroy_subscription(sub)
        self._image_sub = self._info_sub = None

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()

    def _release(self) -> None:
        self._outputs.close()
        self._worker = None
        self._device = "unconfigured"
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
        if not self._settings.autostart:
            return False
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            self.get_logger().error("autostart: configure failed; the node stays unconfigured")
            return False
        if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            self.get_logger().error("autostart: activate failed")
            return False
        return True

    # ------------------------------------------------------------------------------- callbacks
    def _camera_info_matched(self) -> bool:
        sub = self._info_sub
        return sub is not None and sub.get_publisher_count() > 0

    def _on_image(self, msg: Image, msg_info=None) -> None:
        try:
            now = time.monotonic()
            worker = self._worker
            if worker is not None:
                worker.mailbox.put(Received(msg, now))
            self._stats.received(now, msg_info)
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().warning(f"image callback: {err!r}")

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            self._infos.put((int(msg.header.stamp.sec), int(msg.header.stamp.nanosec)), msg)
            self._stats.camera_info(time.monotonic())
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().warning(f"camera_info callback: {err!r}")

    def _on_time_jump(self, jump) -> None:
        """The node's clock jumped back, or switched between system and simulated time: poses go out
        again for stamps before the last published one, and the next frame starts cold."""
        try:
            worker = self._worker
            if worker is not None:
                worker.restart_stream()
            self._stats.time_jumped()
            self.get_logger().warning(
                f"the clock jumped back {-jump.delta.nanoseconds * 1e-9:.3f} s (or changed source): "
                "stamps and tracking start over"
            )
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().warning(f"time jump: {err!r}")

    def _report(self, item: Received, outcome: Outcome) -> None:
        self._outputs.frame(item, outcome, self._settings, self._device, self._worker)

    def _on_diagnostics_timer(self) -> None:
        try:
            self._outputs.diagnostics([self._summary_status()])
            markers = self._outputs.markers
            if markers is not None and self._outputs.status.stale(self._settings.stale_after_s):
                markers.show_stale()
        except Exception as err:  # pragma: no cover - defensive
            self.get_logger().warning(f"diagnostics: {err!r}")

    def _summary_status(self) -> DiagnosticStatus:
        values = {
            "device": self._device,
            "patient_model": self._settings.patient_model,
            "warm_up_s": self._warm_up_s,
            "torch_threads": torch.get_num_threads(),
        }
        if self._device.startswith("cuda"):  # pragma: no cover - GPU machines
            values["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        worker = self._worker
        if worker is not None:
            values["renderer_threads"] = worker.renderer_threads
        config_error = self._config_error if worker is None else ""
        dropped = worker.mailbox.dropped if worker is not None else 0
        name = self._outputs.diag_name
        summary = self._stats.summary(name, self._device, self._state, config_error, dropped, values)
        return self._outputs.status.flag_stale(summary, self._settings.stale_after_s)


def main(args=None) -> int:
    """Entry point of ``diffpose_node`` (``ros2 run diffpose_ros diffpose_node``)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    use_large_frame_profile(NODE_PROFILE_NAME)
    rclpy.init(args=args)  # installs SIGINT/SIGTERM handlers that shut the context down
    node = None
    executor = MultiThreadedExecutor(num_threads=4)
    try:
        try:
            node = DiffPoseNode()
        except (ParameterError, InvalidParameterTypeException, InvalidParameterValueException) as err:
            rclpy.logging.get_logger(NODE_NAME).fatal(f"{err} (see ros2 param describe, or docs/node.md)")
            return 2
        executor.add_node(node)
        try:
            node.autostart()
        except Exception as err:  # e.g. interrupted by SIGINT/SIGTERM while configuring
            if rclpy.ok():
                node.get_logger().error(f"autostart failed: {err!r}")
        if rclpy.ok():
            spin_until_shutdown(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:  # a signal shut the context down as a wait set was built (rclpy's "context is not valid")
        if rclpy.ok():  # a real error, raised while the context was still valid
            raise
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
