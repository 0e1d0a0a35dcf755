"""The GPU figures of docs/performance.md in one run on a lent GPU machine, which has no SimpleITK, ROS 2 or network.

Step 1, here (the dev environment): ``.venv/bin/python benchmarks/device_run.py prepare`` writes
``runs/device/`` (small enough to carry): ``ct.npz`` (the bundled CT in HU with its affine, and the bundled
label map's structure centroids as training targets), ``run.npz`` (the foreign 7.5 Hz run of
``bench_tracking.py``: mono16 frames, stamps, ground-truth poses, camera, mTRE targets) and
``wheels/`` (roma, which the GPU image lacks). It prints the command for step 2.

Step 2, there, in one call of the device tool with ``carry: ["runs/device"]``::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site runs/device/wheels/*.whl &&
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/device_run.py run --out $OUT

It trains the patient model for ``--train-minutes`` (default 2; what that reaches: ``docs/performance.md``),
then for each renderer backend on the GPU (``torch``: ``grid_sample``; ``cuda``: numba's CUDA kernel):

- the renderer: forward and forward + 6-column Jacobian, dense at 128² and 256² and on the tracking
  level's 32 patches of 15² (1.4 mm volume), medians with the device synchronised, and how far the
  backends' images and Jacobians are apart;
- ``Pipeline.process`` on the run, cold (CNN + pyramid on every frame), tracking, and cold with the
  pyramid ending at 256 px (``registration.finest_width``), on the 256²
  frames and on the same frames upsampled to 512²: latency median / p90 (frame array in, pose out),
  3D mTRE, paths.

Figures go to stdout and ``OUT/device_run.json``. ``run --device cpu --train-minutes 0.1`` is a smoke
run of the same code on any machine (numba instead of the GPU backends).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks"):  # the package, and bench_render's timing helper
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_render import timeit  # noqa: E402

from diffpose_ros.core.frames.prepare import prepare_frame  # noqa: E402
from diffpose_ros.core.geometry import metrics  # noqa: E402
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose  # noqa: E402
from diffpose_ros.core.model.bundle import PatientModel  # noqa: E402
from diffpose_ros.core.model.train import TrainConfig, Trainer  # noqa: E402
from diffpose_ros.core.registration.levels import FINEST_WIDTHS, pyramid  # noqa: E402
from diffpose_ros.core.registration.pipeline import Pipeline, PipelineConfig, set_torch_threads  # noqa: E402
from diffpose_ros.core.registration.registrar import RegistrationConfig
from diffpose_ros.core.rendering.renderer import Renderer, patch_pixels  # noqa: E402
from diffpose_ros.core.rendering.volume import Volume, hu_to_mu  # noqa: E402

DATA = REPO / "runs/device"


# ------------------------------------------------------------------------------------------ prepare
def prepare(args) -> int:
    from bench_tracking import DEFAULT_BAG, make_foreign_bag, read_run

    from diffpose_ros.core.rendering.volume import (
        default_ct_path,
        default_labels_path,
        label_centroids,
        load_ct,
        load_labels,
    )
    from diffpose_ros.ros.conversions import image_to_numpy

    out = Path(args.data)
    (out / "wheels").mkdir(parents=True, exist_ok=True)
    hu = load_ct(default_ct_path())
    targets, _ = label_centroids(load_labels(default_labels_path(), hu))
    np.savez_compressed(
        out / "ct.npz",
        hu=hu.data.numpy().astype(np.int16),  # the bundled CT holds integer HU
        index_to_ct=hu.index_to_ct.numpy(),
        targets=targets.numpy(),
    )
    bag = Path(args.bag) if args.bag else DEFAULT_BAG
    if args.bag is None and not bag.exists():
        make_foreign_bag(bag)
    frames, stamps, poses, camera, run_targets = read_run(bag)
    k = camera
    np.savez_compressed(
        out / "run.npz",
        frames=np.stack([image_to_numpy(m) for m in frames]),
        stamps=np.array(stamps),
        poses=torch.stack(poses).numpy(),
        camera=np.array([k.width, k.height, k.fx, k.fy, k.cx, k.cy], dtype=np.float64),
        targets=run_targets.numpy(),
        bag=str(bag),
    )
    import roma

    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(out / "wheels")]
    subprocess.run([*command, f"roma=={roma.__version__}"], check=True, capture_output=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"wrote {out} ({size:.1f} MB); on the GPU machine (device tool, carry {out.relative_to(REPO)}):")
    print(
        "python3 -m pip install -q --no-index --no-deps --target /tmp/site runs/device/wheels/*.whl && "
        "PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/device_run.py run --out $OUT"
    )
    return 0


# ---------------------------------------------------------------------------------------------- run
def bench_renderers(model: PatientModel, backends: list[str], device: str, sync, repeats: int) -> dict:
    """Renderer timings per backend (1.4 mm volume, a clinical view) and the backends' agreement."""
    iso = model.mu.center + torch.tensor([6.0, -8.0, 10.0], dtype=torch.float64)
    pose = carm_pose(0.21, -0.12, 0.07, 760.0, iso)
    camera = model.intrinsics
    rows, outputs = {}, {}
    for backend in backends:
        renderer = Renderer(model.mu.coarsened_to(1.4), backend=backend, device=device)
        cases = {f"dense {s}": (camera.resized(s), None) for s in (128, 256)}
        k = camera.resized(128)
        centres = torch.stack(torch.meshgrid(torch.arange(8, 128, 16), torch.arange(12, 128, 32), indexing="xy"), -1)
        cases["32 patches of 15 px"] = (k, patch_pixels(k, centres.reshape(-1, 2)[:32], 15))
        for name, (k, pixels) in cases.items():
            with torch.no_grad():
                forward = timeit(lambda: renderer.render(pose, k, pixels), repeats, sync)["median_s"]
            jacobian = timeit(lambda: renderer.render_jacobian(pose, k, pixels), repeats, sync)["median_s"]
            rows[f"{backend}: {name}"] = {"forward_ms": forward * 1e3, "jacobian_ms": jacobian * 1e3}
            print(f"  {backend:6s} {name:22s} forward {forward * 1e3:8.3f} ms   + Jacobian {jacobian * 1e3:8.3f} ms")
        outputs[backend] = [t.cpu() for t in renderer.render_jacobian(pose, camera.resized(128))]
    if len(outputs) == 2:
        (La, Ja), (Lb, Jb) = outputs.values()
        agreement = {
            "image_max_rel": float((La - Lb).abs().max() / La.abs().max()),
            "jacobian_max_rel_per_column": ((Ja - Jb).abs().amax((0, 1)) / Ja.abs().amax((0, 1))).tolist(),
        }
        rows["agreement"] = agreement
        print(f"  {' and '.join(outputs)} agree: {agreement}")
    return rows


