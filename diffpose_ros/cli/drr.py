"""``diffpose-drr``: render a DRR for a pose and intrinsics, as ``OUT.npy`` (line integrals) and ``OUT.png``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from diffpose_ros.core import Intrinsics, Renderer, load_pose, write_png

from .common import add_ct_arguments, load_attenuation, run_cli


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="diffpose-drr", description=__doc__)
    add_ct_arguments(parser)
    parser.add_argument("--camera-info", required=True, help="ROS camera-calibration YAML (pixels, K)")
    parser.add_argument("--pose", required=True, help='pose JSON {"T_ct_source": 4x4} in mm')
    parser.add_argument("--out", required=True, help="output path without extension (writes OUT.npy and OUT.png)")
    parser.add_argument("--voxel-mm", type=float, default=0.0, help="coarsen the CT to about this voxel size first")
    args = parser.parse_args(argv)
    intrinsics = Intrinsics.from_yaml(args.camera_info)
    pose = load_pose(args.pose)
    mu = load_attenuation(args)
    if args.voxel_mm > 0:
        mu = mu.coarsened_to(args.voxel_mm)
    with torch.no_grad():
        image = Renderer(mu).render(pose, intrinsics).numpy()
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".npy", ".png") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.with_suffix(".npy"), image.astype(np.float32))
    write_png(out.with_suffix(".png"), image)
    print(f"wrote {out.with_suffix('.npy')} and {out.with_suffix('.png')} ({intrinsics.width}x{intrinsics.height})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
