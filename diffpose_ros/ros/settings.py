"""The parameters of ``diffpose_node``: one table, and the snapshot the node works from.

:data:`PARAMETERS` holds each parameter once (name, default, description, read-only, allowed
values): the node declares them from it, :class:`Settings` takes its defaults from it, and the tests
pin ``config/diffpose.yaml`` and the launch file to it. Read-only parameters are fixed once the node
has started; the others can change at runtime. The node reads all of them into a new immutable
:class:`Settings`, checks it with :func:`settings_problems` and swaps it in atomically, so the worker
thread always sees one consistent set.

ROS-free: only the node turns the table into ``rcl_interfaces/ParameterDescriptor``s.
"""

from __future__ import annotations

import array
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core.cost import COSTS
from ..core.field import FieldSpec
from ..core.geometry import Intrinsics
from ..core.intensity import POLARITIES
from ..core.pipeline import PipelineConfig
from ..core.preprocess import FRAME_KINDS
from ..core.register import FINEST_WIDTHS, pyramid
from ..core.render import BACKENDS

__all__ = [
    "IMAGE_QOS",
    "PARAMETERS",
    "Parameter",
    "Settings",
    "kind_problem",
    "of_default_kind",
    "pipeline_config",
    "resolve_device",
    "settings_problems",
]

IMAGE_QOS = ("sensor_data", "reliable")


@dataclass(frozen=True)
class Parameter:
    """One node parameter: ``name`` (dots for groups), ``default`` (its type is the parameter's; an
    empty tuple is an unset double array), ``field`` of :class:`Settings`, ``description``,
    ``read_only``, and the allowed values: ``choices`` (of the default's type) or an inclusive ``bounds`` range."""

    name: str
    default: Any
    field: str
    description: str
    read_only: bool = False
    choices: tuple[Any, ...] = ()
    bounds: tuple[float, float] | None = None

    @property
    def constraints(self) -> str:
        """The allowed values in words (``ros2 param describe`` shows them)."""
        if self.choices:
            return "one of: " + ", ".join(map(str, self.choices))
        if self.bounds:
            return f"from {self.bounds[0]:g} to {self.bounds[1]:g}"
        return ""

    @property
    def numeric(self) -> bool:
        """A float or an array of floats: declared with dynamic typing, so that integer literals count
        too (``-p intrinsics.sdd_mm:=1020``, ``[512, 512]``); :class:`Settings` converts them."""
        return isinstance(self.default, (float, tuple))

    def problem(self, value) -> str:
        """Why ``value`` is not allowed (empty when it is)."""
        kind = kind_problem(self.default, value)
        if kind:
            return f"{self.name} must be {kind} (got {value!r})"
        if self.choices and value not in self.choices:
            return f"{self.name} must be {self.constraints} (got {value!r})"
        if self.bounds and not (self.bounds[0] <= value <= self.bounds[1]):
            return f"{self.name} must lie {self.constraints} (got {value!r})"
        return ""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def kind_problem(default, value) -> str:
    """What ``value`` must be to stand for a parameter whose default is ``default`` (empty when it is):
    the same kind, where an integer counts as a float (and integers as an array of floats)."""
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return "" if _is_number(value) and isinstance(value, int) else "an integer"
    if isinstance(default, float):
        return "" if _is_number(value) else "a number"
    if isinstance(default, tuple):  # the parameter service delivers arrays as array.array
        ok = isinstance(value, (tuple, list, array.array)) and all(_is_number(v) for v in value)
        return "" if ok else "an array of numbers"
    return "" if isinstance(value, str) else "a string"


def of_default_kind(default, value):
    """``value`` as a parameter whose default is ``default`` holds it: integers become floats for a float
    or float-array default; anything else (a value of the wrong kind too, for :func:`kind_problem`
    to name) is returned as it is."""
    if not isinstance(default, (float, tuple)) or kind_problem(default, value):
        return value
    return tuple(float(v) for v in value) if isinstance(default, tuple) else float(value)


_GATE = PipelineConfig()

