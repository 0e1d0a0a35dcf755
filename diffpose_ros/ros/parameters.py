"""Node parameters declared once, as the fields of a frozen settings dataclass.

Each field of a :class:`ParameterSet` subclass is made with :func:`parameter`: its default (whose
type is the parameter's; an empty tuple is an unset double array), description, whether it is
read-only (fixed once the node has started) or may change at runtime, and its allowed values
(``choices``, or an inclusive ``bounds`` range). From that one declaration come the
:class:`Parameter` table (:func:`parameter_table`), the node's descriptors and declarations
(:func:`declare_parameters`), the settings snapshot (:meth:`ParameterSet.from_parameters`), the
checks of a value's kind and range (:func:`table_problems`) and the docs' table
(:mod:`.parameter_docs`).

ROS-free but for :func:`descriptor` and :func:`declare_parameters`, which import ``rcl_interfaces``.
"""

from __future__ import annotations

import array
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Parameter",
    "ParameterSet",
    "declare_parameters",
    "descriptor",
    "kind_problem",
    "of_default_kind",
    "parameter",
    "parameter_table",
    "parameter_values",
    "table_problems",
]

_SPEC = "diffpose_ros.parameter"


@dataclass(frozen=True)
class Parameter:
    """One node parameter: ``name`` (dots for groups), ``default`` (its type is the parameter's; an
    empty tuple is an unset double array), ``field`` of the settings dataclass, ``description``,
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
        too (``-p intrinsics.sdd_mm:=1020``, ``[512, 512]``); the settings convert them."""
        return isinstance(self.default, (float, tuple))

    @property
    def type_name(self) -> str:
        """The ROS parameter type: ``bool``, ``integer``, ``double``, ``double array`` or ``string``."""
        for kind, name in ((bool, "bool"), (int, "integer"), (float, "double"), (tuple, "double array")):
            if isinstance(self.default, kind):
                return name
        return "string"

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


def parameter(
    default,
    description: str,
    *,
    name: str | None = None,
    read_only: bool = False,
    choices: tuple = (),
    bounds: tuple[float, float] | None = None,
):
    """A dataclass field that is a node parameter (see :class:`Parameter`); ``name`` defaults to the
    field's name."""
    spec = {"name": name, "description": description, "read_only": read_only, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata={_SPEC: {**spec, "bounds": bounds}})


@functools.cache
def parameter_table(cls) -> tuple[Parameter, ...]:
    """The :class:`Parameter` of each field of the dataclass ``cls``, in field order."""
    table = []
    for f in dataclasses.fields(cls):
        spec = dict(f.metadata[_SPEC])
        table.append(Parameter(default=f.default, field=f.name, **{**spec, "name": spec["name"] or f.name}))
    return tuple(table)


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


class ParameterSet:
    """Base of a frozen dataclass whose fields are made with :func:`parameter`: one immutable snapshot
    of a node's parameters."""

    @classmethod
    def from_parameters(cls, values: dict[str, Any]):
        """The snapshot of parameter ``values`` by name (missing or None: the default). Integer values
        of float parameters become floats; a value of the wrong kind is kept for
        :func:`table_problems` to name."""
        fields = {}
        for p in parameter_table(cls):
            value = values.get(p.name)
            fields[p.field] = of_default_kind(p.default, p.default if value is None else value)
        return cls(**fields)


def table_problems(settings: ParameterSet) -> list[str]:
    """What the table says is wrong with the values of ``settings``: kinds, choices and ranges."""
    problems = [p.problem(getattr(settings, p.field)) for p in parameter_table(type(settings))]
    return [text for text in problems if text]


def descriptor(p: Parameter):
    """The ``rcl_interfaces/ParameterDescriptor`` of ``p``: description, read-only flag, allowed values
    in words and, where it has bounds, its range (``ros2 param describe``, rqt_reconfigure's sliders).
    Floats and float arrays are dynamically typed, so that ``1020`` counts as ``1020.0``; the node's
    validation checks their kind."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    out = ParameterDescriptor(
        description=p.description, read_only=p.read_only, additional_constraints=p.constraints, dynamic_typing=p.numeric
    )
    if p.bounds and isinstance(p.default, float):
        low, high = map(float, p.bounds)
        out.floating_point_range = [FloatingPointRange(from_value=low, to_value=high, step=0.0)]
    elif p.bounds and isinstance(p.default, int) and not isinstance(p.default, bool):
        low, high = map(int, p.bounds)
        out.integer_range = [IntegerRange(from_value=low, to_value=high, step=1)]
    return out


def declare_parameters(node, table: tuple[Parameter, ...]) -> None:
    """Declare each parameter of ``table`` on the rclpy ``node`` with its default (unset for an empty
    array) and :func:`descriptor`."""
    for p in table:
        node.declare_parameter(p.name, None if isinstance(p.default, tuple) else p.default, descriptor(p))


def parameter_values(node, table: tuple[Parameter, ...]) -> dict[str, Any]:
    """The current values of ``table``'s parameters on ``node``, by name (None: unset)."""
    return {p.name: node.get_parameter_or(p.name).value for p in table}
