"""Load: a fluoroscopy stream into diffpose_node at ``--rate`` Hz (default 30), more frames than it can process.

Two processes over real DDS (own ROS_DOMAIN_ID, localhost, the large-frame Fast DDS profile): the
node (``.venv/bin/diffpose_node``, autostart, default parameters) and this process, which publishes
Image + CameraInfo (256^2 mono16, reliable, identical stamps = wall clock) at ``--rate`` Hz for
``--seconds`` s and records ``/tf`` and ``/diagnostics``. The frames follow a smooth periodic sweep
(+-3 deg, +-5 mm, period 10 s; ``--unique`` rendered views) so the node tracks.

Printed: frames published / received by the node / processed / TF published / dropped (by the
mailbox) / lost in transport; the node's RSS (``/proc/<pid>/status``) at start, every 10 s and at
the end; stamp -> TF-arrival latency (median, p90) in the first and the last 10 s; mTRE of the
published poses; and the backlog check: how many TFs arrive after the last frame was sent, and how
late the last one is (a node that queued frames would keep publishing for a long time).

Run: ``.venv/bin/python benchmarks/bench_node_load.py [--seconds 60] [--rate 30] [-p NAME:=VALUE ...]``
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_node_latency import build_model, detector, machine_description, percentile, render_frames, view  # noqa: E402

from diffpose_ros.core.geometry import metrics  # noqa: E402
from diffpose_ros.core.navigation.stamps import stamp_ns  # noqa: E402

NODE_EXE = Path(sys.executable).parent / "diffpose_node"
PERIOD_S = 10.0


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def sweep_pose(center, phase: float) -> torch.Tensor:
    s, c = math.sin(2 * math.pi * phase), math.cos(2 * math.pi * phase)
    return view(center, 3 * s, 2 * c, 0.5 * s, 752 + 5 * c, (5 * s, 3 * c, 2 * s))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long frames are published")
    parser.add_argument("--rate", type=float, default=30.0, help="frames per second")
    parser.add_argument("--unique", type=int, default=40, help="rendered views per sweep period")
    parser.add_argument("--voxel-mm", type=float, default=0.0, help="coarsen the model's CT (0: full resolution)")
    parser.add_argument(
        "-p", "--node-parameter", action="append", default=[], metavar="NAME:=VALUE", help="a parameter of the node"
    )
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"(ignoring arguments for other benchmarks: {' '.join(unknown)})")
    print("bench_node_load:", machine_description())

    domain = 150 + os.getpid() % 80
    env = {
        "ROS_DOMAIN_ID": str(domain),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "config" / "fastdds_large_frames.xml"),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
    }
    os.environ.update(env)
    os.environ.pop("ROS_LOCALHOST_ONLY", None)

    import rclpy
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage

    from diffpose_ros.ros.conversions import intrinsics_to_camera_info, numpy_to_image, transform_to_matrix

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model_path = Path(tmp) / "model.safetensors"
        hu, mu_full = build_model(model_path, args.voxel_mm)
        center = hu.center
        poses = [sweep_pose(center, i / args.unique) for i in range(args.unique)]
        frames = render_frames(mu_full, poses, seed=3)
        targets = metrics.grid_targets(center)
        del mu_full
        print(
            f"scene: {args.unique} views rendered, model written ({model_path.stat().st_size / 2**20:.0f} MB) "
            f"in {time.perf_counter() - t:.1f} s"
        )

        log_path = Path(tmp) / "node.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [
                *(str(NODE_EXE), "--ros-args", "-p", f"patient_model:={model_path}", "-p", "autostart:=true"),
                *(item for value in args.node_parameter for item in ("-p", value)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        context = Context()
        rclpy.init(context=context, domain_id=domain)
        node = rclpy.create_node("bench_node_load", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        image_pub = node.create_publisher(Image, "image", reliable)
        info_pub = node.create_publisher(CameraInfo, "camera_info", reliable)
        lock = threading.Lock()
        tf_rows = []  # (arrival wall s, stamp ns, 4x4 mm)
        summaries = []

        def on_tf(msg):
            now = time.time()
            with lock:
                for tr in msg.transforms:
                    tf_rows.append((now, stamp_ns(tr.header.stamp), transform_to_matrix(tr.transform)))

        frame_statuses = []

        def on_diag(msg):
            for status in msg.status:
                if status.name.endswith("diffpose_node: pipeline"):
                    summaries.append((time.time(), {kv.key: kv.value for kv in status.values}))
                elif status.name.endswith("diffpose_node: frame"):
                    frame_statuses.append((time.time(), {kv.key: kv.value for kv in status.values}))

        node.create_subscription(TFMessage, "/tf", on_tf, QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, reliable)

        def spin_until(predicate, timeout):
            deadline = time.monotonic() + timeout
            while not predicate():
                if time.monotonic() > deadline or proc.poll() is not None:
                    return False
                executor.spin_once(timeout_sec=0.05)
            return True

        try:
            ok = spin_until(
                lambda: (
                    image_pub.get_subscription_count() > 0 and summaries and summaries[-1][1].get("state") == "active"
                ),
                300,
            )
            if not ok:
                print("node did not become active:\n" + log_path.read_text()[-3000:])
                return 1
            rss = [(0.0, rss_mb(proc.pid))]
            info = intrinsics_to_camera_info(detector())
            messages = [numpy_to_image(frame, "mono16") for frame in frames]
            sent = []  # (wall s, stamp ns, view index)
            done = threading.Event()

            def publish_loop():
                period = 1.0 / args.rate
                start = time.monotonic()
                i = 0
                while not done.is_set():
                    elapsed = time.monotonic() - start
                    if elapsed >= args.seconds:
                        break
                    index = int((elapsed / PERIOD_S) * args.unique) % args.unique
                    ns = time.time_ns()
                    stamp = Time(sec=ns // 10**9, nanosec=ns % 10**9)
                    msg = messages[index]  # published (serialised) right away: reusing it is safe
                    msg.header.stamp = stamp
                    info.header.stamp = Time(sec=stamp.sec, nanosec=stamp.nanosec)
                    info_pub.publish(info)
                    image_pub.publish(msg)
                    sent.append((time.time(), ns, index))
                    i += 1
                    time.sleep(max(0.0, start + i * period - time.monotonic()))
                done.set()

            t_start = time.time()
            publisher = threading.Thread(target=publish_loop, daemon=True)
            publisher.start()
            next_sample = 10.0
            while not done.is_set():
                executor.spin_once(timeout_sec=0.05)
                if time.time() - t_start >= next_sample:
                    rss.append((next_sample, rss_mb(proc.pid)))
                    next_sample += 10.0
            publisher.join()
            t_last = sent[-1][0]
            # Drain: whatever the node still publishes for frames already sent.
            end = time.monotonic() + 15.0
            while time.monotonic() < end:
                executor.spin_once(timeout_sec=0.05)
            rss.append((time.time() - t_start, rss_mb(proc.pid)))
            final = summaries[-1][1] if summaries else {}
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            executor.shutdown()
            node.destroy_node()
            context.try_shutdown()

        index_of = {ns: index for _, ns, index in sent}
        rows = [(a, s, M) for a, s, M in tf_rows if s in index_of]
        latencies = [(a - t_start, a - s * 1e-9) for a, s, _ in rows]
        errors = [float(metrics.mtre(torch.as_tensor(M), poses[index_of[s]], targets)) for _, s, M in rows]
        first = [lat for t_rel, lat in latencies if t_rel <= 10.0]
        last = [lat for t_rel, lat in latencies if t_rel >= args.seconds - 10.0]
        after = [(a - t_last) for a, _, _ in rows if a > t_last]
        published = len(sent)
        received = int(final.get("frames_received", "0"))
        processed = int(final.get("frames_processed", "0"))
        dropped = int(final.get("frames_dropped_mailbox", "0"))
        before = int(final.get("frames_dropped_before_receipt", "0"))
        print(
            f"\nstream: {published} frames at {args.rate:g} Hz for {args.seconds:g} s "
            f"(achieved {published / max(sent[-1][0] - sent[0][0], 1e-9):.1f} Hz)"
        )
        print(
            f"node: received {received}, processed {processed}, TF published {len(rows)} "
            f"(node count {final.get('frames_published')}), rejected {final.get('frames_rejected')}, "
            f"dropped by the mailbox {dropped}, dropped before the callback (depth-1 reader queue, "
            f"from sequence gaps) {before}; published - received = {published - received}; "
            f"processed + mailbox drops = {processed + dropped} "
            "(received, less up to 3 in flight or waiting at the end)"
        )
        print(
            "node RSS (MB): "
            + ", ".join(f"t={t_rel:.0f}s {mb:.0f}" for t_rel, mb in rss)
            + f"  -> growth {rss[-1][1] - rss[0][1]:+.1f} MB"
        )
        print(
            f"stamp -> TF arrival latency: first 10 s median {statistics.median(first) * 1e3:.0f} ms "
            f"p90 {percentile(first, 90) * 1e3:.0f} ms (n={len(first)}); last 10 s median "
            f"{statistics.median(last) * 1e3:.0f} ms p90 {percentile(last, 90) * 1e3:.0f} ms (n={len(last)})"
            if first and last
            else "stamp -> TF latency: not enough TFs"
        )
        windows = []
        for w0 in range(0, int(args.seconds), 10):
            lat = [v for t_rel, v in latencies if w0 <= t_rel < w0 + 10]
            if lat:
                windows.append(f"{w0}-{w0 + 10}s {statistics.median(lat) * 1e3:.0f}")
        print("stamp -> TF median latency per 10 s window (ms): " + ", ".join(windows))
        parts = []
        for w0 in range(0, int(args.seconds), 10):
            vals = [v for a, v in frame_statuses if w0 <= a - t_start < w0 + 10 and "t_total_s" in v]
            if vals:
                med = {
                    key: statistics.median(float(v.get(key, "nan")) for v in vals)
                    for key in ("t_in_mailbox_s", "t_camera_info_wait_s", "t_total_s")
                }
                modes = sum(v.get("mode") == "tracking" for v in vals)
                parts.append(
                    f"{w0}-{w0 + 10}s mailbox {med['t_in_mailbox_s'] * 1e3:.0f} / camera_info wait "
                    f"{med['t_camera_info_wait_s'] * 1e3:.0f} / processing {med['t_total_s'] * 1e3:.0f}"
                    f" ({modes}/{len(vals)} tracking)"
                )
        print("node-side medians per window (ms): " + "; ".join(parts))
        print(
            f"processing rate {len(rows) / args.seconds:.2f} poses/s; node-side median latency receipt->publish "
            f"{final.get('latency_receipt_to_publish_median_s')} s, stamp->publish "
            f"{final.get('latency_stamp_to_publish_median_s')} s"
        )
        if errors:
            print(
                f"mTRE of published poses: median {statistics.median(errors):.2f} mm, p90 "
                f"{percentile(errors, 90):.2f} mm, max {max(errors):.2f} mm"
            )
        print(
            f"backlog check: {len(after)} TF(s) arrived after the last frame was sent"
            + (f", the last {max(after):.2f} s after it" if after else "")
            + (" -> no backlog" if len(after) <= 3 else " -> BACKLOG")  # in flight, and the two the mailbox holds
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
