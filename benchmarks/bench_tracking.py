"""Keeping up with fluoroscopy: a smooth 7.5 Hz run, tracked against cold starts, DiffPose's loop as the anchor.

The run: a rosbag2 with ground truth (``--bag``; default: made once into
``runs/bench/foreign_7.5hz`` by ``diffpose-make-bag --sweep 32 --fps 7.5 --renderer diffdrr``, a
C-arm sweep with breathing rendered by DiffDRR with its own HU-to-density map: physics from another
renderer, mono16 with quantum noise; made on the first run only). The patient model: ``--model``.

In process (the node's worker path without DDS: ``image_to_numpy``, ``prepare_frame``,
``Pipeline.process``), every frame of the run, per mode:

- ``cold``: CNN + full pyramid on every frame (``track=False``);
- ``cold, finest 256``: the same with the pyramid ending at 256 px (``registration.finest_width``);
- ``tracking``: the default, from the last accepted pose moved on at constant velocity, one level
  on sparse feature patches, falling back to the pyramid and the CNN;
- ``tracking, 30 Hz budget``: the same with the deadline that the node's default
  ``tracking.frame_budget`` sets on a 30 Hz stream (0.8 of 33 ms from the frame's arrival): the
  refinement stops stepping there once its pose has settled;
- ``no prediction``: the same from the last pose as it was;
- ``dense tracking``: a dense 64 -> 128 px pyramid from the last pose, no prediction (the baseline of
  the sparse level);
- ``DiffPose loop`` (the anchor; ``--reference-frames`` frames): Adam on ``xi`` in ``T exp(xi)``
  for a fixed ``--reference-iterations`` steps, the loss 1 - multiscale NCC (whole image and 13 px
  patches) by autograd through our renderer at 128 px, from the same start as ``no prediction``.

Printed per mode: latency median / p90 (ms, image message in -> pose out, what the node's worker
spends) and its ratio to ``cold`` measured in the same run, 3D mTRE median / p90 (mm), paths taken.

``--node`` (run first): the same bag replayed at its own rate into ``diffpose_node`` in its own process
(``diffpose-demo --bag BAG --rate 1 --no-igtl``; DDS, the node's own mailbox): frames posed, 3D mTRE,
latency stamp -> TF, paths, from its ``summary.json``.

Run: ``.venv/bin/python benchmarks/bench_tracking.py --model runs/models/cxr.safetensors [--node]``
(``ATEN_CPU_CAPABILITY=avx2 NUMBA_CPU_NAME=haswell`` makes torch and numba use AVX2 code only, as on
a CPU without AVX-512)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_node_latency import machine_description  # noqa: E402

from diffpose_ros.core.frames.prepare import prepare_frame, resample_image  # noqa: E402
from diffpose_ros.core.geometry import metrics, se3  # noqa: E402
from diffpose_ros.core.registration.levels import Level, pyramid  # noqa: E402
from diffpose_ros.core.registration.pipeline import Pipeline, PipelineConfig, set_torch_threads  # noqa: E402
from diffpose_ros.core.registration.registrar import RegistrationConfig
from diffpose_ros.core.registration.similarity import multiscale_ncc  # noqa: E402

DEFAULT_BAG = REPO / "runs/bench/foreign_7.5hz"
BUDGET_30HZ_S = 0.8 / 30
"""The node's default ``tracking.frame_budget`` (0.8 of the frame interval) on a 30 Hz stream (s)."""

MODES = {  # name: (config, track, seconds a frame may take before its tracking stops stepping)
    "cold": (PipelineConfig(), False, None),
    "cold, finest 256": (PipelineConfig(cold=RegistrationConfig(levels=pyramid(256))), False, None),
    "tracking": (PipelineConfig(), True, None),
    "tracking, 30 Hz budget": (PipelineConfig(), True, BUDGET_30HZ_S),
    "no prediction": (PipelineConfig(predict=False), True, None),
    "dense tracking": (
        PipelineConfig(predict=False, tracking_levels=(Level(64, 2.0, 6, patch=8), Level(128, 1.4, 6, patch=13))),
        True,
        None,
    ),
}


def make_foreign_bag(path: Path) -> None:
    print(f"making {path} (DiffDRR renders, once)", flush=True)
    command = [str(Path(sys.executable).with_name("diffpose-make-bag")), "--out", str(path), "--sweep", "32"]
    command += ["--fps", "7.5", "--renderer", "diffdrr", "--seed", "3"]
    subprocess.run(command, check=True)


def read_run(bag: Path):
    """Frames (image messages), their stamps (s), ground-truth poses, intrinsics and mTRE targets."""
    from diffpose_ros.bags.bagfile import decode, read_messages
    from diffpose_ros.bags.read import read_truth, targets_for
    from diffpose_ros.core.navigation.stamps import stamp_ns

    truth = read_truth(bag)
    targets, _ = targets_for(truth, None)
    messages = {}
    for _, msgtype, _, cdr in read_messages(bag, [truth.image_topic]):
        msg = decode(cdr, msgtype)
        messages[stamp_ns(msg.header.stamp)] = msg
    stamps = sorted(messages)
    poses = [torch.from_numpy(truth.poses[s]) for s in stamps]
    return [messages[s] for s in stamps], [s * 1e-9 for s in stamps], poses, truth.camera, targets


