"""Bookkeeping for ``diffpose_node``'s ``/diagnostics``: counters, rates, latencies, process memory."""

from __future__ import annotations

import collections
import os
import threading

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

__all__ = ["RATE_WINDOW_S", "FrameStats", "process_rss_bytes", "stamp_str", "key_value"]

RATE_WINDOW_S = 5.0
"""Rates are frames per second over the last this many seconds."""


def process_rss_bytes() -> int:
    """Resident set size of this process (bytes; Linux ``/proc``, else the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class FrameStats:
    """Counters and recent values for ``/diagnostics`` (guarded by one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.received_times: collections.deque[float] = collections.deque()
        self.published_times: collections.deque[float] = collections.deque()
        self.processed = 0
        self.published = 0
        self.rejected = 0
        self.skipped_stamps = 0
        self.latency_receipt: collections.deque[float] = collections.deque(maxlen=50)
        self.latency_stamp: collections.deque[float] = collections.deque(maxlen=50)
        self.missed_before_receipt = 0
        self.last_sequence: dict[str, int] = {}
        self.last_frame: DiagnosticStatus | None = None
        self.last_frame_wall = 0.0

    @staticmethod
    def rate(times: collections.deque, now: float) -> float:
        while times and now - times[0] > RATE_WINDOW_S:
            times.popleft()
        if len(times) < 2:
            return 0.0
        span = max(now - times[0], 1e-6)
        return (len(times) - 1) / span if span > 0 else 0.0


def stamp_str(stamp) -> str:
    return f"{int(stamp.sec)}.{int(stamp.nanosec):09d}"


def key_value(key: str, value) -> KeyValue:
    if isinstance(value, float):
        value = f"{value:.6g}"
    return KeyValue(key=key, value=str(value))
