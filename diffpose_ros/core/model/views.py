"""The C-arm views a patient model is made for: ranges of the contract's parameters, and the
procedure presets that name them.

A :class:`ViewRange` is one box of C-arm parameters (``alpha, beta, gamma`` in degrees, SOD in mm,
isocentre half-widths in mm around the CT centre; :func:`~diffpose_ros.core.geometry.camera.carm_pose`).
A :class:`ViewSet` is a weighted union of boxes (its modes): a spine case takes AP and lateral views,
and a model trained on those modes spends its steps there rather than evenly over every angle
between. :data:`PRESETS` names the views of real procedures as a surgeon takes them; evaluation
and bags draw from a preset as it is, training widens every mode by a :class:`Margin` so that views
at its edges are not extrapolation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import yaml

from diffpose_ros.core.geometry.camera import carm_parameters

from .keys import known_fields

__all__ = ["CLINICAL_RANGE", "Margin", "PRESETS", "ViewRange", "ViewSet"]


@dataclass(frozen=True)
class ViewRange:
    """Uniform ranges ``(low, high)``: angles in degrees (alpha within [-180, 180], beta within
    [-80, 80], no wrap-around), SOD in mm; ``isocenter_mm``: half-widths of the isocentre box around
    the CT centre per LPS axis (mm). ``ValueError`` names a bad field."""

    alpha_deg: tuple[float, float]
    beta_deg: tuple[float, float]
    gamma_deg: tuple[float, float]
    sod_mm: tuple[float, float]
    isocenter_mm: tuple[float, float, float]

    def __post_init__(self) -> None:
        for f in fields(self):
            value = tuple(float(v) for v in getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            if f.name != "isocenter_mm" and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"{f.name} must be [low, high] with low <= high, got {list(value)}")
        if len(self.isocenter_mm) != 3 or min(self.isocenter_mm) < 0:
            raise ValueError(f"isocenter_mm must be three non-negative half-widths, got {list(self.isocenter_mm)}")
        if self.sod_mm[0] <= 0:
            raise ValueError("sod_mm must be positive")
        if self.alpha_deg[0] < -180 or self.alpha_deg[1] > 180 or self.beta_deg[0] < -80 or self.beta_deg[1] > 80:
            raise ValueError(
                f"alpha_deg must lie in [-180, 180] and beta_deg in [-80, 80], got {list(self.alpha_deg)}, "
                f"{list(self.beta_deg)}"
            )

    @classmethod
    def from_dict(cls, d: dict | None, base: ViewRange) -> ViewRange:
        """``base`` with the fields a mapping names; unknown keys are errors."""
        return replace(base, **known_fields(cls, d, "view-range"))

    def as_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    def widened(self, margin: Margin) -> ViewRange:
        """This range with ``margin`` added on every side."""
        a, r = margin.angle_deg, margin.roll_deg
        grow = lambda lo_hi, m: (lo_hi[0] - m, lo_hi[1] + m)  # noqa: E731
        return ViewRange(
            grow(self.alpha_deg, a),
            grow(self.beta_deg, a),
            grow(self.gamma_deg, r),
            grow(self.sod_mm, margin.sod_mm),
            tuple(h + margin.isocenter_mm for h in self.isocenter_mm),
        )

    def contains(self, poses: torch.Tensor, center: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """Which poses ``T_ct_source`` ``(..., 4, 4)`` (mm) are views of this range around the CT
        centre ``center`` (mm): bool ``(...)``. The angles of a view are unique; its SOD and
        isocentre slide together along the principal ray, so a view is in the range when some point
        of that ray is an isocentre of the box at an SOD of the range. ``params``: the poses'
        :func:`~diffpose_ros.core.geometry.camera.carm_parameters` when already computed."""
        poses = poses.to(torch.float64)
        params = carm_parameters(poses, center) if params is None else params
        rad = math.pi / 180
        inside = torch.ones(params.shape[:-1], dtype=torch.bool)
        for i, (lo, hi) in enumerate((self.alpha_deg, self.beta_deg, self.gamma_deg)):
            inside &= (params[..., i] >= lo * rad - 1e-9) & (params[..., i] <= hi * rad + 1e-9)
        # The SODs t with |source + t d - center| <= half on every axis, intersected with the range's.
        source, d = poses[..., :3, 3] - center.to(poses), poses[..., :3, 2]
        half = torch.tensor(self.isocenter_mm, dtype=torch.float64) + 1e-6
        low = torch.full(params.shape[:-1], self.sod_mm[0] - 1e-6, dtype=torch.float64)
        high = torch.full(params.shape[:-1], self.sod_mm[1] + 1e-6, dtype=torch.float64)
        for axis in range(3):
            s, v = source[..., axis], d[..., axis]
            moving = v.abs() > 1e-12
            a = torch.where(moving, (-half[axis] - s) / torch.where(moving, v, 1.0), -math.inf)
            b = torch.where(moving, (half[axis] - s) / torch.where(moving, v, 1.0), math.inf)
            low, high = torch.maximum(low, torch.minimum(a, b)), torch.minimum(high, torch.maximum(a, b))
            inside &= moving | (s.abs() <= half[axis])
        return inside & (low <= high)


@dataclass(frozen=True)
class Margin:
    """What training adds on every side of a preset's modes: ``angle_deg`` to alpha and beta,
    ``roll_deg`` to gamma, ``sod_mm`` to SOD, ``isocenter_mm`` to the isocentre half-widths."""

    angle_deg: float = 2.0
    roll_deg: float = 1.0
    sod_mm: float = 10.0
    isocenter_mm: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, float(getattr(self, f.name)))
            if getattr(self, f.name) < 0:
                raise ValueError(f"view_margin.{f.name} must be non-negative, got {getattr(self, f.name)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> Margin:
        return cls(**known_fields(cls, d, "view_margin"))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ViewSet:
    """A weighted union of :class:`ViewRange` modes: a view is drawn from mode ``i`` with probability
    ``weights[i] / sum(weights)``. ``name``: the preset it comes from (``""`` for a set of one's own)."""

    modes: tuple[ViewRange, ...]
    weights: tuple[float, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        modes = tuple(self.modes)
        weights = tuple(float(w) for w in self.weights) or (1.0,) * len(modes)
        if not modes or len(weights) != len(modes) or min(weights) <= 0:
            raise ValueError(f"a view set needs one positive weight per mode, got {len(modes)} modes, {weights}")
        object.__setattr__(self, "modes", modes)
        object.__setattr__(self, "weights", weights)

    @classmethod
    def from_spec(cls, spec, margin: Margin | None = None) -> ViewSet:
        """The set a user names: a preset's name, the path of a YAML file holding one of these (at
        its top or under ``view_range:``), a mapping of :class:`ViewRange` keys or a list of such
        mappings, each with an optional ``weight``. Keys a mapping leaves out keep the ``ap``
        preset's box, widened by ``margin`` when one is given. ``ValueError`` names what is wrong."""
        if isinstance(spec, ViewSet):
            return spec
        if isinstance(spec, (str, Path)) and str(spec) in PRESETS:
            return PRESETS[str(spec)]
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            if not path.is_file():
                raise ValueError(f"views range {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
            try:
                doc = yaml.safe_load(path.read_text())
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise ValueError(f"{path} is not a YAML file of view ranges: {err}") from None
            doc = doc["view_range"] if isinstance(doc, dict) and "view_range" in doc else doc
            if isinstance(doc, str) and doc not in PRESETS:  # a name in a file names a preset, not another file
                raise ValueError(f"{path}: names {doc!r}, which is not a preset ({', '.join(PRESETS)})")
            return cls.from_spec(doc, margin)
        base = PRESETS["ap"].modes[0]
        base = base.widened(margin) if margin is not None else base
        if isinstance(spec, dict):
            return cls((ViewRange.from_dict(spec, base),))
        if isinstance(spec, (list, tuple)) and spec and all(isinstance(m, dict) for m in spec):
            weights = [float(m.get("weight", 1.0)) for m in spec]
            modes = [ViewRange.from_dict({k: v for k, v in m.items() if k != "weight"}, base) for m in spec]
            return cls(tuple(modes), tuple(weights))
        raise ValueError(f"a views range is a preset name, a mapping or a list of mappings, got {spec!r}")

    def as_spec(self) -> str | list[dict]:
        """What :meth:`from_spec` reads back: the preset's name, or the modes with their weights."""
        if self.name:
            return self.name
        return [{**m.as_dict(), "weight": w} for m, w in zip(self.modes, self.weights)]

    def widened(self, margin: Margin) -> ViewSet:
        """Every mode widened by ``margin`` (a set of its own: no longer the preset)."""
        return ViewSet(tuple(m.widened(margin) for m in self.modes), self.weights)

    def trained(self, margin: Margin) -> ViewSet:
        """The views training draws for this set: a preset widened by ``margin``, boxes of one's own
        as they are."""
        return self.widened(margin) if self.name else self

    def without_roll(self) -> ViewSet:
        """The same views at ``gamma = 0``."""
        return ViewSet(tuple(replace(m, gamma_deg=(0.0, 0.0)) for m in self.modes), self.weights, self.name)

    @property
    def roll_deg(self) -> tuple[float, float]:
        """The lowest and highest roll of any mode (degrees)."""
        return min(m.gamma_deg[0] for m in self.modes), max(m.gamma_deg[1] for m in self.modes)

    @property
    def centre(self) -> tuple[float, float, float]:
        """The weighted means of the modes' central alpha, beta (degrees) and SOD (mm): where a
        regressor's zero output points, equally far from symmetric modes."""
        total = sum(self.weights)

        def mean(name: str) -> float:
            return sum(w * sum(getattr(m, name)) / 2 for m, w in zip(self.modes, self.weights)) / total

        return mean("alpha_deg"), mean("beta_deg"), mean("sod_mm")

    def contains(self, poses: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Which poses ``T_ct_source`` ``(..., 4, 4)`` (mm) are views of one of the modes around the
        CT centre ``center`` (mm): bool ``(...)`` (:meth:`ViewRange.contains`)."""
        inside = torch.zeros(poses.shape[:-2], dtype=torch.bool)
        params = carm_parameters(poses.to(torch.float64), center)  # once for every mode
        for mode in self.modes:
            inside |= mode.contains(poses, center, params)
        return inside


CLINICAL_RANGE = ViewRange((-30, 30), (-20, 20), (-10, 10), (650, 850), (40, 40, 40))
"""The geometry contract's clinical range near AP (the ``ap`` preset)."""


def _mode(alpha, beta, gamma=(-10, 10)) -> ViewRange:
    return ViewRange(alpha, beta, gamma, CLINICAL_RANGE.sod_mm, CLINICAL_RANGE.isocenter_mm)


_LATERALS = (_mode((75, 105), (-15, 15)), _mode((-105, -75), (-15, 15)))
_SWINGS = (_mode((30, 75), (-15, 15)), _mode((-75, -30), (-15, 15)))

PRESETS: dict[str, ViewSet] = {
    "ap": ViewSet((CLINICAL_RANGE,), name="ap"),
    "lateral": ViewSet(_LATERALS, name="lateral"),
    "spine": ViewSet((CLINICAL_RANGE, *_LATERALS, *_SWINGS), (2, 1, 1, 0.5, 0.5), name="spine"),
    "pelvis": ViewSet(
        (
            CLINICAL_RANGE,
            _mode((-15, 15), (25, 45)),
            _mode((-15, 15), (-45, -25)),
            _mode((30, 60), (-15, 15)),
            _mode((-60, -30), (-15, 15)),
        ),
        (2, 1, 1, 1, 1),
        name="pelvis",
    ),
    "orbit": ViewSet((_mode((-110, 110), (-20, 20)),), name="orbit"),
}
"""Procedure presets (views as a surgeon takes them; SOD 650-850 mm, isocentre within 40 mm of the
CT centre, roll within 10 deg):

- ``ap``: near-AP views, alpha within 30 deg and beta within 20 deg (the geometry contract's
  clinical range; the default);
- ``lateral``: laterals from either side, alpha within 15 deg of +-90 deg, beta within 15 deg;
- ``spine``: AP and both laterals, which spine surgery alternates between, and (half as often
  as each lateral) the swings between them, alpha 30-75 deg either side;
- ``pelvis``: AP, inlet and outlet (beam tilted 25-45 deg toward the head or the feet) and Judet
  obliques (alpha 30-60 deg either side);
- ``orbit``: any orbit angle within 110 deg of AP, beta within 20 deg.
"""