def diffpose_loop(pipeline: Pipeline, frame, start_pose: torch.Tensor, iterations: int) -> torch.Tensor:
    """DiffPose's test-time optimisation, as its paper runs it: Adam on the twist of a
    right-perturbation, loss 1 - multiscale NCC, autograd through the renderer, fixed iterations."""
    start = pipeline.start(frame, start_pose)
    k = frame.intrinsics.resized(128)
    target = resample_image(start.target, k.width, k.height)
    renderer = pipeline.registrar.renderer()
    rho = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    phi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([{"params": [rho], "lr": 0.1}, {"params": [phi], "lr": 1e-3}])
    for _ in range(iterations):
        optimizer.zero_grad()
        drr = renderer.render(start.pose @ se3.exp(torch.cat([rho, phi])), k)
        loss = 1 - multiscale_ncc(drr, target, (None, 13), (0.5, 0.5))
        loss.backward()
        optimizer.step()
    return (start.pose @ se3.exp(torch.cat([rho, phi]))).detach()


def run_pipeline(args, frames, stamps, poses, camera, targets) -> None:
    from diffpose_ros.ros.conversions import image_to_numpy

    rows = {}
    for name, (config, track, budget) in MODES.items():
        pipeline = Pipeline.from_file(args.model, config=config)
        pipeline.warm_up(camera)
        latencies, errors, paths = [], [], []
        for msg, stamp, T in zip(frames, stamps, poses):
            t = time.perf_counter()
            frame = prepare_frame(image_to_numpy(msg), "transmission", camera)
            result = pipeline.process(frame, stamp=stamp, track=track, deadline=budget and t + budget)
            latencies.append(time.perf_counter() - t)
            errors.append(float(metrics.mtre(result.pose, T, targets)) if result.accepted else float("inf"))
            paths.append(result.path)
        rows[name] = (latencies[1:], errors[1:], paths[1:])  # the first frame of a run is always cold
    # The anchor: DiffPose's loop on a few frames, from the last frame's accepted pose.
    pipeline = Pipeline.from_file(args.model)
    latencies, errors = [], []
    for i in range(1, 1 + args.reference_frames):
        frame = prepare_frame(image_to_numpy(frames[i]), "transmission", camera)
        previous = pipeline.process(prepare_frame(image_to_numpy(frames[i - 1]), "transmission", camera), track=False)
        t = time.perf_counter()
        pose = diffpose_loop(pipeline, frame, previous.pose, args.reference_iterations)
        latencies.append(time.perf_counter() - t)
        errors.append(float(metrics.mtre(pose, poses[i], targets)))
    rows[f"DiffPose loop ({args.reference_iterations} Adam steps)"] = (latencies, errors, ["adam"] * len(errors))

    cold = statistics.median(rows["cold"][0])
    header = ("mode", "frames", "median ms", "p90 ms", "/ cold", "mTRE med", "p90 mm")
    print("\n{:30s} {:>6s} {:>10s} {:>8s} {:>7s} {:>9s} {:>7s}  paths".format(*header))
    for name, (lat, err, path) in rows.items():
        finite = [e for e in err if np.isfinite(e)]
        counts = {p: path.count(p) for p in sorted(set(path))}
        print(
            f"{name:30s} {len(lat):6d} {statistics.median(lat) * 1e3:10.1f} {np.quantile(lat, 0.9) * 1e3:8.1f} "
            f"{statistics.median(lat) / cold:7.2f} {statistics.median(err):9.3f} "
            f"{np.quantile(finite, 0.9) if finite else float('nan'):7.3f}  {counts} accepted {len(finite)}/{len(err)}"
        )


def run_node(args, bag: Path) -> None:
    out = REPO / "runs/bench/node_tracking"
    command = [str(Path(sys.executable).with_name("diffpose-demo")), "--bag", str(bag), "--model", str(args.model)]
    command += ["--rate", "1", "--no-igtl", "--out", str(out)]
    print("\nnode:", " ".join(command), flush=True)
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text())
    print(
        f"node at the bag's own rate ({s['input_rate_hz']:.2f} Hz): "
        f"{s['frames_with_pose']}/{s['frames']} frames posed, "
        f"3D mTRE median {s['median_mtre_mm']:.3f} mm (p90 {s['p90_mtre_mm']:.3f}); latency stamp -> TF median "
        f"{s['median_latency_s'] * 1e3:.0f} ms (p90 {s['p90_latency_s'] * 1e3:.0f} ms); paths {s['paths']}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "runs/models/cxr.safetensors", help="patient model")
    parser.add_argument("--bag", type=Path, default=None, help=f"a run with ground truth (default {DEFAULT_BAG})")
    parser.add_argument("--reference-frames", type=int, default=3, help="frames for DiffPose's loop")
    parser.add_argument("--reference-iterations", type=int, default=100, help="Adam steps of DiffPose's loop")
    parser.add_argument("--node", action="store_true", help="also replay the bag into the node process")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"(ignoring arguments for other benchmarks: {' '.join(unknown)})")
    if not args.model.is_file():
        print(f"bench_tracking: no patient model at {args.model} (make one with diffpose-train or diffpose-demo)")
        return 0
    bag = args.bag or DEFAULT_BAG
    if args.bag is None and not bag.exists():
        make_foreign_bag(bag)
    capability = os.environ.get("ATEN_CPU_CAPABILITY"), os.environ.get("NUMBA_CPU_NAME")
    set_torch_threads("cpu")  # as the node does
    print("bench_tracking:", machine_description(), "| forced code paths (torch, numba):", capability)
    frames, stamps, poses, camera, targets = read_run(bag)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print(f"run: {bag} ({len(frames)} frames at {rate:.2f} Hz, {camera.width}x{camera.height}); model {args.model}")
    if args.node:  # first: run right after the in-process modes, the node loses frames before receipt
        run_node(args, bag)
    run_pipeline(args, frames, stamps, poses, camera, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
