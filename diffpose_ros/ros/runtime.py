"""Running rclpy: the nodes' executor loop and GIL switch interval; for the command-line tools, a
node spun in a background thread with a clean stop on SIGINT/SIGTERM; the package's installed data,
and the large-frame Fast DDS profiles.

Fast DDS's default shared-memory segment (512 KiB) is too small for fluoroscopy frames: a writer
with it loses best-effort frames of 512 KiB and more. :func:`use_large_frame_profile` points
``FASTDDS_DEFAULT_PROFILES_FILE`` at one of the package's profiles unless the user set one:
``config/fastdds_large_frames.xml`` for the tools (16 MiB segments), ``config/fastdds_node.xml`` for
the nodes (their readers reached over UDP with 4 MiB socket buffers, so that a publisher with Fast
DDS's defaults gets large frames to them). It must be called before the first participant is
created; processes with and without it still talk to each other.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

__all__ = [
    "GIL_SWITCH_INTERVAL_S",
    "NODE_PROFILE_NAME",
    "PACKAGE",
    "PROFILE_NAME",
    "large_frame_profile",
    "package_file",
    "share_directories",
    "use_large_frame_profile",
    "RosSession",
    "spin_until_shutdown",
]

PACKAGE = "diffpose_ros"
PROFILE_NAME = "fastdds_large_frames.xml"
NODE_PROFILE_NAME = "fastdds_node.xml"

GIL_SWITCH_INTERVAL_S = 0.0005
"""The nodes' GIL switch interval (``sys.setswitchinterval``; Python's default is 5 ms). The worker
gives the GIL up for every tensor operation and render, and waits up to this long to get it back from
an executor thread handling incoming frames, many times per frame: a short interval keeps the
worker's frames short under a stream (``docs/performance.md``)."""


def spin_until_shutdown(executor) -> None:
    """``executor.spin()`` until the context shuts down, past a race in rclpy: when a callback destroys
    a subscription (deactivate unsubscribes) after the spinning thread listed the node's waitables,
    that thread still adds the subscription's event handler to its wait set and rclpy raises
    ``InvalidHandle``; the next wait set no longer lists it (``destroy_subscription`` removes its
    handlers), so spinning goes on."""
    import rclpy
    from rclpy.exceptions import InvalidHandle

    while rclpy.ok():
        try:
            executor.spin_once()
        except InvalidHandle:
            continue


def share_directories() -> list[Path]:
    """Where the package's data (``config/``, ``launch/``, ``package.xml``) may lie, in lookup order:
    the ament index's share directory (a colcon install, or a venv that ``scripts/dev.sh setup``
    registered, on ``AMENT_PREFIX_PATH``), ``share/diffpose_ros`` under the interpreter's prefix
    (``pip install .``), and the source tree (a checkout, ``pip install -e .``)."""
    found = []
    try:
        from ament_index_python.packages import get_package_share_directory

        found.append(Path(get_package_share_directory(PACKAGE)))
    except (ImportError, LookupError, OSError):  # no ament index, no AMENT_PREFIX_PATH, or not registered
        pass
    return found + [Path(sys.prefix) / "share" / PACKAGE, Path(__file__).resolve().parents[2]]


def package_file(*parts: str) -> Path | None:
    """The first existing ``<share>/<parts>`` over :func:`share_directories` (None: nowhere)."""
    return next((d.joinpath(*parts) for d in share_directories() if d.joinpath(*parts).is_file()), None)


def large_frame_profile(name: str = PROFILE_NAME) -> Path | None:
    """The shipped Fast DDS profile ``config/<name>`` (:data:`PROFILE_NAME` for the tools,
    :data:`NODE_PROFILE_NAME` for the nodes; see :func:`package_file`)."""
    return package_file("config", name)


def use_large_frame_profile(name: str = PROFILE_NAME) -> str | None:
    """Set ``FASTDDS_DEFAULT_PROFILES_FILE`` to the shipped profile ``name`` when it is unset and the
    rmw is Fast DDS's; returns the profile in use (None: Fast DDS's defaults)."""
    current = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")
    if current:
        return current
    profile = large_frame_profile(name)
    if profile is not None and os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp").startswith("rmw_fastrtps"):
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
        return str(profile)
    return None


class RosSession:
    """``with RosSession("name") as s:`` an initialised context, ``s.node`` spun by a
    single-threaded executor in a daemon thread, and ``s.stop`` (a ``threading.Event``) set by
    SIGINT/SIGTERM (so a tool's main loop ends cleanly and finishes its files).

    Single-threaded because the tools' callbacks are short and the caller's thread must keep its
    timing: rclpy's ``MultiThreadedExecutor`` loops in Python (rebuilding its wait set, polling its
    futures) and holds the GIL long enough to delay a replay's paced sends into bursts."""

    def __init__(self, name: str, args: list[str] | None = None):
        self.name = name
        self.args = args
        self.stop = threading.Event()

    def __enter__(self) -> RosSession:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        use_large_frame_profile()
        rclpy.init(args=self.args, signal_handler_options=SignalHandlerOptions.NO)
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.node = rclpy.create_node(self.name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name=f"{self.name}-spin", daemon=True)
        self._thread.start()
        return self

    def _on_signal(self, signum, frame) -> None:
        self.stop.set()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was requested."""
        return self.stop.wait(seconds)

    def __exit__(self, *exc) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        rclpy.try_shutdown()
        self._thread.join(timeout=2.0)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
