"""diffpose_node over real DDS: one node process (autostart, YAML parameters) for the whole module.

The node runs ``.venv/bin/diffpose_node --ros-args --params-file <yaml> -p patient_model:=... -p
autostart:=true`` with ``image``/``camera_info`` remapped to ``/xray/...``; this process publishes
frames rendered at known poses and checks ``/tf``, ``~/pose``, ``/tf_static``, ``/diagnostics`` and
``~/overlay``. Bad inputs come one per test; after each the node must still answer (a parameter
service call and its lifecycle state), and good frames after them still get a TF.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from ros_harness import (
    CONFIG_YAML,
    NodeProcess,
    Probe,
    domain_id,
    make_frame,
    mtre_mm,
    ros_disabled,
    ros_env,
    stamp_key,
    status_values,
)

pytestmark = pytest.mark.dds

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

DIAG_OK, DIAG_WARN, DIAG_ERROR = b"\x00", b"\x01", b"\x02"
YAML_CAMERA_FRAME = "yaml_source_optical"
MTRE_LIMIT_MM = 2.0


def _test_yaml(tmp_path) -> tuple:
    doc = yaml.safe_load(CONFIG_YAML.read_text())
    params = doc["/**"]["ros__parameters"]
    params["camera_frame"] = YAML_CAMERA_FRAME
    params["gate"]["min_similarity"] = 0.55
    params["tracking"]["max_age_s"] = 30.0
    params["overlay"]["width"] = 128
    params["diagnostics"]["period_s"] = 0.5
    path = tmp_path / "diffpose_test.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, params


@pytest.fixture(scope="module")
def ros(scene, tmp_path_factory, env_patch):
    domain = domain_id(0)
    env = ros_env(domain)
    for key, value in env.items():
        env_patch.setenv(key, value)
    tmp = tmp_path_factory.mktemp("node")
    yaml_path, params = _test_yaml(tmp)
    proc = NodeProcess(
        [
            "--params-file",
            str(yaml_path),
            "-p",
            f"patient_model:={scene.model_path}",
            "-p",
            "autostart:=true",
            "-r",
            "image:=/xray/image",
            "-r",
            "camera_info:=/xray/camera_info",
        ],
        env,
        tmp / "node.log",
    )
    probe = Probe(domain)
    probe.owner = proc
    probe.subscribe_tf_static()
    try:
        probe.wait_state("active", timeout=240.0)
        probe.wait_subscribed()
        yield probe, proc, params
    finally:
        probe.close()
        code = proc.stop()
        print(f"diffpose_node exit code {code}\n--- node log ---\n{proc.log(3000)}")


def _alive(probe: Probe) -> None:
    """The node still answers: a parameter service call and its lifecycle state."""
    assert probe.get_parameters(["ct_frame"])["ct_frame"] == "ct"
    assert probe.get_state() == "active"
    assert probe.owner.alive()


def _send_good(probe: Probe, scene, index: int, frame_id: str = "", with_info: bool = True):
    image, info = make_frame(scene, index, frame_id=frame_id, with_info=with_info)
    status = probe.send(image, info)
    assert status.level == DIAG_OK, f"{status.message} {status_values(status)}"
    child = frame_id or YAML_CAMERA_FRAME
    (tf,) = probe.spin_until(lambda: probe.tf_at(image.header.stamp), 30.0, "the TF at the image's stamp")
    assert tf.header.frame_id == "ct" and tf.child_frame_id == child
    return image, tf, status


def _tf_matrix(tf) -> np.ndarray:
    from diffpose_ros.ros.conversions import transform_to_matrix

    return transform_to_matrix(tf.transform)


# ------------------------------------------------------------------------------------ good path
def test_ct_ras_static_transform_is_latched(ros):
    probe, _, _ = ros
    # Subscribed (transient local) after the node published it at start: latched.
    found = probe.spin_until(lambda: [t for t in probe.tf_static if t.child_frame_id == "ct_ras"], 30.0, "ct -> ct_ras")
    t = found[0]
    assert t.header.frame_id == "ct"
    M = _tf_matrix(t)
    np.testing.assert_allclose(M, np.diag([-1.0, -1.0, 1.0, 1.0]), atol=1e-12)
    # A second, late subscriber also gets it.
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from tf2_msgs.msg import TFMessage

    late = []
    probe.node.create_subscription(
        TFMessage,
        "/tf_static",
        lambda m: late.extend(m.transforms),
        QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL),
    )
    probe.spin_until(lambda: late, 30.0, "the latched /tf_static for a late subscriber")


def test_parameters_from_yaml_are_applied(ros):
    probe, _, params = ros
    got = probe.get_parameters(
        [
            "camera_frame",
            "gate.min_similarity",
            "tracking.max_age_s",
            "overlay.width",
            "diagnostics.period_s",
            "image_qos",
            "intrinsics.sdd_mm",
            "autostart",
        ]
    )
    assert got == {
        "camera_frame": YAML_CAMERA_FRAME,
        "gate.min_similarity": params["gate"]["min_similarity"],
        "tracking.max_age_s": params["tracking"]["max_age_s"],
        "overlay.width": params["overlay"]["width"],
        "diagnostics.period_s": params["diagnostics"]["period_s"],
        "image_qos": "sensor_data",
        "intrinsics.sdd_mm": 0.0,
        "autostart": True,  # from -p, which overrides the file
    }


def test_tf_at_image_stamps_with_small_mtre(ros, scene):
    probe, _, _ = ros
    stamps, modes = [], []
    for index, frame_id in ((0, ""), (1, "xray_source_optical"), (2, "")):
        image, tf, status = _send_good(probe, scene, index, frame_id)
        values = status_values(status)
        error = mtre_mm(scene, _tf_matrix(tf), index)
        print(
            f"frame {index}: mTRE {error:.3f} mm, {values['mode']}, similarity {values['similarity']}, "
            f"{values['iterations']} iterations, {values['t_total_s']} s"
        )
        assert error < MTRE_LIMIT_MM
        assert tf.header.stamp == image.header.stamp
        stamps.append(stamp_key(tf.header.stamp))
        modes.append(values["mode"])
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    assert modes[0] == "cold"
    # Exactly one TF per published stamp.
    for key in stamps:
        assert sum(stamp_key(t.header.stamp) == key for t in probe.tf if t.header.frame_id == "ct") == 1


def test_pose_topic_has_a_positive_definite_covariance(ros, scene):
    probe, _, _ = ros
    from diffpose_ros.ros.conversions import pose_to_matrix

    image, tf, _ = _send_good(probe, scene, 3)
    (pose,) = probe.spin_until(
        lambda: [p for p in probe.poses if p.header.stamp == image.header.stamp], 30.0, "~/pose at the image's stamp"
    )
    assert pose.header.frame_id == "ct"
    np.testing.assert_allclose(pose_to_matrix(pose.pose.pose), _tf_matrix(tf), atol=1e-9)
    C = np.asarray(pose.pose.covariance, dtype=np.float64).reshape(6, 6)
    assert np.isfinite(C).all()
    np.testing.assert_allclose(C, C.T, rtol=1e-9, atol=1e-30)
    eig = np.linalg.eigvalsh(C)
    print("covariance eigenvalues (m^2, rad^2):", eig)
    assert eig.min() > 0
    # Position standard deviations in metres: sub-millimetre to a few millimetres, not mm read as m.
    assert 0 < math.sqrt(C[0, 0]) < 0.01


def test_markers_reach_a_late_subscriber(ros, scene):
    """``~/markers``: the CT's box and bone surface (sent at configure) and the C-arm at the last pose
    (sent with its frame) both reach a subscriber that joins afterwards (transient local)."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from visualization_msgs.msg import Marker, MarkerArray

    from diffpose_ros.core.navigation.scene import MAX_TRIANGLES
    from diffpose_ros.ros.markers import COLOURS

    probe, _, _ = ros
    image, tf, _ = _send_good(probe, scene, 3)
    got = {}
    latched = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    sub = probe.node.create_subscription(
        MarkerArray, "/diffpose_node/markers", lambda m: got.update({m.markers[0].ns: m}), latched
    )
    try:
        probe.spin_until(lambda: {"ct", "carm"} <= set(got), 30.0, "the latched ~/markers")
    finally:
        probe.node.destroy_subscription(sub)
    box, bone = got["ct"].markers
    assert (box.type, bone.type) == (Marker.LINE_LIST, Marker.TRIANGLE_LIST)
    assert box.header.frame_id == bone.header.frame_id == "ct"
    assert len(box.points) == 24 and 0 < len(bone.points) <= 3 * MAX_TRIANGLES
    source = got["carm"].markers[0]
    assert source.header.frame_id == "ct" and source.header.stamp == image.header.stamp
    p, t = source.pose.position, tf.transform.translation
    np.testing.assert_allclose([p.x, p.y, p.z], [t.x, t.y, t.z], atol=1e-9)  # metres, as TF
    colour = (source.color.r, source.color.g, source.color.b, source.color.a)
    assert colour in (pytest.approx(COLOURS["accepted"]), pytest.approx(COLOURS["stale"]))  # stale after 1 s


