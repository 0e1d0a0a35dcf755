"""``diffpose_node``'s worker: the newest frame in, a pose or a stated reason out, in its own thread.

The image callback only puts each message into a :class:`Mailbox`, which holds the newest frame
and the one it replaced, so the backlog is never more than one frame. The worker takes the newest
frame (the replaced one is dropped) unless it is gaining on the stream: after a frame it published
without tracking at the stream's start or after tracked frames (a cold start takes longer than a
frame interval; the frames after it are tracked again), or a tracked one it posed and reported
within the stream's frame interval (or before that interval is known), it catches up with the
replaced frame first. A caught-up frame has waited a frame interval or more, so its tracking
deadline (``tracking.frame_budget``) has usually passed and its refinement stops at its first
settled step. A stream faster than tracking, or never tracked, gets the newest frame each time.

The worker finds the frame's intrinsics (:func:`~.camera_info.choose_intrinsics`), prepares it with
the core's one preparation step (:func:`~diffpose_ros.core.frames.prepare.prepare_frame`), runs the
pipeline and hands an :class:`Outcome` to the node, which publishes it. Poses go out only for stamps
strictly newer than the last published one of the stream (a stream starts at each activation, and
again when the node's clock jumps back). No rclpy here: tests drive a worker with plain messages.
"""

from __future__ import annotations

import statistics
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus

from diffpose_ros.core import (
    Frame,
    FrameResult,
    Pipeline,
    Route,
    prepare_frame,
    set_renderer_threads,
    stamp_from_ns,
    stamp_ns,
)

from .camera_info import CameraInfoCache, choose_intrinsics
from .conversions import camera_info_to_intrinsics, frame_kind, image_to_numpy
from .settings import Settings

__all__ = ["FrameWorker", "Mailbox", "Outcome", "OutcomeKind", "Received", "diagnostic_values"]


@dataclass
class Received:
    """An image message and ``time.monotonic()`` at its receipt."""

    msg: Any
    wall: float


class Mailbox:
    """The newest :class:`Received` and the one it replaced; ``dropped`` counts the frames replaced
    twice or passed over by a take, and :meth:`interval_s` tells how often frames arrive (every one
    put, taken or not)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Received | None = None
        self._replaced: Received | None = None
        self._receipts: deque[float] = deque(maxlen=17)
        self.dropped = 0

    def put(self, item: Received) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += self._replaced is not None
                self._replaced = self._item
            self._item = item
            self._receipts.append(item.wall)
            self._cond.notify_all()

    def interval_s(self) -> float | None:
        """Median seconds between the receipts of the last 17 frames (None before 5): the stream's
        frame interval, whatever the worker kept up with."""
        with self._cond:
            times = list(self._receipts)
        if len(times) < 5:
            return None
        return statistics.median(b - a for a, b in zip(times, times[1:]))

    def take(self, timeout: float, catch_up: bool = False) -> Received | None:
        """The frame to process next, after up to ``timeout`` s (None if none came): with ``catch_up``
        the replaced frame when there is one (the newest stays for the next take), else the newest
        (emptying the mailbox; the replaced one is dropped)."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None, timeout)
            if catch_up and self._replaced is not None:
                item, self._replaced = self._replaced, None
                return item
            self.dropped += self._replaced is not None
            item, self._item, self._replaced = self._item, None, None
            return item

    def clear(self) -> None:
        with self._cond:
            self._item = self._replaced = None


class OutcomeKind(str, Enum):
    """What became of a frame (compares equal to its value, and prints as it)."""

    def __str__(self) -> str:
        return self.value

    PUBLISHED = "published"
    """``result`` is an accepted pose for ``frame``."""
    REJECTED = "rejected"
    """Refused input, or refused by the gate (then with the refused ``result`` and its ``frame``)."""
    SKIPPED = "skipped"
    """The stamp is not newer than the last published pose's."""
    FAILED = "failed"
    """An internal error."""


@dataclass
class Outcome:
    """What became of one frame: its :class:`OutcomeKind`, the diagnostic ``level`` and ``message``,
    the frame status's ``values``, and the pipeline's typed ``result`` with its ``frame`` when the
    pipeline ran."""

    kind: OutcomeKind
    level: bytes
    message: str
    values: dict = field(default_factory=dict)
    result: FrameResult | None = None
    frame: Frame | None = None


