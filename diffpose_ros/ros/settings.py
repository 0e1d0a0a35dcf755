"""The parameters of ``diffpose_node`` that can change at runtime, as one immutable snapshot.

``TUNABLE_PARAMETERS`` maps each runtime-tunable ROS parameter to its :class:`Settings` field; the node
reads them into a new :class:`Settings`, validates it with :func:`settings_problems` and swaps it in
atomically, so the worker thread always sees one consistent set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.geometry import Intrinsics
from ..core.pipeline import PipelineConfig

__all__ = [
    "INPUT_KINDS",
    "IMAGE_QOS",
    "Settings",
    "TUNABLE_PARAMETERS",
    "settings_problems",
    "pipeline_config",
    "resolve_device",
]

INPUT_KINDS = ("transmission", "line_integrals")
IMAGE_QOS = ("sensor_data", "reliable")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda``/``cuda:N``/``cpu`` checked."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but torch.cuda is not available")
        return name
    if name == "cpu":
        return name
    raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)")


@dataclass(frozen=True)
class Settings:
    """The runtime-tunable parameters, as one immutable snapshot (swapped atomically)."""

    camera_frame: str = "carm_source_optical"
    invert: bool = False
    mirror: bool = False
    input_kind: str = "transmission"
    camera_info_wait_s: float = 0.5
    sdd_mm: float = 0.0
    pixel_spacing_mm: float = 0.0
    principal_point: tuple[float, ...] = ()
    min_similarity: float = PipelineConfig.min_similarity
    max_source_distance_mm: float = 2000.0
    tracking_enabled: bool = True
    tracking_max_age_s: float = 1.0
    overlay_width: int = 256

    def parameter_intrinsics(self, width: int, height: int) -> Intrinsics | None:
        """Intrinsics from the ``intrinsics.*`` parameters for a ``width x height`` image, or None if unset."""
        if self.sdd_mm <= 0 or self.pixel_spacing_mm <= 0:
            return None
        pp = tuple(self.principal_point) if len(self.principal_point) == 2 else None
        return Intrinsics.from_detector(self.sdd_mm, width, height, self.pixel_spacing_mm, pp)


# parameter name -> Settings field
TUNABLE_PARAMETERS = {
    "camera_frame": "camera_frame",
    "invert": "invert",
    "mirror": "mirror",
    "input_kind": "input_kind",
    "camera_info_wait_s": "camera_info_wait_s",
    "intrinsics.sdd_mm": "sdd_mm",
    "intrinsics.pixel_spacing_mm": "pixel_spacing_mm",
    "intrinsics.principal_point": "principal_point",
    "gate.min_similarity": "min_similarity",
    "gate.max_source_distance_mm": "max_source_distance_mm",
    "tracking.enabled": "tracking_enabled",
    "tracking.max_age_s": "tracking_max_age_s",
    "overlay.width": "overlay_width",
}


def settings_problems(s: Settings, image_qos: str) -> list[str]:
    """What is wrong with ``s`` (and the ``image_qos`` parameter); empty when all is well."""
    problems = []
    if s.input_kind not in INPUT_KINDS:
        problems.append(f"input_kind must be one of {INPUT_KINDS}")
    if image_qos not in IMAGE_QOS:
        problems.append(f"image_qos must be one of {IMAGE_QOS}")
    if not (-1.0 <= s.min_similarity <= 1.0):
        problems.append("gate.min_similarity must lie in [-1, 1]")
    if s.tracking_max_age_s < 0 or s.camera_info_wait_s < 0:
        problems.append("tracking.max_age_s and camera_info_wait_s must be >= 0")
    if s.sdd_mm < 0 or s.pixel_spacing_mm < 0 or s.max_source_distance_mm <= 0:
        problems.append("intrinsics and distances must not be negative")
    if len(s.principal_point) not in (0, 2):
        problems.append("intrinsics.principal_point must be [] or [cx, cy]")
    if s.overlay_width < 8:
        problems.append("overlay.width must be >= 8")
    if not s.camera_frame:
        problems.append("camera_frame must not be empty")
    return problems


def pipeline_config(s: Settings, base: PipelineConfig | None = None) -> PipelineConfig:
    """``base`` (default :class:`PipelineConfig`) with the gate and tracking values of ``s``."""
    return dataclasses.replace(
        base or PipelineConfig(),
        min_similarity=float(s.min_similarity),
        tracking_max_age_s=float(s.tracking_max_age_s),
        max_source_distance_mm=float(s.max_source_distance_mm),
    )
