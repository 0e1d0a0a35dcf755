"""Bag files without DDS: what diffpose-make-bag writes, and what diffpose-score computes from bags.

The made bag is read back with ``rosbags`` (its own CDR decoder, independent of ours) and with rclpy;
the score is checked on doctored output bags whose errors are known by construction.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ros_harness import FRAME_POSES, ros_disabled

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

from diffpose_ros.bags.bagfile import BagWriter, QosSpec, bag_topics, decode, read_messages  # noqa: E402
from diffpose_ros.bags.read import read_estimates, read_truth, targets_for  # noqa: E402
from diffpose_ros.bags.score import score_frames  # noqa: E402
from diffpose_ros.cli import make_bag, score  # noqa: E402
from diffpose_ros.core.frames.prepare import line_integrals_from_transmission  # noqa: E402
from diffpose_ros.core.geometry import metrics, se3  # noqa: E402
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose  # noqa: E402
from diffpose_ros.core.io.files import save_json  # noqa: E402
from diffpose_ros.core.registration.similarity import ncc  # noqa: E402
from diffpose_ros.core.rendering.renderer import Renderer  # noqa: E402
from diffpose_ros.core.rendering.volume import hu_to_mu  # noqa: E402
from diffpose_ros.ros.conversions import image_to_numpy  # noqa: E402

SIZE, SPACING, FPS = 128, 2.4, 10.0


def frame_poses(center) -> torch.Tensor:
    return torch.stack(
        [
            carm_pose(
                math.radians(a), math.radians(b), math.radians(g), sod, center + torch.tensor(off, dtype=torch.float64)
            )
            for (a, b, g), sod, off in FRAME_POSES[:3]
        ]
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from diffpose_ros.core.rendering.volume import default_ct_path, load_ct

    d = tmp_path_factory.mktemp("bags")
    hu = load_ct(default_ct_path())
    poses = frame_poses(hu.center)
    save_json(d / "poses.json", {"poses": [{"T_ct_source": T} for T in poses]})
    args = [
        "--out",
        str(d / "bag"),
        "--poses",
        str(d / "poses.json"),
        "--fps",
        str(FPS),
        "--size",
        str(SIZE),
        str(SIZE),
        "--pixel-mm",
        str(SPACING),
        "--seed",
        "3",
    ]
    assert make_bag.main(args) == 0
    return d, hu, poses


@pytest.mark.slow
def test_made_bag_reads_back_with_rosbags_and_rclpy(made):
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    d, hu, poses = made
    store = get_typestore(Stores.ROS2_KILTED)
    by_topic: dict[str, list] = {}
    with Reader(d / "bag") as reader:
        assert any(p.suffix == ".mcap" for p in (d / "bag").iterdir())
        types = {c.topic: c.msgtype for c in reader.connections}
        for conn, t_ns, raw in reader.messages():
            by_topic.setdefault(conn.topic, []).append((t_ns, store.deserialize_cdr(raw, conn.msgtype), raw))
    assert types == {
        "/carm/image_raw": "sensor_msgs/msg/Image",
        "/carm/camera_info": "sensor_msgs/msg/CameraInfo",
        "/tf_ground_truth": "tf2_msgs/msg/TFMessage",
        "/diffpose/scene": "std_msgs/msg/String",
    }
    images, infos, truths = by_topic["/carm/image_raw"], by_topic["/carm/camera_info"], by_topic["/tf_ground_truth"]
    assert len(images) == len(infos) == len(truths) == 3

    def ns(stamp):
        return stamp.sec * 1_000_000_000 + stamp.nanosec

    image_stamps = [ns(m.header.stamp) for _, m, _ in images]
    assert (
        image_stamps
        == [ns(m.header.stamp) for _, m, _ in infos]
        == [ns(m.transforms[0].header.stamp) for _, m, _ in truths]
    )
    assert image_stamps == [t for t, _, _ in images], "messages are logged at their stamps"
    assert np.allclose(np.diff(image_stamps) * 1e-9, 1 / FPS, atol=1e-6)
    renderer = Renderer(hu_to_mu(hu))
    for (_, img, raw), (_, info, _), (_, tf, _), T in zip(images, infos, truths, poses):
        assert (img.encoding, img.width, img.height, img.step) == ("mono16", SIZE, SIZE, 2 * SIZE)
        assert img.header.frame_id == "carm_source_optical"
        assert tf.transforms[0].header.frame_id == "ct" and tf.transforms[0].child_frame_id == "carm_source_optical_gt"
        t = tf.transforms[0].transform.translation
        assert np.allclose([t.x, t.y, t.z], (T[:3, 3] / 1000).numpy(), atol=1e-9)
        assert np.allclose(info.k, [1020 / SPACING, 0, (SIZE - 1) / 2, 0, 1020 / SPACING, (SIZE - 1) / 2, 0, 0, 1])
        # rclpy decodes the same bytes to the same pixels; the frame is the DRR at the true pose.
        pixels = image_to_numpy(decode(raw, "sensor_msgs/msg/Image"))
        assert np.array_equal(pixels, np.frombuffer(img.data.tobytes(), np.uint16).reshape(SIZE, SIZE))
        drr = renderer.render(T, Intrinsics.from_detector(1020.0, SIZE, SIZE, SPACING))
        assert float(ncc(line_integrals_from_transmission(pixels), drr.float(), dims=2)) > 0.95
    scene = json.loads(by_topic["/diffpose/scene"][0][1].data)
    assert len(scene["targets_ct_mm"]) > 10 and scene["frames"] == 3 and scene["ct"].endswith("cxr.nii.gz")


@pytest.mark.slow
def test_make_bag_mirrored_mono8_sqlite(made, tmp_path):
    d, hu, poses = made
    args = [
        "--out",
        str(tmp_path / "m"),
        "--poses",
        str(d / "poses.json"),
        "--size",
        "96",
        "64",
        "--pixel-mm",
        "3.0",
        "--encoding",
        "mono8",
        "--mirror",
        "--storage",
        "sqlite3",
        "--principal-point",
        "50",
        "30",
        "--seed",
        "3",
    ]
    assert make_bag.main(args) == 0
    assert any(p.suffix == ".db3" for p in (tmp_path / "m").iterdir())
    msgs = {
        t: decode(raw, mt) for t, mt, _, raw in read_messages(tmp_path / "m", ["/carm/image_raw", "/carm/camera_info"])
    }
    image, info = msgs["/carm/image_raw"], msgs["/carm/camera_info"]
    assert (image.encoding, image.width, image.height) == ("mono8", 96, 64)
    assert info.k[2] == pytest.approx(95 - 50) and info.k[5] == pytest.approx(30), "camera_info of the mirrored image"


@pytest.mark.slow
def test_make_bag_round_field_and_text_frames_are_masked(made, tmp_path):
    """--round-field and --burned-in-text make clinical-looking frames; the node's preparation step
    (here through the scorer's image_to_frame) leaves the black corners and the text out."""
    from diffpose_ros.ros.conversions import camera_info_to_intrinsics, image_to_frame

    d, hu, poses = made
    args = ["--out", str(tmp_path / "r"), "--poses", str(d / "poses.json"), "--round-field", "0.45"]
    assert make_bag.main([*args, "--burned-in-text", "--seed", "4"]) == 0
    msgs = {
        t: decode(raw, mt) for t, mt, _, raw in read_messages(tmp_path / "r", ["/carm/image_raw", "/carm/camera_info"])
    }
    pixels = image_to_numpy(msgs["/carm/image_raw"])
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 0 and (pixels == 65535).sum() > 50  # field edge, text
    frame = image_to_frame(msgs["/carm/image_raw"], camera_info_to_intrinsics(msgs["/carm/camera_info"]))
    assert 0.5 < frame.valid_fraction < 0.63  # the disk (pi 0.45^2 = 0.64) less its margin
    assert not frame.mask[0, 0] and not frame.mask[torch.from_numpy(pixels == 65535)].any()
    assert make_bag.main(["--out", str(tmp_path / "bad"), "--views", "1", "--round-field", "0.9"]) == 2
    assert make_bag.main(["--out", str(tmp_path / "none"), "--sweep", "0"]) == 2  # not a silent 24
    assert make_bag.main(["--out", str(tmp_path / "neg"), "--views", "1", "--i0", "-1"]) == 2


@pytest.mark.slow
def test_make_bag_without_quantum_noise(made, tmp_path):
    """``--i0 0``: no quantum noise (the simulation's own convention), on the same scale as with it."""
    d, _, _ = made
    first = {}
    for name, i0 in (("quiet", "0"), ("noisy", "20000")):
        args = ["--out", str(tmp_path / name), "--poses", str(d / "poses.json"), "--i0", i0, "--blur", "0"]
        assert make_bag.main(args) == 0
        raw = next(raw for _, _, _, raw in read_messages(tmp_path / name, ["/carm/image_raw"]))
        first[name] = image_to_numpy(decode(raw, "sensor_msgs/msg/Image")).astype(np.float64)
    quiet, noisy = first["quiet"], first["noisy"]
    assert quiet.max() > 1000 and np.median(noisy / np.maximum(quiet, 1)) == pytest.approx(1.0, abs=0.05)


@pytest.mark.slow
def test_make_bag_clinical_video(made, tmp_path, capsys):
    """--clinical all with mono8: 8-bit video spanning the range, its field and text masked; the scene
    names the factors; an unknown factor is refused."""
    from diffpose_ros.ros.conversions import camera_info_to_intrinsics, image_to_frame

    d, _, _ = made
    args = ["--out", str(tmp_path / "c"), "--poses", str(d / "poses.json"), "--encoding", "mono8"]
    assert make_bag.main([*args, "--clinical", "all", "--seed", "2"]) == 0
    topics = ["/carm/image_raw", "/carm/camera_info", "/diffpose/scene"]
    msgs = {t: decode(raw, mt) for t, mt, _, raw in read_messages(tmp_path / "c", topics)}
    pixels = image_to_numpy(msgs["/carm/image_raw"])
    assert pixels.dtype == np.uint8 and pixels[0, 0] == 0 and pixels.max() == 255
    frame = image_to_frame(msgs["/carm/image_raw"], camera_info_to_intrinsics(msgs["/carm/camera_info"]))
    assert 0.4 < frame.valid_fraction < 0.63
    clinical = json.loads(msgs["/diffpose/scene"].data)["exposure"]["clinical"]
    assert clinical["display"] and clinical["metal"] == 2 and clinical["field"] == 0.45 and not clinical["inverted"]
    assert json.loads(msgs["/diffpose/scene"].data)["exposure"]["recursive_filter"] is None
    # A flat panel's video lags behind motion: its sequence records the recursive filter's weight.
    assert make_bag.main([*args[:1], str(tmp_path / "f"), *args[2:], "--clinical", "fp:display", "--seed", "2"]) == 0
    scene = json.loads(decode(*next((raw, mt) for _, mt, _, raw in read_messages(tmp_path / "f", topics[2:]))).data)
    assert 0.35 <= scene["exposure"]["recursive_filter"] <= 0.7 and scene["exposure"]["clinical"]["family"] == "fp"
    assert make_bag.main(["--out", str(tmp_path / "g"), "--views", "1", "--clinical", "glare"]) == 2
    assert "unknown clinical factor" in capsys.readouterr().err


@pytest.mark.slow
def test_make_bag_with_another_renderers_physics(made, tmp_path):
    """--renderer diffdrr: frames from DiffDRR's Siddon with its own HU-to-density map (a foreign run),
    the same view as our renderer's (NCC > 0.9 of the line integrals) but not the same image."""
    pytest.importorskip("diffdrr")
    from diffpose_ros.ros.conversions import camera_info_to_intrinsics, image_to_frame

    d, _, _ = made
    frames = {}
    for renderer in ("ours", "diffdrr"):
        out = tmp_path / renderer
        args = ["--out", str(out), "--poses", str(d / "poses.json"), "--size", "64", "64", "--pixel-mm", "4.8"]
        assert make_bag.main([*args, "--renderer", renderer]) == 0
        topics = ["/carm/image_raw", "/carm/camera_info", "/diffpose/scene"]
        msgs = {t: decode(raw, mt) for t, mt, _, raw in read_messages(out, topics)}
        assert json.loads(msgs["/diffpose/scene"].data)["renderer"] == renderer
        frame = image_to_frame(msgs["/carm/image_raw"], camera_info_to_intrinsics(msgs["/carm/camera_info"]))
        frames[renderer] = frame.image.flatten().double()
    similarity = float(ncc(frames["ours"], frames["diffdrr"]))
    assert 0.9 < similarity < 0.9999, similarity


@pytest.mark.slow
def test_make_bag_refuses_to_overwrite_and_bad_pose_files(made, tmp_path, capsys):
    d, _, _ = made
    assert make_bag.main(["--out", str(d / "bag"), "--views", "1"]) == 2
    assert "exists already" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"poses": [[[1, 0, 0, 0], [0, 1, 0, 0]]]}))
    assert make_bag.main(["--out", str(tmp_path / "x"), "--poses", str(tmp_path / "bad.json")]) == 2
    assert "pose 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ score
