"""``diffpose-register``: refine an initial C-arm pose against one X-ray and print the result as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.field import FieldSpec
from ..core.geometry import Intrinsics
from ..core.io import load_pose, read_xray, save_json, write_picture
from ..core.overlay import render_overlay
from ..core.pipeline import Pipeline
from ..core.preprocess import prepare_frame
from ..core.register import Registrar
from .common import add_ct_arguments, load_attenuation, run_cli


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="diffpose-register", description=__doc__)
    add_ct_arguments(parser)
    parser.add_argument("--model", help="patient model from diffpose-train: its CNN initialises and its CT refines")
    parser.add_argument("--camera-info", required=True, help="ROS camera-calibration YAML of the image")
    parser.add_argument("--image", required=True, help=".npy line integrals, or PNG/TIFF transmission image")
    parser.add_argument(
        "--init", help="initial pose JSON (T_ct_source, mm); required without --model, overrides the CNN"
    )
    parser.add_argument("--out", help="write the result JSON here (it is always printed)")
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="the device shows the image from the detector side: the image and --camera-info are flipped back",
    )
    parser.add_argument("--overlay", help="write a PNG of the image with the DRR's edges at the result")
    parser.add_argument("--field-radius", type=float, default=0.0, help="known round field radius (pixels; 0: detect)")
    parser.add_argument(
        "--field-center", type=float, nargs=2, metavar=("CX", "CY"), help="its centre (default: image centre)"
    )
    parser.add_argument(
        "--no-field-detection", action="store_true", help="use every pixel (no field, text or saturation mask)"
    )
    args = parser.parse_args(argv)
    if args.model is None and args.init is None:
        parser.error("give --init (and --ct), or --model to let the patient model's CNN initialise")

    intrinsics = Intrinsics.from_yaml(args.camera_info)
    raw, kind = read_xray(args.image)
    try:
        field = FieldSpec(
            not args.no_field_detection, args.field_radius, args.field_center and tuple(args.field_center)
        )
        frame = prepare_frame(raw, kind, intrinsics, mirror=args.mirror, field=field)
    except ValueError as err:
        raise ValueError(f"{args.image}: {err}") from err
    record = {}
    if args.model:
        pipeline = Pipeline.from_file(args.model)
        registrar = pipeline.registrar
        init = load_pose(args.init) if args.init else pipeline.initial_pose(frame)
        record["initialisation"] = "init file" if args.init else "CNN"
        record["T_ct_source_init"] = init.tolist()
    else:
        registrar = Registrar(load_attenuation(args))
        init = load_pose(args.init)
    result = registrar.register(frame.image, frame.intrinsics, init, mask=frame.mask)
    failure = result.failure()
    record = {**result.as_dict(), "failed": bool(failure), "failure": failure, **record}
    record["valid_fraction"] = frame.valid_fraction
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_json(args.out, record)
    if args.overlay:
        write_picture(args.overlay, render_overlay(registrar.renderer(), frame, result.pose))
    if failure:
        print(f"warning: registration failed its checks: {failure}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
