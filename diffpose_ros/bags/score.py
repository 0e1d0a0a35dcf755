"""Score a node's recorded output against a ground-truth bag (``diffpose-score``).

Frames are the ground-truth bag's images (or, without images, its ground-truth stamps); each is
matched by exact stamp with the estimate bag's transform ``ct`` -> camera frame on ``/tf`` (either
direction; ``~/pose`` when there is no such transform). Per frame: 3D mTRE and mPE (mm), rotation
(deg) and translation (mm) errors, latency, and the path the node's diagnostics say it took
(``tracking``, ``cold``, ...). A frame without a pose counts as a failure in the
success rates. Latency is stamp-independent, so replays of old bags work: the arrival of the pose
minus the arrival of the input with the same stamp, both on the recorder's clock, when the estimate
bag also recorded the input (an Image or CameraInfo topic); otherwise the node's own
``latency_receipt_to_publish_s`` from its ``/diagnostics`` frame status.

Ground truth: ``tf2_msgs/TFMessage`` (default topic ``/tf_ground_truth``; any TF topic but ``/tf`` and
``/tf_static`` otherwise) with ``ct`` as parent, or a ``geometry_msgs/PoseStamped`` /
``PoseWithCovarianceStamped`` topic. Target points (``ct``, LPS mm): ``targets`` argument, else the
scene description of a ``diffpose-make-bag`` bag, else the bundled CT's structure centroids.

A navigator's view (:func:`score_navigator`): what an OpenIGTLink client of ``diffpose-igtl`` received,
its transforms scored with the same 3D mTRE (``summary.json``'s ``igtl``, a section of ``report.md``).
"""

from __future__ import annotations

import bisect
import collections
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core import metrics
from ..core.geometry import CONTRACT_SDD_MM, Intrinsics
from ..core.io import save_json
from ..core.navigation import stamp_from_ns, stamp_ns
from .bagfile import bag_topics, decode, read_messages

__all__ = [
    "Truth",
    "Estimates",
    "read_truth",
    "read_estimates",
    "score_frames",
    "score_navigator",
    "summarize",
    "targets_for",
    "sdd_for",
    "write_plots",
    "write_overlays",
    "write_report",
    "tf_pose",
    "stamp_from_key",
]

IMAGE = "sensor_msgs/msg/Image"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
TF = "tf2_msgs/msg/TFMessage"
POSE_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped")
SCENE_TOPIC = "/diffpose/scene"
IGTL_STAMP_TOLERANCE_NS = 10_000
"""An OpenIGTLink timestamp (float seconds) is a frame's stamp when within 10 us of it."""


def stamp_from_key(key: str) -> int:
    """Nanoseconds of a ``sec.nanosec`` stamp (the node's diagnostic spelling, the inverse of
    :func:`~diffpose_ros.core.navigation.stamp_from_ns`); a missing fraction counts as 0."""
    sec, _, nsec = key.partition(".")
    return int(sec) * 1_000_000_000 + int(nsec or 0)


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
    from ..ros.conversions import transform_to_matrix

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
    """Read the ground truth, the frames and the camera of ``bag``."""
    from ..ros.conversions import camera_info_to_intrinsics, pose_to_matrix

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
    from ..ros.conversions import pose_to_matrix

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
                    out.node_latency_s[stamp_from_key(values["stamp"])] = float(values["latency_receipt_to_publish_s"])
                if "path" in values:  # which of the pipeline's paths the frame took
                    out.node_path[stamp_from_key(values["stamp"])] = values["path"]
    chosen, out.source = (
        (tf_poses, f"{tf_topic} ({ct_frame} -> {camera_frame})") if tf_poses else (topic_poses, str(pose_topic))
    )
    for stamp, (T, arrival) in chosen.items():
        out.poses[stamp] = T
        out.arrivals[stamp] = arrival
    return out


def score_frames(truth: Truth, estimates: Estimates, targets_ct_mm: torch.Tensor, sdd_mm: float) -> list[dict]:
    """One row per frame: stamp, seconds from the first frame, errors (None without a pose), latency."""
    rows = []
    t0 = truth.frames[0]
    camera = truth.camera
    for stamp in truth.frames:
        row = {"stamp": stamp_from_ns(stamp), "t_s": (stamp - t0) * 1e-9, "has_pose": stamp in estimates.poses}
        T_true = truth.poses.get(stamp)
        if T_true is None:
            row["no_truth"] = True
        elif row["has_pose"]:
            est = torch.from_numpy(estimates.poses[stamp])
            tru = torch.from_numpy(T_true)
            if camera is not None:
                row.update(metrics.frame_errors(est, tru, targets_ct_mm, camera, sdd_mm / camera.fx, sdd_mm))
            else:
                row["mtre_mm"] = float(metrics.mtre(est, tru, targets_ct_mm))
                row.update(metrics.pose_errors(est, tru, radius_mm=sdd_mm / 2))
        if stamp in estimates.node_path:
            row["path"] = estimates.node_path[stamp]
        if row["has_pose"]:
            if stamp in estimates.inputs:
                row["latency_s"] = (estimates.arrivals[stamp] - estimates.inputs[stamp]) * 1e-9
            elif stamp in estimates.node_latency_s:
                row["latency_s"] = estimates.node_latency_s[stamp]
        rows.append(row)
    return rows