def test_repeated_stamp_is_skipped(ros, scene):
    probe, _, _ = ros
    last = max((t for t in probe.tf if t.header.frame_id == "ct"), key=lambda t: stamp_key(t.header.stamp))
    before = len(probe.tf)
    image, info = make_frame(scene, 4, stamp=last.header.stamp)
    probe.frames.clear()
    status = probe.send(image, info)
    assert status.level == DIAG_WARN and "not newer" in status.message
    assert len(probe.tf_at(last.header.stamp)) == 1 and len(probe.tf) == before
    _alive(probe)


def test_overlay_published_while_subscribed(ros, scene):
    probe, _, _ = ros
    sub = probe.subscribe_overlay()
    try:
        probe.spin_until(lambda: sub.get_publisher_count() > 0, 30.0, "the ~/overlay publisher")
        image, _, _ = _send_good(probe, scene, 4)
        (overlay,) = probe.spin_until(
            lambda: [o for o in probe.overlays if o.header.stamp == image.header.stamp], 30.0, "~/overlay"
        )
        assert overlay.encoding == "bgr8" and overlay.width == 128 and overlay.height == 128
        from diffpose_ros.ros.conversions import image_to_numpy

        picture = image_to_numpy(overlay, encodings=("bgr8",))
        green = (picture[..., 1] == 255) & (picture[..., 0] == 0) & (picture[..., 2] == 0)
        assert green.sum() > 20, "no DRR edges drawn"
    finally:
        probe.node.destroy_subscription(sub)


