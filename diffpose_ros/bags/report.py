"""A score's files: ``summary.json``, ``frames.json``, ``report.md`` and its PNG pictures.

The pictures: the 3D mTRE and latency over the frames' time, the mTRE histogram, and overlays of the
DRR's edges at the estimate on a few frames of the ground-truth bag.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from diffpose_ros.core import (
    Renderer,
    hu_to_mu,
    load_ct,
    render_overlay,
    save_json,
    stamp_from_ns,
    stamp_ns,
    write_picture,
)
from diffpose_ros.ros.conversions import image_to_frame

from .bagfile import decode, read_messages
from .read import Estimates, Truth

__all__ = ["write_plots", "write_overlays", "write_report"]


def write_plots(out: Path, rows: list[dict]) -> list[str]:
    """``error_over_time.png`` and ``error_histogram.png`` of :func:`~.score.score_frames` rows in ``out``;
    returns their names."""
    with_pose = [r for r in rows if "mtre_mm" in r]
    missing = [r for r in rows if not r["has_pose"]]
    fig = Figure(figsize=(7, 5), dpi=110)
    axes = fig.subplots(2, 1, sharex=True)
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

    fig = Figure(figsize=(6, 3.5), dpi=110)
    ax = fig.subplots()
    errors = [r["mtre_mm"] for r in with_pose]
    if errors:
        ax.hist(errors, bins=min(30, max(5, len(errors) // 2)), color="tab:blue", alpha=0.8)
    ax.set_xlabel("3D mTRE (mm)")
    ax.set_ylabel("frames")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "error_histogram.png")
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
    """PNGs of a few frames (first, median error, worst, last) with the DRR's edges at the estimate;
    returns their names (none without a scored frame, the camera or the truth bag's images)."""
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
    """``report.md``'s lines on :func:`~.score.score_navigator`'s figures."""
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