def _median(values):
    return statistics.median(values) if values else None


def _quantile(values, q):
    return float(np.quantile(values, q)) if values else None


def summarize(rows: list[dict], estimates: Estimates) -> dict:
    """The summary of :func:`score_frames` rows (``summary.json``'s figures)."""
    scored = [r for r in rows if not r.get("no_truth")]
    errors = [r["mtre_mm"] for r in scored if "mtre_mm" in r]
    latencies = [r["latency_s"] for r in scored if "latency_s" in r]
    n = len(scored)
    arrivals = sorted(estimates.arrivals[s] for s in estimates.arrivals)
    span = (arrivals[-1] - arrivals[0]) * 1e-9 if len(arrivals) > 1 else 0.0
    input_span = scored[-1]["t_s"] - scored[0]["t_s"] if n > 1 else 0.0
    return {
        "frames": n,
        "frames_with_pose": len(errors),
        "frames_without_pose": n - len(errors),
        "median_mtre_mm": _median(errors),
        "mean_mtre_mm": statistics.fmean(errors) if errors else None,
        "p90_mtre_mm": _quantile(errors, 0.9),
        "max_mtre_mm": max(errors) if errors else None,
        "median_mpe_mm": _median([r["mpe_mm"] for r in scored if "mpe_mm" in r]),
        "median_rotation_deg": _median([r["rotation_deg"] for r in scored if "rotation_deg" in r]),
        "median_translation_mm": _median([r["translation_mm"] for r in scored if "translation_mm" in r]),
        **{f"success_rate_{k}mm": (sum(e < k for e in errors) / n if n else None) for k in (1, 2, 10)},
        "median_latency_s": _median(latencies),
        "p90_latency_s": _quantile(latencies, 0.9),
        "max_latency_s": max(latencies) if latencies else None,
        "throughput_hz": (len(arrivals) - 1) / span if span > 0 else None,
        "paths": dict(collections.Counter(r["path"] for r in scored if "path" in r)),
        "input_rate_hz": (n - 1) / input_span if input_span > 0 else None,
    }


def _frame_at(timestamp_s: float, frames: list[int]) -> int | None:
    """The stamp (ns) in sorted ``frames`` that an OpenIGTLink timestamp (s) stands for, or None."""
    ns = round(timestamp_s * 1e9)
    i = bisect.bisect_left(frames, ns)
    near = [f for f in frames[max(i - 1, 0) : i + 1] if abs(f - ns) <= IGTL_STAMP_TOLERANCE_NS]
    return near[0] if near else None


def score_navigator(messages: list, truth: Truth, targets_ct_mm: torch.Tensor, node_stamps) -> dict:
    """What a navigator received from ``diffpose-igtl`` (pyigtl messages, as a
    :class:`~.navigator.Receiver` keeps them), against ``truth``: ``summary.json``'s ``igtl``.

    An OK TRANSFORM (``T_ctras_source``: C-arm source -> CT RAS, mm) at a frame's stamp is turned back
    into ``T_ct_source`` (``ct``, LPS mm) and scored with the 3D mTRE of :func:`score_frames`. An
    INVALID one is counted by the reason of the STRING status with the same timestamp. ``node_stamps``:
    the stamps (ns) of the node's own poses on ``/tf``, each expected to have an OK TRANSFORM.
    """
    from ..core.navigation import PoseStatus, ras_to_carm
    from ..ros.igtl_bridge import BridgeSettings

    devices = BridgeSettings()

    def of(device: str, kind: str) -> list:
        return [m for m in messages if m.device_name == device and m.message_type == kind]

    transforms = of(devices.transform_device, "TRANSFORM")
    images = of(devices.image_device, "IMAGE")
    statuses = [(m.timestamp, PoseStatus.from_json(m.string)) for m in of(devices.status_device, "STRING")]
    reason_at = {timestamp: status.reason for timestamp, status in statuses}
    ok = [m for m in transforms if m.metadata.get("TransformStatus") == "OK"]
    reasons = collections.Counter(
        reason_at.get(m.timestamp, "no status") for m in transforms if m.metadata.get("TransformStatus") != "OK"
    )
    ok_stamps, errors = set(), []
    for m in ok:
        stamp = _frame_at(m.timestamp, truth.frames)
        if stamp is None:
            continue
        ok_stamps.add(stamp)
        if stamp in truth.poses:
            T_ct_source = torch.from_numpy(ras_to_carm(m.matrix))
            errors.append(float(metrics.mtre(T_ct_source, torch.from_numpy(truth.poses[stamp]), targets_ct_mm)))
    ok_times = {m.timestamp for m in ok}
    node_stamps = set(node_stamps)
    return {
        "transforms": len(transforms),
        "transforms_ok": len(ok),
        "transforms_invalid": len(transforms) - len(ok),
        "invalid_reasons": dict(reasons),
        "images": len(images),
        "images_at_ok_transforms": sum(m.timestamp in ok_times for m in images),
        "statuses": len(statuses),
        "statuses_valid": sum(status.valid for _, status in statuses),
        "ok_transforms_scored": len(errors),
        "node_tfs": len(node_stamps),
        "node_tfs_with_ok_transform": len(node_stamps & ok_stamps),
        "median_mtre_mm": _median(errors),
        "p90_mtre_mm": _quantile(errors, 0.9),
        "max_mtre_mm": max(errors) if errors else None,
    }


