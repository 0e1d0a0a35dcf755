"""The parameters of ``diffpose_node``: their declaration, and the snapshot the node works from.

:class:`Settings` declares each parameter once, as a field (:func:`~.parameters.parameter`: name,
default, description, read-only, allowed values); :data:`PARAMETERS` is its table, from which the
node declares them, and against which the tests pin ``config/diffpose.yaml`` and the docs' table.
Read-only parameters are fixed once the node has started; the others can change at runtime. The node
reads all of them into a new immutable :class:`Settings`, checks it with :func:`settings_problems`
and swaps it in atomically, so the worker thread always sees one consistent set.

ROS-free: :func:`~.parameters.descriptor` turns the table into ``rcl_interfaces/ParameterDescriptor``s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from diffpose_ros.core import (
    BACKENDS,
    COSTS,
    FINEST_WIDTHS,
    FRAME_KINDS,
    POLARITIES,
    FieldSpec,
    Intrinsics,
    PipelineConfig,
    pyramid,
)

from .parameters import ParameterSet, parameter, parameter_table, table_problems
from .qos import IMAGE_QOS

__all__ = ["PARAMETERS", "Settings", "pipeline_config", "resolve_device", "settings_problems"]

_GATE = PipelineConfig()


@dataclass(frozen=True)
class Settings(ParameterSet):
    """All parameters of ``diffpose_node`` as one immutable snapshot (swapped atomically)."""

    # fmt: off
    patient_model: str = parameter("", "path of the patient model file (.safetensors)", read_only=True)
    device: str = parameter("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N", read_only=True)
    renderer: str = parameter(
        "auto",
        "ray-marching backend: auto (numba on the CPU, torch on a GPU), numba, cuda (numba's CUDA kernel) or torch",
        read_only=True, choices=("auto", *BACKENDS),
    )
    num_threads: int = parameter(
        0, "torch CPU threads (0: one on the CPU, where the renderer has threads of its own; torch's default on a GPU)",
        read_only=True, bounds=(0, 1024),
    )
    renderer_threads: int = parameter(
        0, "CPU renderer threads (0: one per core); fewer leave cores to other software on the machine",
        read_only=True, bounds=(0, 1024),
    )
    autostart: bool = parameter(False, "configure and activate at start", read_only=True)
    ct_frame: str = parameter("ct", "TF frame of the CT (LPS); parent of the published transform", read_only=True)
    ct_ras_frame: str = parameter(
        "ct_ras", "static RAS frame under ct_frame (empty: not published)", read_only=True
    )
    image_qos: str = parameter(
        "sensor_data", "sensor_data (best effort) or reliable, depth 1", read_only=True, choices=IMAGE_QOS
    )
    diagnostics_period_s: float = parameter(
        1.0, "period of the /diagnostics summary (s)", name="diagnostics.period_s", read_only=True,
        bounds=(0.05, 3600.0),
    )
    stale_after_s: float = parameter(
        1.0, "the summary warns when no pose was accepted for this long (s, wall clock)",
        name="diagnostics.stale_after_s", bounds=(0.01, 3600.0),
    )
    cost: str = parameter(
        _GATE.cold.cost,
        "registration cost (mixed: half ncc, half gradient_ncc; ncc: 0.5 NCC + 0.5 patch NCC; gradient_ncc)",
        name="registration.cost", read_only=True, choices=tuple(COSTS),
    )
    finest_width: int = parameter(
        128,
        "width (pixels) of the cold pyramid's finest level: 128, or 256 (a better 3D pose on clinical frames, "
        "at a slower cold start)",
        name="registration.finest_width", read_only=True, choices=FINEST_WIDTHS,
    )
    multistart_budget_s: float = parameter(
        _GATE.multistart_budget_s,
        "seconds a cold start that failed the gate may spend on starts around the CNN's estimate (0: none)",
        name="registration.multistart_budget_s", bounds=(0.0, 10.0),
    )
    camera_frame: str = parameter("carm_source_optical", "child frame when header.frame_id is empty")
    invert: bool = parameter(
        False, "publish frame_id -> ct_frame (the inverse) instead of ct_frame -> frame_id"
    )
    mirror: bool = parameter(False, "frames are mirrored left-right (seen from the detector side)")
    input_kind: str = parameter(
        "transmission", "32FC1 frames are transmission or line_integrals", choices=FRAME_KINDS
    )
    camera_info_wait_s: float = parameter(
        0.5, "how long a frame waits for its camera_info (s)", bounds=(0.0, 60.0)
    )
    sdd_mm: float = parameter(
        0.0, "source-to-detector distance (mm) when no camera_info; 0: unset", name="intrinsics.sdd_mm",
        bounds=(0.0, 1e4),
    )
    pixel_spacing_mm: float = parameter(
        0.0, "detector pixel spacing (mm) when no camera_info; 0: unset", name="intrinsics.pixel_spacing_mm",
        bounds=(0.0, 100.0),
    )
    principal_point: tuple[float, ...] = parameter(
        (), "[cx, cy] in pixels when no camera_info; unset or empty: image centre",
        name="intrinsics.principal_point",
    )
    min_similarity: float = parameter(
        _GATE.min_similarity, "smallest accepted final similarity (of registration.cost)",
        name="gate.min_similarity", bounds=(-1.0, 1.0),
    )
    polarity: str = parameter(
        _GATE.polarity,
        "how frames show bone: bones_dark (transmission), bones_bright (inverted display; a frame that looks "
        "the other way is refused) or auto (either)", choices=(*POLARITIES, "auto"),
    )
    max_source_distance_mm: float = parameter(
        _GATE.max_source_distance_mm, "largest plausible source distance from the CT centre (mm)",
        name="gate.max_source_distance_mm", bounds=(1.0, 1e5),
    )
    field_auto: bool = parameter(
        True, "find the field (round or blades), burned-in text and saturated pixels in transmission frames",
        name="field.auto",
    )
    field_radius_px: float = parameter(
        0.0, "known round field radius (delivered pixels); 0: detect", name="field.radius_px", bounds=(0.0, 1e5)
    )
    field_center_px: tuple[float, ...] = parameter(
        (), "[cx, cy] of the known round field (pixels); unset: image centre", name="field.center_px"
    )
    field_margin_px: float = parameter(
        3.0, "pixels inside the field's edge that are left out", name="field.margin_px", bounds=(0.0, 100.0)
    )
    tracking_enabled: bool = parameter(
        True, "start from the last accepted pose when it is recent", name="tracking.enabled"
    )
    tracking_predict: bool = parameter(
        _GATE.predict, "move the tracking start on at the velocity of the last two accepted poses",
        name="tracking.predict",
    )
    tracking_max_age_s: float = parameter(
        _GATE.tracking_max_age_s, "tracking when the last accepted pose is younger than this (stamps, s)",
        name="tracking.max_age_s", bounds=(0.0, 3600.0),
    )
    tracking_frame_budget: float = parameter(
        0.8,
        "share of the interval between received frames that a tracked frame may take from its receipt: "
        "its refinement then stops stepping, once its pose has settled (0: no limit)",
        name="tracking.frame_budget", bounds=(0.0, 100.0),
    )
    overlay_width: int = parameter(256, "width (pixels) of ~/overlay", name="overlay.width", bounds=(8, 4096))
    # fmt: on

    def field(self) -> FieldSpec:
        """The ``field.*`` parameters as the core's :class:`~diffpose_ros.core.frames.field.FieldSpec`."""
        center = tuple(self.field_center_px) if len(self.field_center_px) == 2 else None
        return FieldSpec(self.field_auto, self.field_radius_px, center, self.field_margin_px)

    def parameter_intrinsics(self, width: int, height: int) -> Intrinsics | None:
        """Intrinsics from the ``intrinsics.*`` parameters for a ``width x height`` image, or None if unset."""
        if self.sdd_mm <= 0 or self.pixel_spacing_mm <= 0:
            return None
        pp = tuple(self.principal_point) if len(self.principal_point) == 2 else None
        return Intrinsics.from_detector(self.sdd_mm, width, height, self.pixel_spacing_mm, pp)


