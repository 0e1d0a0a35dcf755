"""The OpenIGTLink bridge without DDS: pairing, validity and staleness (:class:`Bridge` driven with plain
messages and a fake clock), and the transport (:mod:`diffpose_ros.ros.igtl.link`) against pyigtl
clients, a pyigtl server that restarts, a client sending garbage and one that never reads."""

from __future__ import annotations

import json
import math
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pyigtl
import pytest
import torch

from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
from diffpose_ros.core.geometry.conventions import fluoro_ijk_to_world
from diffpose_ros.core.navigation.stamps import stamp_from_ns
from diffpose_ros.core.navigation.status import PoseStatus
from diffpose_ros.ros.conversions import CT_TO_CT_RAS, intrinsics_to_camera_info, numpy_to_image, transform_stamped
from diffpose_ros.ros.igtl import link as igtl_link
from diffpose_ros.ros.igtl.bridge import PAIR_TIMEOUT_S, Bridge, BridgeSettings
from diffpose_ros.ros.igtl.link import IgtlClient, IgtlServer, parse_endpoint
from diffpose_ros.ros.igtl.navigator import Receiver, free_port, wait_until

FRAME = "carm_source_optical"
K = Intrinsics.from_detector(1020.0, 64, 48, 4.8, principal_point=(30.0, 25.5))


def _pose(offset: float = 0.0) -> np.ndarray:
    centre = torch.tensor([10.0 + offset, -20.0, 200.0], dtype=torch.float64)
    return carm_pose(math.radians(12.0), math.radians(-5.0), 0.1, 750.0, centre).numpy()


def _stamp(ns: int):
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _header(ns: int, frame_id: str = FRAME):
    from std_msgs.msg import Header

    return Header(stamp=_stamp(ns), frame_id=frame_id)


def _tf(T, ns: int, parent="ct", child=FRAME, invert=False):
    from tf2_msgs.msg import TFMessage

    return TFMessage(transforms=[transform_stamped(T, _stamp(ns), parent, child, invert)])


def _status(ns: int, valid=True, reason="", similarity=0.8) -> str:
    return PoseStatus(valid, reason, similarity, 0.1, stamp_from_ns(ns), "cnn" if valid else None, FRAME).to_json()


class Harness:
    """A :class:`Bridge` with a fake monotonic clock and a list of what it sent."""

    def __init__(self, **settings):
        self.now = 100.0
        self.sent: list = []
        defaults = {"stale_after_s": 1.0, "sdd_mm": 1020.0}
        self.bridge = Bridge(
            BridgeSettings(**{**defaults, **settings}),
            self.sent.extend,
            monotonic=lambda: self.now,
            now_ns=lambda: 5_000_000_000_000,
        )
        static = _tf(CT_TO_CT_RAS, 0, "ct", "ct_ras")
        self.bridge.on_tf(static, static=True)

    def frame(self, ns: int, pixels=None, mirror_info=False):
        pixels = np.arange(K.width * K.height, dtype=np.uint16).reshape(K.height, K.width) if pixels is None else pixels
        info_k = K.mirrored() if mirror_info else K
        self.bridge.on_camera_info(intrinsics_to_camera_info(info_k, header=_header(ns)))
        self.bridge.on_image(numpy_to_image(pixels, "mono16", header=_header(ns)))
        return pixels

    def of(self, device, kind=None):
        return [m for m in self.sent if m.device_name == device and (kind is None or m.message_type == kind)]


def _unpacked(message):
    """The message as a receiver sees it (packed by pyigtl, unpacked again)."""
    data = message.pack()
    fields = pyigtl.MessageBase.parse_header(data[: pyigtl.MessageBase.IGTL_HEADER_SIZE])
    out = pyigtl.MessageBase.create_message(fields["message_type"])
    out.unpack(fields, data[pyigtl.MessageBase.IGTL_HEADER_SIZE :])
    return out


# ----------------------------------------------------------------------------------- the bridge
@pytest.mark.parametrize("tf_first", [True, False])
def test_accepted_frame_sends_transform_status_and_image(tf_first):
    h = Harness()
    ns, T = 1_700_000_000_123_456_789, _pose()
    pixels = h.frame(ns)
    events = [lambda: h.bridge.on_tf(_tf(T, ns)), lambda: h.bridge.on_status(_status(ns))]
    for event in events if tf_first else events[::-1]:
        event()
    (transform,) = h.of("CArmToCT")
    transform = _unpacked(transform)
    assert transform.message_type == "TRANSFORM" and transform.metadata == {"TransformStatus": "OK"}
    np.testing.assert_allclose(transform.matrix, CT_TO_CT_RAS @ T, atol=1e-3)
    assert transform.timestamp == pytest.approx(ns * 1e-9, abs=1e-6)
    (string,) = h.of("DiffPoseStatus")
    doc = json.loads(_unpacked(string).string)
    assert doc["valid"] is True and doc["stamp"] == stamp_from_ns(ns) and doc["source"] == "cnn"
    assert doc["similarity"] == 0.8 and doc["latency_s"] == pytest.approx(5000 - ns * 1e-9)
    (image,) = h.of("Fluoro")
    image = _unpacked(image)
    assert image.world_coordinate_system == "ras" and image.image.shape == (1, K.height, K.width)
    np.testing.assert_array_equal(image.image[0], pixels)
    expected = fluoro_ijk_to_world(CT_TO_CT_RAS @ T, K.fx, K.fy, K.cx, K.cy, 1020.0)
    np.testing.assert_allclose(image.ijk_to_world_matrix, expected, atol=1e-2)


