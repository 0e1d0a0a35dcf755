"""Synthetic fluoroscopy sequences with ground truth, written as a rosbag2 (``diffpose-make-bag``).

Each frame is a DRR of the CT (our renderer, full-resolution attenuation; or, with
``renderer="diffdrr"``, DiffDRR's Siddon with its own HU-to-density map: another renderer's physics)
at a known C-arm pose,
turned into what a detector delivers by :func:`~diffpose_ros.core.simulation.detector.simulate_transmission`
(quantum noise, detector blur, a gain the node does not know, optional collimation and clinical
factors; a flat panel's display chain, ``fp:display``, also lags behind motion through its recursive
temporal filter), mirrored if the device mirrors, in mono16 (default), mono8 or 32FC1.

The bag (``TOPICS``), every message logged at its stamp:

- ``/carm/image_raw`` (``sensor_msgs/Image``) and ``/carm/camera_info`` (``sensor_msgs/CameraInfo``),
  same stamp, ``header.frame_id`` = the camera frame (``carm_source_optical``);
- ``/tf_ground_truth`` (``tf2_msgs/TFMessage``): ``ct`` -> ``<camera frame>_gt``, ``T_ct_source`` in
  metres at each frame's stamp (a separate topic, so replaying the bag never feeds the truth to TF);
- ``/diffpose/scene`` (``std_msgs/String``, latched): JSON naming the CT (path and SHA-256), the target
  points (``ct``, LPS mm) that mTRE is measured on, the detector, the exposure and the pose source.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffpose_ros.core import (
    CONTRACT_PIXEL_MM,
    CONTRACT_SDD_MM,
    ClinicalFactors,
    Intrinsics,
    Renderer,
    Volume,
    hu_to_mu,
    simulate_transmission,
    split_stamp,
)
from diffpose_ros.core.simulation import flat_panel

from .bagfile import BagWriter, QosSpec

__all__ = ["TOPICS", "Detector", "Exposure", "add_camera_topics", "write_camera_frame", "write_sequence"]

TOPICS = {
    "image": "/carm/image_raw",
    "camera_info": "/carm/camera_info",
    "truth": "/tf_ground_truth",
    "scene": "/diffpose/scene",
}
"""Topic names of a synthesized bag."""

ENCODINGS = {"mono16": "uint16", "mono8": "uint8", "32FC1": "float32"}


@dataclass(frozen=True)
class Detector:
    """The flat-panel detector: size (pixels), pixel spacing (mm), SDD (mm), principal point (pixels;
    None = the image centre)."""

    width: int = 256
    height: int = 256
    pixel_mm: float = CONTRACT_PIXEL_MM
    sdd_mm: float = CONTRACT_SDD_MM
    principal_point: tuple[float, float] | None = None

    @property
    def intrinsics(self) -> Intrinsics:
        return Intrinsics.from_detector(self.sdd_mm, self.width, self.height, self.pixel_mm, self.principal_point)


@dataclass(frozen=True)
class Exposure:
    """How frames are delivered: photons per unattenuated pixel ``i0``, blur (pixels), encoding,
    mirroring, collimation (fraction shut per side) and the ``clinical`` factors (display chain,
    round field, burned-in text, metal, scatter and heel:
    :class:`~diffpose_ros.core.simulation.clinical.ClinicalFactors`;
    a display chain spans the encoding's range). The gain is drawn once per sequence (the node never
    knows it) and jitters by ``gain_jitter`` per frame, like automatic exposure control."""

    i0: float = 5000.0
    blur_sigma_px: float = 0.7
    encoding: str = "mono16"
    mirror: bool = False
    collimation: float = 0.0
    gain_jitter: float = 0.02
    clinical: ClinicalFactors = ClinicalFactors()

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unsupported encoding {self.encoding!r}: one of {', '.join(ENCODINGS)}")


def add_camera_topics(bag: BagWriter) -> None:
    """Declare the image and camera_info topics (reliable, depth 10) and the latched scene topic."""
    image_qos = QosSpec(reliable=True, transient_local=False, depth=10)
    bag.add_topic(TOPICS["image"], "sensor_msgs/msg/Image", image_qos)
    bag.add_topic(TOPICS["camera_info"], "sensor_msgs/msg/CameraInfo", image_qos)
    bag.add_topic(TOPICS["scene"], "std_msgs/msg/String", QosSpec.named("latched"))


def write_camera_frame(
    bag: BagWriter, t_ns: int, pixels: np.ndarray, encoding: str, intrinsics: Intrinsics, camera_frame: str
):
    """Write one frame (``(H, W)`` in ``encoding``) and its camera_info, both stamped and logged at
    ``t_ns``; returns the stamp (``builtin_interfaces/Time``)."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    from diffpose_ros.ros.conversions import intrinsics_to_camera_info, numpy_to_image

    stamp = Time(sec=split_stamp(t_ns)[0], nanosec=split_stamp(t_ns)[1])
    header = lambda: Header(stamp=stamp, frame_id=camera_frame)  # noqa: E731 - one Header per message
    bag.write(TOPICS["image"], t_ns, numpy_to_image(pixels, encoding, header=header()))
    bag.write(TOPICS["camera_info"], t_ns, intrinsics_to_camera_info(intrinsics, header=header()))
    return stamp


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gain(exposure: Exposure, rng: np.random.Generator) -> float:
    """Counts per photon for the whole sequence: the unattenuated level lands at 50-90 % of the range
    (``i0`` photons, or 1 without quantum noise: ``i0`` 0, as :func:`~.detector.simulate_transmission`)."""
    if exposure.encoding == "32FC1":
        return float(rng.uniform(0.5, 2.0))
    top = 65535 if exposure.encoding == "mono16" else 255
    return float(rng.uniform(0.5, 0.9)) * top / (exposure.i0 if exposure.i0 > 0 else 1.0)


