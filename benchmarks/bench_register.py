"""Benchmark test-time registration (``Registrar.register``) on the bundled CT.

Each seeded trial draws a view ``T_true`` from the geometry contract's clinical range (and a
principal point within +-10 px of the 256^2 detector's centre), renders the target at the full
256^2 detector (SDD 1020 mm, 1.2 mm pixels) and starts the registration from ``T_true`` moved by a
10 deg rotation about a random axis through the isocentre and a 30 mm translation in a random
direction:

    T_init = Trans(d) @ Tiso @ R @ Tiso^-1 @ T_true        (all in the ``ct`` frame)

The registrar resamples the target itself (its finest pyramid level is 128 px wide). Reported per
trial: initial and final 3D mTRE (mm, ``metrics.grid_targets`` around the CT centre), rotation and
translation errors, LM iterations, wall seconds (``RegistrationResult.seconds``) and process CPU
seconds (all threads; less sensitive to other processes on a shared machine), converged/failed; then medians,
maxima and success
shares.

``--target-renderer diffdrr`` renders the target with DiffDRR's Siddon and DiffDRR's own HU->density
map (a cross-renderer test); ``--noise`` turns the target into a transmission image
``I ~ Poisson(I0 exp(-L))``, ``I0 = 1e4``, and registers ``-log(I / I0)``.

Run: ``cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_register.py [--trials 10]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numba
import roma
import torch

from diffpose_ros.core.geometry import metrics, se3
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
from diffpose_ros.core.registration.registrar import Registrar
from diffpose_ros.core.rendering.diffdrr_reference import DiffDRRReference
from diffpose_ros.core.rendering.renderer import Renderer
from diffpose_ros.core.rendering.volume import default_ct_path, hu_to_mu, load_ct

SDD = 1020.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def uniform(g, lo, hi, n=None):
    shape = () if n is None else (n,)
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def random_unit(g) -> torch.Tensor:
    v = torch.randn(3, generator=g, dtype=torch.float64)
    return v / v.norm()


def translation(t: torch.Tensor) -> torch.Tensor:
    return se3.make_pose(torch.eye(3, dtype=torch.float64), t)


def draw_trial(g, center: torch.Tensor, rot_deg: float, trans_mm: float):
    """(T_true, T_init, intrinsics, view parameters) of one trial."""
    alpha = math.radians(float(uniform(g, -30, 30)))
    beta = math.radians(float(uniform(g, -20, 20)))
    gamma = math.radians(float(uniform(g, -10, 10)))
    sod = float(uniform(g, 650, 850))
    iso = center + uniform(g, -40, 40, 3)
    pp = uniform(g, -10, 10, 2)
    K = Intrinsics.from_detector(SDD, 256, 256, 1.2, principal_point=(127.5 + float(pp[0]), 127.5 + float(pp[1])))
    T_true = carm_pose(alpha, beta, gamma, sod, iso)
    R = se3.make_pose(
        roma.rotvec_to_rotmat(random_unit(g) * math.radians(rot_deg)), torch.zeros(3, dtype=torch.float64)
    )
    d = random_unit(g) * trans_mm
    T_init = translation(d) @ translation(iso) @ R @ translation(-iso) @ T_true
    view = {
        "alpha_deg": math.degrees(alpha),
        "beta_deg": math.degrees(beta),
        "gamma_deg": math.degrees(gamma),
        "sod_mm": sod,
        "isocenter_offset_mm": (iso - center).tolist(),
        "principal_point": [K.cx, K.cy],
    }
    return T_true, T_init, K, view


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-renderer", choices=["ours", "diffdrr"], default="ours")
    ap.add_argument("--noise", action="store_true", help="Poisson noise on I = I0 exp(-L), I0 = --i0")
    ap.add_argument("--i0", type=float, default=1e4)
    ap.add_argument("--rot-deg", type=float, default=10.0)
    ap.add_argument("--trans-mm", type=float, default=30.0)
    ap.add_argument("--threshold-mm", type=float, default=0.5, help="success: final mTRE below this")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()

    env = {
        "torch": torch.__version__,
        "numba": numba.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "os_cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
    }
    for k, v in env.items():
        print(f"{k:>14s}: {v}")

    ct_path = default_ct_path()
    hu = load_ct(ct_path)
    mu = hu_to_mu(hu)
    targets = metrics.grid_targets(hu.center)
    t0 = time.perf_counter()
    registrar = Registrar(mu)
    build_s = time.perf_counter() - t0
    target_renderer = Renderer(mu)  # the full-resolution volume at the default step
    # DiffDRR Siddon with DiffDRR's own HU->density map (mapping: geometry contract)
    diffdrr_target = DiffDRRReference(ct_path, sdd_mm=SDD) if args.target_renderer == "diffdrr" else None
    print(f"{'registrar':>14s}: built in {build_s:.2f} s; levels {registrar.config.levels}")
    print(f"{'target':>14s}: {args.target_renderer} 256^2{f' + Poisson noise I0={args.i0:g}' if args.noise else ''}")

    def make_target(T, K, g):
        L = target_renderer.render(T, K).double()
        if diffdrr_target is not None:
            with torch.no_grad():
                Ld = diffdrr_target.render(T, K).double()
            # DiffDRR's densities are in [0, 1]: bring its line integrals to our attenuation scale
            # (mean matched to ours) so that the transmission image has realistic counts.
            L = Ld * (L.mean() / Ld.mean())
        if args.noise:
            counts = torch.poisson(args.i0 * torch.exp(-L), generator=g)
            L = -torch.log(counts.clamp(min=1.0) / args.i0)
        return L.float()

    # warm-up (JIT compile, caches) on a trial that is not timed
    g = torch.Generator().manual_seed(10_000 + args.seed)
    T_true, T_init, K, _ = draw_trial(g, hu.center, args.rot_deg, args.trans_mm)
    t0 = time.perf_counter()
    registrar.register(make_target(T_true, K, g), K, T_init)
    print(f"{'warm-up':>14s}: {time.perf_counter() - t0:.2f} s (one untimed registration)")

    results = []
    hdr = (
        f"{'trial':>5s} {'init mTRE':>10s} {'final mTRE':>11s} {'rot deg':>8s} {'trans mm':>9s} {'iters':>6s} "
        f"{'seconds':>8s} {'cpu s':>6s} {'NCC':>7s} {'conv':>5s} {'fail':>5s}"
    )
    print("\n" + hdr)
    for trial in range(args.trials):
        g = torch.Generator().manual_seed(args.seed * 1000 + trial)
        T_true, T_init, K, view = draw_trial(g, hu.center, args.rot_deg, args.trans_mm)
        image = make_target(T_true, K, g)
        c0 = time.process_time()
        res = registrar.register(image, K, T_init)
        cpu_s = time.process_time() - c0
        init_mtre = float(metrics.mtre(T_init, T_true, targets))
        final_mtre = float(metrics.mtre(res.pose, T_true, targets))
        errs = metrics.pose_errors(res.pose, T_true, SDD / 2)
        row = {
            "trial": trial,
            "init_mtre_mm": init_mtre,
            "final_mtre_mm": final_mtre,
            "rotation_deg": errs["rotation_deg"],
            "translation_mm": errs["translation_mm"],
            "iterations": res.iterations,
            "seconds": res.seconds,
            "cpu_seconds": cpu_s,
            "similarity": res.similarity,
            "converged": res.converged,
            "failed": bool(res.failure()),
            "view": view,
            "iterations_per_level": [
                sum(1 for h in res.history if h["level"] == lv) for lv in range(len(registrar.config.levels))
            ],
        }
        results.append(row)
        print(
            f"{trial:5d} {init_mtre:10.2f} {final_mtre:11.4f} {errs['rotation_deg']:8.4f} "
            f"{errs['translation_mm']:9.4f} {res.iterations:6d} {res.seconds:8.3f} {cpu_s:6.2f} {res.similarity:7.4f} "
            f"{str(res.converged):>5s} {str(bool(res.failure())):>5s}   per level {row['iterations_per_level']}",
            flush=True,
        )

    fm = [r["final_mtre_mm"] for r in results]
    secs = [r["seconds"] for r in results]
    its = [r["iterations"] for r in results]
    summary = {
        "trials": len(results),
        "init_mtre_median_mm": statistics.median(r["init_mtre_mm"] for r in results),
        "final_mtre_median_mm": statistics.median(fm),
        "final_mtre_max_mm": max(fm),
        "seconds_median": statistics.median(secs),
        "seconds_max": max(secs),
        "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in results),
        "iterations_median": statistics.median(its),
        "iterations_max": max(its),
        f"success_below_{args.threshold_mm}mm": sum(m < args.threshold_mm for m in fm) / len(fm),
        "success_below_1mm": sum(m < 1 for m in fm) / len(fm),
        "success_below_2mm": sum(m < 2 for m in fm) / len(fm),
        "converged_share": sum(r["converged"] for r in results) / len(results),
        "failed_flag_share": sum(r["failed"] for r in results) / len(results),
    }
    print("\nsummary:")
    for k, v in summary.items():
        print(f"  {k:>28s}: {v:.4g}" if isinstance(v, float) else f"  {k:>28s}: {v}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "summary": summary, "trials": results}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