PARAMETERS = parameter_table(Settings)
"""The parameters of ``diffpose_node``, in declaration order."""


def settings_problems(s: Settings) -> list[str]:
    """What is wrong with ``s`` (allowed values of the table, and what a value alone cannot say)."""
    problems = table_problems(s)
    if problems:  # values of the wrong kind: nothing below can be judged
        return problems
    for name, point in (("intrinsics.principal_point", s.principal_point), ("field.center_px", s.field_center_px)):
        if len(point) not in (0, 2) or not all(math.isfinite(v) for v in point):
            problems.append(f"{name} must be [] or [cx, cy] (finite pixels)")
    if not s.camera_frame:
        problems.append("camera_frame must not be empty")
    return problems


def pipeline_config(s: Settings, base: PipelineConfig | None = None) -> PipelineConfig:
    """``base`` (default :class:`PipelineConfig`) with the gate, polarity, tracking, cost, pyramid,
    multistart budget and renderer of ``s``."""
    base = base or PipelineConfig()
    return dataclasses.replace(
        base,
        min_similarity=float(s.min_similarity),
        tracking_max_age_s=float(s.tracking_max_age_s),
        predict=bool(s.tracking_predict),
        max_source_distance_mm=float(s.max_source_distance_mm),
        polarity=s.polarity,
        renderer=s.renderer,
        multistart_budget_s=float(s.multistart_budget_s),
        cold=dataclasses.replace(base.cold, cost=s.cost, levels=pyramid(s.finest_width)),
    )


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
