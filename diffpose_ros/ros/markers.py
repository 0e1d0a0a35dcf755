"""``diffpose_node``'s ``~/markers``: the registration as a ``visualization_msgs/MarkerArray`` for RViz.

All markers are in ``ct_frame``, in metres (the core's geometry, :mod:`diffpose_ros.core.navigation.scene`, is in
mm). Namespace ``ct``, from the patient model at configure: id 0 the CT's bounding box (``LINE_LIST``),
id 1 the bone surface (``TRIANGLE_LIST``, at most :data:`~diffpose_ros.core.navigation.scene.MAX_TRIANGLES`).
Namespace ``carm``, at the current estimate: id 0 the source (``SPHERE``), id 1 the detector rectangle
(``LINE_STRIP``), id 2 the rays from the source to its four corners (``LINE_LIST``), coloured by
validity: green ``accepted``; orange ``stale`` (the last accepted pose, once none was accepted for
``diagnostics.stale_after_s``); red ``rejected`` (the gate's refused estimate, or the last drawn C-arm
for a frame without one). The detector is drawn ``intrinsics.sdd_mm`` from the source, or the
contract's 1020 mm when that is unset: the rays and the rectangle's shape do not depend on it.

Latching: two publishers on the one topic, both reliable and transient local with depth 1. One sends
the ``ct`` array once, the other the ``carm`` array at each change; DDS keeps the last message of each
writer, so a late transient-local subscriber (RViz started later) gets both, and the mesh goes out
once, not with every frame. The subscriber's depth must be 2 or more (the two arrays arrive
together; ``config/diffpose.rviz`` has 10).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from geometry_msgs.msg import Point
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

from diffpose_ros.core import CONTRACT_SDD_MM, Volume
from diffpose_ros.core.navigation.scene import Frustum, Surface, bone_surface, box_edges, carm_frustum

from .conversions.geometry import MM_PER_M
from .qos import latched_qos

__all__ = ["COLOURS", "MARKERS_TOPIC", "MarkerPublisher", "carm_markers", "scene_markers"]

MARKERS_TOPIC = "~/markers"

COLOURS = {
    "accepted": (0.2, 0.85, 0.3, 1.0),
    "stale": (1.0, 0.6, 0.0, 1.0),
    "rejected": (0.95, 0.15, 0.1, 1.0),
}
"""RGBA of the C-arm by validity."""
_BOX_RGBA = (0.55, 0.75, 1.0, 0.8)
_BONE_RGBA = (0.92, 0.89, 0.8, 0.7)
_LINE_M = 0.003  # line width
_SOURCE_M = 0.03  # source sphere diameter
_VALIDITY = {"published": "accepted", "rejected": "rejected", "failed": "rejected"}  # worker Outcome.kind


def _points(xyz_mm: np.ndarray) -> list[Point]:
    """``geometry_msgs/Point``s (m) of ``(N, 3)`` points in mm."""
    return [Point(x=x, y=y, z=z) for x, y, z in (np.asarray(xyz_mm, dtype=np.float64) / MM_PER_M).tolist()]


def _marker(ns: str, marker_id: int, kind: int, frame_id: str, stamp, rgba, width_m: float = 1.0) -> Marker:
    """An ``ADD`` marker of type ``kind`` (e.g. ``Marker.SPHERE``) with identity pose and uniform
    ``scale`` ``width_m`` (the line width of lines, the diameter of a sphere, 1 for triangles)."""
    marker = Marker(ns=ns, id=marker_id, type=kind, action=Marker.ADD)
    marker.header.frame_id = frame_id
    if stamp is not None:
        marker.header.stamp = stamp
    marker.pose.orientation.w = 1.0
    marker.scale.x = marker.scale.y = marker.scale.z = float(width_m)
    marker.color = ColorRGBA(r=rgba[0], g=rgba[1], b=rgba[2], a=rgba[3])
    return marker


def scene_markers(edges_mm: np.ndarray, surface: Surface, frame_id: str) -> MarkerArray:
    """``MarkerArray`` of namespace ``ct``: the box ``edges_mm`` ``(12, 2, 3)`` and the bone ``surface``
    (both in ``ct`` mm), stamped 0 (static: RViz uses the latest transform)."""
    box = _marker("ct", 0, Marker.LINE_LIST, frame_id, None, _BOX_RGBA, _LINE_M)
    box.points = _points(edges_mm.reshape(-1, 3))
    bone = _marker("ct", 1, Marker.TRIANGLE_LIST, frame_id, None, _BONE_RGBA)
    bone.points = _points(surface.vertices[surface.faces].reshape(-1, 3))
    return MarkerArray(markers=[box, bone])


def carm_markers(frustum: Frustum, validity: str, frame_id: str, stamp) -> MarkerArray:
    """``MarkerArray`` of namespace ``carm``: source, detector and rays of ``frustum`` (``ct`` mm) in
    the colour of ``validity`` (:data:`COLOURS`), stamped ``stamp``."""
    rgba = COLOURS[validity]
    source = _marker("carm", 0, Marker.SPHERE, frame_id, stamp, rgba, _SOURCE_M)
    source.pose.position = _points(frustum.source[None])[0]
    detector = _marker("carm", 1, Marker.LINE_STRIP, frame_id, stamp, rgba, _LINE_M)
    detector.points = _points(np.vstack([frustum.corners, frustum.corners[:1]]))  # closed
    rays = _marker("carm", 2, Marker.LINE_LIST, frame_id, stamp, rgba, _LINE_M)
    rays.points = _points(frustum.rays.reshape(-1, 3))
    return MarkerArray(markers=[source, detector, rays])


class MarkerPublisher:
    """Publishes ``~/markers`` for ``node`` in ``frame_id`` (see the module docstring); thread-safe."""

    def __init__(self, node, frame_id: str):
        self._node, self._frame_id = node, frame_id
        self._scene_pub = node.create_publisher(MarkerArray, MARKERS_TOPIC, latched_qos())
        self._carm_pub = node.create_publisher(MarkerArray, MARKERS_TOPIC, latched_qos())
        self._lock = threading.Lock()
        self._frustum: Frustum | None = None
        self._validity = ""
        self._stamp = None

    def publish_scene(self, mu: Volume) -> str:
        """Publish the box and bone surface of the attenuation volume ``mu``; what was drawn, in words.

        A failure is logged and leaves the scene out: it never stops the node."""
        try:
            t0 = time.perf_counter()
            surface = bone_surface(mu)
            self._scene_pub.publish(scene_markers(box_edges(mu), surface, self._frame_id))
            return f"{len(surface.faces)} triangles at {surface.voxel_mm:.1f} mm in {time.perf_counter() - t0:.2f} s"
        except Exception as err:
            self._node.get_logger().warning(f"~/markers: no CT box and bone surface: {err!r}")
            return "none"

    def publish_carm(self, outcome, stamp, sdd_mm: float) -> None:
        """Draw the C-arm for a worker ``Outcome``: at its estimate when it has one, else where it was
        last drawn; ``sdd_mm`` <= 0 draws the detector at the contract's distance."""
        validity = _VALIDITY.get(outcome.kind)
        if validity is None:  # a skipped frame changes nothing
            return
        with self._lock:
            if outcome.result is not None and outcome.frame is not None:
                pose = torch.as_tensor(outcome.result.pose).detach().cpu().numpy()
                sdd = sdd_mm if sdd_mm > 0 else CONTRACT_SDD_MM
                self._frustum, self._stamp = carm_frustum(pose, outcome.frame.intrinsics, sdd), stamp
            self._show(validity)

    def show_stale(self) -> None:
        """Recolour an accepted C-arm as stale (the node calls this once no pose was accepted for
        ``diagnostics.stale_after_s``); a rejected one stays red."""
        with self._lock:
            if self._validity == "accepted":
                self._show("stale")

    def destroy(self) -> None:
        for pub in (self._scene_pub, self._carm_pub):
            self._node.destroy_publisher(pub)

    def _show(self, validity: str) -> None:
        if self._frustum is not None:
            self._validity = validity
            self._carm_pub.publish(carm_markers(self._frustum, validity, self._frame_id, self._stamp))
