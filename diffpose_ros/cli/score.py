"""``diffpose-score``: score a node's poses against a ground-truth bag.

Offline: ``diffpose-score --truth BAG --estimate BAG --out DIR`` (the estimate bag recorded with
``diffpose-record`` while ``diffpose-replay`` played the truth bag into the node). Live:
``diffpose-score --truth BAG --live --out DIR`` replays, records and scores in one command against a
node already running. Writes ``DIR/summary.json``, ``frames.json``, ``report.md`` and PNG pictures
(error over time, error histogram, a few overlays of the DRR's edges at the estimate).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffpose_ros.bags.live import run_live
from diffpose_ros.bags.read import Truth, read_estimates, read_truth, sdd_for, targets_for
from diffpose_ros.bags.record import DEFAULT_TOPICS
from diffpose_ros.bags.replay import ReplayOptions, parse_remaps
from diffpose_ros.bags.report import write_overlays, write_plots, write_report
from diffpose_ros.bags.score import score_frames, score_navigator, summarize
from diffpose_ros.ros.runtime import RosSession

from .common import run_cli, split_ros_args


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--targets", help="JSON list of target points (ct, LPS mm); default: the bag's scene")
    parser.add_argument("--ct", help="CT for the overlays (default: the one the bag's scene names)")
    parser.add_argument("--ct-frame", help="TF frame of the CT (default: the scene's, else ct)")
    parser.add_argument("--camera-frame", help="child frame of the estimates (default: the images' frame_id)")
    parser.add_argument(
        "--truth-topic", help="ground-truth topic (default /tf_ground_truth, else any TF topic but /tf)"
    )
    parser.add_argument("--image-topic", help="the truth bag's image topic (default: its only sensor_msgs/Image topic)")
    parser.add_argument("--camera-info-topic", help="the truth bag's camera_info topic")
    parser.add_argument("--sdd-mm", type=float, help="SDD for mPE (default: the scene's, else 1020)")
    parser.add_argument("--mirror", action="store_true", help="the bag's frames are mirrored (overlays)")
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay pictures (they need the CT)")


def load_truth(args: argparse.Namespace) -> Truth:
    return read_truth(args.truth, args.truth_topic, args.image_topic, args.camera_info_topic, args.ct_frame)


def score_and_report(
    args: argparse.Namespace,
    truth: Truth,
    estimate_bag: str | Path,
    out: Path,
    extra: dict | None = None,
    navigator: list | None = None,
) -> dict:
    """Score ``estimate_bag`` against ``truth``, write the report into ``out``; returns the summary.
    ``navigator``: the messages an OpenIGTLink client of ``diffpose-igtl`` received, scored too (``igtl``)."""
    ct_frame = args.ct_frame or truth.scene.get("ct_frame", "ct")
    camera_frame = args.camera_frame or truth.camera_frame
    estimates = read_estimates(estimate_bag, ct_frame, camera_frame)
    targets, targets_desc = targets_for(truth, args.targets)
    rows = score_frames(truth, estimates, targets, sdd_for(truth, args.sdd_mm))
    summary = summarize(rows, estimates)
    summary.update(
        truth_bag=str(Path(truth.bag).resolve()),
        estimate_bag=str(Path(estimate_bag).resolve()),
        estimate_source=estimates.source or "none found",
        latency_source="pose arrival - input arrival (recorder clock)"
        if estimates.inputs
        else "node diagnostics (receipt -> publish)"
        if estimates.node_latency_s
        else "not available",
        targets=targets_desc,
        **(extra or {}),
    )
    if navigator is not None:
        summary["igtl"] = score_navigator(navigator, truth, targets, estimates.poses)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("overlay_*.png"):  # from an earlier report in the same folder
        stale.unlink()
    pictures = write_plots(out, rows)
    ct = args.ct or truth.scene.get("ct")
    if not args.no_overlays:
        if ct and Path(ct).exists():
            mirror = args.mirror or bool(truth.scene.get("exposure", {}).get("mirror", False))
            pictures += write_overlays(out, truth, estimates, rows, ct, mirror)
        else:
            print("no overlays: the CT is unknown (give --ct)")
    write_report(out, summary, rows, pictures)
    return summary


def print_summary(summary: dict, out: Path) -> None:
    s = summary

    def f(key, spec=".3f", d=s):
        return "n/a" if d.get(key) is None else format(d[key], spec)

    print(f"frames {s['frames']}, with pose {s['frames_with_pose']}, without {s['frames_without_pose']}")
    print(
        f"3D mTRE median {f('median_mtre_mm')} mm, mean {f('mean_mtre_mm')} mm, p90 {f('p90_mtre_mm')} mm; "
        f"success <2 mm {f('success_rate_2mm', '.1%')}; mPE median {f('median_mpe_mm')} mm"
    )
    print(
        f"latency median {f('median_latency_s')} s, p90 {f('p90_latency_s')} s; "
        f"throughput {f('throughput_hz', '.2f')} Hz"
    )
    n = s.get("igtl")
    if n is not None:
        print(
            f"OpenIGTLink: {n['transforms_ok']} OK + {n['transforms_invalid']} INVALID TRANSFORMs "
            f"({n['node_tfs_with_ok_transform']}/{n['node_tfs']} node TFs), {n['images']} IMAGEs, "
            f"{n['statuses']} statuses; 3D mTRE median {f('median_mtre_mm', d=n)} mm, max {f('max_mtre_mm', d=n)} mm"
        )
    print(f"report: {out.resolve()}/report.md, summary.json, frames.json, pictures")


def _main(argv: list[str] | None) -> int:
    argv, ros_args = split_ros_args(argv)
    parser = argparse.ArgumentParser(
        prog="diffpose-score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--truth", required=True, help="ground-truth bag (e.g. from diffpose-make-bag)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--estimate", help="recorded output bag")
    mode.add_argument("--live", action="store_true", help="replay --truth into the running node, record, score")
    parser.add_argument("--out", required=True, help="report folder")
    add_score_arguments(parser)
    live = parser.add_argument_group("live run")
    live.add_argument("--rate", type=float, default=1.0, help="replay speed factor")
    live.add_argument("--remap", nargs="+", metavar="OLD:=NEW", help="publish bag topic OLD as NEW")
    live.add_argument("--outputs", nargs="+", default=DEFAULT_TOPICS, help="the node's topics to record")
    live.add_argument("--settle", type=float, default=30.0, help="seconds to wait for answers after the last frame")
    args = parser.parse_args(argv)
    out = Path(args.out)
    truth = load_truth(args)
    extra = {}
    if args.live:
        targets, _ = targets_for(truth, args.targets)
        estimate = out / "output_bag"
        options = ReplayOptions(
            rate=args.rate,
            remap=parse_remaps(args.remap),
            topics=[t for t in (truth.image_topic, truth.camera_info_topic) if t],
        )
        with RosSession("diffpose_score", ros_args) as session:
            result = run_live(
                session,
                truth,
                estimate,
                options,
                args.outputs,
                targets,
                settle_s=args.settle,
                ct_frame=args.ct_frame,
                camera_frame=args.camera_frame,
            )
        extra = {"replay": result.replay, "recorded": result.recorded, "replay_rate": args.rate}
    else:
        estimate = Path(args.estimate)
    summary = score_and_report(args, truth, estimate, out, extra)
    print_summary(summary, out)
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("frames", "frames_with_pose", "median_mtre_mm", "success_rate_2mm", "median_latency_s")
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
