"""A recorded X-ray run as a rosbag2 (``diffpose-make-bag --from-dicom``): an operating room's run, replayed.

The run is a multi-frame DICOM file (a cine loop) or a folder of single-frame files (a series),
read by :mod:`diffpose_ros.core.io.dicom`. The bag has the topics of a synthesized one
(:data:`.synthesize.TOPICS`) but no ground truth:

- ``/carm/image_raw``: the frames in transmission polarity (modality LUT and photometric
  interpretation applied, radiographs inverted; see :mod:`diffpose_ros.core.io.dicom`), ``mono8`` when
  Bits Stored <= 8, else ``mono16``, rounded into the type (the whole run scaled down first if its
  values exceed the type);
- ``/carm/camera_info``: the intrinsics from the tags (or the ones given), same stamp;
- ``/diffpose/scene`` (latched): JSON describing the source file, its modality, the detector and the
  timing.

Stamps: the first frame's acquisition date-time (UTC when the file gives its offset; taken as UTC
otherwise), else now, plus each frame's time (Frame Time, Frame Time Vector, Cine Rate, or the
series' acquisition times); a run without timing tags is stamped ``1 / fps`` apart.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np

from diffpose_ros.core import DicomXray, Intrinsics, read_dicom, read_dicom_series

from .bagfile import BagWriter
from .synthesize import TOPICS, add_camera_topics, write_camera_frame

__all__ = ["read_run", "to_encoding", "write_dicom_bag"]


def read_run(path: str | Path) -> DicomXray:
    """The run in ``path``: a folder of single-frame DICOM files, else one (multi-frame) DICOM file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DICOM file or folder not found: {path}")
    return read_dicom_series(path) if path.is_dir() else read_dicom(path)


def to_encoding(frames: np.ndarray, bits_stored: int) -> tuple[np.ndarray, str, float]:
    """``(pixels, encoding, scale)``: ``frames`` as ``mono8`` (Bits Stored <= 8) or ``mono16``, rounded;
    ``scale`` (<= 1) was applied to all of them when their largest value exceeds the type."""
    dtype, encoding = (np.uint8, "mono8") if bits_stored <= 8 else (np.uint16, "mono16")
    top = np.iinfo(dtype).max
    peak = float(frames.max())
    scale = min(1.0, top / peak) if peak > 0 else 1.0
    pixels = np.clip(np.rint(frames.astype(np.float64) * scale), 0, top).astype(dtype)
    return pixels, encoding, scale


def _start_ns(acquired: dt.datetime | None) -> int:
    if acquired is None:
        return time.time_ns()
    utc = acquired.astimezone(dt.timezone.utc) if acquired.tzinfo else acquired.replace(tzinfo=dt.timezone.utc)
    return round(utc.timestamp() * 1e6) * 1000


def write_dicom_bag(
    out: str | Path,
    run: DicomXray,
    intrinsics: Intrinsics | None = None,
    fps: float = 5.0,
    camera_frame: str = "carm_source_optical",
    start_time_ns: int | None = None,
    storage: str = "mcap",
) -> dict:
    """Write the run ``run`` into the bag ``out`` (see the module); returns the scene description.

    ``intrinsics``: the camera (default: the tags'; ``ValueError`` naming the missing tags when they
    give none); ``fps``: frame rate (Hz) of a run without timing tags; ``start_time_ns``: stamp of the
    first frame (default: its acquisition date-time, else now).
    """
    k = intrinsics or run.require_intrinsics()
    if (k.width, k.height) != (run.frames.shape[2], run.frames.shape[1]):
        raise ValueError(
            f"{run.path}: frames are {run.frames.shape[2]}x{run.frames.shape[1]} but the camera is {k.width}x{k.height}"
        )
    if run.frame_times_s is not None:
        times, timing = run.frame_times_s, "DICOM tags"
    else:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        times, timing = np.arange(run.frame_count) / fps, f"none in the tags: {fps:g} Hz"
    start = int(start_time_ns if start_time_ns is not None else _start_ns(run.acquired))
    pixels, encoding, scale = to_encoding(run.frames, run.bits_stored)
    duration = float(times[-1] - times[0])
    scene = {
        "source": "dicom",
        "dicom": str(Path(run.path).resolve()),
        "modality": run.modality,
        "photometric_interpretation": run.photometric,
        "presentation_intent": run.presentation_intent,
        "bits_stored": run.bits_stored,
        "encoding": encoding,
        "scale": scale,
        "camera_frame": camera_frame,
        "detector": {
            "width": k.width,
            "height": k.height,
            "fx": k.fx,
            "fy": k.fy,
            "cx": k.cx,
            "cy": k.cy,
            "sdd_mm": run.sdd_mm,
            "pixel_spacing_mm": run.pixel_spacing_mm,
            "field_radius_px": run.field_radius_px,
            "intrinsics_source": "given" if intrinsics else "DICOM tags",
        },
        "frames": run.frame_count,
        "frame_times_s": [float(t) for t in times],
        "fps": (run.frame_count - 1) / duration if duration > 0 else fps,
        "timing": timing,
        "start_time_ns": start,
        "ground_truth": None,
        "topics": {key: TOPICS[key] for key in ("image", "camera_info", "scene")},
    }
    from std_msgs.msg import String

    with BagWriter(out, storage) as bag:
        add_camera_topics(bag)
        bag.write(TOPICS["scene"], start, String(data=json.dumps(scene)))
        for frame, t in zip(pixels, times):
            write_camera_frame(bag, start + round(float(t) * 1e9), frame, encoding, k, camera_frame)
    return scene
