"""``diffpose-register``: refine an initial C-arm pose against one X-ray and print the result as JSON.

The camera: ``--camera-info`` when given, else a DICOM image's own tags (SDD, imager pixel spacing;
:mod:`diffpose_ros.core.io.dicom`); the result records which (``intrinsics_source``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffpose_ros.core import (
    POLARITIES,
    FieldSpec,
    Intrinsics,
    Pipeline,
    PipelineConfig,
    Registrar,
    load_pose,
    prepare_frame,
    read_xray,
    render_overlay,
    save_json,
    write_picture,
)

from .common import add_ct_arguments, add_pyramid_argument, load_attenuation, registration_config, run_cli


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="diffpose-register", description=__doc__)
    add_ct_arguments(parser)
    parser.add_argument("--model", help="patient model from diffpose-train: its CNN initialises and its CT refines")
    parser.add_argument(
        "--camera-info", help="ROS camera-calibration YAML of the image (default: a DICOM image's geometry tags)"
    )
    parser.add_argument(
        "--image", required=True, help=".npy line integrals, PNG/TIFF transmission image, or DICOM X-ray (.dcm)"
    )
    parser.add_argument("--frame", type=int, default=0, help="frame of a multi-frame DICOM file (from 0; default 0)")
    parser.add_argument(
        "--init", help="initial pose JSON (T_ct_source, mm); required without --model, overrides the CNN"
    )
    parser.add_argument("--out", help="write the result JSON here (it is always printed)")
    parser.add_argument(
        "--polarity",
        choices=(*POLARITIES, "auto"),
        default="bones_dark",
        help="how the image shows bone (after DICOM's photometric interpretation and modality); a frame that "
        "looks the other way is refused (default bones_dark; auto: either). With --model only",
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="the device shows the image from the detector side: the image and --camera-info are flipped back",
    )
    add_pyramid_argument(parser)
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
    if args.model and (args.ct or args.bone_scale != 1.0):
        parser.error("--model brings its own CT: --ct and --bone-scale go without --model")

    given = Intrinsics.from_yaml(args.camera_info) if args.camera_info else None
    xray = read_xray(args.image)
    raw = xray.frame(args.frame)
    intrinsics = given or xray.intrinsics()
    # A round field the DICOM tags give replaces the field detection (--field-radius overrides it).
    tag_radius = xray.dicom.field_radius_px if xray.dicom is not None and not args.no_field_detection else None
    radius = args.field_radius or tag_radius or 0.0
    try:
        field = FieldSpec(not args.no_field_detection, radius, args.field_center and tuple(args.field_center))
        frame = prepare_frame(raw, xray.kind, intrinsics, mirror=args.mirror, field=field)
    except ValueError as err:
        raise ValueError(f"{args.image}: {err}") from err
    if args.model:
        config = PipelineConfig(polarity=args.polarity, cold=registration_config(args))
        pipeline = Pipeline.from_file(args.model, config=config)
        renderer = pipeline.registrar.renderer()
        outcome = pipeline.process(frame, track=False, initial_pose=load_pose(args.init) if args.init else None)
        pose, failure, d = outcome.pose, outcome.reason, outcome.as_dict()
        record = {key: d[key] for key in ("T_ct_source", "similarity", "iterations")}
        record.update(seconds=d["timings"]["total"], converged=d["converged"], failed=bool(failure), failure=failure)
        record.update({key: d[key] for key in ("outlier_fraction", "polarity", "polarity_scores")})
        record.update(initialisation="init file" if args.init else "CNN", T_ct_source_init=d["T_ct_source_init"])
    else:
        registrar = Registrar(load_attenuation(args), registration_config(args))
        renderer = registrar.renderer()
        result = registrar.register(frame.image, frame.intrinsics, load_pose(args.init), mask=frame.mask)
        pose, failure = result.pose, result.failure()
        record = {**result.as_dict(), "failed": bool(failure), "failure": failure}
    record["valid_fraction"] = frame.valid_fraction
    record["intrinsics_source"] = f"camera-info {args.camera_info}" if given else "DICOM tags"
    record["intrinsics"] = {k: getattr(intrinsics, k) for k in ("width", "height", "fx", "fy", "cx", "cy")}
    if xray.frame_count > 1:
        record["frame"], record["frames"] = args.frame, xray.frame_count
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_json(args.out, record)
    if args.overlay:
        write_picture(args.overlay, render_overlay(renderer, frame, pose))
    if failure:
        print(f"warning: registration failed its checks: {failure}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