PARAMETERS: tuple[Parameter, ...] = (
    Parameter("patient_model", "", "patient_model", "path of the patient model file (.safetensors)", True),
    Parameter(
        "device", "auto", "device", "auto (cuda when available, else cpu), cpu, cuda or cuda:N", True
    ),
    Parameter(
        "renderer", "auto", "renderer",
        "ray-marching backend: auto (numba on the CPU, torch on a GPU), numba, cuda (numba's CUDA kernel) or torch",
        True, ("auto", *BACKENDS),
    ),
    Parameter(
        "num_threads", 0, "num_threads",
        "torch CPU threads (0: one on the CPU, where the renderer has threads of its own; torch's default on a GPU)",
        True, bounds=(0, 1024),
    ),
    Parameter(
        "renderer_threads", 0, "renderer_threads",
        "CPU renderer threads (0: one per core); fewer leave cores to other software on the machine",
        True, bounds=(0, 1024),
    ),
    Parameter("autostart", False, "autostart", "configure and activate at start", True),
    Parameter("ct_frame", "ct", "ct_frame", "TF frame of the CT (LPS); parent of the published transform", True),
    Parameter("ct_ras_frame", "ct_ras", "ct_ras_frame", "static RAS frame under ct_frame (empty: not published)", True),
    Parameter(
        "image_qos", "sensor_data", "image_qos", "sensor_data (best effort) or reliable, depth 1", True, IMAGE_QOS
    ),
    Parameter(
        "diagnostics.period_s", 1.0, "diagnostics_period_s", "period of the /diagnostics summary (s)", True,
        bounds=(0.05, 3600.0),
    ),
    Parameter(
        "diagnostics.stale_after_s", 1.0, "stale_after_s",
        "the summary warns when no pose was accepted for this long (s, wall clock)", bounds=(0.01, 3600.0),
    ),
    Parameter(
        "registration.cost", _GATE.cold.cost, "cost",
        "registration cost (mixed: half ncc, half gradient_ncc; ncc: 0.5 NCC + 0.5 patch NCC; gradient_ncc)", True,
        tuple(COSTS),
    ),
    Parameter(
        "registration.finest_width", 128, "finest_width",
        "width (pixels) of the cold pyramid's finest level: 128, or 256 (a better 3D pose on clinical frames, "
        "about 2.5x the cold start's time on a CPU)", True, FINEST_WIDTHS,
    ),
    Parameter("camera_frame", "carm_source_optical", "camera_frame", "child frame when header.frame_id is empty"),
    Parameter(
        "invert", False, "invert", "publish frame_id -> ct_frame (the inverse) instead of ct_frame -> frame_id"
    ),
    Parameter("mirror", False, "mirror", "frames are mirrored left-right (seen from the detector side)"),
    Parameter(
        "input_kind", "transmission", "input_kind", "32FC1 frames are transmission or line_integrals",
        choices=FRAME_KINDS,
    ),
    Parameter(
        "camera_info_wait_s", 0.5, "camera_info_wait_s", "how long a frame waits for its camera_info (s)",
        bounds=(0.0, 60.0),
    ),
    Parameter(
        "intrinsics.sdd_mm", 0.0, "sdd_mm", "source-to-detector distance (mm) when no camera_info; 0: unset",
        bounds=(0.0, 1e4),
    ),
    Parameter(
        "intrinsics.pixel_spacing_mm", 0.0, "pixel_spacing_mm",
        "detector pixel spacing (mm) when no camera_info; 0: unset", bounds=(0.0, 100.0),
    ),
    Parameter(
        "intrinsics.principal_point", (), "principal_point",
        "[cx, cy] in pixels when no camera_info; unset or empty: image centre",
    ),
    Parameter(
        "gate.min_similarity", _GATE.min_similarity, "min_similarity",
        "smallest accepted final similarity (of registration.cost)", bounds=(-1.0, 1.0),
    ),
    Parameter(
        "polarity", _GATE.polarity, "polarity",
        "how frames show bone: bones_dark (transmission), bones_bright (inverted display; a frame that looks "
        "the other way is refused) or auto (either)", choices=(*POLARITIES, "auto"),
    ),
    Parameter(
        "gate.max_source_distance_mm", _GATE.max_source_distance_mm, "max_source_distance_mm",
        "largest plausible source distance from the CT centre (mm)", bounds=(1.0, 1e5),
    ),
    Parameter(
        "field.auto", True, "field_auto",
        "find the field (round or blades), burned-in text and saturated pixels in transmission frames",
    ),
    Parameter(
        "field.radius_px", 0.0, "field_radius_px", "known round field radius (delivered pixels); 0: detect",
        bounds=(0.0, 1e5),
    ),
    Parameter(
        "field.center_px", (), "field_center_px", "[cx, cy] of the known round field (pixels); unset: image centre"
    ),
    Parameter(
        "field.margin_px", 3.0, "field_margin_px", "pixels inside the field's edge that are left out",
        bounds=(0.0, 100.0),
    ),
    Parameter("tracking.enabled", True, "tracking_enabled", "start from the last accepted pose when it is recent"),
    Parameter(
        "tracking.predict", _GATE.predict, "tracking_predict",
        "move the tracking start on at the velocity of the last two accepted poses",
    ),
    Parameter(
        "tracking.max_age_s", _GATE.tracking_max_age_s, "tracking_max_age_s",
        "tracking when the last accepted pose is younger than this (stamps, s)", bounds=(0.0, 3600.0),
    ),
    Parameter(
        "tracking.frame_budget", 0.8, "tracking_frame_budget",
        "share of the interval between received frames that a tracked frame may take from its receipt: "
        "its refinement then stops stepping, once its pose has settled (0: no limit)", bounds=(0.0, 100.0),
    ),
    Parameter("overlay.width", 256, "overlay_width", "width (pixels) of ~/overlay", bounds=(8, 4096)),
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """All parameters as one immutable snapshot (swapped atomically); defaults from :data:`PARAMETERS`."""

    patient_model: str
    device: str
    renderer: str
    num_threads: int
    renderer_threads: int
    autostart: bool
    ct_frame: str
    ct_ras_frame: str
    image_qos: str
    diagnostics_period_s: float
    stale_after_s: float
    cost: str
    finest_width: int
    camera_frame: str
    invert: bool
    mirror: bool
    input_kind: str
    camera_info_wait_s: float
    sdd_mm: float
    pixel_spacing_mm: float
    principal_point: tuple[float, ...]
    min_similarity: float
    polarity: str
    max_source_distance_mm: float
    field_auto: bool
    field_radius_px: float
    field_center_px: tuple[float, ...]
    field_margin_px: float
    tracking_enabled: bool
    tracking_predict: bool
    tracking_max_age_s: float
    tracking_frame_budget: float
    overlay_width: int

    @classmethod
    def from_parameters(cls, values: dict[str, Any]) -> Settings:
        """Settings from parameter values by name (missing or None: the table's default). Integer
        values of float parameters become floats; a value of the wrong kind is kept for
        :func:`settings_problems` to name."""
        fields = {}
        for p in PARAMETERS:
            value = values.get(p.name)
            value = p.default if value is None else value
            fields[p.field] = of_default_kind(p.default, value)
        return cls(**fields)

    def field(self) -> FieldSpec:
        """The ``field.*`` parameters as the core's :class:`~diffpose_ros.core.field.FieldSpec`."""
        center = tuple(self.field_center_px) if len(self.field_center_px) == 2 else None
        return FieldSpec(self.field_auto, self.field_radius_px, center, self.field_margin_px)

    def parameter_intrinsics(self, width: int, height: int) -> Intrinsics | None:
        """Intrinsics from the ``intrinsics.*`` parameters for a ``width x height`` image, or None if unset."""
        if self.sdd_mm <= 0 or self.pixel_spacing_mm <= 0:
            return None
        pp = tuple(self.principal_point) if len(self.principal_point) == 2 else None
        return Intrinsics.from_detector(self.sdd_mm, width, height, self.pixel_spacing_mm, pp)


def settings_problems(s: Settings) -> list[str]:
    """What is wrong with ``s`` (allowed values of the table, and what a value alone cannot say)."""
    problems = [p.problem(getattr(s, p.field)) for p in PARAMETERS]
    problems = [text for text in problems if text]
    if problems:  # values of the wrong kind: nothing below can be judged
        return problems
    for name, point in (("intrinsics.principal_point", s.principal_point), ("field.center_px", s.field_center_px)):
        if len(point) not in (0, 2) or not all(math.isfinite(v) for v in point):
            problems.append(f"{name} must be [] or [cx, cy] (finite pixels)")
    if not s.camera_frame:
        problems.append("camera_frame must not be empty")
    return problems


def pipeline_config(s: Settings, base: PipelineConfig | None = None) -> PipelineConfig:
    """``base`` (default :class:`PipelineConfig`) with the gate, polarity, tracking, cost, pyramid and
    renderer of ``s``."""
    base = base or PipelineConfig()
    return dataclasses.replace(
        base,
        min_similarity=float(s.min_similarity),
        tracking_max_age_s=float(s.tracking_max_age_s),
        predict=bool(s.tracking_predict),
        max_source_distance_mm=float(s.max_source_distance_mm),
        polarity=s.polarity,
        renderer=s.renderer,
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
