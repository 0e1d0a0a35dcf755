"""The OpenIGTLink bridge's logic: pair each frame's status with its pose and image, and say when poses stop.

Inputs are ROS messages handed over by the node (:mod:`.node`): ``diffpose_node``'s ``~/status``
(:class:`~diffpose_ros.core.navigation.status.PoseStatus` JSON), ``/tf`` and ``/tf_static``
(``tf2_msgs/TFMessage``, kept here by exact stamp: the PyPI wheels have no ``tf2_ros``), ``image``
and ``camera_info``. Outputs are pyigtl messages handed to ``send`` (a :mod:`.link`), stamped
with the image's stamp:

- an accepted status at stamp S whose ``ct`` -> frame transform at S is on ``/tf``: TRANSFORM
  ``CArmToCT`` (``T_ctras_source``, mm, metadata ``TransformStatus: OK``), STRING ``DiffPoseStatus``
  and, when the frame and its intrinsics arrived, IMAGE ``Fluoro`` on the detector plane;
- a rejected frame: TRANSFORM with the last accepted matrix (identity before the first one) and
  ``TransformStatus: INVALID``, and the STRING with the reason; never a new pose;
- no accepted pose for ``stale_after_s`` (monotonic clock): the same INVALID pair with reason
  ``stale``, repeated every ``max(stale_after_s, 1 s)`` while it lasts.

The STRING's ``latency_s`` is the bridge's: the stamp to the moment it is sent (on the node clock).
No rclpy here: tests drive a :class:`Bridge` with plain messages.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from diffpose_ros.core import (
    CONTRACT_SDD_MM,
    LPS_TO_RAS,
    PoseStatus,
    StaleTimer,
    carm_to_ras,
    fluoro_ijk_to_world,
    stamp_from_ns,
    stamp_ns,
)
from diffpose_ros.ros.conversions.geometry import transform_to_matrix
from diffpose_ros.ros.conversions.image import image_to_numpy
from diffpose_ros.ros.conversions.intrinsics import camera_info_to_intrinsics
from diffpose_ros.ros.parameters import ParameterSet, parameter, parameter_table, table_problems
from diffpose_ros.ros.qos import IMAGE_QOS

__all__ = ["BRIDGE_PARAMETERS", "Bridge", "BridgeSettings", "TfBuffer"]

KEEP_FRAMES = 64
"""Images and camera_infos kept by stamp, waiting for their status."""
PAIR_TIMEOUT_S = 2.0
"""An accepted status whose ``/tf`` has not come after this long is dropped (with a warning); a latched
status from before the bridge started is one. Staleness then tells the navigator."""


@dataclass(frozen=True)
class BridgeSettings(ParameterSet):
    """The parameters of ``diffpose_igtl``, all read-only, as one snapshot (table: :data:`BRIDGE_PARAMETERS`)."""

    # fmt: off
    port: int = parameter(
        18944, "OpenIGTLink server port (0: any free port, logged)", read_only=True, bounds=(0, 65535)
    )
    address: str = parameter("0.0.0.0", "address the server listens on (0.0.0.0: all interfaces)", read_only=True)
    connect: str = parameter(
        "", "HOST:PORT of a navigator's OpenIGTLink server to connect to instead of serving", read_only=True
    )
    sdd_mm: float = parameter(
        CONTRACT_SDD_MM, "source-to-detector distance (mm): places the IMAGE on its detector plane", read_only=True
    )
    mirror: bool = parameter(False, "frames are mirrored left-right (as diffpose_node's mirror)", read_only=True)
    stale_after_s: float = parameter(
        1.0, "INVALID with reason stale when no pose was accepted for this long (s)", read_only=True
    )
    camera_frame: str = parameter(
        "carm_source_optical", "the frame's TF frame when header.frame_id is empty (as diffpose_node's)",
        read_only=True,
    )
    ct_frame: str = parameter("ct", "TF frame of the CT (LPS), as diffpose_node's", read_only=True)
    ct_ras_frame: str = parameter(
        "ct_ras", "static RAS frame under ct_frame ('' or missing on /tf_static: LPS -> RAS)", read_only=True
    )
    transform_device: str = parameter(
        "CArmToCT", "OpenIGTLink device name of the TRANSFORM (C-arm source -> CT RAS)", read_only=True
    )
    image_device: str = parameter("Fluoro", "OpenIGTLink device name of the IMAGE", read_only=True)
    status_device: str = parameter(
        "DiffPoseStatus", "OpenIGTLink device name of the STRING (JSON status)", read_only=True
    )
    image_qos: str = parameter(
        "sensor_data", "sensor_data (best effort) or reliable", read_only=True, choices=IMAGE_QOS
    )
    # fmt: on

    def problems(self) -> list[str]:
        """What is wrong with these values: kinds, choices and ranges of the table, then what it cannot say."""
        out = table_problems(self)
        if out:
            return out
        if not (self.sdd_mm > 0 and self.stale_after_s > 0):
            out.append("sdd_mm and stale_after_s must be positive")
        for name in ("transform_device", "image_device", "status_device"):
            if not 0 < len(getattr(self, name).encode()) <= 20:
                out.append(f"{name} must have 1 to 20 bytes (OpenIGTLink device names)")
        return out


BRIDGE_PARAMETERS = parameter_table(BridgeSettings)
"""The parameters of ``diffpose_igtl``, in declaration order."""


class TfBuffer:
    """``/tf`` transforms by exact stamp (the last ``keep`` per edge) and ``/tf_static`` ones, in mm."""

    def __init__(self, keep: int = 256):
        self._keep = keep
        self._dynamic: dict[tuple[str, str], collections.OrderedDict[int, np.ndarray]] = {}
        self._static: dict[tuple[str, str], np.ndarray] = {}

    def add(self, transform, static: bool = False) -> None:
        """Keep a ``geometry_msgs/TransformStamped``."""
        edge = (transform.header.frame_id.lstrip("/"), transform.child_frame_id.lstrip("/"))
        matrix = transform_to_matrix(transform.transform)
        if static:
            self._static[edge] = matrix
            return
        stamps = self._dynamic.setdefault(edge, collections.OrderedDict())
        stamps[stamp_ns(transform.header.stamp)] = matrix
        while len(stamps) > self._keep:
            stamps.popitem(last=False)

    def lookup(self, parent: str, child: str, stamp: int | None = None) -> np.ndarray | None:
        """``T_parent_child`` (mm) of one edge, either way round: static, or on ``/tf`` at ``stamp``."""
        for edge, inverse in (((parent, child), False), ((child, parent), True)):
            matrix = self._static.get(edge)
            if matrix is None and stamp is not None:
                matrix = self._dynamic.get(edge, {}).get(stamp)
            if matrix is not None:
                return np.linalg.inv(matrix) if inverse else matrix
        return None


def transform_message(device: str, matrix, timestamp: float, valid: bool):
    """pyigtl TRANSFORM (header v2) with the ``TransformStatus`` metadata PLUS sends."""
    import pyigtl

    message = pyigtl.TransformMessage(np.asarray(matrix), timestamp=timestamp, device_name=device)
    message.header_version = 2
    message.metadata["TransformStatus"] = "OK" if valid else "INVALID"
    return message


def image_message(device: str, pixels: np.ndarray, ijk_to_world, timestamp: float):
    """pyigtl IMAGE (header v2) of an ``(H, W)`` frame: i = column, j = row, world = RAS."""
    import pyigtl

    voxels = np.ascontiguousarray(pixels[None]).astype(pixels.dtype.newbyteorder("<"), copy=False)
    message = pyigtl.ImageMessage(voxels, ijk_to_world, "ras", timestamp=timestamp, device_name=device)
    message.header_version = 2
    return message


def string_message(device: str, text: str, timestamp: float):
    """pyigtl STRING (header v2)."""
    import pyigtl

    message = pyigtl.StringMessage(text, timestamp=timestamp, device_name=device)
    message.header_version = 2
    return message


class Bridge:
    """Turns the node's outputs into OpenIGTLink messages for ``send`` (see the module docstring).

    ``monotonic``: the clock of staleness; ``now_ns``: the node clock (latencies, stale stamps);
    ``logger``: rclpy-style (``info``/``warning``). Thread-safe.
    """

    def __init__(
        self,
        settings: BridgeSettings,
        send: Callable[[list], None],
        monotonic: Callable[[], float] = time.monotonic,
        now_ns: Callable[[], int] = time.time_ns,
        logger=None,
    ):
        self.settings = settings
        self._send, self._monotonic, self._now_ns, self._logger = send, monotonic, now_ns, logger
        self._lock = threading.RLock()
        self.tf = TfBuffer()
        self._images: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._infos: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._pending: collections.OrderedDict[int, tuple[PoseStatus, float]] = collections.OrderedDict()
        self._image_due: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._last_transform = np.eye(4)
        self._stale = StaleTimer(settings.stale_after_s, monotonic())
        self._stale_sent: float | None = None
        self.counts = collections.Counter()

    # ------------------------------------------------------------------------------- inputs
    def on_image(self, msg) -> None:
        with self._lock:
            stamp = stamp_ns(msg.header.stamp)
            _keep(self._images, stamp, msg)
            T_ras = self._image_due.pop(stamp, None)
            if T_ras is not None:
                self._send_image(stamp, T_ras)

    def on_camera_info(self, msg) -> None:
        with self._lock:
            _keep(self._infos, stamp_ns(msg.header.stamp), msg)

    def on_tf(self, msg, static: bool = False) -> None:
        with self._lock:
            for transform in msg.transforms:
                try:
                    self.tf.add(transform, static)
                except ValueError as err:
                    self._warn(f"transform {transform.child_frame_id} ignored: {err}")
            self._flush_pending()

    def on_status(self, text: str) -> None:
        with self._lock:
            try:
                status = PoseStatus.from_json(text)
            except ValueError as err:
                self._warn(str(err))
                return
            if status.valid:
                self._pending[status.stamp_ns] = (status, self._monotonic())
                self._flush_pending()
            else:
                self._send_invalid(status, status.stamp_ns)

    def tick(self) -> None:
        """Time out pending statuses and announce staleness (call a few times a second)."""
        with self._lock:
            now = self._monotonic()
            for stamp, (status, arrived) in list(self._pending.items()):
                if now - arrived > PAIR_TIMEOUT_S:
                    del self._pending[stamp]
                    self._warn(
                        f"accepted pose at {status.stamp} dropped: no /tf {self.settings.ct_frame} -> "
                        f"{status.frame_id} at that stamp within {PAIR_TIMEOUT_S:g} s"
                    )
            repeat = max(self.settings.stale_after_s, 1.0)
            if self._stale.stale(now) and (self._stale_sent is None or now - self._stale_sent >= repeat):
                self._stale_sent = now
                stamp = self._now_ns()
                frame_id = self.settings.camera_frame
                self._send_invalid(PoseStatus(False, "stale", None, None, stamp_from_ns(stamp), None, frame_id), stamp)

    # ------------------------------------------------------------------------------ outputs
    def _flush_pending(self) -> None:
        s = self.settings
        T_ct_ctras = self.tf.lookup(s.ct_frame, s.ct_ras_frame) if s.ct_ras_frame else None
        if T_ct_ctras is None:
            T_ct_ctras = LPS_TO_RAS
        for stamp, (status, _) in list(self._pending.items()):
            T_ct_source = self.tf.lookup(s.ct_frame, status.frame_id or s.camera_frame, stamp)
            if T_ct_source is None:
                continue
            del self._pending[stamp]
            T_ras = carm_to_ras(T_ct_source, T_ct_ctras)
            self._last_transform = T_ras
            self._stale.accepted(self._monotonic())
            self._stale_sent = None
            timestamp = stamp * 1e-9
            out = [
                transform_message(s.transform_device, T_ras, timestamp, True),
                string_message(s.status_device, self._with_latency(status, stamp).to_json(), timestamp),
            ]
            self._send(out)
            self.counts["transform_ok"] += 1
            if stamp in self._images:
                self._send_image(stamp, T_ras)
            else:
                _keep(self._image_due, stamp, T_ras)

    def _send_invalid(self, status: PoseStatus, stamp: int) -> None:
        s, timestamp = self.settings, stamp * 1e-9
        self._send(
            [
                transform_message(s.transform_device, self._last_transform, timestamp, False),
                string_message(s.status_device, self._with_latency(status, stamp).to_json(), timestamp),
            ]
        )
        self.counts["transform_invalid"] += 1

    def _with_latency(self, status: PoseStatus, stamp: int) -> PoseStatus:
        latency = None if status.reason == "stale" else (self._now_ns() - stamp) * 1e-9
        return replace(status, latency_s=latency)

    def _send_image(self, stamp: int, T_ras: np.ndarray) -> None:
        msg = self._images[stamp]
        info = self._infos.get(stamp)
        if info is None and self._infos:
            info = next(reversed(self._infos.values()))  # the calibration rarely changes
        if info is None:
            self._warn("no camera_info received: IMAGE not sent")
            return
        try:
            pixels = image_to_numpy(msg)
            k = camera_info_to_intrinsics(info, pixels.shape[1], pixels.shape[0])
        except ValueError as err:
            self._warn(f"IMAGE not sent: {err}")
            return
        s = self.settings
        ijk_to_world = fluoro_ijk_to_world(T_ras, k.fx, k.fy, k.cx, k.cy, s.sdd_mm, s.mirror)
        self._send([image_message(s.image_device, pixels, ijk_to_world, stamp * 1e-9)])
        self.counts["image"] += 1

    def _warn(self, text: str) -> None:
        if self._logger is not None:
            self._logger.warning(text)


def _keep(store: collections.OrderedDict, key: int, value) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > KEEP_FRAMES:
        store.popitem(last=False)
