"""``diffpose-replay BAG``: play a rosbag2 (sqlite3 or mcap, ours or anyone's) into ROS 2 with its timing.

Like ``ros2 bag play``: raw CDR as stored, original header stamps, publish times following the bag's
log times divided by ``--rate``. ROS arguments after ``--ros-args`` go to rclpy (e.g. a domain is
chosen by ``ROS_DOMAIN_ID``). Uses the package's large-frame Fast DDS profile unless
``FASTDDS_DEFAULT_PROFILES_FILE`` is set.
"""

from __future__ import annotations

import argparse
import json

from diffpose_ros.bags.bagfile import QosSpec
from diffpose_ros.bags.replay import Player, ReplayOptions, parse_remaps

from .common import run_cli, split_ros_args


def _qos_overrides(items: list[str] | None) -> dict[str, QosSpec]:
    out = {}
    for item in items or []:
        topic, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"--qos {item!r} is not TOPIC=PROFILE")
        out[topic] = QosSpec.named(name)
    return out


def _main(argv: list[str] | None) -> int:
    argv, ros_args = split_ros_args(argv)
    parser = argparse.ArgumentParser(
        prog="diffpose-replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bag", help="rosbag2 folder (with metadata.yaml)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1)")
    parser.add_argument("--start-offset", type=float, default=0.0, help="skip this many seconds of the bag")
    parser.add_argument("--loop", action="store_true", help="play again and again until stopped")
    parser.add_argument("--topics", nargs="+", help="play only these bag topics")
    parser.add_argument("--remap", nargs="+", metavar="OLD:=NEW", help="publish bag topic OLD as NEW")
    parser.add_argument(
        "--qos",
        nargs="+",
        metavar="TOPIC=PROFILE",
        help="override a bag topic's QoS: reliable, best_effort, sensor_data or latched",
    )
    parser.add_argument(
        "--clock",
        type=float,
        nargs="?",
        const=100.0,
        default=0.0,
        metavar="HZ",
        help="publish /clock with the bag time (default 100 Hz when given) for use_sim_time",
    )
    parser.add_argument(
        "--wait-for",
        nargs="+",
        metavar="TOPIC[=N]",
        default=[],
        help="before playing, wait until these published topics have a subscriber (or N) and are "
        "matched with every subscriber the ROS graph shows",
    )
    parser.add_argument("--wait-timeout", type=float, default=60.0, help="seconds to wait for them (default 60)")
    args = parser.parse_args(argv)
    options = ReplayOptions(
        rate=args.rate,
        start_offset_s=args.start_offset,
        loop=args.loop,
        topics=args.topics,
        remap=parse_remaps(args.remap),
        qos=_qos_overrides(args.qos),
        clock_hz=args.clock,
    )

    from diffpose_ros.ros.runtime import RosSession

    with RosSession("diffpose_replay", ros_args) as session:
        player = Player(session.node, args.bag, options, stop_event=session.stop)
        if args.wait_for:
            print(f"waiting for subscribers on {', '.join(args.wait_for)}", flush=True)
            player.wait_for_subscribers(args.wait_for, args.wait_timeout)
        print(f"playing {args.bag} at rate {args.rate:g}", flush=True)
        report = player.play()
    print(json.dumps(report.summary(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