def _doctored(truth_bag, out, edit, delay_s=0.25, drop=(), invert=False):
    """An output bag like a recorder's: camera_info arrivals at the stamp, /tf ``delay_s`` later with
    ``edit(T_true)``; frames in ``drop`` get no pose."""
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage

    from diffpose_ros.ros.conversions import matrix_to_transform, transform_to_matrix

    with BagWriter(out) as bag:
        bag.add_topic("/tf", "tf2_msgs/msg/TFMessage", QosSpec())
        bag.add_topic("/carm/camera_info", "sensor_msgs/msg/CameraInfo", QosSpec())
        truths = {}
        for topic, mt, t_ns, raw in read_messages(truth_bag, ["/tf_ground_truth", "/carm/camera_info"]):
            if topic == "/carm/camera_info":
                bag.write(topic, t_ns, raw)
            else:
                truths[t_ns] = decode(raw, mt).transforms[0]
        for i, (t_ns, ts) in enumerate(sorted(truths.items())):
            if i in drop:
                continue
            T = edit(transform_to_matrix(ts.transform))
            out_ts = TransformStamped(header=ts.header, child_frame_id="carm_source_optical")
            if invert:
                out_ts.header.frame_id, out_ts.child_frame_id = "carm_source_optical", "ct"
                T = np.linalg.inv(T)
            out_ts.transform = matrix_to_transform(T)
            bag.write("/tf", t_ns + round(delay_s * 1e9), TFMessage(transforms=[out_ts]))


