"""``diffpose_node``'s ``/diagnostics``: counters, rates and latencies, and the statuses built from them.

Two kinds of ``diagnostic_msgs/DiagnosticStatus``: ``<node>: frame`` for every frame
(:func:`frame_status`: OK with a published pose, WARN for a skipped frame or a pose published outside
the patient model's views, ERROR with the reason for a refused or rejected one) and
``<node>: pipeline``, a periodic summary (:meth:`FrameStats.summary`).
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

__all__ = ["LOST_FRAMES", "RATE_WINDOW_S", "FrameStats", "frame_status", "key_value", "process_rss_bytes", "status"]

RATE_WINDOW_S = 5.0
"""Rates are frames per second over the last this many seconds."""

LOST_FRAMES = (
    "camera_info arrives but no image: frames lost in transport (large frames from a publisher with Fast DDS's "
    "defaults need this node's config/fastdds_node.xml and net.core.rmem_max >= 4194304; see the README)"
)
"""The summary's WARN while camera_info has arrived within :data:`RATE_WINDOW_S` and no image has."""

SUMMARY_FROM_LAST_FRAME = (
    "stamp", "similarity", "iterations", "mode", "path", "valid_fraction", "t_preprocess_s", "t_cnn_s", "t_refine_s",
    "t_total_s",
)  # fmt: skip
"""Values of the last frame status that the summary repeats (as ``last_<key>``)."""