def test_diagnostics_summary(ros):
    probe, _, _ = ros
    probe.summaries.clear()
    status = probe.spin_until(
        lambda: [s for s in probe.summaries if status_values(s).get("frames_published", "0") != "0"],
        30.0,
        "a diagnostics summary",
    )[-1]
    values = status_values(status)
    for key in (
        "rate_in_hz",
        "rate_out_hz",
        "frames_dropped",
        "latency_receipt_to_publish_median_s",
        "latency_stamp_to_publish_median_s",
        "rss_mb",
        "device",
        "last_similarity",
        "last_iterations",
        "last_mode",
        "last_t_refine_s",
    ):
        assert key in values, key
    assert values["device"] == "cpu" or values["device"].startswith("cuda")
    assert float(values["rss_mb"]) > 50
    assert 0 < float(values["latency_receipt_to_publish_median_s"]) < 60


def test_other_encodings_mirror_and_line_integrals(ros, scene):
    """mono8, padded big-endian 32FC1, mirrored frames (mirror:=true) and 32FC1 line integrals."""
    probe, _, _ = ros
    from rclpy.parameter import Parameter

    from diffpose_ros.ros.conversions import numpy_to_image

    def run(index, array, encoding, **kw):
        image, info = make_frame(scene, index)
        msg = numpy_to_image(array, encoding, header=image.header, **kw)
        status = probe.send(msg, info)
        assert status.level == DIAG_OK, status.message
        (tf,) = probe.spin_until(lambda: probe.tf_at(msg.header.stamp), 30.0, "the TF")
        error = mtre_mm(scene, _tf_matrix(tf), index)
        print(f"{encoding} {kw}: mTRE {error:.3f} mm")
        assert error < MTRE_LIMIT_MM

    from diffpose_ros.core.simulation.detector import simulate_transmission

    run(4, simulate_transmission(scene.line_integrals[4], dtype="uint8", rng=np.random.default_rng(5)), "mono8")
    run(3, scene.frames[3].astype(np.float32), "32FC1", step=256 * 4 + 8, is_bigendian=True)
    assert probe.set_parameters([Parameter("mirror", value=True)])[0].successful
    try:
        run(5, np.ascontiguousarray(scene.frames[5][:, ::-1]), "mono16")
    finally:
        assert probe.set_parameters([Parameter("mirror", value=False)])[0].successful
    assert probe.set_parameters([Parameter("input_kind", value="line_integrals")])[0].successful
    try:
        run(0, scene.line_integrals[0].numpy(), "32FC1")
    finally:
        assert probe.set_parameters([Parameter("input_kind", value="transmission")])[0].successful


