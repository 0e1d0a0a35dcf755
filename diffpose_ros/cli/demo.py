"""``diffpose-demo``: the main job, end to end through the ROS 2 node, on the bundled chest CT.

1. The patient model: ``--model`` (default ``runs/models/cxr.safetensors``); when it is missing,
   ``diffpose-train`` makes it once (``--train-minutes``, 15 by default) and later runs reuse it.
2. A fluoroscopy sequence: ``diffpose-make-bag`` (a C-arm sweep with breathing, quantum noise, as
   an image intensifier's 8-bit video: display chain, round field, burned-in text, and steel rods
   that are not in the CT) with ground truth, as a rosbag2; or ``--bag``, a given one with ground truth.
3. ``diffpose_node`` in its own process with the model preloaded (``autostart``), its ``image`` and
   ``camera_info`` remapped to the bag's topics; next to it ``diffpose-igtl`` serving OpenIGTLink
   (``--igtl-port``, default any free one; ``--no-igtl`` skips it) with a navigator's client connected.
4. Replay the bag into it at its own frame rate (7.5 Hz pulsed fluoroscopy; ``--rate`` scales
   the timing) and record its ``/tf``, ``/tf_static``, ``~/pose`` and ``/diagnostics``; each TF is printed and checked.
5. ``diffpose-score``: per-frame errors, the summary and the pictures in ``--out``, and what the
   navigator received (its transforms' 3D mTRE; ``igtl`` in ``summary.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from diffpose_ros.bags.record import DEFAULT_TOPICS as OUTPUTS
from diffpose_ros.bags.replay import ReplayOptions
from diffpose_ros.bags.synthesize import TOPICS
from diffpose_ros.ros.igtl.navigator import Receiver, free_port

from . import make_bag, score, train
from .common import run_cli

DEFAULT_MODEL = Path("runs/models/cxr.safetensors")
IGTL_SETTLE_S = 2.0
"""How long the navigator waits once the bridge follows the node (for the writers' side of the DDS
match) before the replay, and after the replay still reads what the bridge has in flight (s)."""


def _program(script: str, module: str) -> list[str]:
    """The console script next to this Python, else ``python -m module``."""
    exe = Path(sys.executable).with_name(script)
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", module]


def _node_command(model: Path, threads: int, parameters: list[str]) -> list[str]:
    return [
        *_program("diffpose_node", "diffpose_ros.ros.node"),
        "--ros-args",
        "-p",
        f"patient_model:={model.resolve()}",
        "-p",
        "autostart:=true",
        "-p",
        f"num_threads:={threads}",
        *[arg for parameter in parameters for arg in ("-p", parameter)],
        "-r",
        f"image:={TOPICS['image']}",
        "-r",
        f"camera_info:={TOPICS['camera_info']}",
    ]


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def _wait_for(session, process: subprocess.Popen, log: Path, timeout_s: float, ready, what: str) -> None:
    """Until ``ready()``, or fail with the tail of ``log`` (the output of ``process``, which ``what``
    names: "diffpose_node to become active")."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline or session.stop.is_set():
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise ValueError(f"waited in vain for {what} (exit status {process.poll()}); its log:\n{tail}")
        session.wait(0.1)


def _subscribed(session, topic: str):
    """Whether ``topic`` has a subscriber (the node's image topic: configured and active)."""
    return lambda: session.node.count_subscribers(topic) > 0


def _logged(log: Path, text: str):
    """Whether a line of ``log`` contains ``text``."""
    return lambda: log.is_file() and text in log.read_text(errors="replace")


