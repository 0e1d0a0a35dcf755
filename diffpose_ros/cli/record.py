"""``diffpose-record --out BAG [TOPIC ...]``: record ROS 2 topics into an mcap rosbag2 until stopped.

Default topics: the node's outputs (``/tf``, ``/tf_static``, ``/diffpose_node/pose``, ``/diagnostics``).
Topics are subscribed as their publishers appear, with QoS matching them. Stops on Ctrl-C/SIGTERM,
after ``--max-messages`` or ``--duration``, and always finishes the bag. ROS arguments after
``--ros-args`` go to rclpy (``-p use_sim_time:=true`` logs on ``/clock`` time).
"""

from __future__ import annotations

import argparse
import json
import time

from diffpose_ros.bags.record import DEFAULT_TOPICS, Recorder

from .common import run_cli, split_ros_args


def _main(argv: list[str] | None) -> int:
    argv, ros_args = split_ros_args(argv)
    parser = argparse.ArgumentParser(
        prog="diffpose-record", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="rosbag2 folder to create (must not exist)")
    parser.add_argument("topics", nargs="*", help=f"absolute topic names (default: {' '.join(DEFAULT_TOPICS)})")
    parser.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"))
    parser.add_argument("--max-messages", type=int, default=0, help="stop after this many messages (0: no limit)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    args = parser.parse_args(argv)

    from diffpose_ros.ros.runtime import RosSession

    with RosSession("diffpose_record", ros_args) as session:
        recorder = Recorder(
            session.node, args.out, args.topics or DEFAULT_TOPICS, args.storage, args.max_messages, args.duration
        )
        print(f"recording {' '.join(recorder.topics)} into {args.out} (Ctrl-C to stop)", flush=True)
        start = time.monotonic()
        while not (session.stop.is_set() or recorder.done.is_set()):
            session.wait(0.1)
        counts = recorder.close()
    print(json.dumps({"bag": args.out, "seconds": time.monotonic() - start, "messages": counts}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
