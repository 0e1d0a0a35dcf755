"""Ground truth and a node's estimates read from bags, keyed by stamp (ns), for ``diffpose-score``.

Frames are the ground-truth bag's images (or, without images, its ground-truth stamps). Ground truth:
``tf2_msgs/TFMessage`` (default topic ``/tf_ground_truth``; any TF topic but ``/tf`` and ``/tf_static``
otherwise) with ``ct`` as parent, or a ``geometry_msgs/PoseStamped`` / ``PoseWithCovarianceStamped``
topic. Estimates: the output bag's transform ``ct`` -> camera frame on ``/tf`` (either direction;
``~/pose`` when there is no such transform), with the recorder's arrival times, the arrivals of the
inputs it also recorded (Image or CameraInfo) and the node's ``/diagnostics`` frame statuses.

Target points (``ct``, LPS mm): a file, else the scene description of a ``diffpose-make-bag`` bag,
else the bundled CT's structure centroids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffpose_ros.core import CONTRACT_SDD_MM, Intrinsics, parse_stamp, stamp_ns
from diffpose_ros.core.rendering.volume import (
    default_ct_path,
    default_labels_path,
    label_centroids,
    load_ct,
    load_labels,
)
from diffpose_ros.ros.conversions import camera_info_to_intrinsics, pose_to_matrix, transform_to_matrix

from .bagfile import bag_topics, decode, read_messages

__all__ = [
    "Truth",
    "Estimates",
    "read_truth",
    "read_estimates",
    "targets_for",
    "sdd_for",
    "tf_pose",
]

IMAGE = "sensor_msgs/msg/Image"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
TF = "tf2_msgs/msg/TFMessage"
POSE_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped")
SCENE_TOPIC = "/diffpose/scene"


@dataclass
class Truth:
    """What a ground-truth bag says: frame stamps, poses (mm), the camera and the scene."""

    bag: Path
    frames: list[int]
    poses: dict[int, np.ndarray]
    camera: Intrinsics | None
    camera_frame: str
    image_topic: str | None
    camera_info_topic: str | None
    scene: dict = field(default_factory=dict)


@dataclass
class Estimates:
    """What a recorded output bag says, by stamp (ns): poses (mm) and arrival times (ns, recorder clock)."""

    bag: Path
    poses: dict[int, np.ndarray] = field(default_factory=dict)
    arrivals: dict[int, int] = field(default_factory=dict)
    inputs: dict[int, int] = field(default_factory=dict)
    node_latency_s: dict[int, float] = field(default_factory=dict)
    node_path: dict[int, str] = field(default_factory=dict)
    source: str = ""


def _pick(topics: dict, types: tuple[str, ...], preferred: str | None, exclude=()) -> str | None:
    if preferred:
        if preferred not in topics:
            raise ValueError(f"topic {preferred} is not in the bag (it has {', '.join(sorted(topics))})")
        return preferred
    candidates = sorted(t for t, info in topics.items() if info.msgtype in types and t not in exclude)
    return candidates[0] if candidates else None


def tf_pose(transform_stamped, parent: str, child: str | None) -> np.ndarray | None:
    """``T_parent_child`` (mm) from a TransformStamped in either direction, or None if it is another edge."""
    a, b = transform_stamped.header.frame_id.lstrip("/"), transform_stamped.child_frame_id.lstrip("/")
    if a == parent and (child is None or b == child) and b != parent:
        return transform_to_matrix(transform_stamped.transform)
    if b == parent and (child is None or a == child):
        return np.linalg.inv(transform_to_matrix(transform_stamped.transform))
    return None


def read_truth(
    bag: str | Path,
    truth_topic: str | None = None,
    image_topic: str | None = None,
    camera_info_topic: str | None = None,
    ct_frame: str | None = None,
) -> Truth:
    """Read the ground truth, the frames and the camera of ``bag``; ValueError without ground truth."""
    bag = Path(bag)
    topics = bag_topics(bag)
    scene = {}
    if SCENE_TOPIC in topics:
        for _, msgtype, _, raw in read_messages(bag, [SCENE_TOPIC]):
            scene = json.loads(decode(raw, msgtype).data)
    ct_frame = ct_frame or scene.get("ct_frame", "ct")
    truth_topic = truth_topic or ("/tf_ground_truth" if "/tf_ground_truth" in topics else None)
    truth_topic = _pick(topics, (TF,) + POSE_TYPES, truth_topic, exclude=("/tf", "/tf_static"))
    if truth_topic is None:
        raise ValueError(
            f"{bag} has no ground truth: no TFMessage topic (other than /tf) and no pose topic; "
            "name one with --truth-topic"
        )
    image_topic = _pick(topics, (IMAGE,), image_topic)
    camera_info_topic = _pick(topics, (CAMERA_INFO,), camera_info_topic)
    poses: dict[int, np.ndarray] = {}
    frames: list[int] = []
    camera, camera_frame = None, scene.get("camera_frame", "")
    wanted = [t for t in (truth_topic, image_topic, camera_info_topic) if t]
    for topic, msgtype, _, raw in read_messages(bag, wanted):
        msg = decode(raw, msgtype)
        if topic == truth_topic:
            if msgtype == TF:
                for ts in msg.transforms:
                    T = tf_pose(ts, ct_frame, scene.get("truth_frame"))
                    if T is not None:
                        poses[stamp_ns(ts.header.stamp)] = T
            else:
                pose = msg.pose.pose if msgtype.endswith("WithCovarianceStamped") else msg.pose
                poses[stamp_ns(msg.header.stamp)] = pose_to_matrix(pose)
        elif topic == image_topic:
            frames.append(stamp_ns(msg.header.stamp))
            camera_frame = camera_frame or msg.header.frame_id
        elif topic == camera_info_topic and camera is None:
            camera = camera_info_to_intrinsics(msg)
    if not poses:
        raise ValueError(f"{bag}: no ground-truth pose with parent frame {ct_frame!r} on {truth_topic}")
    frames = sorted(set(frames)) if frames else sorted(poses)
    return Truth(
        bag, frames, poses, camera, camera_frame or "carm_source_optical", image_topic, camera_info_topic, scene
    )


def read_estimates(
    bag: str | Path, ct_frame: str, camera_frame: str, tf_topic: str = "/tf", pose_topic: str | None = None
) -> Estimates:
    """Poses and timing from a recorded output bag (``/tf``, else a pose topic), inputs and diagnostics."""
    bag = Path(bag)
    topics = bag_topics(bag)
    out = Estimates(bag)
    inputs = [t for t, info in topics.items() if info.msgtype in (IMAGE, CAMERA_INFO)]
    diagnostics = [t for t, info in topics.items() if info.msgtype == "diagnostic_msgs/msg/DiagnosticArray"]
    pose_topic = _pick(topics, ("geometry_msgs/msg/PoseWithCovarianceStamped",), pose_topic)
    tf_poses, topic_poses = {}, {}
    wanted = [t for t in (tf_topic if tf_topic in topics else None, pose_topic, *inputs, *diagnostics) if t]
    for topic, msgtype, t_ns, raw in read_messages(bag, wanted):
        msg = decode(raw, msgtype)
        if topic == tf_topic:
            for ts in msg.transforms:
                T = tf_pose(ts, ct_frame, camera_frame)
                if T is not None:
                    tf_poses.setdefault(stamp_ns(ts.header.stamp), (T, t_ns))
        elif topic == pose_topic:
            if msg.header.frame_id.lstrip("/") == ct_frame:
                topic_poses.setdefault(stamp_ns(msg.header.stamp), (pose_to_matrix(msg.pose.pose), t_ns))
        elif topic in inputs:
            out.inputs.setdefault(stamp_ns(msg.header.stamp), t_ns)
        else:
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                if "stamp" not in values:
                    continue
                if "latency_receipt_to_publish_s" in values:
                    out.node_latency_s[parse_stamp(values["stamp"], strict=False)] = float(
                        values["latency_receipt_to_publish_s"]
                    )
                if "path" in values:  # which of the pipeline's paths the frame took
                    out.node_path[parse_stamp(values["stamp"], strict=False)] = values["path"]
    chosen, out.source = (
        (tf_poses, f"{tf_topic} ({ct_frame} -> {camera_frame})") if tf_poses else (topic_poses, str(pose_topic))
    )
    for stamp, (T, arrival) in chosen.items():
        out.poses[stamp] = T
        out.arrivals[stamp] = arrival
    return out


def targets_for(truth: Truth, targets_path: str | None) -> tuple[torch.Tensor, str]:
    """The mTRE targets (``(N, 3)``, ``ct``, LPS mm) and where they came from.

    ``targets_path``: a JSON list of ``[x, y, z]`` points or ``{"targets_ct_mm": [...]}``; ValueError otherwise."""
    if targets_path:
        doc = json.loads(Path(targets_path).read_text())
        points = doc.get("targets_ct_mm") if isinstance(doc, dict) else doc
        t = torch.tensor(points, dtype=torch.float64)
        if t.ndim != 2 or t.shape[1] != 3 or not torch.isfinite(t).all():
            raise ValueError(f"{targets_path}: expected a list of [x, y, z] points (ct, LPS mm)")
        return t, f"{len(t)} points from {targets_path}"
    if truth.scene.get("targets_ct_mm"):
        t = torch.tensor(truth.scene["targets_ct_mm"], dtype=torch.float64)
        return t, f"{len(t)} points from the bag's scene description ({SCENE_TOPIC})"
    t, _ = label_centroids(load_labels(default_labels_path(), load_ct(default_ct_path())))
    return t, f"{len(t)} structure centroids of the bundled CT (the bag names no targets)"


def sdd_for(truth: Truth, sdd_mm: float | None) -> float:
    """SDD (mm) for mPE: given, else the scene's, else the contract detector's."""
    if sdd_mm:
        return float(sdd_mm)
    return float(truth.scene.get("detector", {}).get("sdd_mm", CONTRACT_SDD_MM))
