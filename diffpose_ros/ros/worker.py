"""``diffpose_node``'s worker: the newest frame in, a pose or a stated reason out, in two threads.

The image callback only puts each message into a one-slot :class:`Mailbox` (a frame still waiting
there is replaced and counted as dropped), so there is never a backlog. Two stages follow, each in
a thread of its own and joined by a second one-slot mailbox, so that the next frame is made ready
while the current one is registered:

- ``diffpose_prepare`` takes the newest message, converts it, finds its intrinsics
  (:func:`~.camera_info.choose_intrinsics`, waiting for its camera_info if one is coming) and
  prepares it with the core's one preparation step (:func:`~diffpose_ros.core.preprocess.prepare_frame`);
- ``diffpose_worker`` takes the newest prepared frame, runs the pipeline and hands an
  :class:`Outcome` to the node, which publishes it.

A frame that is refused while being prepared reaches the node the same way, as a rejected
outcome. Poses go out only for stamps strictly newer than the last published one. No rclpy here:
tests drive a worker with plain messages.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus

from ..core.pipeline import FrameResult, Pipeline
from ..core.preprocess import Frame, prepare_frame
from .camera_info import CameraInfoCache, choose_intrinsics, stamp_text
from .conversions import camera_info_to_intrinsics, frame_kind, image_to_numpy
from .settings import Settings

__all__ = ["FrameWorker", "Mailbox", "Outcome", "Prepared", "Received"]


@dataclass
class Received:
    """An image message and ``time.monotonic()`` at its receipt."""

    msg: Any
    wall: float


class Mailbox:
    """One slot holding the newest item; ``dropped`` counts the replaced ones."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self.dropped = 0

    def put(self, item: Any) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()

    def take(self, timeout: float) -> Any:
        """The waiting item (emptying the slot), after up to ``timeout`` s; None if none came."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None, timeout)
            item, self._item = self._item, None
            return item

    def clear(self) -> None:
        with self._cond:
            self._item = None


@dataclass
class Outcome:
    """What became of one frame: ``kind`` (``published``: ``result`` is an accepted pose for
    ``frame``; ``rejected``: refused input, or by the gate, with the refused ``result`` and its
    ``frame``; ``skipped``: stamp not newer; ``failed``: internal error), the diagnostic ``level``
    and ``message``, and the frame status's ``values``."""

    kind: str
    level: bytes
    message: str
    values: dict = field(default_factory=dict)
    result: FrameResult | None = None
    frame: Frame | None = None


@dataclass
class Prepared:
    """A :class:`Received` frame after preparation: the ``frame`` for the pipeline, or the
    ``outcome`` that refused it; the frame status's ``values`` so far; ``wall``: ``time.monotonic()``
    when it was ready."""

    item: Received
    values: dict
    wall: float
    frame: Frame | None = None
    outcome: Outcome | None = None


