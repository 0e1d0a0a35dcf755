"""The patient model file: everything a node preloads, in one safetensors file.

Tensors: the CNN's weights (``cnn.*``), the attenuation volume used for refinement
(``volume.mu``, float16, 1/mm) and its affine (``volume.index_to_ct``, float64, voxel index -> LPS mm),
and the CNN's reference pose and anchor. Metadata (the safetensors header's string map) holds one
JSON document under ``diffpose_ros``: the format version, the CT source and geometry, the backbone
(timm name, stage widths or null for timm's), the working intrinsics, the training configuration
and summary, and validation errors. A file that names no widths or stem gets timm's.

safetensors parses only a JSON header and raw arrays: a pickle or any other foreign file is refused
before anything in it can run. Loading checks the version, the names and shapes it expects, and
that the arrays are finite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from diffpose_ros.core.geometry.camera import Intrinsics
from diffpose_ros.core.rendering.volume import Volume

from .regressor import PoseRegressor
from .views import Margin, ViewSet

__all__ = ["FORMAT_VERSION", "PatientModel", "save_patient_model", "load_patient_model", "PatientModelError"]

FORMAT_VERSION = 1
_KEY = "diffpose_ros"


class PatientModelError(ValueError):
    """A patient model file that is missing, corrupt, truncated, foreign or of another version."""


@dataclass
class PatientModel:
    """A loaded patient model: the CNN, the refinement volume and the metadata.

    ``intrinsics``: the CNN's working camera (frames are warped to it before the CNN);
    ``metadata``: the JSON document of the file (see the module docstring).
    """

    regressor: PoseRegressor
    mu: Volume
    intrinsics: Intrinsics
    metadata: dict = field(default_factory=dict)

    @property
    def views(self) -> ViewSet:
        """The views the model is for, as a surgeon takes them: its training preset (unwidened), or
        the boxes it was trained on when they were its own. A model that records no preset (made
        before presets, or without training metadata) is an ``ap`` model."""
        spec = self.metadata.get("training", {}).get("view_range")
        return ViewSet.from_spec(spec if isinstance(spec, (str, list)) else "ap")

    @property
    def trained_views(self) -> ViewSet:
        """The views the CNN was trained on (margin included): a pose outside them is extrapolation."""
        training = self.metadata.get("training", {})
        margin = Margin.from_dict(training.get("view_margin"))
        return ViewSet.from_spec(training.get("view_range", "ap"), margin).trained(margin)


def save_patient_model(path: str | Path, model: PatientModel) -> None:
    """Write ``model`` to ``path`` (one safetensors file; parent folders are created)."""
    tensors = {f"cnn.{k}": v.detach().cpu().contiguous() for k, v in model.regressor.state_dict().items()}
    tensors["volume.mu"] = model.mu.data.to(torch.float16).contiguous()
    tensors["volume.index_to_ct"] = model.mu.index_to_ct.to(torch.float64).contiguous()
    k = model.intrinsics
    meta = dict(model.metadata)
    meta.update(
        {
            "format_version": FORMAT_VERSION,
            "backbone": model.regressor.backbone_name,
            "backbone_channels": list(model.regressor.channels) if model.regressor.channels else None,
            "backbone_stem": model.regressor.stem,
            "image_size": model.regressor.image_size,
            "intrinsics": {"width": k.width, "height": k.height, "fx": k.fx, "fy": k.fy, "cx": k.cx, "cy": k.cy},
            "ct_source": model.mu.source,
        }
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_KEY: json.dumps(meta)})


def _read(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise PatientModelError(f"patient model not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise PatientModelError(f"{path} is not a readable patient model (safetensors): {err}") from err
    if _KEY not in header:
        raise PatientModelError(f"{path} is a safetensors file but not a diffpose_ros patient model")
    try:
        meta = json.loads(header[_KEY])
    except json.JSONDecodeError as err:
        raise PatientModelError(f"{path}: corrupt metadata: {err}") from err
    if not isinstance(meta, dict):
        raise PatientModelError(f"{path}: corrupt metadata: a JSON {type(meta).__name__} instead of an object")
    return tensors, meta


def load_patient_model(path: str | Path, device: str | torch.device = "cpu") -> PatientModel:
    """Load and check a patient model; ``PatientModelError`` names what is wrong with a bad file."""
    path = Path(path)
    tensors, meta = _read(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PatientModelError(f"{path}: format version {version}, this diffpose_ros reads version {FORMAT_VERSION}")
    try:
        mu = tensors.pop("volume.mu").float()
        affine = tensors.pop("volume.index_to_ct").double()
        k = meta["intrinsics"]
        intrinsics = Intrinsics(k["width"], k["height"], k["fx"], k["fy"], k["cx"], k["cy"])
        weights = {name[4:]: t for name, t in tensors.items() if name.startswith("cnn.")}
        # Reference and anchor are buffers: placeholders here, the file's values load below.
        regressor = PoseRegressor(
            torch.eye(4, dtype=torch.float64),
            torch.zeros(3),
            backbone=meta["backbone"],
            image_size=meta["image_size"],
            channels=meta.get("backbone_channels"),
            stem=meta.get("backbone_stem"),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise PatientModelError(f"{path}: incomplete or inconsistent patient model: {err!r}") from err
    if mu.dim() != 3 or affine.shape != (4, 4):
        raise PatientModelError(
            f"{path}: volume must be 3D with a 4x4 affine, got {tuple(mu.shape)}, {tuple(affine.shape)}"
        )
    if not (torch.isfinite(mu).all() and torch.isfinite(affine).all()):
        raise PatientModelError(f"{path}: the volume holds NaN or Inf values")
    try:
        regressor.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise PatientModelError(f"{path}: CNN weights do not match a {meta['backbone']} regressor: {err}") from err
    if not all(torch.isfinite(t).all() for t in weights.values()):
        raise PatientModelError(f"{path}: CNN weights hold NaN or Inf values")
    regressor.eval().to(device)
    return PatientModel(regressor, Volume(mu, affine, meta.get("ct_source", "")), intrinsics, meta)
