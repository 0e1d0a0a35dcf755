"""diffpose_node's ``~/status`` and stale diagnostics, and the OpenIGTLink bridge, over real DDS.

One ``diffpose_node`` process and two ``diffpose_igtl`` processes for the module: one serving
OpenIGTLink (a test receiver, a client sending garbage and one that never reads connect to it), one in
client mode connecting to a pyigtl server that starts after it and restarts in the middle. This
process publishes frames and compares what arrives over OpenIGTLink with the node's ``/tf``.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pyigtl
import pytest
from ros_harness import NodeProcess, Probe, domain_id, make_frame, ros_disabled, ros_env, stamp_key

from diffpose_ros.ros.igtl.navigator import Receiver, free_port

pytestmark = pytest.mark.dds

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

STALE_S = 2.0
BRIDGE_EXE = Path(sys.executable).parent / "diffpose-igtl"
DIAG_WARN = b"\x01"


def _bridge(args: list[str], env, log: Path) -> NodeProcess:
    command = [str(BRIDGE_EXE)] if BRIDGE_EXE.is_file() else [sys.executable, "-m", "diffpose_ros.ros.igtl.node"]
    # Reliable images: a best-effort 128 KB frame can be lost on a busy machine, and then no IMAGE goes out.
    common = ["-p", f"stale_after_s:={STALE_S}", "-p", "address:=127.0.0.1", "-p", "image_qos:=reliable"]
    return NodeProcess(
        [*common, *args, "-r", "image:=/xray/image", "-r", "camera_info:=/xray/camera_info"], env, log, command
    )


@pytest.fixture(scope="module")
def rig(scene, tmp_path_factory, env_patch):
    domain = domain_id(1)
    env = ros_env(domain)
    for key, value in env.items():
        env_patch.setenv(key, value)
    tmp = tmp_path_factory.mktemp("igtl")
    node = NodeProcess(
        [
            *("-p", f"patient_model:={scene.model_path}", "-p", "autostart:=true"),
            *("-p", "gate.min_similarity:=0.55", "-p", "diagnostics.period_s:=0.5"),
            *("-p", f"diagnostics.stale_after_s:={STALE_S}"),
            *("-r", "image:=/xray/image", "-r", "camera_info:=/xray/camera_info"),
        ],
        env,
        tmp / "node.log",
    )
    server_port, client_port = free_port(), free_port()
    server = _bridge(["-p", f"port:={server_port}"], env, tmp / "bridge_server.log")
    client = _bridge(["-p", f"connect:=127.0.0.1:{client_port}"], env, tmp / "bridge_client.log")
    probe = Probe(domain)
    probe.owner = node
    from std_msgs.msg import String

    statuses = []
    probe.node.create_subscription(
        String, "/diffpose_node/status", lambda m: statuses.append(json.loads(m.data)), probe._latched
    )
    receiver = None
    try:
        probe.wait_state("active", timeout=240.0)
        probe.spin_until(  # the node and both bridges
            lambda: min(probe.image_pub.get_subscription_count(), probe.info_pub.get_subscription_count()) >= 3,
            60.0,
            "the image and camera_info subscriptions of the node and both bridges",
        )
        probe.spin_until(  # both bridges follow /tf and ~/status (a TF published before they match is lost to them)
            lambda: min(probe.node.count_subscribers(t) for t in ("/tf", "/diffpose_node/status")) >= 3,
            60.0,
            "the /tf and ~/status subscriptions of both bridges",
        )
        receiver = Receiver(server_port, timeout=60.0)
        _prime(probe, receiver, scene)
        yield probe, receiver, statuses, client_port, (node, server, client)
    finally:
        if receiver is not None:
            receiver.close()
        probe.close()
        for name, proc in (("bridge (server)", server), ("bridge (client)", client), ("diffpose_node", node)):
            code = proc.stop()
            print(f"{name} exit code {code}\n--- log ---\n{proc.log(2000)}")


def _prime(probe, receiver: Receiver, scene, timeout: float = 90.0) -> None:
    """Frames until the bridge sends a TRANSFORM: DDS matches the node's /tf writer with a bridge's
    reader some time after each has seen the other, and a pose published before that reaches the
    probe but never the bridge (which then drops it, with a warning, as it should)."""
    deadline = time.monotonic() + timeout
    while True:
        image, info = make_frame(scene, 0)
        probe.send(image, info)
        try:
            receiver.wait(lambda: _ok_transforms(receiver), 3.0, "a TRANSFORM")
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no TRANSFORM from the bridge in {timeout:.0f} s of frames") from None
    time.sleep(1.0)  # the client-mode bridge follows the same topics: let it match too


def _ok_transforms(receiver: Receiver) -> list:
    return [m for m in receiver.of("CArmToCT") if m.metadata.get("TransformStatus") == "OK"]


def _at(messages: list, stamp) -> list:
    t = int(stamp.sec) + int(stamp.nanosec) * 1e-9
    return [m for m in messages if abs(m.timestamp - t) < 1e-5]


def _tf_matrix(tf) -> np.ndarray:
    from diffpose_ros.ros.conversions import transform_to_matrix

    return transform_to_matrix(tf.transform)


def test_poses_images_and_status_follow_the_node(rig, scene):
    """Per accepted frame: one OK TRANSFORM equal to /tf in RAS, the IMAGE on its rays, ~/status valid;
    meanwhile bad clients do not stall anything, and the client-mode bridge survives a server restart."""
    from diffpose_ros.ros.conversions import CT_TO_CT_RAS

    probe, receiver, statuses, client_port, procs = rig
    garbage = socket.create_connection(("127.0.0.1", receiver.sock.getpeername()[1]))
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\x00" * 100)
    silent = socket.create_connection(("127.0.0.1", receiver.sock.getpeername()[1]))  # never reads
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    navigator = pyigtl.OpenIGTLinkServer(port=client_port, local_server=True)  # after the bridge started
    try:
        sent, pixels = [], {}
        for index in (0, 1):
            image, info = make_frame(scene, index)
            status = probe.send(image, info)
            assert status.level == b"\x00", status.message
            sent.append(image.header.stamp)
            pixels[stamp_key(image.header.stamp)] = scene.frames[index]
            probe.spin_until(lambda: probe.tf_at(image.header.stamp), 30.0, "the TF")
            got = receiver.wait(lambda: _at(_ok_transforms(receiver), image.header.stamp), 15.0, "the TRANSFORM")
            assert len(got) == 1
            # Client mode: the navigator's server gets it; then it restarts once.
            _wait_navigator(navigator, image.header.stamp)
            if index == 0:
                navigator.stop()
                navigator = pyigtl.OpenIGTLinkServer(port=client_port, local_server=True)
        for stamp in sent:
            (tf,) = probe.tf_at(stamp)
            (transform,) = _at(_ok_transforms(receiver), stamp)
            T_ras = CT_TO_CT_RAS @ _tf_matrix(tf)
            np.testing.assert_allclose(transform.matrix, T_ras, atol=1e-3)
            (image,) = receiver.wait(lambda s=stamp: _at(receiver.of("Fluoro"), s), 10.0, "the IMAGE")
            np.testing.assert_array_equal(image.image[0], pixels[stamp_key(stamp)])
            _check_image_on_rays(image, T_ras, scene.detector)
            (string,) = _at(receiver.of("DiffPoseStatus"), stamp)
            doc = json.loads(string.string)
            assert doc["valid"] and doc["reason"] == "" and doc["stamp"] == stamp_key(stamp)
            assert doc["source"] in ("cnn", "tracking") and doc["similarity"] > 0.55 and doc["latency_s"] > 0
        probe.spin_until(lambda: [s for s in statuses if s["stamp"] == stamp_key(sent[-1])], 10.0, "~/status")
        node_status = [s for s in statuses if s["stamp"] == stamp_key(sent[-1])][0]
        assert node_status["valid"] and node_status["frame_id"] == "carm_source_optical"
        assert probe.get_state() == "active" and all(p.alive() for p in procs) and not receiver.closed
    finally:
        navigator.stop()
        for s in (garbage, silent):
            s.close()
        for s, h in handlers.items():
            signal.signal(s, h)


def _wait_navigator(navigator, stamp, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = navigator.wait_for_message("CArmToCT", timeout=0.5)
        if message is not None and _at([message], stamp):
            return
    raise AssertionError(f"the navigator's server got no CArmToCT at {stamp_key(stamp)}")


def _check_image_on_rays(image, T_ras, k) -> None:
    """Centre and corners: on their pixels' rays from the source, on the plane z = SDD of the source frame."""
    assert image.image.shape == (1, k.height, k.width) and image.world_coordinate_system == "ras"
    inv = np.linalg.inv(T_ras)
    for i, j in ((0, 0), (k.width - 1, 0), (0, k.height - 1), (k.width - 1, k.height - 1), (127.5, 127.5)):
        q = inv @ image.ijk_to_world_matrix @ [i, j, 0.0, 1.0]
        assert abs(q[2] - 1020.0) < 0.1
        assert abs(k.fx * q[0] / q[2] + k.cx - i) * 1020.0 / k.fx < 0.1  # mm on the detector
        assert abs(k.fy * q[1] / q[2] + k.cy - j) * 1020.0 / k.fy < 0.1