def test_mirrored_off_centre_frame_gives_the_cli_pose(ros, scene, tmp_path):
    """One preparation step for the node and the CLI: a mirrored frame whose principal point lies
    30 px right of and 20 px above the centre, delivered with the device's (mirrored) camera_info,
    gets the same pose from the node (mirror:=true) as from ``diffpose-register --mirror``. The CLI
    used to flip the image but not the intrinsics and registered another camera."""
    probe, _, _ = ros
    import json

    import cv2
    import torch
    from rclpy.parameter import Parameter
    from ros_harness import DETECTOR, SDD, SPACING

    from diffpose_ros.cli import register
    from diffpose_ros.core.geometry import metrics
    from diffpose_ros.core.geometry.camera import Intrinsics
    from diffpose_ros.core.rendering import renderer as render
    from diffpose_ros.core.rendering import volume
    from diffpose_ros.core.simulation import detector as simulate
    from diffpose_ros.ros.conversions import intrinsics_to_camera_info, numpy_to_image

    index = 1
    camera = Intrinsics.from_detector(SDD, DETECTOR, DETECTOR, SPACING, (127.5 + 30.0, 127.5 - 20.0))
    renderer = render.Renderer(volume.hu_to_mu(volume.load_ct(volume.default_ct_path())))
    with torch.no_grad():
        view = renderer.render(scene.poses[index], camera)
    delivered = np.ascontiguousarray(simulate.simulate_transmission(view, rng=np.random.default_rng(9))[:, ::-1])
    delivered_camera = camera.mirrored()  # what the device says of the pixels it sends
    assert delivered_camera.cx == pytest.approx(127.5 - 30.0)

    image, info = make_frame(scene, index)
    msg = numpy_to_image(delivered, "mono16", header=image.header)
    info = intrinsics_to_camera_info(delivered_camera, header=info.header)
    # Cold start on both sides (no tracking from the previous test's frame).
    settings = [Parameter("mirror", value=True), Parameter("tracking.enabled", value=False)]
    assert all(r.successful for r in probe.set_parameters(settings))
    try:
        status = probe.send(msg, info)
        assert status.level == DIAG_OK, status.message
        (tf,) = probe.spin_until(lambda: probe.tf_at(msg.header.stamp), 30.0, "the TF")
    finally:
        restore = [Parameter("mirror", value=False), Parameter("tracking.enabled", value=True)]
        assert all(r.successful for r in probe.set_parameters(restore))
    node_pose = _tf_matrix(tf)

    cv2.imwrite(str(tmp_path / "frame.png"), delivered)
    delivered_camera.to_yaml(tmp_path / "camera.yaml")
    args = ["--model", str(scene.model_path), "--camera-info", str(tmp_path / "camera.yaml")]
    args += ["--image", str(tmp_path / "frame.png"), "--mirror", "--out", str(tmp_path / "result.json")]
    args += ["--finest-width", "128"]  # the node's default pyramid (the tool's own ends at 256 px)
    assert register.main(args) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    cli_pose = np.array(result["T_ct_source"])

    between = float(metrics.mtre(torch.from_numpy(node_pose), torch.from_numpy(cli_pose), scene.targets))
    errors = mtre_mm(scene, node_pose, index), mtre_mm(scene, cli_pose, index)
    print(f"mTRE node {errors[0]:.3f} mm, CLI {errors[1]:.3f} mm; between them {between:.4f} mm")
    assert not result["failed"], result["failure"]
    assert max(errors) < MTRE_LIMIT_MM
    assert between < 0.05