def test_image_after_its_pose_and_inverted_tf_and_mirror():
    h = Harness(mirror=True)
    ns, T = 2_000_000_000, _pose()
    h.bridge.on_camera_info(intrinsics_to_camera_info(K.mirrored(), header=_header(ns)))
    h.bridge.on_tf(_tf(T, ns, invert=True))  # frame -> ct (invert:=true on the node)
    h.bridge.on_status(_status(ns))
    assert len(h.of("CArmToCT")) == 1 and not h.of("Fluoro")
    np.testing.assert_allclose(h.of("CArmToCT")[0].matrix, CT_TO_CT_RAS @ T, atol=1e-3)
    h.bridge.on_image(numpy_to_image(np.zeros((K.height, K.width), np.uint8), "mono8", header=_header(ns)))
    (image,) = h.of("Fluoro")
    m = K.mirrored()
    expected = fluoro_ijk_to_world(CT_TO_CT_RAS @ T, m.fx, m.fy, m.cx, m.cy, 1020.0, True)
    np.testing.assert_allclose(image.ijk_to_world_matrix, expected, atol=1e-2)
    assert image.image.dtype == np.uint8


def test_rejected_frame_sends_invalid_with_the_last_transform():
    h = Harness()
    T = _pose()
    h.frame(1_000)
    h.bridge.on_tf(_tf(T, 1_000))
    h.bridge.on_status(_status(1_000))
    h.frame(2_000)
    h.bridge.on_tf(_tf(_pose(50.0), 2_000))  # a TF at a rejected stamp is never sent
    h.bridge.on_status(_status(2_000, valid=False, reason="rejected by the gate: similarity 0.1", similarity=0.1))
    first, second = h.of("CArmToCT")
    assert second.metadata == {"TransformStatus": "INVALID"}
    np.testing.assert_allclose(second.matrix, first.matrix)
    doc = json.loads(h.of("DiffPoseStatus")[-1].string)
    assert doc["valid"] is False and doc["reason"] == "rejected by the gate: similarity 0.1"
    assert doc["stamp"] == stamp_from_ns(2_000) and doc["source"] is None
    assert len(h.of("Fluoro")) == 1


def test_invalid_before_any_pose_sends_identity():
    h = Harness()
    h.bridge.on_status(_status(3_000, valid=False, reason="bad frame: constant image"))
    (transform,) = h.of("CArmToCT")
    assert transform.metadata["TransformStatus"] == "INVALID"
    np.testing.assert_array_equal(transform.matrix, np.eye(4))


def test_stale_after_stale_after_s_and_repeated():
    h = Harness(stale_after_s=1.0)
    h.frame(1_000)
    h.bridge.on_tf(_tf(_pose(), 1_000))
    h.bridge.on_status(_status(1_000))
    h.now += 0.9
    h.bridge.tick()
    assert len(h.sent) == 3  # transform, status, image: not stale yet
    h.now += 0.2
    h.bridge.tick()
    transform, string = h.sent[-2:]
    assert transform.metadata["TransformStatus"] == "INVALID"
    doc = json.loads(string.string)
    assert doc["reason"] == "stale" and doc["valid"] is False and doc["latency_s"] is None
    h.now += 0.5
    h.bridge.tick()
    assert len(h.sent) == 5  # once per stale_after_s (at least 1 s)
    h.now += 0.6
    h.bridge.tick()
    assert len(h.sent) == 7


def test_never_a_pose_goes_stale_and_malformed_status_is_ignored():
    h = Harness(stale_after_s=0.5)
    h.bridge.on_status("not json")
    h.bridge.tick()
    assert not h.sent
    h.now += 0.6
    h.bridge.tick()
    assert json.loads(h.of("DiffPoseStatus")[0].string)["reason"] == "stale"


def test_accepted_status_without_its_tf_is_dropped():
    h = Harness(stale_after_s=100.0)
    h.bridge.on_status(_status(7_000))  # e.g. the latched status of a frame from before the bridge started
    h.now += PAIR_TIMEOUT_S + 0.1
    h.bridge.tick()
    h.bridge.on_tf(_tf(_pose(), 7_000))  # too late
    assert not h.sent