def test_rejected_frame_then_stale(rig, scene):
    """A constant frame: INVALID with its reason and the last transform, ~/status invalid; no frames for
    stale_after_s: INVALID ``stale`` within stale_after_s + 0.5 s, and the node's summary WARNs."""
    from diffpose_ros.ros.conversions import numpy_to_image

    probe, receiver, statuses, _, _ = rig
    image, info = make_frame(scene, 2)
    assert probe.send(image, info).level == b"\x00"
    (last_ok,) = receiver.wait(lambda: _at(_ok_transforms(receiver), image.header.stamp), 15.0, "the TRANSFORM")
    blank, info = make_frame(scene, 2)
    blank_image = numpy_to_image(np.full((256, 256), 1000, np.uint16), header=blank.header)
    status = probe.send(blank_image, info)
    assert status.level == b"\x02"
    invalid = receiver.wait(lambda: _at(receiver.of("CArmToCT"), blank.header.stamp), 15.0, "the INVALID TRANSFORM")
    assert invalid[0].metadata["TransformStatus"] == "INVALID"
    np.testing.assert_allclose(invalid[0].matrix, last_ok.matrix)
    (string,) = _at(receiver.of("DiffPoseStatus"), blank.header.stamp)
    doc = json.loads(string.string)
    assert not doc["valid"] and "constant" in doc["reason"] and doc["reason"] == status.message
    probe.spin_until(lambda: [s for s in statuses if s["stamp"] == stamp_key(blank.header.stamp)], 10.0, "~/status")
    assert not [s for s in statuses if s["stamp"] == stamp_key(blank.header.stamp)][0]["valid"]
    # No accepted pose since frame 2 (the blank frame may have taken longer than STALE_S): stale,
    # timed from the arrival of that pose's TRANSFORM here.
    stale = receiver.wait(
        lambda: [
            m
            for m in receiver.of("DiffPoseStatus")
            if m.received_at > last_ok.received_at and json.loads(m.string)["reason"] == "stale"
        ],
        STALE_S + 5.0,
        "the stale status",
    )
    delay = stale[0].received_at - last_ok.received_at
    print(f"stale announced {delay:.2f} s after the last accepted pose (stale_after_s {STALE_S})")
    assert STALE_S - 0.1 < delay < STALE_S + 0.5
    transform = [m for m in receiver.of("CArmToCT") if m.timestamp == stale[0].timestamp][0]
    assert transform.metadata["TransformStatus"] == "INVALID"
    probe.summaries.clear()
    summary = probe.spin_until(
        lambda: [s for s in probe.summaries if s.level == DIAG_WARN and "stale" in s.message], 10.0, "a stale WARN"
    )[0]
    assert {kv.key: kv.value for kv in summary.values}["stale"] == "True"
