"""The ROS 2 runtime this package needs is installed and really talks DDS.

Set up with ``scripts/install_ros2_wheels.sh .venv`` (no ROS 2 install) or
by sourcing a ROS 2 install; run with the venv's own python:
``.venv/bin/python -m pytest -q test/ros``. ``DIFFPOSE_NO_ROS=1`` skips.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.dds

if os.environ.get("DIFFPOSE_NO_ROS") == "1":
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
FASTDDS_PROFILE = REPO / "config" / "fastdds_large_frames.xml"

try:
    import rclpy  # noqa: F401

    _ROS_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    _ROS_IMPORT_ERROR = exc

SETUP_HINT = (
    "rclpy cannot be imported ({err}). Set up ROS 2 first: run "
    "`scripts/install_ros2_wheels.sh .venv` and run the tests with "
    "`.venv/bin/python -m pytest` (or source a ROS 2 install); "
    "set DIFFPOSE_NO_ROS=1 to skip the ROS tests instead."
)

N_FRAMES = 20
MIN_FRAMES = 18
WIDTH = HEIGHT = 512
DISCOVERY_TIMEOUT_S = 10.0
RECEIVE_TIMEOUT_S = 5.0


def _require_rclpy():
    if _ROS_IMPORT_ERROR is not None:
        pytest.fail(SETUP_HINT.format(err=_ROS_IMPORT_ERROR), pytrace=False)


def test_messages_import():
    _require_rclpy()
    import rclpy  # noqa: F401
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from lifecycle_msgs.msg import Transition
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage

    for cls in (TFMessage, Image, CameraInfo, PoseWithCovarianceStamped, DiagnosticArray, Transition):
        msg = cls()
        assert deserialize_message(serialize_message(msg), cls) == msg


# The publisher process. Protocol over its stdin/stdout:
#   it waits until its two publishers are matched by a subscription, then for
#   the line "go" (the test's subscriptions have matched it), sends one
#   TFMessage on /tf and N_FRAMES images, prints "sent", and waits for "done".
PUBLISHER = textwrap.dedent(
    """
    import array, sys, time
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from geometry_msgs.msg import TransformStamped
    from sensor_msgs.msg import Image
    from tf2_msgs.msg import TFMessage

    n_frames, width, height, timeout = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rclpy.init()
    node = rclpy.create_node("diffpose_test_publisher")
    img_pub = node.create_publisher(Image, "/diffpose_test/image", qos_profile_sensor_data)
    tf_pub = node.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))

    deadline = time.monotonic() + timeout
    while img_pub.get_subscription_count() < 1 or tf_pub.get_subscription_count() < 1:
        if time.monotonic() > deadline:
            sys.exit("publisher: no subscription matched within %.0f s" % timeout)
        time.sleep(0.01)
    print("matched", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("publisher: expected 'go' on stdin")

    t = TransformStamped()
    t.header.stamp = node.get_clock().now().to_msg()
    t.header.frame_id = "world"
    t.child_frame_id = "carm_source"
    t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = 0.1, 0.2, 0.3
    t.transform.rotation.w = 1.0
    tf_pub.publish(TFMessage(transforms=[t]))

    payload = array.array("B", bytes(width * height * 2))
    for i in range(n_frames):
        msg = Image(height=height, width=width, encoding="mono16", is_bigendian=0, step=width * 2)
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = "frame_%d" % i
        payload[0] = i
        msg.data = payload
        img_pub.publish(msg)
        time.sleep(0.02)  # pacing: 50 Hz
    print("sent", flush=True)
    sys.stdin.readline()  # "done" (or EOF): keep the writer alive until the test has read
    node.destroy_node()
    rclpy.shutdown()
    """
)


def _domain_id() -> int:
    return 1 + os.getpid() % 100


def test_two_processes_large_images_and_tf(monkeypatch, tmp_path):
    _require_rclpy()
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from tf2_msgs.msg import TFMessage

    assert FASTDDS_PROFILE.is_file(), FASTDDS_PROFILE
    domain_id = _domain_id()
    ros_env = {
        "ROS_DOMAIN_ID": str(domain_id),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(FASTDDS_PROFILE),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
    }
    for key, value in ros_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)
    monkeypatch.delenv("ROS_STATIC_PEERS", raising=False)

    t_start = time.monotonic()
    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    node = rclpy.create_node("diffpose_test_subscriber", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)

    frames = []
    tf_msgs = []

    def on_image(msg):
        frames.append((msg.header.frame_id, msg.width, msg.height, msg.encoding, msg.step, len(msg.data)))

    img_sub = node.create_subscription(Image, "/diffpose_test/image", on_image, qos_profile_sensor_data)
    tf_sub = node.create_subscription(
        TFMessage, "/tf", tf_msgs.append, QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    )

    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    stderr_path = tmp_path / "publisher.stderr"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(N_FRAMES), str(WIDTH), str(HEIGHT), str(DISCOVERY_TIMEOUT_S)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("wb"),
        env={**os.environ, **ros_env},
        text=True,
    )

    def publisher_failure(what):
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        return f"{what} (publisher exit code {proc.returncode}, stderr: {stderr_path.read_text()[-2000:]!r})"

    try:
        # Discovery: both of our subscriptions see the publisher process.
        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        while img_sub.get_publisher_count() < 1 or tf_sub.get_publisher_count() < 1:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(publisher_failure(f"no publisher discovered within {DISCOVERY_TIMEOUT_S} s"))
            executor.spin_once(timeout_sec=0.01)
        t_discovered = time.monotonic()

        # The publisher says it has matched us too (it waits on get_subscription_count()).
        line = proc.stdout.readline().strip()
        if line != "matched":
            pytest.fail(publisher_failure(f"publisher said {line!r} instead of 'matched'"))
        proc.stdin.write("go\n")
        proc.stdin.flush()

        deadline = time.monotonic() + RECEIVE_TIMEOUT_S
        while (len(frames) < N_FRAMES or not tf_msgs) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.01)
            if proc.poll() is not None:
                break
        # Whatever is still queued after the last frame.
        end = time.monotonic() + 0.2
        while time.monotonic() < end and len(frames) < N_FRAMES:
            executor.spin_once(timeout_sec=0.01)

        proc.stdin.write("done\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, publisher_failure("publisher failed")
        assert "sent" in out

        elapsed = time.monotonic() - t_start
        print(
            f"domain {domain_id}: discovery {t_discovered - t_start:.2f} s, "
            f"{len(frames)}/{N_FRAMES} frames, {len(tf_msgs)} TFMessage, total {elapsed:.2f} s"
        )
        assert len(frames) >= MIN_FRAMES, f"only {len(frames)}/{N_FRAMES} best-effort 512x512 mono16 frames arrived"
        for frame_id, width, height, encoding, step, size in frames:
            assert frame_id.startswith("frame_")
            assert (width, height, encoding, step, size) == (WIDTH, HEIGHT, "mono16", 2 * WIDTH, WIDTH * HEIGHT * 2)
        assert len(tf_msgs) == 1, f"expected one TFMessage on /tf, got {len(tf_msgs)}"
        (tf,) = tf_msgs[0].transforms
        assert (tf.header.frame_id, tf.child_frame_id) == ("world", "carm_source")
        assert (tf.transform.translation.x, tf.transform.translation.y, tf.transform.translation.z) == (0.1, 0.2, 0.3)
        assert elapsed < 20.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()


def test_the_package_data_is_found_where_it_is_installed(monkeypatch, tmp_path):
    """The ament index's share directory first (colcon, or the venv that ``scripts/dev.sh setup``
    registered), then ``<sys.prefix>/share``, then this checkout."""
    from diffpose_ros.ros import runtime

    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert runtime.large_frame_profile().read_bytes() == FASTDDS_PROFILE.read_bytes()  # the venv's or the checkout's
    installed = tmp_path / "install" / "diffpose_ros"
    (installed / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    (installed / "share" / "ament_index" / "resource_index" / "packages" / "diffpose_ros").touch()
    (installed / "share" / "diffpose_ros" / "config").mkdir(parents=True)
    (installed / "share" / "diffpose_ros" / "config" / "fastdds_large_frames.xml").write_text("<dds/>")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(installed))
    assert runtime.large_frame_profile() == installed / "share" / "diffpose_ros" / "config" / "fastdds_large_frames.xml"
    assert runtime.package_file("config", "no such file") is None


def test_the_readme_setup_registers_the_package_in_the_venv(monkeypatch):
    """After ``scripts/dev.sh setup`` (an editable install, which leaves data_files out), ``ros2 run``
    and ``ros2 launch`` find the package with the venv on ``AMENT_PREFIX_PATH``."""
    if not Path(sys.prefix, ".diffpose_setup_stamp").is_file():
        pytest.skip("not the venv of scripts/dev.sh setup")
    from ament_index_python.packages import get_package_prefix, get_package_share_directory

    monkeypatch.setenv("AMENT_PREFIX_PATH", sys.prefix)
    share = Path(get_package_share_directory("diffpose_ros"))
    assert Path(get_package_prefix("diffpose_ros")) == Path(sys.prefix)
    for item in ("package.xml", "launch/diffpose.launch.py", "config/diffpose.yaml", "config/fastdds_large_frames.xml"):
        assert (share / item).is_file(), item
    for exe in ("diffpose_node", "diffpose_igtl"):
        path = Path(sys.prefix, "lib", "diffpose_ros", exe)
        assert path.is_file() and os.access(path, os.X_OK), path