def bench_pipelines(model, backends, device, sync, run) -> dict:
    """``Pipeline.process`` per backend, frame size and mode over the run."""
    w, h, fx, fy, cx, cy = run["camera"]
    camera = Intrinsics(int(w), int(h), fx, fy, cx, cy)
    targets = torch.from_numpy(run["targets"])
    rows = {}
    for backend in backends:
        for size in (256, 512):
            k = camera.resized(size)
            frames = [cv2.resize(f, (k.width, k.height), interpolation=cv2.INTER_LINEAR) for f in run["frames"]]
            pipelines = {
                width: Pipeline(
                    model, device, PipelineConfig(renderer=backend, cold=RegistrationConfig(levels=pyramid(width)))
                )
                for width in FINEST_WIDTHS
            }
            for pipeline in pipelines.values():
                pipeline.warm_up(k)
            for mode, track, width in (("cold", False, 128), ("tracking", True, 128), ("cold-256", False, 256)):
                pipeline = pipelines[width]
                pipeline.reset_tracking()
                latencies, errors, paths = [], [], []
                for f, stamp, T in zip(frames, run["stamps"], run["poses"]):
                    sync()
                    start = time.perf_counter()
                    result = pipeline.process(prepare_frame(f, "transmission", k), float(stamp), track)
                    sync()
                    latencies.append(time.perf_counter() - start)
                    error = metrics.mtre(result.pose, torch.from_numpy(T), targets)
                    errors.append(float(error) if result.accepted else float("inf"))
                    paths.append(result.path)
                latencies, errors, paths = latencies[1:], errors[1:], paths[1:]  # the first frame is always cold
                row = {
                    "median_ms": statistics.median(latencies) * 1e3,
                    "p90_ms": float(np.quantile(latencies, 0.9)) * 1e3,
                    "mtre_median_mm": statistics.median(errors),
                    "accepted": sum(np.isfinite(errors)),
                    "frames": len(errors),
                    "paths": {p: paths.count(p) for p in sorted(set(paths))},
                }
                rows[f"{backend} {size}² {mode}"] = row
                print(
                    f"  {backend:6s} {size}² {mode:8s} {row['median_ms']:7.1f} ms (p90 {row['p90_ms']:6.1f})  "
                    f"mTRE {row['mtre_median_mm']:.3f} mm  accepted {row['accepted']}/{row['frames']}  {row['paths']}"
                )
    return rows


def run_all(args) -> int:
    data = Path(args.data)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    set_torch_threads(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    backends = ["torch", "cuda"] if device.startswith("cuda") else ["numba"]
    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"device_run: {machine}; torch {torch.__version__}; backends {backends}", flush=True)
    ct, run = np.load(data / "ct.npz"), dict(np.load(data / "run.npz"))
    hu = Volume(torch.from_numpy(ct["hu"].astype(np.float32)), torch.from_numpy(ct["index_to_ct"]), "bundled CT")
    config = TrainConfig.for_device(device)
    trainer = Trainer(hu, torch.from_numpy(ct["targets"]), config, device=device)
    best = trainer.fit(args.train_minutes * 60)
    print(f"trained {trainer.step} steps in {trainer.elapsed:.0f} s: CNN-only validation {best}", flush=True)
    model = PatientModel(trainer.best_model().cpu(), hu_to_mu(hu), config.intrinsics, {"validation": best})
    report = {
        "machine": machine,
        "torch": torch.__version__,
        "training": {"steps": trainer.step, "seconds": trainer.elapsed, "validation": best},
    }
    print("renderer (1.4 mm volume):", flush=True)
    report["renderer"] = bench_renderers(model, backends, device, sync, args.repeats)
    print("Pipeline.process on the foreign 7.5 Hz run:", flush=True)
    report["pipeline"] = bench_pipelines(model, backends, device, sync, run)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "device_run.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="write runs/device here")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--bag", help="a run with ground truth (default: bench_tracking's foreign run)")
    r = sub.add_parser("run", help="train and measure (on the GPU machine)")
    r.add_argument("--data", default=str(DATA))
    r.add_argument("--device", help="default: cuda when available, else cpu")
    r.add_argument("--train-minutes", type=float, default=2.0)
    r.add_argument("--repeats", type=int, default=20)
    r.add_argument("--out", help="folder for device_run.json")
    args = parser.parse_args(argv)
    return prepare(args) if args.step == "prepare" else run_all(args)


if __name__ == "__main__":
    sys.exit(main())
