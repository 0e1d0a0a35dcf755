"""What ``diffpose_node`` publishes: each frame's outcome and the ``/diagnostics`` statuses.

For an accepted pose: ``/tf`` (``ct_frame`` -> the image's frame, or the inverse with ``invert``),
``~/pose`` and, while subscribed, ``~/overlay``. For every frame: its ``<node>: frame`` status on
``/diagnostics``, ``~/status`` and the C-arm on ``~/markers``. ``~/pose``, ``~/overlay`` and
``~/markers`` exist from configure to cleanup (:meth:`NodeOutputs.open`, :meth:`NodeOutputs.close`);
``/tf_static`` (``ct_frame`` -> ``ct_ras_frame``), ``~/status`` and ``/diagnostics`` for the node's
whole life.
"""

from __future__ import annotations

import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.time import Time
from sensor_msgs.msg import Image

from diffpose_ros.core import Volume

from .conversions.geometry import CT_TO_CT_RAS, pose_with_covariance_stamped, transform_stamped
from .conversions.image import numpy_to_image
from .diagnostics import FrameStats, frame_status
from .markers import MarkerPublisher
from .settings import Settings
from .status import StatusReporter
from .tf_publisher import TransformPublisher
from .worker import FrameWorker, Outcome, OutcomeKind, Received

__all__ = ["NodeOutputs"]


class NodeOutputs:
    """The publishers of the lifecycle ``node`` (see the module docstring); ``settings``: the node's
    settings at start, ``stats``: its frame counters, which :meth:`frame` updates."""

    def __init__(self, node, settings: Settings, stats: FrameStats):
        self._node, self._stats = node, stats
        self._diag_pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.diag_name = node.get_fully_qualified_name().lstrip("/")
        self.tf = TransformPublisher(node)
        self.status = StatusReporter(node, settings.stale_after_s)
        self.markers: MarkerPublisher | None = None  # from configure to cleanup
        self._pose_pub = self._overlay_pub = None
        if settings.ct_ras_frame:
            now = node.get_clock().now().to_msg()
            self.tf.send_static(transform_stamped(CT_TO_CT_RAS, now, settings.ct_frame, settings.ct_ras_frame))

    def open(self, ct_frame: str, mu: Volume) -> str:
        """Create ``~/pose``, ``~/overlay`` and ``~/markers`` and publish the CT scene of ``mu``; what
        was drawn, in words."""
        node = self._node
        self._pose_pub = node.create_lifecycle_publisher(PoseWithCovarianceStamped, "~/pose", 10)
        self._overlay_pub = node.create_lifecycle_publisher(Image, "~/overlay", 1)
        self.markers = MarkerPublisher(node, ct_frame)
        return self.markers.publish_scene(mu)

    def close(self) -> None:
        """Destroy what :meth:`open` created."""
        for pub in (self._pose_pub, self._overlay_pub):
            if pub is not None:
                self._node.destroy_lifecycle_publisher(pub)
        self._pose_pub = self._overlay_pub = None
        if self.markers is not None:
            self.markers.destroy()
        self.markers = None

    def frame(self, item: Received, outcome: Outcome, s: Settings, device: str, worker: FrameWorker | None) -> None:
        """Publish what the worker made of a frame with settings ``s``: TF, ``~/pose`` and the overlay
        (drawn by ``worker``'s pipeline) for an accepted pose, the frame status on ``/diagnostics`` and
        ``~/status``, and the C-arm on ``~/markers``."""
        msg = item.msg
        if outcome.kind == OutcomeKind.PUBLISHED:
            result = outcome.result
            child = msg.header.frame_id or s.camera_frame
            self.tf.send(transform_stamped(result.pose, msg.header.stamp, s.ct_frame, child, s.invert))
            if self._pose_pub is not None:
                pose = pose_with_covariance_stamped(result.pose, result.covariance, msg.header.stamp, s.ct_frame)
                self._pose_pub.publish(pose)
            now = time.monotonic()
            latency_receipt = now - item.wall
            node_ns = self._node.get_clock().now().nanoseconds
            latency_stamp = (node_ns - Time.from_msg(msg.header.stamp).nanoseconds) * 1e-9
            outcome.values.update(
                latency_receipt_to_publish_s=latency_receipt, latency_stamp_to_publish_s=latency_stamp
            )
            self._stats.published(now, latency_receipt, latency_stamp)
            self._overlay(msg, outcome, s, worker)
        elif outcome.kind == OutcomeKind.REJECTED:
            self._stats.rejected()
        elif outcome.kind == OutcomeKind.SKIPPED:
            self._stats.skipped()
        status = frame_status(self.diag_name, device, outcome.level, outcome.message, msg.header, outcome.values)
        self._stats.remember(status)
        self.diagnostics([status])
        self.status.publish(outcome, msg.header, msg.header.frame_id or s.camera_frame)
        markers = self.markers
        if markers is not None:
            markers.publish_carm(outcome, msg.header.stamp, s.sdd_mm)

    def _overlay(self, msg: Image, outcome: Outcome, s: Settings, worker: FrameWorker | None) -> None:
        pub = self._overlay_pub
        if pub is None or worker is None or pub.get_subscription_count() == 0:
            return
        try:
            picture = worker.pipeline.overlay(outcome.frame, outcome.result.pose, s.overlay_width)
            out = numpy_to_image(picture, "bgr8", header=msg.header)
            out.header.frame_id = out.header.frame_id or s.camera_frame
            pub.publish(out)
        except Exception as err:
            self._node.get_logger().warning(f"overlay failed: {err!r}", throttle_duration_sec=5.0)

    def diagnostics(self, statuses: list[DiagnosticStatus]) -> None:
        """Publish ``statuses`` on ``/diagnostics``, stamped now (node clock)."""
        array = DiagnosticArray(status=statuses)
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._diag_pub.publish(array)