def diagnostic_values(result: FrameResult) -> dict:
    """The frame status's values of a pipeline result, from its ``as_dict()``: its scalars, the
    polarity scores as one string and each timing as ``t_<stage>_s``."""
    d = result.as_dict()
    values = {
        key: d[key]
        for key in ("mode", "path", "start", "similarity", "iterations", "converged", "out_of_time", "in_view_range")
    }
    values["polarity"] = d["polarity"]
    values["polarity_scores"] = " ".join(f"{v:.3f}" for v in d["polarity_scores"])
    values["outlier_fraction"] = d["outlier_fraction"]
    values.update({f"t_{name}_s": seconds for name, seconds in d["timings"].items()})
    return values


class FrameWorker:
    """Processes the frames of :attr:`mailbox` with ``pipeline`` in a thread of its own: the newest,
    or the one the newest replaced while the worker is gaining on the stream (see the module).

    ``settings``: the node's current :class:`~.settings.Settings`; ``infos``: the camera_info cache;
    ``camera_info_matched``: whether a camera_info publisher is matched (worth waiting for one);
    ``report``: the node's publisher of an :class:`Outcome`; ``logger``: rclpy-style logger.
    :attr:`renderer_threads`: the CPU renderer's threads in the worker thread (``renderer_threads``
    parameter; 0 until the thread has started).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        settings: Callable[[], Settings],
        infos: CameraInfoCache,
        camera_info_matched: Callable[[], bool],
        report: Callable[[Received, Outcome], None],
        logger,
    ):
        self.pipeline = pipeline
        self.mailbox = Mailbox()
        self._settings, self._infos, self._matched = settings, infos, camera_info_matched
        self._report, self._logger = report, logger
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_stamp_ns: int | None = None
        self._catch_up = False  # take the replaced frame next (:meth:`_gaining`)
        self._after_tracking = True  # the last published frame was tracked, or the stream starts
        self.renderer_threads = 0

    def start(self, keep_running: Callable[[], bool] = lambda: True) -> None:
        """Start the thread, on a new stream (:meth:`restart_stream`); it ends at :meth:`stop` or when
        ``keep_running()`` turns false. Refused while the thread of an earlier start still runs."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the worker thread is still running: stop it first")
        self._stop.clear()
        self.mailbox.clear()
        self.restart_stream()
        self._thread = threading.Thread(target=self._loop, args=(keep_running,), name="diffpose_worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the thread (waiting up to ``timeout`` s for the frame in hand) and drop any waiting frame."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self._logger.error(f"the worker thread did not stop within {timeout:g} s")
                return
        self._thread = None
        self.mailbox.clear()

    def restart_stream(self) -> None:
        """Take the next frame as the start of a new stream: whatever its stamp (no older published
        pose holds it back) and from a cold start. Applied by the worker thread before that frame;
        the node calls it when its clock jumps back (a replayed bag starting over)."""
        self._restart.set()

    def _loop(self, keep_running: Callable[[], bool]) -> None:
        self.renderer_threads = set_renderer_threads(self._settings().renderer_threads)
        while not self._stop.is_set() and keep_running():
            # A new stream starts with the newest frame, never with one kept from before the restart.
            item = self.mailbox.take(0.1, catch_up=self._catch_up and not self._restart.is_set())
            if item is None or self._stop.is_set():
                continue
            self._catch_up = False
            if self._restart.is_set():
                self._restart.clear()
                self._last_stamp_ns = None
                self._after_tracking = True
                self.pipeline.reset_tracking()
            began, published = time.monotonic(), None
            try:
                outcome = self.handle(item)
                if outcome is not None and not self._stop.is_set():
                    if outcome.kind == OutcomeKind.PUBLISHED:
                        self._last_stamp_ns = stamp_ns(item.msg.header.stamp)
                        published = outcome.result
                    self._report(item, outcome)
            except Exception as err:
                self._logger.error(f"frame failed: {err!r}\n{traceback.format_exc()}")
                message = f"internal error: {type(err).__name__}: {err}"
                try:
                    self._report(item, Outcome(OutcomeKind.FAILED, DiagnosticStatus.ERROR, message))
                except Exception as again:  # e.g. publishing after shutdown: the thread carries on
                    self._logger.error(f"could not report the failed frame: {again!r}")
            if published is not None:
                self._catch_up = self._gaining(published, time.monotonic() - began)
                self._after_tracking = published.mode == Route.TRACKING

    def _gaining(self, published: FrameResult, seconds: float) -> bool:
        """Whether the worker gains on the stream after a frame ``published`` (and reported) in
        ``seconds``: a frame that was not tracked but starts the stream or follows a tracked one (the
        frames after it are tracked again; a stream whose frames are never tracked gains nothing), or
        a tracked frame done within the stream's frame interval (or before that is known). Never
        with tracking off."""
        if not self._settings().tracking_enabled:
            return False
        if published.mode != Route.TRACKING:
            return self._after_tracking
        interval = self.mailbox.interval_s()
        return interval is None or seconds < interval

    def handle(self, item: Received) -> Outcome | None:
        """The :class:`Outcome` of one frame (None when the worker was stopped meanwhile)."""
        msg, s = item.msg, self._settings()
        stamp = stamp_ns(msg.header.stamp)
        values = {"encoding": msg.encoding, "size": f"{msg.width}x{msg.height}"}
        values["t_in_mailbox_s"] = time.monotonic() - item.wall
        if self._last_stamp_ns is not None and stamp <= self._last_stamp_ns:
            message = (
                "stamp not newer than the last published pose: frame skipped "
                "(a replay that starts over: publish /clock and set use_sim_time, or restart the node's activation)"
            )
            return Outcome(OutcomeKind.SKIPPED, DiagnosticStatus.WARN, message, values)
        try:
            pixels = image_to_numpy(msg)  # a malformed message is refused before any waiting
            t0 = time.perf_counter()
            k, values["intrinsics_source"] = self._intrinsics(msg, s)
            values["t_camera_info_wait_s"] = time.perf_counter() - t0
            frame = prepare_frame(pixels, frame_kind(msg.encoding, s.input_kind), k, s.mirror, s.field())
            values["t_convert_s"] = frame.prepare_seconds
            values["valid_fraction"] = frame.valid_fraction
            if self._stop.is_set():
                return None
            deadline = self._deadline(item, s)
            result = self.pipeline.process(frame, stamp=stamp * 1e-9, track=s.tracking_enabled, deadline=deadline)
        except ValueError as err:
            text = stamp_from_ns(stamp_ns(msg.header.stamp))
            self._logger.warning(f"frame {text} refused: {err}", throttle_duration_sec=1.0)
            return Outcome(OutcomeKind.REJECTED, DiagnosticStatus.ERROR, f"bad frame: {err}", values)
        values.update(diagnostic_values(result))
        if not result.accepted:
            message = f"rejected by the gate: {result.reason}"
            return Outcome(OutcomeKind.REJECTED, DiagnosticStatus.ERROR, message, values, result, frame)
        if result.in_view_range is False:  # a pose the CNN was not trained near: worth a look, still gated
            message = "pose published, outside the patient model's range of views"
            return Outcome(OutcomeKind.PUBLISHED, DiagnosticStatus.WARN, message, values, result, frame)
        return Outcome(OutcomeKind.PUBLISHED, DiagnosticStatus.OK, "pose published", values, result, frame)

    def _deadline(self, item: Received, s: Settings) -> float | None:
        """``time.perf_counter()`` by which a tracked frame's refinement stops stepping: its receipt plus
        ``tracking.frame_budget`` of the stream's frame interval (None: no budget, or no interval yet)."""
        interval = self.mailbox.interval_s()
        if s.tracking_frame_budget <= 0 or interval is None:
            return None
        return time.perf_counter() + item.wall + s.tracking_frame_budget * interval - time.monotonic()

    def _intrinsics(self, msg, s: Settings):
        stamp = (int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
        width, height = int(msg.width), int(msg.height)
        info = self._infos.wait_for(stamp, s.camera_info_wait_s, lambda: not self._stop.is_set() and self._matched())
        if info is not None and any(float(d) != 0.0 for d in info.d):
            self._logger.warning(
                f"camera_info has distortion coefficients D={list(info.d)}, which the node does not apply: "
                "it expects undistorted frames (remap image to a rectified topic, e.g. image_proc's image_rect)",
                throttle_duration_sec=10.0,
            )
        return choose_intrinsics(
            stamp,
            None if info is None else lambda: camera_info_to_intrinsics(info, width, height),
            lambda: s.parameter_intrinsics(width, height),
            self._infos.latest_stamp(),
        )