def test_round_field_with_burned_in_text_is_posed(ros, scene):
    """An image intensifier's round field and burned-in text: the node masks them (valid_fraction in
    the frame status) and still poses the frame."""
    probe, _, _ = ros
    from diffpose_ros.core.simulation.detector import round_field_and_text
    from diffpose_ros.ros.conversions import numpy_to_image

    index = 3
    image, info = make_frame(scene, index)
    msg = numpy_to_image(round_field_and_text(scene.frames[index], 0.45, text=True), "mono16", header=image.header)
    status = probe.send(msg, info)
    assert status.level == DIAG_OK, status.message
    assert 0.5 < float(status_values(status)["valid_fraction"]) < 0.63
    (tf,) = probe.spin_until(lambda: probe.tf_at(msg.header.stamp), 30.0, "the TF")
    assert mtre_mm(scene, _tf_matrix(tf), index) < MTRE_LIMIT_MM


def test_clinical_video_is_posed_and_the_same_view_inverted_is_refused(ros, scene):
    """8-bit display-processed video with every clinical factor (round field, text, rods, scatter):
    posed, its status naming the polarity and the share of outlier pixels; the same view with bones
    bright is refused with the reason and publishes no TF."""
    probe, _, _ = ros
    from diffpose_ros.core.simulation.clinical import ClinicalFactors
    from diffpose_ros.core.simulation.detector import simulate_transmission
    from diffpose_ros.ros.conversions import numpy_to_image

    index = 2
    for spec in ("all", "all,inverted"):
        factors = ClinicalFactors.parse(spec)
        video = simulate_transmission(
            scene.line_integrals[index], dtype="uint8", rng=np.random.default_rng(8), clinical=factors
        )
        image, info = make_frame(scene, index)
        msg = numpy_to_image(video, "mono8", header=image.header)
        status = probe.send(msg, info)
        values = status_values(status)
        if not factors.inverted:
            assert status.level == DIAG_OK, f"{status.message} {values}"
            assert values["polarity"] == "bones_dark" and 0 < float(values["outlier_fraction"]) < 0.3
            (tf,) = probe.spin_until(lambda: probe.tf_at(msg.header.stamp), 30.0, "the TF")
            assert mtre_mm(scene, _tf_matrix(tf), index) < MTRE_LIMIT_MM
        else:
            assert status.level == DIAG_ERROR and "polarity looks inverted" in status.message, status.message
            assert probe.tf_at(msg.header.stamp) == []
    _alive(probe)


def test_covariance_grows_with_less_information(ros, scene):
    """The same view at a lower dose (more quantum noise): a larger ~/pose covariance."""
    probe, _, _ = ros
    from diffpose_ros.core.simulation.detector import simulate_transmission
    from diffpose_ros.ros.conversions import numpy_to_image

    traces = []
    for i0 in (2e4, 300.0):
        image, info = make_frame(scene, 1)
        frame = simulate_transmission(scene.line_integrals[1], i0=i0, rng=np.random.default_rng(7))
        msg = numpy_to_image(frame, "mono16", header=image.header)
        status = probe.send(msg, info)
        assert status.level == DIAG_OK, status.message
        (pose,) = probe.spin_until(
            lambda: [p for p in probe.poses if p.header.stamp == msg.header.stamp], 30.0, "~/pose"
        )
        C = np.asarray(pose.pose.covariance).reshape(6, 6)
        traces.append((np.trace(C[:3, :3]), np.trace(C[3:, 3:]), status_values(status)["similarity"]))
    print("covariance traces (position m^2, rotation rad^2, similarity) at i0 2e4 / 300:", traces)
    assert traces[1][0] > 2 * traces[0][0] and traces[1][1] > 2 * traces[0][1]


# ------------------------------------------------------------------------------------ bad input
def _bad(probe: Probe, image, info, expect: str):
    status = probe.send(image, info)
    assert status.level == DIAG_ERROR, f"{status.message}"
    assert expect in status.message, status.message
    assert not probe.tf_at(image.header.stamp)
    _alive(probe)
    return status