def write_sequence(
    out: str | Path,
    hu: Volume,
    ct_path: str | Path,
    poses: torch.Tensor,
    fps: float,
    targets_ct_mm: torch.Tensor,
    detector: Detector = Detector(),
    exposure: Exposure = Exposure(),
    camera_frame: str = "carm_source_optical",
    ct_frame: str = "ct",
    start_time_ns: int | None = None,
    seed: int = 0,
    pose_source: str = "",
    storage: str = "mcap",
    progress: bool = True,
    renderer: str = "ours",
) -> dict:
    """Render ``poses`` (``(N, 4, 4)`` ``T_ct_source``, mm) as fluoroscopy at ``fps`` into the bag ``out``.

    ``hu``: the CT in Hounsfield units (``ct``, LPS mm) read from ``ct_path``. Stamps start at
    ``start_time_ns`` (default: now) and advance by ``1 / fps``. Returns the scene description that
    is also written on ``/diffpose/scene``.
    """
    from geometry_msgs.msg import TransformStamped
    from std_msgs.msg import Header, String
    from tf2_msgs.msg import TFMessage

    from diffpose_ros.ros.conversions import matrix_to_transform

    poses = torch.as_tensor(poses, dtype=torch.float64).reshape(-1, 4, 4)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rng = np.random.default_rng(seed)
    k = detector.intrinsics
    k_delivered = k.mirrored() if exposure.mirror else k
    ours = Renderer(hu_to_mu(hu))
    if renderer == "ours":
        render = lambda T: ours.render(T, k)  # noqa: E731
    elif renderer == "diffdrr":
        from diffpose_ros.core.rendering.diffdrr_reference import DiffDRRReference

        reference = DiffDRRReference(ct_path, sdd_mm=detector.sdd_mm)
        render = lambda T: reference.render_like(T, k, ours.render(T, k))  # noqa: E731
    else:
        raise ValueError(f"unknown renderer {renderer!r}: ours or diffdrr")
    gain = _gain(exposure, rng)
    lag = None  # a flat panel's fluoroscopy video lags behind motion
    if exposure.clinical.family == "fp" and exposure.clinical.display:
        lag = flat_panel.RecursiveFilter(rng.uniform(0.35, 0.7))
    start = int(start_time_ns if start_time_ns is not None else time.time_ns())
    ct_path = Path(ct_path)
    scene = {
        "ct": str(ct_path.resolve()),
        "ct_sha256": _sha256(ct_path) if ct_path.is_file() else None,
        "ct_frame": ct_frame,
        "camera_frame": camera_frame,
        "truth_frame": f"{camera_frame}_gt",
        "targets_ct_mm": targets_ct_mm.double().tolist(),
        "detector": {**asdict(detector), "fx": k.fx, "fy": k.fy, "cx": k.cx, "cy": k.cy},
        "exposure": {**asdict(exposure), "gain": gain, "recursive_filter": None if lag is None else lag.weight},
        "frames": int(poses.shape[0]),
        "fps": float(fps),
        "pose_source": pose_source,
        "renderer": renderer,
        "seed": seed,
        "topics": TOPICS,
    }
    with BagWriter(out, storage) as bag:
        add_camera_topics(bag)
        bag.add_topic(TOPICS["truth"], "tf2_msgs/msg/TFMessage", QosSpec(True, False, 100))
        bag.write(TOPICS["scene"], start, String(data=json.dumps(scene)))
        for i in tqdm(range(poses.shape[0]), desc="frames", unit="frame", disable=not progress):
            t_ns = start + round(i * 1e9 / fps)
            with torch.no_grad():
                L = render(poses[i])
            frame_gain = gain * float(1 + exposure.gain_jitter * rng.standard_normal())
            frame = simulate_transmission(
                L,
                i0=exposure.i0,
                gain=frame_gain,
                blur_sigma_px=exposure.blur_sigma_px,
                dtype=ENCODINGS[exposure.encoding],
                rng=rng,
                collimation=exposure.collimation,
                clinical=exposure.clinical,
                mirror=exposure.mirror,
            )
            frame = frame if lag is None else lag(frame)
            stamp = write_camera_frame(bag, t_ns, frame, exposure.encoding, k_delivered, camera_frame)
            truth = TransformStamped(header=Header(stamp=stamp, frame_id=ct_frame), child_frame_id=f"{camera_frame}_gt")
            truth.transform = matrix_to_transform(poses[i])
            bag.write(TOPICS["truth"], t_ns, TFMessage(transforms=[truth]))
    return scene
