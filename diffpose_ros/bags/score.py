"""Estimates scored against ground truth: per-frame rows, their summary, and a navigator's view.

Per frame (:func:`score_frames`): 3D mTRE and mPE (mm), rotation (deg) and translation (mm) errors,
latency (s) and the path the node's diagnostics say it took (``tracking``, ``cold``, ...). A frame
without a pose counts as a failure in the success rates. Latency does not depend on the stamps, so
replays of any bag work: the arrival of the pose minus the arrival of the input with the same stamp,
both on the recorder's clock, when the estimate bag also recorded the input; otherwise the node's own
``latency_receipt_to_publish_s`` from its ``/diagnostics`` frame status.

A navigator's view (:func:`score_navigator`): what an OpenIGTLink client of ``diffpose-igtl`` received,
its transforms scored with the same 3D mTRE (``summary.json``'s ``igtl``).
"""

from __future__ import annotations

import bisect
import collections
import statistics

import numpy as np
import torch

from diffpose_ros.core import PoseStatus, ras_to_carm, stamp_from_ns
from diffpose_ros.core.geometry import metrics
from diffpose_ros.ros.igtl.bridge import BridgeSettings

from .read import Estimates, Truth

__all__ = ["score_frames", "summarize", "score_navigator"]

IGTL_STAMP_TOLERANCE_NS = 10_000
"""An OpenIGTLink timestamp (float seconds) is a frame's stamp when within 10 us of it."""


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
    :class:`~diffpose_ros.ros.igtl.navigator.Receiver` keeps them), against ``truth``: ``summary.json``'s ``igtl``.

    An OK TRANSFORM (``T_ctras_source``: C-arm source -> CT RAS, mm) at a frame's stamp is turned back
    into ``T_ct_source`` (``ct``, LPS mm) and scored with the 3D mTRE of :func:`score_frames`. An
    INVALID one is counted by the reason of the STRING status with the same timestamp. ``node_stamps``:
    the stamps (ns) of the node's own poses on ``/tf``, each expected to have an OK TRANSFORM.
    """
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