def test_bad_wrong_encoding(ros, scene):
    probe, _, _ = ros
    from diffpose_ros.ros.conversions import numpy_to_image

    image, info = make_frame(scene, 0)
    rgb = numpy_to_image(np.zeros((256, 256, 3), np.uint8) + 7, "rgb8", header=image.header)
    _bad(probe, rgb, info, "unsupported image encoding 'rgb8'")


def test_bad_zero_size(ros, scene):
    probe, _, _ = ros
    image, info = make_frame(scene, 0)
    image.height = image.width = image.step = 0
    image.data = b""
    _bad(probe, image, info, "zero size")


def test_bad_data_shorter_than_height_times_step(ros, scene):
    probe, _, _ = ros
    image, info = make_frame(scene, 0)
    image.data = image.data[: len(image.data) - image.step - 1]
    _bad(probe, image, info, "shorter than height * step")


def test_bad_nan_and_inf_floats(ros, scene):
    probe, _, _ = ros
    from diffpose_ros.ros.conversions import numpy_to_image

    for bad in (np.nan, np.inf):
        image, info = make_frame(scene, 0)
        frame = scene.frames[0].astype(np.float32)
        frame[100:110, 50:60] = bad
        _bad(probe, numpy_to_image(frame, "32FC1", header=image.header), info, "NaN/Inf pixels")


def test_bad_constant_image(ros, scene):
    probe, _, _ = ros
    from diffpose_ros.ros.conversions import numpy_to_image

    image, info = make_frame(scene, 0)
    _bad(probe, numpy_to_image(np.full((256, 256), 1000, np.uint16), header=image.header), info, "constant")


def test_bad_missing_camera_info_and_no_parameter_intrinsics(ros, scene):
    probe, _, _ = ros
    image, _ = make_frame(scene, 0, with_info=False)
    _bad(probe, image, None, "no camera_info with the image's stamp")


def test_bad_camera_info_with_all_zero_K(ros, scene):
    probe, _, _ = ros
    image, info = make_frame(scene, 0)
    info.k = [0.0] * 9
    _bad(probe, image, info, "uncalibrated")


def test_bad_mismatched_stamps(ros, scene):
    probe, _, _ = ros
    image, info = make_frame(scene, 0)
    info.header.stamp.nanosec = (info.header.stamp.nanosec + 1_000_000) % 1_000_000_000
    status = _bad(probe, image, info, "stamps must be identical")
    assert stamp_key(image.header.stamp) in status.message


def test_bad_camera_info_size_differs_from_image(ros, scene):
    probe, _, _ = ros
    image, info = make_frame(scene, 0)
    info.width, info.height = 512, 512
    _bad(probe, image, info, "the image is 256x256")


# ------------------------------------------------------------------------- runtime parameters
def test_gate_rejects_with_reason_and_publishes_nothing(ros, scene):
    probe, _, _ = ros
    from rclpy.parameter import Parameter

    (result,) = probe.set_parameters([Parameter("gate.min_similarity", value=0.9999)])
    assert result.successful, result.reason
    try:
        image, info = make_frame(scene, 5)
        poses_before = len(probe.poses)
        status = probe.send(image, info)
        assert status.level == DIAG_ERROR and "rejected by the gate: similarity" in status.message, status.message
        assert not probe.tf_at(image.header.stamp)
        assert len(probe.poses) == poses_before
    finally:
        (result,) = probe.set_parameters([Parameter("gate.min_similarity", value=0.55)])
        assert result.successful


def test_read_only_and_invalid_parameters_are_refused(ros):
    probe, _, _ = ros
    from rclpy.parameter import Parameter

    results = probe.set_parameters([Parameter("ct_frame", value="other")])
    assert not results[0].successful
    results = probe.set_parameters([Parameter("input_kind", value="jpeg")])
    assert not results[0].successful and "input_kind" in results[0].reason
    assert probe.get_parameters(["ct_frame", "input_kind"]) == {"ct_frame": "ct", "input_kind": "transmission"}