def test_settings_problems_and_endpoints():
    assert not BridgeSettings().problems()
    assert BridgeSettings(port=70000, transform_device="x" * 21, image_qos="fast").problems()
    typed = BridgeSettings.from_parameters({"sdd_mm": 1020, "stale_after_s": 2, "port": 0})
    assert (typed.sdd_mm, typed.stale_after_s, typed.port) == (1020.0, 2.0, 0) and not typed.problems()
    wrong = BridgeSettings.from_parameters({"sdd_mm": "far", "mirror": 1})
    assert wrong.problems() == ["sdd_mm must be a number (got 'far')", "mirror must be true or false (got 1)"]
    assert parse_endpoint("navigator:18945") == ("navigator", 18945)
    assert parse_endpoint("10.0.0.2") == ("10.0.0.2", 18944)
    with pytest.raises(ValueError):
        parse_endpoint("host:port")


def test_navigator_score_of_what_the_bridge_sent():
    """score_navigator: OK TRANSFORMs back in ct LPS against the truth (one exact, one 1 mm off), the
    INVALID ones by reason, IMAGEs and statuses counted, the node's TFs matched by stamp."""
    from diffpose_ros.bags.read import Truth
    from diffpose_ros.bags.score import score_navigator

    h = Harness()
    ns = [1_700_000_000_123_456_789 + k * 200_000_000 for k in range(3)]
    T = [_pose(), _pose(5.0)]
    for stamp, pose in zip(ns, T, strict=False):
        h.frame(stamp)
        h.bridge.on_tf(_tf(pose, stamp))
        h.bridge.on_status(_status(stamp))
    h.bridge.on_status(_status(ns[2], valid=False, reason="constant image"))
    h.now += 2.0
    h.bridge.tick()
    truth_1mm_off = T[1].copy()
    truth_1mm_off[:3, 3] += [0.6, 0.0, 0.8]
    truth = Truth(Path("."), ns, {ns[0]: T[0], ns[1]: truth_1mm_off, ns[2]: T[1]}, None, FRAME, None, None)
    targets = torch.tensor([[0.0, 0.0, 0.0], [30.0, -20.0, 210.0], [-40.0, 15.0, 180.0]], dtype=torch.float64)
    n = score_navigator([_unpacked(m) for m in h.sent], truth, targets, node_stamps=ns[:2])
    assert n["median_mtre_mm"] == pytest.approx(0.5, abs=1e-3) and n["max_mtre_mm"] == pytest.approx(1.0, abs=1e-3)
    assert {k: v for k, v in n.items() if not k.endswith("_mtre_mm")} == {
        "transforms": 4,
        "transforms_ok": 2,
        "transforms_invalid": 2,
        "invalid_reasons": {"constant image": 1, "stale": 1},
        "images": 2,
        "images_at_ok_transforms": 2,
        "statuses": 4,
        "statuses_valid": 2,
        "ok_transforms_scored": 2,
        "node_tfs": 2,
        "node_tfs_with_ok_transform": 2,
    }


# ---------------------------------------------------------------------------------- transport
def _transform(i: float, device="CArmToCT"):
    m = np.eye(4)
    m[0, 3] = i
    return pyigtl.TransformMessage(m, device_name=device)


def test_server_serves_clients_independently_and_survives_bad_ones(monkeypatch):
    # Short enough that the silent client goes soon, long enough for a reader on a loaded 2-core machine.
    monkeypatch.setattr(igtl_link, "SEND_TIMEOUT_S", 2.0)
    server = IgtlServer(0, "127.0.0.1")
    try:
        first = Receiver(server.port, unpack_images=False)
        wait_until(lambda: server.connections == 1, 5, "the first client")
        server.send([_transform(1.0)])
        first.wait(lambda: first.of("CArmToCT"), 5, "the first transform")
        # A second client gets the current state at once, then disconnects.
        second = Receiver(server.port)
        second.wait(lambda: second.of("CArmToCT"), 5, "the state for a new client")
        second.close()
        # A client that sends garbage is dropped; one that never reads is dropped once its buffers fill.
        garbage = socket.create_connection(("127.0.0.1", server.port))
        garbage.sendall(b"\xff" * 200)
        silent = socket.create_connection(("127.0.0.1", server.port))
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # 12 frames: 24 messages, within a connection's queue (QUEUE_MESSAGES), so the reader loses none;
        # 2 MB images fill the silent client's socket buffers.
        big = np.zeros((1, 1024, 1024), np.uint16)
        t0 = time.monotonic()
        for i in range(12):
            server.send([pyigtl.ImageMessage(big, device_name="Fluoro"), _transform(2.0 + i)])
        assert time.monotonic() - t0 < 0.5, "send() must not block"
        first.wait(lambda: len(first.of("CArmToCT")) >= 13, 30, "every transform at the first client")
        assert [m.matrix[0, 3] for m in first.of("CArmToCT")] == [1.0] + [2.0 + i for i in range(12)]
        wait_until(lambda: server.connections == 1, 10, "the garbage and silent clients to be dropped")
        assert not first.closed
        # pyigtl's own client also works.
        client = pyigtl.OpenIGTLinkClient("127.0.0.1", server.port)
        try:
            wait_until(lambda: server.connections == 2, 5, "pyigtl's client")
            server.send([string_message := pyigtl.StringMessage("hello", device_name="DiffPoseStatus")])
            got = client.wait_for_message("DiffPoseStatus", timeout=5)
            assert got is not None and got.string == string_message.string
        finally:
            client.stop()
        for s in (garbage, silent):
            s.close()
        first.close()
    finally:
        server.close()


