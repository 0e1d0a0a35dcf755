"""Files the command-line tools read and write: pose JSON and X-ray images.

Pose files are JSON ``{"T_ct_source": [[4x4 row-major]]}`` in millimetres and contract frames.
Images (:func:`read_xray`): ``.npy`` holds float line integrals (``H x W``); PNG/TIFF (8- or 16-bit,
one channel) hold transmission images as a detector delivers them; DICOM files (``.dcm``/``.dicom``
or any file with the DICOM preamble, one or more frames) are read by :mod:`.dicom`, which also
gives their geometry. Nothing here unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from diffpose_ros.core.geometry.camera import Intrinsics

from .dicom import DicomXray, is_dicom, read_dicom

__all__ = [
    "XrayImage",
    "check_pose",
    "load_pose",
    "load_poses",
    "save_json",
    "read_xray",
    "to_uint8",
    "write_png",
    "write_picture",
]


def check_pose(T, where: str = "pose") -> torch.Tensor:
    """``T`` as a 4x4 float64 tensor; ``ValueError`` naming ``where`` if it is not a finite rigid transform."""
    try:
        T = torch.as_tensor(T, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{where}: not a numeric 4x4 matrix: {err}") from err
    if T.shape != (4, 4) or not torch.isfinite(T).all():
        raise ValueError(f"{where}: T_ct_source must be a finite 4x4 matrix, got shape {tuple(T.shape)}")
    R = T[:3, :3]
    if not torch.allclose(R.T @ R, torch.eye(3, dtype=torch.float64), atol=1e-4) or float(torch.det(R)) < 0:
        raise ValueError(f"{where}: the rotation part of T_ct_source is not a proper rotation")
    if not torch.allclose(T[3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64)):
        raise ValueError(f"{where}: the last row of T_ct_source must be [0, 0, 0, 1]")
    return T


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON: {err}") from err


def load_pose(path: str | Path) -> torch.Tensor:
    """``T_ct_source`` (4x4 float64, mm) from a pose JSON file; ``ValueError`` if it is not a rigid transform."""
    path = Path(path)
    doc = _read_json(path, "pose")
    if not isinstance(doc, dict) or "T_ct_source" not in doc:
        raise ValueError(f"{path} is not a pose JSON with a 4x4 'T_ct_source'")
    return check_pose(doc["T_ct_source"], str(path))


def load_poses(path: str | Path) -> torch.Tensor:
    """``(N, 4, 4)`` poses ``T_ct_source`` (float64, mm) from a JSON list.

    Accepted: ``{"poses": [...]}`` or a bare list, whose items are 4x4 matrices or
    ``{"T_ct_source": 4x4}`` objects (what :func:`load_pose` reads).
    """
    path = Path(path)
    doc = _read_json(path, "pose list")
    items = doc.get("poses") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise ValueError(f'{path}: expected a non-empty list of poses (or {{"poses": [...]}})')
    poses = []
    for i, item in enumerate(items):
        matrix = item.get("T_ct_source") if isinstance(item, dict) else item
        poses.append(check_pose(matrix, f"{path}: pose {i}"))
    return torch.stack(poses)


def save_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON (tensors and arrays become lists)."""

    def plain(x):
        if isinstance(x, (torch.Tensor, np.ndarray)):
            return x.tolist()
        raise TypeError(f"cannot write {type(x).__name__} to JSON")

    Path(path).write_text(json.dumps(data, indent=2, default=plain) + "\n")


@dataclass(frozen=True)
class XrayImage:
    """The frames of an X-ray file and what the file says about them.

    ``frames``: ``(N, H, W)`` (N = 1 but for multi-frame DICOM); ``kind``: ``"transmission"`` or
    ``"line_integrals"`` (:data:`~diffpose_ros.core.frames.prepare.FRAME_KINDS`); ``dicom``: the DICOM
    reading (geometry, frame times, round field) of a DICOM file, else None.
    """

    path: Path
    frames: np.ndarray
    kind: str
    dicom: DicomXray | None = None

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    def frame(self, index: int = 0) -> np.ndarray:
        """Frame ``index`` (``(H, W)``); ``ValueError`` when the file has no such frame."""
        if not 0 <= index < self.frame_count:
            raise ValueError(f"{self.path} has {self.frame_count} frame(s): no frame {index} (frames count from 0)")
        return self.frames[index]

    def intrinsics(self) -> Intrinsics:
        """The camera the file's own tags give (DICOM); ``ValueError`` naming what is missing otherwise."""
        if self.dicom is None:
            raise ValueError(f"{self.path} carries no imaging geometry (PNG/TIFF/.npy): give --camera-info CAM.yaml")
        return self.dicom.require_intrinsics()


def read_xray(path: str | Path) -> XrayImage:
    """Read an X-ray: ``.npy`` line integrals, PNG/TIFF transmission, or DICOM (see the module)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.suffix.lower() in (".dcm", ".dicom") or is_dicom(path):
        dicom = read_dicom(path)
        return XrayImage(path, dicom.frames, "transmission", dicom)
    if path.suffix.lower() == ".npy":
        try:
            image = np.load(path, allow_pickle=False).astype(np.float32)
        except ValueError as err:
            raise ValueError(f"{path} is not a plain numeric .npy array: {err}") from err
        if image.ndim != 2:
            raise ValueError(f"{path} holds a {image.ndim}D array; expected an (H, W) image of line integrals")
        return XrayImage(path, image[None], "line_integrals")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read {path} as an image (PNG/TIFF 8/16-bit, DICOM or .npy)")
    if image.ndim == 3:
        raise ValueError(f"{path} has {image.shape[2]} channels; X-rays must be single-channel")
    return XrayImage(path, image[None], "transmission")


def to_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """``image`` min-max scaled to 8 bits between its 0.5 and 99.5 percentiles (bright = high value)."""
    a = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)


def write_png(path: str | Path, image: np.ndarray | torch.Tensor) -> None:
    """Save a picture of ``image`` (:func:`to_uint8`)."""
    write_picture(path, to_uint8(image))


def write_picture(path: str | Path, picture: np.ndarray) -> None:
    """Save an 8-bit picture (``(H, W)`` grey or ``(H, W, 3)`` BGR, e.g. an overlay) as a PNG."""
    if not cv2.imwrite(str(path), picture):
        raise ValueError(f"cannot write {path} (a .png path in an existing folder?)")