def test_score_reports_known_errors(made, tmp_path, capsys):
    d, _, poses = made
    shift = np.eye(4)
    shift[0, 3] = 1.5  # 1.5 mm along the source x axis: every target moves by exactly 1.5 mm
    _doctored(d / "bag", tmp_path / "est", lambda T: T @ shift, delay_s=0.25, drop={1})
    assert (
        score.main(["--truth", str(d / "bag"), "--estimate", str(tmp_path / "est"), "--out", str(tmp_path / "r")]) == 0
    )
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["frames"] == 3 and summary["frames_with_pose"] == 2 and summary["frames_without_pose"] == 1
    assert summary["median_mtre_mm"] == pytest.approx(1.5, abs=1e-6)
    assert summary["mean_mtre_mm"] == pytest.approx(1.5, abs=1e-6)
    assert summary["success_rate_2mm"] == pytest.approx(2 / 3) and summary["success_rate_1mm"] == 0.0
    assert summary["median_translation_mm"] == pytest.approx(1.5, abs=1e-6)
    assert summary["median_rotation_deg"] == pytest.approx(0.0, abs=1e-5)
    assert summary["median_latency_s"] == pytest.approx(0.25, abs=1e-6)
    assert "input arrival" in summary["latency_source"]
    for name in ("report.md", "frames.json", "error_over_time.png", "error_histogram.png"):
        assert (tmp_path / "r" / name).is_file()
    assert len(list((tmp_path / "r").glob("overlay_*.png"))) >= 1
    assert "3D mTRE median 1.500 mm" in capsys.readouterr().out