class FrameWorker:
    """Prepares the newest frame of :attr:`mailbox` and processes it with ``pipeline``, in two threads.

    ``settings``: the node's current :class:`~.settings.Settings`; ``infos``: the camera_info cache;
    ``camera_info_matched``: whether a camera_info publisher is matched (worth waiting for one);
    ``report``: the node's publisher of an :class:`Outcome`; ``logger``: rclpy-style logger.
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
        self._ready = Mailbox()  # prepared frames, the worker's input
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_stamp_ns: int | None = None

    @property
    def dropped(self) -> int:
        """Frames replaced by newer ones in either one-slot mailbox before they were processed."""
        return self.mailbox.dropped + self._ready.dropped

    def start(self, keep_running: Callable[[], bool] = lambda: True) -> None:
        """Start both threads; they end at :meth:`stop` or when ``keep_running()`` turns false."""
        self._stop.clear()
        self.mailbox.clear()
        self._ready.clear()
        self._threads = [
            threading.Thread(target=loop, args=(keep_running,), name=name, daemon=True)
            for loop, name in ((self._prepare_loop, "diffpose_prepare"), (self._process_loop, "diffpose_worker"))
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop both threads (waiting up to ``timeout`` s for the frame in hand) and drop any waiting frame."""
        self._stop.set()
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self.mailbox.clear()
        self._ready.clear()

    def _prepare_loop(self, keep_running: Callable[[], bool]) -> None:
        while not self._stop.is_set() and keep_running():
            item = self.mailbox.take(0.1)
            if item is None or self._stop.is_set():
                continue
            try:
                prepared = self.prepare(item)
            except Exception as err:
                self._logger.error(f"frame preparation failed: {err!r}\n{traceback.format_exc()}")
                message = f"internal error: {type(err).__name__}: {err}"
                prepared = Prepared(
                    item, {}, time.monotonic(), outcome=Outcome("failed", DiagnosticStatus.ERROR, message)
                )
            if not self._stop.is_set():
                self._ready.put(prepared)

    def _process_loop(self, keep_running: Callable[[], bool]) -> None:
        while not self._stop.is_set() and keep_running():
            prepared = self._ready.take(0.1)
            if prepared is None or self._stop.is_set():
                continue
            item = prepared.item
            try:
                outcome = self.process(prepared)
                if outcome is not None and not self._stop.is_set():
                    self._report(item, outcome)
                    if outcome.kind == "published":
                        self._last_stamp_ns = _stamp_ns(item.msg)
            except Exception as err:
                self._logger.error(f"frame failed: {err!r}\n{traceback.format_exc()}")
                message = f"internal error: {type(err).__name__}: {err}"
                self._report(item, Outcome("failed", DiagnosticStatus.ERROR, message))

    def prepare(self, item: Received) -> Prepared:
        """Convert one message and prepare its frame; a refused frame gets a rejected ``outcome``."""
        msg, s = item.msg, self._settings()
        values = {"encoding": msg.encoding, "size": f"{msg.width}x{msg.height}"}
        values["t_in_mailbox_s"] = time.monotonic() - item.wall
        try:
            pixels = image_to_numpy(msg)  # a malformed message is refused before any waiting
            t0 = time.perf_counter()
            k, values["intrinsics_source"] = self._intrinsics(msg, s)
            values["t_camera_info_wait_s"] = time.perf_counter() - t0
            frame = prepare_frame(pixels, frame_kind(msg.encoding, s.input_kind), k, s.mirror, s.field())
        except ValueError as err:
            return Prepared(item, values, time.monotonic(), outcome=self._refused(msg, err, values))
        values["t_convert_s"] = frame.prepare_seconds
        values["valid_fraction"] = frame.valid_fraction
        return Prepared(item, values, time.monotonic(), frame=frame)

    def process(self, prepared: Prepared) -> Outcome | None:
        """The :class:`Outcome` of one prepared frame (None when the worker was stopped meanwhile)."""
        msg, values = prepared.item.msg, prepared.values
        values["t_ready_wait_s"] = time.monotonic() - prepared.wall
        stamp_ns = _stamp_ns(msg)
        if self._last_stamp_ns is not None and stamp_ns <= self._last_stamp_ns:
            message = "stamp not newer than the last published pose: frame skipped"
            return Outcome("skipped", DiagnosticStatus.WARN, message, values)
        if prepared.outcome is not None:
            return prepared.outcome
        if self._stop.is_set():
            return None
        frame = prepared.frame
        try:
            result = self.pipeline.process(frame, stamp=stamp_ns * 1e-9, track=self._settings().tracking_enabled)
        except ValueError as err:
            return self._refused(msg, err, values)
        values.update(
            mode=result.mode,
            path=result.path,
            similarity=float(result.similarity),
            iterations=int(result.iterations),
            converged=bool(result.converged),
            polarity=result.polarity,
            polarity_scores=" ".join(f"{v:.3f}" for v in result.polarity_scores),
            outlier_fraction=float(result.outlier_fraction),
            **{f"t_{name}_s": float(v) for name, v in result.timings.items()},
        )
        if not result.accepted:
            message = f"rejected by the gate: {result.reason}"
            return Outcome("rejected", DiagnosticStatus.ERROR, message, values, result, frame)
        return Outcome("published", DiagnosticStatus.OK, "pose published", values, result, frame)

    def _refused(self, msg, err: ValueError, values: dict) -> Outcome:
        stamp = stamp_text((msg.header.stamp.sec, msg.header.stamp.nanosec))
        self._logger.warning(f"frame {stamp} refused: {err}", throttle_duration_sec=1.0)
        return Outcome("rejected", DiagnosticStatus.ERROR, f"bad frame: {err}", values)

    def _intrinsics(self, msg, s: Settings):
        stamp = (int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
        width, height = int(msg.width), int(msg.height)
        info = self._infos.wait_for(stamp, s.camera_info_wait_s, lambda: not self._stop.is_set() and self._matched())
        return choose_intrinsics(
            stamp,
            None if info is None else lambda: camera_info_to_intrinsics(info, width, height),
            lambda: s.parameter_intrinsics(width, height),
            self._infos.latest_stamp(),
        )


def _stamp_ns(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
