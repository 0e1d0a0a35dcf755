"""Benchmark one training step (render, augment, forward, backward, optimiser) per network and pool setting.

Builds one :class:`Trainer` per variant on the bundled CT, each the training defaults (or
``--config``) with a few keys changed, fills each pool, then times their ``train_step`` calls
round-robin (so that a noisy machine slows them alike) and prints the median seconds per step and
the ratio to the first variant, measured in the same run.

Run: ``cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_train_step.py [--steps 15]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffpose_ros.cli.common import load_ct_and_targets
from diffpose_ros.cli.train import load_config
from diffpose_ros.core.model.train import TrainConfig, Trainer

# (label, training keys changed from the base configuration)
VARIANTS = [
    ("base (the defaults or --config)", {}),
    ("timm's stem (3 convolutions and a max-pool)", {"backbone_stem": None}),
    ("resnet10t, timm's widths 64-128-256-512 and stem", {"backbone": "resnet10t"}),
    ("resnet18", {"backbone": "resnet18"}),
    ("aim 1.5 deg (larger pool renders)", {"aim_deg": 1.5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="training YAML (default: the built-in defaults)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per backbone")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    base = load_config(args.config, args.device)
    _, hu, targets, _ = load_ct_and_targets(None, None)
    trainers = {}
    for label, changes in VARIANTS:
        d = {**base.as_dict(), **changes}
        if "backbone" in changes:  # its own widths and stem
            d.update(backbone_channels=None, backbone_stem=None)
        trainer = Trainer(hu, targets, TrainConfig.from_dict(d), device=args.device)
        for _ in range(3):  # pool fill, allocations, JIT
            trainer.train_step(0.5)
        trainers[f"{label} ({trainer.config.backbone}, {trainer.model.backbone.num_features} features)"] = trainer
    times = {label: [] for label in trainers}
    for _ in range(args.steps):
        for label, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step(0.5)
            times[label].append(time.perf_counter() - t0)
    first = statistics.median(next(iter(times.values())))
    report = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch_size": base.batch_size,
        "image_size": base.image_size,
        "pool_refresh": base.pool_refresh,
        "steps": {
            label: {"median_s": statistics.median(t), "ratio_to_base": statistics.median(t) / first}
            for label, t in times.items()
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