def process_rss_bytes() -> int:
    """Resident set size of this process (bytes; Linux ``/proc``, else the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def key_value(key: str, value) -> KeyValue:
    if isinstance(value, float):
        value = f"{value:.6g}"
    return KeyValue(key=key, value=str(value))


def status(name: str, hardware_id: str, level: bytes, message: str, values: dict) -> DiagnosticStatus:
    """A ``DiagnosticStatus`` with ``values`` as key-value strings (floats to 6 significant digits)."""
    pairs = [key_value(k, v) for k, v in values.items()]
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id, values=pairs)


def frame_status(name: str, hardware_id: str, level: bytes, message: str, header, values: dict) -> DiagnosticStatus:
    """The ``<node>: frame`` status of the image with ``header`` (its stamp and frame_id come first)."""
    stamp = f"{int(header.stamp.sec)}.{int(header.stamp.nanosec):09d}"
    return status(
        f"{name}: frame", hardware_id, level, message, {"stamp": stamp, "frame_id": header.frame_id, **values}
    )


class FrameStats:
    """Counters and recent values of the node's frames (thread-safe: callbacks and the worker)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._received_times: collections.deque[float] = collections.deque()
            self._info_times: collections.deque[float] = collections.deque()
            self._published_times: collections.deque[float] = collections.deque()
            self._counts = dict.fromkeys(
                ("received", "processed", "published", "rejected", "skipped_stamps", "missed", "clock_jumps"), 0
            )
            self._latency_receipt: collections.deque[float] = collections.deque(maxlen=50)
            self._latency_stamp: collections.deque[float] = collections.deque(maxlen=50)
            self._last_sequence: dict[str, int] = {}
            self._last_frame: DiagnosticStatus | None = None
            self._last_frame_time = 0.0

    def received(self, now: float, msg_info=None) -> None:
        """An image reached the callback; ``msg_info`` (rclpy's MessageInfo) reveals frames that did
        not: a gap in a publisher's sequence numbers (replaced in the depth-1 reader queue, or lost)."""
        with self._lock:
            self._received_times.append(now)
            self._counts["received"] += 1
            seq = msg_info.get("publication_sequence_number") if msg_info else None
            gid = msg_info.get("publisher_gid") if msg_info else None
            if seq is None or gid is None:
                return
            last = self._last_sequence.get(repr(gid))
            if last is not None and seq <= last:  # not a newer sample of this publisher: no gap to count
                return
            if last is not None and seq > last + 1:
                self._counts["missed"] += seq - last - 1
            self._last_sequence[repr(gid)] = seq

    def camera_info(self, now: float) -> None:
        """A camera_info reached the callback (its rate beside the images' tells frames lost in transport)."""
        with self._lock:
            self._info_times.append(now)

    def time_jumped(self) -> None:
        with self._lock:
            self._counts["clock_jumps"] += 1

    def skipped(self) -> None:
        with self._lock:
            self._counts["skipped_stamps"] += 1

    def rejected(self) -> None:
        with self._lock:
            self._counts["processed"] += 1
            self._counts["rejected"] += 1

    def published(self, now: float, latency_receipt_s: float, latency_stamp_s: float) -> None:
        with self._lock:
            self._counts["processed"] += 1
            self._counts["published"] += 1
            self._published_times.append(now)
            self._latency_receipt.append(latency_receipt_s)
            self._latency_stamp.append(latency_stamp_s)

    def remember(self, status: DiagnosticStatus) -> None:
        """The latest frame status (the summary repeats it while it is recent)."""
        with self._lock:
            self._last_frame, self._last_frame_time = status, time.monotonic()

    @staticmethod
    def _rate(times: collections.deque, now: float) -> float:
        while times and now - times[0] > RATE_WINDOW_S:
            times.popleft()
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(now - times[0], 1e-6)

    def summary(
        self, name: str, hardware_id: str, state: str, config_error: str, mailbox_dropped: int, values: dict
    ) -> DiagnosticStatus:
        """The ``<node>: pipeline`` status: ERROR when configuring failed, WARN when not active or when
        camera_info arrives without images (:data:`LOST_FRAMES`), the last frame's level and message
        while it is recent and not OK, else OK. ``values`` (device, model, ...) follow the state, then
        rates, counters, latencies and the last frame's results; ``mailbox_dropped``: frames the
        node's mailbox replaced twice or passed over, never processed."""
        now = time.monotonic()
        with self._lock:
            c = dict(self._counts)
            rates = {"rate_in_hz": self._rate(self._received_times, now)}
            rates["rate_camera_info_hz"] = self._rate(self._info_times, now)
            images_recent = bool(self._received_times)  # within RATE_WINDOW_S (_rate dropped the older ones)
            rates["rate_out_hz"] = self._rate(self._published_times, now)
            lr, ls = list(self._latency_receipt), list(self._latency_stamp)
            last, last_age = self._last_frame, now - self._last_frame_time
        if config_error:
            level, message = DiagnosticStatus.ERROR, config_error
        elif state != "active":
            level, message = DiagnosticStatus.WARN, f"lifecycle state {state}"
        elif rates["rate_camera_info_hz"] > 0 and not images_recent:
            level, message = DiagnosticStatus.WARN, LOST_FRAMES
        elif last is not None and last_age < 2 * RATE_WINDOW_S and last.level != DiagnosticStatus.OK:
            level, message = last.level, last.message
        else:
            level, message = DiagnosticStatus.OK, "ok" if last is not None else "waiting for frames"
        out = {
            "state": state,
            **values,
            **rates,
            "frames_received": c["received"],
            "frames_dropped": mailbox_dropped + c["missed"],
            "frames_dropped_mailbox": mailbox_dropped,
            "frames_processed": c["processed"],
            "frames_published": c["published"],
            "frames_rejected": c["rejected"],
            "frames_skipped_old_stamp": c["skipped_stamps"],
            "frames_dropped_before_receipt": c["missed"],
            "clock_jumps_back": c["clock_jumps"],
            "latency_receipt_to_publish_last_s": lr[-1] if lr else math.nan,
            "latency_receipt_to_publish_median_s": float(np.median(lr)) if lr else math.nan,
            "latency_stamp_to_publish_last_s": ls[-1] if ls else math.nan,
            "latency_stamp_to_publish_median_s": float(np.median(ls)) if ls else math.nan,
            "rss_mb": process_rss_bytes() / 2**20,
        }
        if last is not None:
            for kv in last.values:
                if kv.key in SUMMARY_FROM_LAST_FRAME:
                    out[f"last_{kv.key}"] = kv.value
            out["last_result"] = last.message
        return status(f"{name}: pipeline", hardware_id, level, message, out)