def _as_typed(value):
    """``value`` as ``ros2 param set`` sends what a user types for it: ``1020`` and ``[128, 128]`` are
    integers, so a float or float array that holds whole numbers goes as integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(float(v).is_integer() for v in value):
        return [int(v) for v in value]
    return list(value) if isinstance(value, tuple) else value


def test_every_runtime_parameter_is_taken_through_the_service_as_typed(ros):
    """Over ``set_parameters`` (the parameter service that ``ros2 param set`` calls) arrays arrive as
    ``array.array`` and whole numbers as integers: every runtime parameter takes them."""
    probe, _, _ = ros
    from rclpy.parameter import Parameter

    from diffpose_ros.ros.settings import PARAMETERS

    runtime = [p.name for p in PARAMETERS if not p.read_only]
    before = probe.get_parameters(runtime)
    sent = [Parameter(n, value=_as_typed(v)) for n, v in before.items() if v not in (None, [])]  # unset: no value
    assert {p.name for p in sent} >= {"gate.min_similarity", "field.radius_px", "tracking.frame_budget"}
    results = probe.set_parameters(sent)
    assert all(r.successful for r in results), [(p.name, r.reason) for p, r in zip(sent, results) if not r.successful]
    assert probe.get_parameters(runtime) == before
    arrays = [
        Parameter("field.center_px", value=[128, 128]),
        Parameter("intrinsics.principal_point", value=[127.5, 127.0]),
    ]
    try:
        results = probe.set_parameters(arrays)
        assert all(r.successful for r in results), [r.reason for r in results]
        got = probe.get_parameters(["field.center_px", "intrinsics.principal_point"])
        assert got == {"field.center_px": [128.0, 128.0], "intrinsics.principal_point": [127.5, 127.0]}
    finally:  # unset again (an empty array)
        results = probe.set_parameters([Parameter(p.name, value=[]) for p in arrays])
        assert all(r.successful for r in results), [r.reason for r in results]


def test_a_known_field_set_at_runtime_takes_effect(ros, scene):
    """``field.radius_px`` and the integer array ``field.center_px`` set through the service: the next
    frame's valid pixels are that disc (less its margin), and the frame is still posed."""
    probe, _, _ = ros
    from rclpy.parameter import Parameter

    results = probe.set_parameters(
        [Parameter("field.radius_px", value=100), Parameter("field.center_px", value=[128, 120])]
    )
    assert all(r.successful for r in results), [r.reason for r in results]
    try:
        _, tf, status = _send_good(probe, scene, 4)
        disc = math.pi * (100 - 3) ** 2 / 256**2  # field.margin_px is 3
        assert abs(float(status_values(status)["valid_fraction"]) - disc) < 0.02, status_values(status)
        assert mtre_mm(scene, _tf_matrix(tf), 4) < MTRE_LIMIT_MM
    finally:
        results = probe.set_parameters(
            [Parameter("field.radius_px", value=0.0), Parameter("field.center_px", value=[])]
        )
        assert all(r.successful for r in results), [r.reason for r in results]


def test_parameter_intrinsics_when_no_camera_info(ros, scene):
    """After all the bad input: intrinsics set at runtime, a frame without camera_info gets its TF."""
    probe, _, _ = ros
    from rclpy.parameter import Parameter

    results = probe.set_parameters(
        [Parameter("intrinsics.sdd_mm", value=1020.0), Parameter("intrinsics.pixel_spacing_mm", value=1.2)]
    )
    assert all(r.successful for r in results), results
    try:
        image, tf, status = _send_good(probe, scene, 5, with_info=False)
        assert status_values(status)["intrinsics_source"] == "parameters"
        assert mtre_mm(scene, _tf_matrix(tf), 5) < MTRE_LIMIT_MM
    finally:
        probe.set_parameters(
            [Parameter("intrinsics.sdd_mm", value=0.0), Parameter("intrinsics.pixel_spacing_mm", value=0.0)]
        )


def test_good_frame_after_bad_input_gets_tf(ros, scene):
    probe, _, _ = ros
    image, tf, _ = _send_good(probe, scene, 2)
    assert mtre_mm(scene, _tf_matrix(tf), 2) < MTRE_LIMIT_MM
    _alive(probe)