@contextlib.contextmanager
def _navigator(session, port: int, stale_after_s: float, log: Path, env: dict) -> Iterator[Receiver]:
    """``diffpose-igtl`` in its own process (environment ``env``) serving OpenIGTLink on localhost
    ``port``, and a navigator's client connected to it once the bridge follows the node's
    ``~/status``; stopped on exit."""
    from diffpose_ros.ros.igtl.node import FOLLOWING, STATUS_TOPIC

    command = [
        *_program("diffpose-igtl", "diffpose_ros.ros.igtl.node"),
        "--ros-args",
        *("-p", f"port:={port}", "-p", "address:=127.0.0.1", "-p", f"stale_after_s:={stale_after_s:.3f}"),
        *("-p", "image_qos:=reliable"),  # the navigator gets the frame of every transform
        *("-r", f"image:={TOPICS['image']}", "-r", f"camera_info:={TOPICS['camera_info']}"),
    ]
    print(f"      diffpose_igtl on OpenIGTLink port {port} (log {log}):\n      {' '.join(command)}", flush=True)
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    receiver = None
    try:
        _wait_for(session, process, log, 120.0, _subscribed(session, STATUS_TOPIC), "diffpose_igtl to subscribe")
        # DDS matches the node's writers with the bridge's readers some time after the bridge
        # subscribes, and poses sent before that never reach it: wait until the bridge says that it
        # follows the node, then a little longer for the writers' side of the match.
        _wait_for(session, process, log, 60.0, _logged(log, FOLLOWING), "diffpose_igtl to follow the node")
        receiver = Receiver(port, timeout=30.0, unpack_images=False)
        time.sleep(IGTL_SETTLE_S)
        yield receiver
        time.sleep(IGTL_SETTLE_S)
    finally:
        if receiver is not None:
            receiver.close()
        _stop(process)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffpose-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help=f"patient model (default {DEFAULT_MODEL}; trained when missing)"
    )
    parser.add_argument("--train-minutes", type=float, default=15.0, help="training budget when the model is missing")
    parser.add_argument("--rate", type=float, default=1.0, help="replay speed factor (default 1: the bag's own rate)")
    parser.add_argument("--node-threads", type=int, default=0, help="torch threads of the node (0: its default)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME:=VALUE",
        help="a node parameter, as ros2 run's -p takes it (repeatable), e.g. renderer_threads:=1",
    )
    parser.add_argument("--igtl-port", type=int, default=0, help="OpenIGTLink port of the bridge (0: any free one)")
    parser.add_argument("--no-igtl", action="store_true", help="without the OpenIGTLink bridge and navigator")
    parser.add_argument(
        "--bag", help="replay this bag with ground truth (diffpose-make-bag's, or one recorded elsewhere) instead"
    )
    make_bag.add_arguments(parser)
    # Clinical-looking frames: an image intensifier's 8-bit video (display chain, round field,
    # burned-in text) with steel rods that are not in the CT; --clinical all adds scatter and heel.
    parser.set_defaults(sweep=24, fps=7.5, seed=7, encoding="mono8", clinical="display,field,text,metal")
    args = parser.parse_args(argv)
    bad = [p for p in args.param if ":=" not in p]
    if bad:
        parser.error(f"--param takes NAME:=VALUE, not {bad[0]!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    model = Path(args.model)
    if model.is_file():
        print(f"[1/5] patient model: {model.resolve()} (cached)", flush=True)
    else:
        print(
            f"[1/5] patient model: training it once into {model} ({args.train_minutes:g} min; reused afterwards)",
            flush=True,
        )
        code = train.main(["--out", str(model), "--time-budget", str(args.train_minutes)])
        if code != 0:
            return code

    from diffpose_ros.bags.live import run_live
    from diffpose_ros.bags.read import read_truth, targets_for

    estimate = out / "output_bag"
    shutil.rmtree(estimate, ignore_errors=True)
    if args.bag:
        bag = Path(args.bag)
        truth = read_truth(bag)
        frames = truth.frames
        fps = (len(frames) - 1) / ((frames[-1] - frames[0]) * 1e-9) if len(frames) > 1 else 1.0
        print(f"[2/5] fluoroscopy sequence: {bag} ({len(frames)} frames at {fps:.3g} Hz)", flush=True)
    else:
        bag = out / "fluoro_bag"
        shutil.rmtree(bag, ignore_errors=True)
        print(f"[2/5] fluoroscopy sequence: diffpose-make-bag -> {bag}", flush=True)
        scene = make_bag.make_bag(args, str(bag))
        fps = scene["fps"]
        print(
            f"      {scene['frames']} frames at {fps:g} Hz ({scene['pose_source']}), "
            f"{args.size[0]}x{args.size[1]} {args.encoding}, I0 {args.i0:g} photons/pixel",
            flush=True,
        )
        truth = read_truth(bag)
    from diffpose_ros.ros.runtime import RosSession, use_large_frame_profile

    users_profile = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")
    use_large_frame_profile()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    # The nodes load their own profile, as in an operating room, unless the user named one for all.
    node_env = {k: v for k, v in os.environ.items() if k != "FASTDDS_DEFAULT_PROFILES_FILE" or users_profile}
    node_log = out / "node.log"
    command = _node_command(model, args.node_threads, args.param)
    print(f"[3/5] diffpose_node in its own process (log {node_log}):\n      {' '.join(command)}", flush=True)
    with node_log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=node_env)
    try:
        targets, _ = targets_for(truth, None)
        with RosSession("diffpose_demo") as session, contextlib.ExitStack() as stack:
            active = _subscribed(session, TOPICS["image"])
            _wait_for(session, process, node_log, 300.0, active, "diffpose_node to become active")
            navigator = None
            if not args.no_igtl:  # a navigator is told "stale" after two frame intervals without a pose
                stale_s = max(1.0, 2.0 / (fps * args.rate))
                port = args.igtl_port or free_port()
                navigator = stack.enter_context(_navigator(session, port, stale_s, out / "igtl.log", node_env))
            print(f"[4/5] node active; replaying at rate {args.rate:g} and recording {', '.join(OUTPUTS)}", flush=True)
            options = ReplayOptions(rate=args.rate, topics=[TOPICS["image"], TOPICS["camera_info"]])
            live = run_live(session, truth, estimate, options, OUTPUTS, targets, log=lambda s: print(s, flush=True))
    finally:
        status = _stop(process)
    print(f"      node stopped (exit status {status}); {live.answered}/{live.frames} frames answered", flush=True)

    print("[5/5] diffpose-score", flush=True)
    score_args = argparse.Namespace(
        targets=None, ct=None, ct_frame=None, camera_frame=None, sdd_mm=None, mirror=False, no_overlays=False
    )
    summary = score.score_and_report(
        score_args,
        truth,
        estimate,
        out,
        {
            "replay": live.replay,
            "replay_rate": args.rate,
            "model": str(model.resolve()),
            "total_seconds": time.perf_counter() - t0,
        },
        None if navigator is None else navigator.received(),
    )
    score.print_summary(summary, out)
    return 0 if summary["frames_with_pose"] == summary["frames"] else 1


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
