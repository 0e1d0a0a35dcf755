"""``diffpose-demo``: the main job on the bundled chest CT.

1. The patient model: loaded from ``--model`` (default ``runs/models/cxr.safetensors``); when it is
   missing, ``diffpose-train`` makes it once (``--train-minutes``, 15 by default on 2 CPU cores) and
   it is reused afterwards.
2. Fluoroscopy: a 16-bit transmission frame (quantum noise, detector blur) at a random clinical view.
3. ``diffpose-register --model``: the CNN initialises, the refinement finishes; the same code path
   as the tool and the node.
4. The error against the known pose, and the pictures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ..core import metrics
from ..core.geometry import Intrinsics, carm_pose
from ..core.io import save_json
from ..core.render import Renderer
from ..core.simulate import simulate_transmission
from ..core.volume import default_ct_path, default_labels_path, hu_to_mu, label_centroids, load_ct, load_labels
from . import register, train
from .common import run_cli

DEFAULT_MODEL = Path("runs/models/cxr.safetensors")
SDD_MM, PIXEL_MM = 1020.0, 1.2  # the simulated detector: source-to-detector distance, pixel spacing


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="diffpose-demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help=f"patient model (default {DEFAULT_MODEL}; trained when missing)")
    parser.add_argument("--train-minutes", type=float, default=15.0, help="training budget when the model is missing")
    parser.add_argument("--seed", type=int, default=7, help="seed of the view and the noise")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()

    model = Path(args.model)
    if model.is_file():
        print(f"[1/4] patient model: {model.resolve()} (cached)")
    else:
        print(f"[1/4] patient model: training it once into {model} ({args.train_minutes:g} min; reused afterwards)")
        code = train.main(["--out", str(model), "--time-budget", str(args.train_minutes)])
        if code != 0:
            return code

    ct_path = default_ct_path()
    hu = load_ct(ct_path)
    targets, _ = label_centroids(load_labels(default_labels_path(), hu))
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand(1, generator=gen))  # noqa: E731
    truth = carm_pose(
        math.radians(u(-30, 30)), math.radians(u(-20, 20)), math.radians(u(-10, 10)), u(650, 850),
        hu.center + (torch.rand(3, generator=gen, dtype=torch.float64) * 80 - 40),
    )
    camera = Intrinsics.from_detector(sdd=SDD_MM, width=256, height=256, pixel_spacing=PIXEL_MM)
    camera.to_yaml(out / "camera.yaml")
    print(f"[2/4] simulating a 256x256 mono16 fluoroscopy frame of {ct_path.name} (Poisson noise, I0 = 5000, blur 0.7 px)")
    with torch.no_grad():
        drr = Renderer(hu_to_mu(hu)).render(truth, camera)
    cv2.imwrite(str(out / "xray.png"), simulate_transmission(drr, i0=5e3, rng=rng))
    save_json(out / "truth.json", {"T_ct_source": truth})

    print("[3/4] diffpose-register --model: CNN initialisation, then refinement")
    code = register.main([
        "--model", str(model), "--camera-info", str(out / "camera.yaml"), "--image", str(out / "xray.png"),
        "--out", str(out / "result.json"), "--overlay", str(out / "overlay.png"),
    ])
    if code != 0:
        return code
    result = json.loads((out / "result.json").read_text())
    estimate = torch.tensor(result["T_ct_source"], dtype=torch.float64)
    initial = torch.tensor(result["T_ct_source_init"], dtype=torch.float64)
    errors = metrics.frame_errors(estimate, truth, targets, camera, PIXEL_MM, SDD_MM)
    summary = {
        "cnn_mtre_mm": float(metrics.mtre(initial, truth, targets)),
        **{"final_mtre_mm" if k == "mtre_mm" else k: v for k, v in errors.items()},
        "registration_seconds": result["seconds"],
        "iterations": result["iterations"],
        "similarity": result["similarity"],
        "converged": result["converged"],
        "targets": f"{len(targets)} label-map structure centroids",
        "model": str(model.resolve()),
        "total_seconds": time.perf_counter() - t0,
    }
    save_json(out / "summary.json", summary)
    print(
        f"[4/4] 3D mTRE: CNN {summary['cnn_mtre_mm']:.2f} mm -> refined {summary['final_mtre_mm']:.3f} mm "
        f"(rotation {summary['rotation_deg']:.3f} deg, translation {summary['translation_mm']:.2f} mm; "
        f"refinement {summary['registration_seconds']:.2f} s, {summary['iterations']} iterations)"
    )
    print(f"outputs in {out.resolve()}: xray.png, overlay.png, result.json, summary.json; model {model.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
