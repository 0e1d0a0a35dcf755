"""Which intrinsics a frame is registered with: the camera_info with its stamp, else parameters.

:class:`CameraInfoCache` keeps the latest camera_info messages by stamp and lets the worker wait a
little for one that is late; :func:`choose_intrinsics` is the policy (ROS-free, tested alone):

1. the camera_info with the image's exact stamp, when it describes the image;
2. else the node's ``intrinsics.*`` parameters, when they are set (and valid);
3. else a ``ValueError`` that says what is missing (no camera_info at all, or none with this stamp)
   or why the camera_info was refused.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from diffpose_ros.core import Intrinsics
from diffpose_ros.core.navigation.stamps import NS_PER_S, stamp_from_ns

__all__ = ["CameraInfoCache", "choose_intrinsics"]

Stamp = tuple[int, int]
"""``(sec, nanosec)`` of a ``builtin_interfaces/Time``."""


def _text(stamp: Stamp) -> str:
    return stamp_from_ns(stamp[0] * NS_PER_S + stamp[1])


class CameraInfoCache:
    """The last ``keep`` camera_info messages by stamp (thread-safe)."""

    def __init__(self, keep: int = 16):
        self._keep = keep
        self._items: collections.OrderedDict[Stamp, Any] = collections.OrderedDict()
        self._cond = threading.Condition()

    def put(self, stamp: Stamp, info) -> None:
        with self._cond:
            self._items[stamp] = info
            self._items.move_to_end(stamp)
            while len(self._items) > self._keep:
                self._items.popitem(last=False)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def latest_stamp(self) -> Stamp | None:
        with self._cond:
            return next(reversed(self._items), None)

    def wait_for(self, stamp: Stamp, wait_s: float, keep_waiting: Callable[[], bool]) -> Any | None:
        """The camera_info with ``stamp``, waiting up to ``wait_s`` while ``keep_waiting()`` holds
        (e.g. a camera_info publisher is matched and the node is not stopping); None without one."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while stamp not in self._items:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not keep_waiting():
                    return None
                self._cond.wait(min(remaining, 0.05))
            return self._items[stamp]


def choose_intrinsics(
    stamp: Stamp,
    from_camera_info: Callable[[], Intrinsics] | None,
    from_parameters: Callable[[], Intrinsics | None],
    latest_camera_info: Stamp | None,
) -> tuple[Intrinsics, str]:
    """``(intrinsics, source)`` for the image with ``stamp``.

    ``from_camera_info``: converts the camera_info with that stamp (None: there is none; it raises
    ``ValueError`` when the camera_info does not describe the image); ``from_parameters``: the
    parameters' intrinsics (None: unset; ``ValueError``: invalid); ``latest_camera_info``: the
    newest camera_info stamp seen (for the message when none matches). ``source`` says which was used.
    """
    refused = ""
    if from_camera_info is not None:
        try:
            return from_camera_info(), "camera_info"
        except ValueError as err:
            refused = str(err)
    try:
        parameters = from_parameters()
    except ValueError as err:
        raise ValueError(f"intrinsics parameters are invalid: {err}") from err
    if parameters is not None:
        return parameters, "parameters" + (f" (camera_info refused: {refused})" if refused else "")
    if refused:
        raise ValueError(refused)
    if latest_camera_info is not None:
        raise ValueError(
            f"no camera_info with the image's stamp {_text(stamp)} (latest camera_info stamp "
            f"{_text(latest_camera_info)}: image and camera_info stamps must be identical) and no "
            "intrinsics parameters"
        )
    raise ValueError(
        "missing camera_info: none received and no intrinsics parameters "
        "(intrinsics.sdd_mm, intrinsics.pixel_spacing_mm)"
    )