def test_score_rotation_error_matches_metrics_and_inverted_tf(made, tmp_path):
    d, hu, poses = made
    R = se3.exp(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, math.radians(1.0)], dtype=torch.float64)).numpy()
    _doctored(d / "bag", tmp_path / "est", lambda T: T @ R, invert=True)
    truth = read_truth(d / "bag")
    estimates = read_estimates(tmp_path / "est", "ct", truth.camera_frame)
    targets, _ = targets_for(truth, None)
    rows = score_frames(truth, estimates, targets, 1020.0)
    expected = [float(metrics.mtre(T @ torch.from_numpy(R), T, targets)) for T in poses]
    assert [r["mtre_mm"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert all(r["rotation_deg"] == pytest.approx(1.0, abs=1e-6) for r in rows)


def test_score_refuses_what_is_not_a_bag(tmp_path, capsys):
    assert score.main(["--truth", str(tmp_path), "--estimate", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "metadata.yaml" in capsys.readouterr().err


def test_bag_topics_keep_offered_qos(tmp_path):
    from std_msgs.msg import String

    with BagWriter(tmp_path / "q", "sqlite3") as bag:
        bag.add_topic("/latched", "std_msgs/msg/String", QosSpec.named("latched"))
        bag.add_topic("/fast", "std_msgs/msg/String", QosSpec.named("sensor_data"))
        bag.write("/latched", 1, String(data="a"))
    topics = bag_topics(tmp_path / "q")
    assert topics["/latched"].qos == QosSpec(True, True, 1) and topics["/latched"].count == 1
    assert topics["/fast"].qos.reliable is False and topics["/fast"].count == 0


def test_replay_waits_for_acknowledgements_in_short_waits(monkeypatch):
    """After playing, a replay waits for each reliable topic's acknowledgements in short waits with
    sleeps between: one long wait in rclpy lets no other thread of the process run (the main job's
    recorder logged the last pose 2.6 s late), and a stop must end the wait. A topic still not
    acknowledged at the deadline is named. The clock is a stand-in that the sleeps advance."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from diffpose_ros.bags import replay

    class Clock:  # time.monotonic() for replay, advanced only by the stop event's waits
        now = 0.0

        def monotonic(self) -> float:
            return self.now

    class Stop:
        def __init__(self, clock: Clock):
            self.clock, self.stopped = clock, False

        def is_set(self) -> bool:
            return self.stopped

        def wait(self, seconds: float) -> bool:
            self.clock.now += seconds
            return self.stopped

    class Publisher:
        def __init__(self, acked_after: int):
            self.waits: list[float] = []
            self.acked_after = acked_after
            self.qos_profile = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)

        def wait_for_all_acked(self, timeout) -> bool:
            self.waits.append(timeout.nanoseconds * 1e-9)
            return len(self.waits) > self.acked_after

    clock = Clock()
    monkeypatch.setattr(replay, "time", clock)
    player = replay.Player.__new__(replay.Player)  # only what _deliver reads; a real one needs a node and a bag
    player.options, player.stop_event = replay.ReplayOptions(remap={"/never": "/renamed"}), Stop(clock)
    player._publishers = {"/acked": Publisher(3), "/never": Publisher(10**9)}
    assert player._deliver(10.0) == ["/renamed"]
    acked, never = player._publishers["/acked"], player._publishers["/never"]
    assert len(acked.waits) == 4 and max(acked.waits + never.waits) <= 0.05
    assert 10.0 < clock.now < 10.2 and len(never.waits) > 100  # polled until the deadline, in short waits
    player.stop_event.stopped = True
    never.waits.clear()
    assert player._deliver(60.0) == ["/renamed"] and len(never.waits) == 1
