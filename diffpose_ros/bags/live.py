"""A live run: replay a ground-truth bag into a running node and record its answers, in one process.

The node runs elsewhere (its own process, as in the OR). This process replays the bag's frames
(:class:`~.replay.Player`, original timing divided by the rate) and records the node's outputs plus
the replayed ``camera_info`` (:class:`~.record.Recorder`, for stamp-independent latency). It prints
each pose as it arrives, checked against the ground truth, and stops once the node has answered
every frame (a pose or a frame status on ``/diagnostics`` for each stamp) and the frame status of
each answered frame has come too (the node sends it after the pose; at most ``STATUS_GRACE_S``
longer), or ``settle_s`` after the last frame went out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffpose_ros.core import parse_stamp, stamp_from_ns, stamp_ns
from diffpose_ros.core.geometry import metrics

from .bagfile import decode
from .read import Truth, tf_pose
from .record import Recorder
from .replay import Player, ReplayOptions

__all__ = ["LiveResult", "run_live"]

STATUS_GRACE_S = 2.0
"""After the last answer, how long a run still waits for frame statuses not yet recorded (s)."""


@dataclass
class LiveResult:
    recorded: dict[str, int]
    replay: dict
    answered: int
    frames: int


def run_live(
    session,
    truth: Truth,
    out_bag: str | Path,
    options: ReplayOptions,
    outputs: list[str],
    targets_ct_mm: torch.Tensor,
    wait_timeout_s: float = 120.0,
    settle_s: float = 30.0,
    ct_frame: str | None = None,
    camera_frame: str | None = None,
    log=print,
) -> LiveResult:
    """Replay ``truth.bag`` through ``session.node`` (a :class:`~diffpose_ros.ros.runtime.RosSession`)
    and record ``outputs`` (absolute topics, all published by the node) plus the replayed camera_info
    into ``out_bag``.

    A frame's pose is the ``/tf`` transform between ``ct_frame`` (default: the scene's, else ``ct``)
    and ``camera_frame`` (default: the images' ``frame_id``) at its stamp, in either direction."""
    image_topic = options.remap.get(truth.image_topic, truth.image_topic) if truth.image_topic else None
    info_topic = (
        options.remap.get(truth.camera_info_topic, truth.camera_info_topic) if truth.camera_info_topic else None
    )
    if image_topic is None:
        raise ValueError(f"{truth.bag} has no sensor_msgs/Image topic to replay")
    frames = set(truth.frames)
    ct_frame = ct_frame or truth.scene.get("ct_frame", "ct")
    camera_frame = camera_frame or truth.camera_frame
    answered: set[int] = set()
    with_status: set[int] = set()  # stamps whose frame status on /diagnostics was recorded

    def on_output(topic: str, t_ns: int, raw: bytes) -> None:
        if topic == "/tf":
            for ts in decode(raw, "tf2_msgs/msg/TFMessage").transforms:
                stamp = stamp_ns(ts.header.stamp)
                T = tf_pose(ts, ct_frame, camera_frame)
                if stamp not in frames or stamp in answered or T is None:
                    continue
                answered.add(stamp)
                error = ""
                if stamp in truth.poses:
                    e = float(metrics.mtre(torch.from_numpy(T), torch.from_numpy(truth.poses[stamp]), targets_ct_mm))
                    error = f", 3D mTRE {e:.2f} mm"
                t = T[:3, 3] / 1000  # the source in ct, metres
                log(
                    f"  TF {ts.header.frame_id} -> {ts.child_frame_id} @ {stamp_from_ns(stamp)}: "
                    f"t = ({t[0]:+.4f}, {t[1]:+.4f}, {t[2]:+.4f}) m{error}  [{len(answered)}/{len(frames)}]"
                )
        elif topic == "/diagnostics":
            for status in decode(raw, "diagnostic_msgs/msg/DiagnosticArray").status:
                if not status.name.endswith(": frame"):
                    continue
                values = {kv.key: kv.value for kv in status.values}
                stamp = parse_stamp(values.get("stamp", "0.0"), strict=False)
                with_status.add(stamp)
                if status.level != 0 and stamp in frames and stamp not in answered:
                    answered.add(stamp)
                    log(f"  no pose @ {stamp_from_ns(stamp)}: {status.message}  [{len(answered)}/{len(frames)}]")

    topics = list(dict.fromkeys([*outputs, *([info_topic] if info_topic else [])]))
    recorder = Recorder(session.node, out_bag, topics, on_message=on_output)
    player = Player(session.node, truth.bag, options, stop_event=session.stop)
    try:
        player.wait_for_subscribers([image_topic, *([info_topic] if info_topic else [])], wait_timeout_s)
        # The recorder must be matched with every output (and the replayed camera_info) before the
        # first frame goes out: DDS does not deliver what was published before the match.
        deadline = time.monotonic() + wait_timeout_s
        while not all(recorder.matched(t) for t in topics):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no publisher matched on {', '.join(t for t in topics if not recorder.matched(t))}")
            session.wait(0.05)
        log(f"replaying {len(frames)} frames from {truth.bag} at rate {options.rate:g} onto {image_topic}")
        report = player.play()
        deadline = time.monotonic() + settle_s
        while len(answered) < len(frames) and time.monotonic() < deadline and not session.stop.is_set():
            session.wait(0.1)
        deadline = min(deadline, time.monotonic() + STATUS_GRACE_S)
        while answered - with_status and time.monotonic() < deadline and not session.stop.is_set():
            session.wait(0.05)
    finally:
        recorded = recorder.close()
    return LiveResult(recorded, report.summary(), len(answered), len(frames))