def test_client_mode_reconnects_to_a_restarted_pyigtl_server():
    port = free_port()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # pyigtl's server replaces them
    client = IgtlClient("127.0.0.1", port)
    servers = []
    try:
        client.send([_transform(1.0)])  # nobody there yet: kept as the state
        for round_ in range(2):
            server = pyigtl.OpenIGTLinkServer(port=port, local_server=True)
            servers.append(server)
            got = server.wait_for_message("CArmToCT", timeout=10)
            assert got is not None, f"no transform after (re)start {round_}"
            for i in range(3):
                client.send([_transform(10.0 * round_ + i)])
                got = server.wait_for_message("CArmToCT", timeout=10)
                assert got is not None and got.matrix[0, 3] in (10.0 * round_ + i, 10.0 * round_ + i - 1)
            server.stop()
            wait_until(lambda: not client.connected, 10, "the client to notice the server went away")
    finally:
        client.close()
        for s in servers:
            s.stop()  # again for the last one: returns at once
        for s, h in handlers.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------ ~/status of the node
def _result(similarity: float, mode: str, accepted: bool):
    from diffpose_ros.core.registration.result import FrameResult, Route

    eye = torch.eye(4, dtype=torch.float64)
    reason = "" if accepted else "similarity"
    return FrameResult(eye, torch.eye(6), similarity, 3, True, accepted, reason, Route(mode), eye)


def test_outcome_status_of_each_kind():
    from diagnostic_msgs.msg import DiagnosticStatus

    from diffpose_ros.ros.status import outcome_status
    from diffpose_ros.ros.worker import Outcome

    header = _header(1_700_000_000_000_000_007)
    published = Outcome("published", DiagnosticStatus.OK, "pose published", {}, _result(0.9, "tracking", True))
    status = outcome_status(published, header, FRAME, 0.25)
    assert (status.valid, status.reason, status.source, status.similarity) == (True, "", "tracking", 0.9)
    assert status.stamp == "1700000000.000000007" and status.latency_s == 0.25 and status.frame_id == FRAME
    message = "rejected by the gate: similarity"
    gate = Outcome("rejected", DiagnosticStatus.ERROR, message, {}, _result(0.2, "cold", False))
    status = outcome_status(gate, header, FRAME, 0.3)
    assert not status.valid and status.reason == gate.message and status.source == "cnn" and status.similarity == 0.2
    refused = Outcome("rejected", DiagnosticStatus.ERROR, "bad frame: constant", {})
    assert outcome_status(refused, header, FRAME, None).source is None
    assert PoseStatus.from_json(outcome_status(refused, header, FRAME, None).to_json()).reason == "bad frame: constant"


# ------------------------------------------------------------------------------ the bridge's node
@pytest.mark.dds
def test_bridge_node_declares_its_table(monkeypatch):
    """``diffpose_igtl`` declares its table's parameters with their descriptors; a float parameter
    takes an integer literal."""
    from ros_harness import rclpy_context, ros_disabled

    if ros_disabled():
        pytest.skip("DIFFPOSE_NO_ROS=1")
    from rclpy.parameter import Parameter

    from diffpose_ros.ros.igtl.bridge import BRIDGE_PARAMETERS
    from diffpose_ros.ros.igtl.node import IgtlNode

    with rclpy_context(monkeypatch) as context:
        overrides = [Parameter("port", value=0), Parameter("sdd_mm", value=1000)]
        node = IgtlNode(context=context, parameter_overrides=overrides)
        try:
            for p in BRIDGE_PARAMETERS:
                d = node.describe_parameter(p.name)
                assert d.read_only and d.description == p.description, p.name
            (port_range,) = node.describe_parameter("port").integer_range
            assert (port_range.from_value, port_range.to_value) == (0, 65535)
            settings = node.bridge.settings
            assert (settings.port, settings.sdd_mm, type(settings.sdd_mm)) == (0, 1000.0, float)
        finally:
            node.close()
            node.destroy_node()
