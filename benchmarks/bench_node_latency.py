"""Per-frame latency of diffpose_node's processing, cold (CNN + refinement) and tracking.

What one frame costs in the node's worker thread, measured in-process with the node's own code path:
``sensor_msgs/Image`` -> array (:func:`~diffpose_ros.ros.conversions.image_to_numpy`), camera_info ->
intrinsics, transmission -> line integrals, :meth:`Pipeline.process` (CNN + Levenberg-Marquardt
refinement at the default working resolution: pyramid 32 -> 64 -> 128 px, tracking 64 -> 128 px),
then the TF and covariance conversions. DDS transport is not included (bench_node_load.py measures
stamp -> TF over DDS).

Scene: the bundled chest CT at full resolution in the patient model (as ``diffpose-train`` writes
it; ``--voxel-mm`` coarsens it), an untrained CNN (its zero head predicts the reference view
``carm_pose(0, 0, 0, 750, centre)``; ``--model`` takes a trained patient model instead), frames
rendered at 256^2 (SDD 1020 mm, 1.2 mm pixels) as mono16 transmission images with quantum noise.

- cold: ``--frames`` views within ~5 deg / 15 mm of the reference, each processed with
  ``track=False`` (CNN, then the full pyramid);
- tracking: a smooth trajectory (0.4 deg and 0.6 mm per frame, stamps 0.1 s apart), processed with
  ``track=True`` (first frame cold, then from the last accepted pose with the short pyramid).

Printed: machine (and load average: the CPU may be shared, which inflates wall times; the process
CPU time per frame is printed too), per-stage medians, total median / p90 per mode, mTRE (mm),
acceptance; on every device (cpu, and cuda when torch sees one; ``--device`` picks one).

Run: ``.venv/bin/python benchmarks/bench_node_latency.py [--frames 10] [--device cpu|cuda|all]``
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffpose_ros.core.frames.prepare import prepare_frame  # noqa: E402
from diffpose_ros.core.geometry import camera as geometry
from diffpose_ros.core.geometry import metrics
from diffpose_ros.core.model import bundle, regressor  # noqa: E402
from diffpose_ros.core.registration.pipeline import Pipeline  # noqa: E402
from diffpose_ros.core.rendering import renderer as render
from diffpose_ros.core.rendering import volume
from diffpose_ros.core.simulation import detector as simulate

SDD, DETECTOR, SPACING = 1020.0, 256, 1.2


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (
        f"{cpu}, {affinity} usable cores (os.cpu_count {os.cpu_count()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    try:
        load = os.getloadavg()
        text += f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared machine)"
    except OSError:
        pass
    return text


def detector() -> geometry.Intrinsics:
    return geometry.Intrinsics.from_detector(SDD, DETECTOR, DETECTOR, SPACING)


def build_model(path: Path, voxel_mm: float = 0.0):
    """Write an untrained patient model of the bundled CT; returns ``(hu, mu_full)``."""
    hu = volume.load_ct(volume.default_ct_path())
    mu_full = volume.hu_to_mu(hu)
    mu = mu_full.coarsened_to(voxel_mm) if voxel_mm > 0 else mu_full
    reference = geometry.carm_pose(0.0, 0.0, 0.0, 750.0, hu.center)
    model = bundle.PatientModel(
        regressor.PoseRegressor(reference, hu.center),
        mu,
        detector().resized(64),
        {"purpose": "benchmark (untrained CNN)"},
    )
    bundle.save_patient_model(path, model)
    return hu, mu_full


def view(center: torch.Tensor, alpha=0.0, beta=0.0, gamma=0.0, sod=750.0, offset=(0.0, 0.0, 0.0)) -> torch.Tensor:
    return geometry.carm_pose(
        math.radians(alpha),
        math.radians(beta),
        math.radians(gamma),
        sod,
        center + torch.tensor(offset, dtype=torch.float64),
    )


def cold_views(center, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = np.random.default_rng(seed)
    return [
        view(center, *g.uniform(-4, 4, 2), g.uniform(-2, 2), 750 + g.uniform(-12, 12), g.uniform(-8, 8, 3))
        for _ in range(n)
    ]


def trajectory(center, n: int, deg_per_frame: float = 0.4, mm_per_frame: float = 0.6) -> list[torch.Tensor]:
    """A smooth sweep starting near the reference view."""
    return [
        view(
            center,
            2 + deg_per_frame * i,
            -1 + 0.5 * deg_per_frame * i,
            0.5,
            755 - mm_per_frame * i,
            (3 + mm_per_frame * i, -2, 2),
        )
        for i in range(n)
    ]


def render_frames(mu_full, poses, seed: int = 0) -> list[np.ndarray]:
    renderer = render.Renderer(mu_full)
    rng = np.random.default_rng(seed)
    k = detector()
    out = []
    with torch.no_grad():
        for T in poses:
            out.append(simulate.simulate_transmission(renderer.render(T, k), rng=rng))
    return out


def percentile(values, q):
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def run_device(device: str, model_path: Path, cold, track, targets) -> None:
    from diffpose_ros.ros.conversions import (
        camera_info_to_intrinsics,
        covariance_to_ros,
        image_to_numpy,
        intrinsics_to_camera_info,
        matrix_to_transform,
        numpy_to_image,
    )

    t = time.perf_counter()
    pipeline = Pipeline.from_file(model_path, device=device)
    load_s = time.perf_counter() - t
    warm_s = pipeline.warm_up()
    info = intrinsics_to_camera_info(detector())

    def one(frame: np.ndarray, stamp: float, track_flag: bool):
        msg = numpy_to_image(frame, "mono16")
        t0, c0 = time.perf_counter(), time.process_time()
        array = image_to_numpy(msg)
        k = camera_info_to_intrinsics(info, array.shape[1], array.shape[0])
        result = pipeline.process(prepare_frame(array, "transmission", k), stamp=stamp, track=track_flag)
        matrix_to_transform(result.pose)
        covariance_to_ros(result.pose, result.covariance)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, result

    print(f"\n== device {device}: model load {load_s:.2f} s, warm-up {warm_s:.2f} s")
    for name, (poses, frames), track_flag, dt in (("cold", cold, False, 10.0), ("tracking", track, True, 0.1)):
        pipeline.reset_tracking()
        rows, cpus = [], []
        for i, (T, frame) in enumerate(zip(poses, frames)):
            seconds, cpu, r = one(frame, 1000.0 + dt * i, track_flag)
            error = float(metrics.mtre(r.pose, T, targets))
            rows.append((seconds, r, error))
            cpus.append(cpu)
        if name == "tracking":
            rows, cpus = rows[1:], cpus[1:]  # the first frame of a sequence is cold
        totals = [s for s, _, _ in rows]
        modes = {m: sum(r.mode == m for _, r, _ in rows) for m in ("cold", "tracking")}
        stages = {
            key: statistics.median(r.timings.get(key, 0.0) for _, r, _ in rows)
            for key in ("preprocess", "cnn", "start", "refine")
        }
        print(
            f"{name:9s} n={len(rows):3d}  median {statistics.median(totals) * 1e3:7.1f} ms  "
            f"p90 {percentile(totals, 90) * 1e3:7.1f} ms  max {max(totals) * 1e3:7.1f} ms "
            f"(CPU time, all threads: median {statistics.median(cpus) * 1e3:.0f} ms) | stages (median) "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in stages.items())
            + f" | iterations median {statistics.median(r.iterations for _, r, _ in rows):.0f}"
            f" | mTRE median {statistics.median(e for _, _, e in rows):.2f} mm, max {max(e for _, _, e in rows):.2f} mm"
            f" | accepted {sum(r.accepted for _, r, _ in rows)}/{len(rows)} | modes {modes}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=10, help="cold frames (tracking uses 3x as many)")
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cpu, plus cuda when available)")
    parser.add_argument("--voxel-mm", type=float, default=0.0, help="coarsen the model's CT (0: full resolution)")
    parser.add_argument("--model", type=Path, default=None, help="a trained patient model instead of the untrained one")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"(ignoring arguments for other benchmarks: {' '.join(unknown)})")
    print("bench_node_latency:", machine_description())
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        hu = volume.load_ct(volume.default_ct_path())
        mu_full = volume.hu_to_mu(hu)
        if args.model is None:
            model_path = Path(tmp) / "model.safetensors"
            build_model(model_path, args.voxel_mm)
        else:
            model_path = args.model
        model = bundle.load_patient_model(model_path)
        print(
            f"patient model: volume {tuple(model.mu.data.shape[::-1])} voxels of "
            f"{[round(float(s), 2) for s in model.mu.spacing]} mm, CNN {model.metadata.get('backbone')} "
            f"{model.regressor.image_size}^2; frames 256^2 mono16"
        )
        center = hu.center
        cold_poses = cold_views(center, args.frames)
        track_poses = trajectory(center, 3 * args.frames + 1)
        cold = (cold_poses, render_frames(mu_full, cold_poses, 1))
        track = (track_poses, render_frames(mu_full, track_poses, 2))
        targets = metrics.grid_targets(center)
        print(f"scene ready in {time.perf_counter() - t:.1f} s")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if args.device != "all":
            devices = [args.device]
        for device in devices:
            run_device(device, model_path, cold, track, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