# ----------------------------------------------------------------------------------------- report
def write_plots(out: Path, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_pose = [r for r in rows if "mtre_mm" in r]
    missing = [r for r in rows if not r["has_pose"]]
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), dpi=110, sharex=True)
    axes[0].plot([r["t_s"] for r in with_pose], [r["mtre_mm"] for r in with_pose], "o-", ms=3, label="3D mTRE")
    if missing:
        axes[0].plot([r["t_s"] for r in missing], [0] * len(missing), "rx", label="no pose")
    axes[0].axhline(2.0, color="grey", ls="--", lw=0.8, label="2 mm")
    axes[0].set_ylabel("3D mTRE (mm)")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].grid(alpha=0.3)
    lat = [r for r in rows if "latency_s" in r]
    axes[1].plot([r["t_s"] for r in lat], [r["latency_s"] * 1e3 for r in lat], "s-", ms=3, color="tab:orange")
    axes[1].set_ylabel("latency (ms)")
    axes[1].set_xlabel("frame time (s from the first frame)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "error_over_time.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    errors = [r["mtre_mm"] for r in with_pose]
    if errors:
        ax.hist(errors, bins=min(30, max(5, len(errors) // 2)), color="tab:blue", alpha=0.8)
    ax.set_xlabel("3D mTRE (mm)")
    ax.set_ylabel("frames")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "error_histogram.png")
    plt.close(fig)
    return ["error_over_time.png", "error_histogram.png"]


def write_overlays(
    out: Path,
    truth: Truth,
    estimates: Estimates,
    rows: list[dict],
    ct_path: str | Path,
    mirror: bool = False,
    count: int = 4,
) -> list[str]:
    """PNGs of a few frames (first, median error, worst, last) with the DRR's edges at the estimate."""
    from ..core.io import write_picture
    from ..core.overlay import render_overlay
    from ..core.render import Renderer
    from ..core.volume import hu_to_mu, load_ct
    from ..ros.conversions import image_to_frame

    scored = [r for r in rows if "mtre_mm" in r]
    if not scored or truth.camera is None or truth.image_topic is None:
        return []
    by_error = sorted(scored, key=lambda r: r["mtre_mm"])
    picks = {"first": scored[0], "median": by_error[len(by_error) // 2], "worst": by_error[-1], "last": scored[-1]}
    chosen = list(dict.fromkeys(r["stamp"] for r in picks.values()))[:count]
    labels = {row["stamp"]: label for label, row in picks.items()}  # a later label wins for a shared stamp
    renderer = Renderer(hu_to_mu(load_ct(ct_path)))
    names = []
    for _, msgtype, _, raw in read_messages(truth.bag, [truth.image_topic]):
        msg = decode(raw, msgtype)
        key = stamp_from_ns(stamp_ns(msg.header.stamp))
        if key not in chosen:
            continue
        frame = image_to_frame(msg, truth.camera, mirror=mirror)
        pose = torch.from_numpy(estimates.poses[stamp_ns(msg.header.stamp)])
        name = f"overlay_{labels[key]}_{key.replace('.', '_')}.png"
        write_picture(out / name, render_overlay(renderer, frame, pose, 256))
        names.append(name)
    return names


def _fmt(value, spec=".3f", unit=""):
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def write_report(out: str | Path, summary: dict, rows: list[dict], pictures: list[str]) -> None:
    """``summary.json``, ``frames.json`` and ``report.md`` (with the pictures) in ``out``."""
    out = Path(out)
    save_json(out / "summary.json", summary)
    save_json(out / "frames.json", {"frames": rows})
    s = summary
    lines = [
        "# diffpose_ros replay score",
        "",
        f"- ground truth: `{s.get('truth_bag')}`; estimates: `{s.get('estimate_bag')}` ({s.get('estimate_source')})",
        f"- targets: {s.get('targets')}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| frames / with pose / without | {s['frames']} / {s['frames_with_pose']} / {s['frames_without_pose']} |",
        f"| 3D mTRE median / mean / p90 / max | {_fmt(s['median_mtre_mm'])} / {_fmt(s['mean_mtre_mm'])} / "
        f"{_fmt(s['p90_mtre_mm'])} / {_fmt(s['max_mtre_mm'])} mm |",
        f"| mPE median | {_fmt(s['median_mpe_mm'])} mm |",
        f"| rotation / translation error median | {_fmt(s['median_rotation_deg'])} deg / "
        f"{_fmt(s['median_translation_mm'])} mm |",
        f"| success < 1 / 2 / 10 mm | {_fmt(s['success_rate_1mm'], '.1%')} / {_fmt(s['success_rate_2mm'], '.1%')} / "
        f"{_fmt(s['success_rate_10mm'], '.1%')} |",
        f"| latency median / p90 / max ({s.get('latency_source')}) | {_fmt(s['median_latency_s'], '.3f')} / "
        f"{_fmt(s['p90_latency_s'], '.3f')} / {_fmt(s['max_latency_s'], '.3f')} s |",
        f"| throughput (poses) / input rate | {_fmt(s['throughput_hz'], '.2f')} / "
        f"{_fmt(s['input_rate_hz'], '.2f')} Hz |",
        f"| paths (node diagnostics) | {', '.join(f'{k} {v}' for k, v in s.get('paths', {}).items()) or '-'} |",
        "",
    ]
    if "igtl" in s:
        lines += _navigator_section(s["igtl"])
    lines += [f"![{p}]({p})" for p in pictures]
    lines += [
        "",
        "| stamp | t (s) | pose | mTRE (mm) | mPE (mm) | rot (deg) | trans (mm) | latency (s) | path |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stamp']} | {r['t_s']:.3f} | {'yes' if r['has_pose'] else '**no**'} | "
            f"{_fmt(r.get('mtre_mm'))} | {_fmt(r.get('mpe_mm'))} | {_fmt(r.get('rotation_deg'))} | "
            f"{_fmt(r.get('translation_mm'))} | {_fmt(r.get('latency_s'))} | {r.get('path', '')} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _navigator_section(n: dict) -> list[str]:
    """``report.md``'s lines on :func:`score_navigator`'s figures."""
    reasons = ", ".join(f"{k}: {v}" for k, v in n["invalid_reasons"].items()) or "none"
    return [
        "## Navigator (OpenIGTLink)",
        "",
        "What a navigator connected to `diffpose-igtl` received: TRANSFORM `CArmToCT` (C-arm source -> CT RAS, mm),",
        "IMAGE `Fluoro`, STRING `DiffPoseStatus`; each OK TRANSFORM back in `ct` (LPS) against the ground truth.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| TRANSFORMs OK / INVALID (reasons) | {n['transforms_ok']} / {n['transforms_invalid']} ({reasons}) |",
        f"| node TFs with an OK TRANSFORM at their stamp | {n['node_tfs_with_ok_transform']} / {n['node_tfs']} |",
        f"| IMAGEs / at an OK TRANSFORM's stamp | {n['images']} / {n['images_at_ok_transforms']} |",
        f"| STRING statuses / valid | {n['statuses']} / {n['statuses_valid']} |",
        f"| 3D mTRE of the OK TRANSFORMs median / p90 / max ({n['ok_transforms_scored']} scored) | "
        f"{_fmt(n['median_mtre_mm'])} / {_fmt(n['p90_mtre_mm'])} / {_fmt(n['max_mtre_mm'])} mm |",
        "",
    ]


def targets_for(truth: Truth, targets_path: str | None) -> tuple[torch.Tensor, str]:
    """The mTRE targets (``ct``, LPS mm) and where they came from."""
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
    from ..core.volume import default_ct_path, default_labels_path, label_centroids, load_ct, load_labels

    t, _ = label_centroids(load_labels(default_labels_path(), load_ct(default_ct_path())))
    return t, f"{len(t)} structure centroids of the bundled CT (the bag names no targets)"


def sdd_for(truth: Truth, sdd_mm: float | None) -> float:
    """SDD (mm) for mPE: given, else the scene's, else the contract detector's."""
    if sdd_mm:
        return float(sdd_mm)
    return float(truth.scene.get("detector", {}).get("sdd_mm", CONTRACT_SDD_MM))
