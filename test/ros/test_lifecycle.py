"""Lifecycle of diffpose_node over its services, and clean failures for bad patient model files.

Three node processes run side by side in this module's domain, each in its own namespace:

- ``/missing``: ``patient_model`` does not exist, ``autostart:=true``;
- ``/corrupt``: a truncated patient model file, ``autostart:=true``;
- ``/lc``: a good model, no autostart, ``invert:=true`` and ``image_qos:=reliable``: driven through
  configure / activate / deactivate / cleanup / configure / activate by the lifecycle services.

The failing ones must stay up and answer (state ``unconfigured``, parameter services) with the
reason logged and on ``/diagnostics``; every process exits cleanly on SIGINT / SIGTERM.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from ros_harness import (
    NodeProcess,
    Probe,
    domain_id,
    make_frame,
    mtre_mm,
    ros_disabled,
    ros_env,
    status_values,
)

pytestmark = pytest.mark.dds

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

DIAG_OK, DIAG_ERROR = b"\x00", b"\x02"


@pytest.fixture(scope="module")
def procs(scene, tmp_path_factory, env_patch):
    domain = domain_id(1)
    env = ros_env(domain)
    for key, value in env.items():
        env_patch.setenv(key, value)
    tmp = tmp_path_factory.mktemp("lifecycle")
    corrupt = tmp / "truncated.safetensors"
    corrupt.write_bytes(scene.model_path.read_bytes()[:4096])
    started = {
        "missing": NodeProcess(
            [
                "-r",
                "__ns:=/missing",
                "-p",
                f"patient_model:={tmp / 'does_not_exist.safetensors'}",
                "-p",
                "autostart:=true",
            ],
            env,
            tmp / "missing.log",
        ),
        "corrupt": NodeProcess(
            ["-r", "__ns:=/corrupt", "-p", f"patient_model:={corrupt}", "-p", "autostart:=true"],
            env,
            tmp / "corrupt.log",
        ),
        "lc": NodeProcess(
            [
                "-r",
                "__ns:=/lc",
                "-p",
                f"patient_model:={scene.model_path}",
                "-p",
                "invert:=true",
                "-p",
                "image_qos:=reliable",
                "-p",
                "camera_frame:=lc_source",
            ],
            env,
            tmp / "lc.log",
        ),
    }
    probe = Probe(domain, image_topic="/lc/image", info_topic="/lc/camera_info")
    probe.subscribe_tf_static()
    try:
        yield probe, started
    finally:
        probe.close()
        for name, proc in started.items():
            code = proc.stop()
            print(f"--- {name}: exit code {code} ---\n{proc.log(2000)}")


def _configure_failure(probe: Probe, proc: NodeProcess, ns: str, expect: str):
    probe.owner = proc
    node = f"/{ns}/diffpose_node"
    summary = probe.spin_until(
        lambda: [s for s in probe.summaries if s.name == f"{ns}/diffpose_node: pipeline" and s.level == DIAG_ERROR],
        180.0,
        f"the configure failure of {node} on /diagnostics",
    )[-1]
    assert expect in summary.message, summary.message
    assert probe.get_state(node) == "unconfigured"
    assert expect in proc.log(20000)
    # Configure again: fails again, cleanly; the node still answers.
    from lifecycle_msgs.msg import Transition

    assert probe.change_state(Transition.TRANSITION_CONFIGURE, node) is False
    assert probe.get_state(node) == "unconfigured"
    assert probe.get_parameters(["patient_model"], node)["patient_model"].endswith(".safetensors")
    assert proc.alive()


def test_missing_patient_model_fails_configure_cleanly(procs):
    probe, started = procs
    _configure_failure(probe, started["missing"], "missing", "patient model not found")


def test_corrupt_patient_model_fails_configure_cleanly(procs):
    probe, started = procs
    _configure_failure(probe, started["corrupt"], "corrupt", "not a readable patient model")


def test_lifecycle_transitions_over_services(procs, scene):
    from lifecycle_msgs.msg import Transition

    from diffpose_ros.ros.conversions import transform_to_matrix

    probe, started = procs
    probe.owner = started["lc"]
    node = "/lc/diffpose_node"
    probe.wait_state("unconfigured", node)
    assert probe.image_pub.get_subscription_count() == 0

    assert probe.change_state(Transition.TRANSITION_CONFIGURE, node)
    assert probe.get_state(node) == "inactive"
    assert probe.image_pub.get_subscription_count() == 0  # subscribes only when active

    for cycle in range(2):
        assert probe.change_state(Transition.TRANSITION_ACTIVATE, node)
        assert probe.get_state(node) == "active"
        probe.wait_subscribed()
        image, info = make_frame(scene, cycle, frame_id="")
        status = probe.send(image, info)
        assert status.level == DIAG_OK, status.message
        (tf,) = probe.spin_until(lambda: probe.tf_at(image.header.stamp), 30.0, "the (inverted) TF")
        # invert:=true: camera frame -> ct, the inverse of T_ct_source.
        assert (tf.header.frame_id, tf.child_frame_id) == ("lc_source", "ct")
        assert mtre_mm(scene, np.linalg.inv(transform_to_matrix(tf.transform)), cycle) < 2.0

        assert probe.change_state(Transition.TRANSITION_DEACTIVATE, node)
        assert probe.get_state(node) == "inactive"
        probe.spin_until(
            lambda: probe.image_pub.get_subscription_count() == 0,
            30.0,
            "the image subscription to go away on deactivate",
        )
        assert probe.change_state(Transition.TRANSITION_CLEANUP, node)
        assert probe.get_state(node) == "unconfigured"
        if cycle == 0:
            assert probe.change_state(Transition.TRANSITION_CONFIGURE, node)
            assert probe.get_state(node) == "inactive"
    # An impossible transition is refused, the node carries on.
    assert probe.change_state(Transition.TRANSITION_ACTIVATE, node) is False
    assert probe.get_state(node) == "unconfigured"


def test_diagnostics_name_each_node(procs):
    probe, _ = procs
    names = {s.name for s in probe.summaries}
    assert {"missing/diffpose_node: pipeline", "corrupt/diffpose_node: pipeline", "lc/diffpose_node: pipeline"} <= names
    # /lc ends the lifecycle test unconfigured: its next periodic summary says so.
    probe.spin_until(
        lambda: any(
            status_values(s)["state"] == "unconfigured"
            for s in probe.summaries
            if s.name == "lc/diffpose_node: pipeline"
        ),
        30.0,
        "an unconfigured /lc summary",
    )
    states = {status_values(s)["state"] for s in probe.summaries if s.name == "lc/diffpose_node: pipeline"}
    labels = {"unconfigured", "inactive", "active", "configuring", "activating", "deactivating", "cleaningup"}
    assert "unconfigured" in states and states <= labels, states


@pytest.mark.parametrize("name, sig", [("lc", signal.SIGTERM), ("missing", signal.SIGINT), ("corrupt", signal.SIGTERM)])
def test_clean_exit_on_signals(procs, name, sig):
    _, started = procs
    proc = started[name]
    assert proc.alive()
    code = proc.stop(sig, timeout=60.0)
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log(100000)
