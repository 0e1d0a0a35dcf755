"""What the pipeline says about one frame: a typed :class:`FrameResult`, and its one dict form.

Every consumer (the node's status, diagnostics and markers, the tools' JSON) reads a frame's outcome
from :meth:`FrameResult.as_dict` or from the fields themselves, never from a copy made by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

__all__ = ["FrameResult", "Route", "covariance_in_parent", "fit_covariance"]


class Route(str, Enum):
    """How a refinement started, and on which levels it ran (compares equal to its value, and prints
    as it)."""

    def __str__(self) -> str:
        return self.value

    GIVEN = "given"
    """From the caller's pose, the full pyramid."""
    TRACKING = "tracking"
    """From the pose predicted by the last accepted ones, one sparse level."""
    PYRAMID = "pyramid"
    """From the predicted pose, the full pyramid (tracking failed)."""
    COLD = "cold"
    """From the patient model's CNN, the full pyramid."""
    MULTISTART = "multistart"
    """From the best of several starts around the CNN's estimate, the full pyramid (the cold
    refinement failed the gate)."""


@dataclass
class FrameResult:
    """Outcome of one frame.

    ``pose``: ``T_ct_source`` (4x4 float64, mm; the refined estimate even when rejected);
    ``covariance``: 6x6 over ``xi = (rho mm, phi rad)`` in the source frame (inf when nothing was
    refined); ``similarity``: the cost's final similarity in [-1, 1] (NaN when nothing was refined);
    ``iterations``: refinement steps of the result's route; ``converged``: its finest level stopped on a
    tolerance; ``accepted``: passed the gate; ``reason``: why not (empty when accepted); ``mode``: the
    :class:`Route` of the result; ``initial_pose``: where that refinement started (on the multistart
    route, the CNN's estimate that its starts move); ``timings``: seconds
    per stage (``preprocess``, ``cnn``, ``start``: polarity and intensity map, ``refine``, ``total``);
    ``polarity``: how the frame showed bone; ``polarity_scores``: ``(bones_dark, bones_bright)``;
    ``outlier_fraction``: share of the valid pixels the refinement left out as outliers;
    ``routes``: every route tried, in order; ``out_of_time``: the refinement stopped at the frame's
    deadline once its pose had settled; ``start``: where the result's refinement started: ``cnn``,
    ``given``, ``predicted`` (tracking) or, on the multistart route, the winning start
    (``refined``, or a name of :data:`~.multistart.OFFSETS`); ``in_view_range``: the pose lies among
    the views the patient model was trained on (:attr:`~diffpose_ros.core.model.bundle.PatientModel.trained_views`;
    outside them the CNN extrapolated), None when unknown.
    """

    pose: torch.Tensor
    covariance: torch.Tensor
    similarity: float
    iterations: int
    converged: bool
    accepted: bool
    reason: str
    mode: Route
    initial_pose: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    polarity: str = "bones_dark"
    polarity_scores: tuple[float, float] = (float("nan"), float("nan"))
    outlier_fraction: float = 0.0
    routes: tuple[Route, ...] = ()
    out_of_time: bool = False
    start: str = ""
    in_view_range: bool | None = None

    @property
    def path(self) -> str:
        """The routes tried, e.g. ``tracking>pyramid``."""
        return ">".join(route.value for route in self.routes)

    def as_dict(self) -> dict:
        """JSON-ready (plain Python types; poses as nested row-major lists, mm); ``similarity`` is NaN
        when nothing was refined (``json.dumps`` writes ``NaN``)."""
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "mode": self.mode.value,
            "path": self.path,
            "start": self.start,
            "in_view_range": self.in_view_range,
            "T_ct_source": self.pose.tolist(),
            "T_ct_source_init": self.initial_pose.tolist(),
            "similarity": float(self.similarity),
            "iterations": int(self.iterations),
            "converged": bool(self.converged),
            "out_of_time": bool(self.out_of_time),
            "polarity": self.polarity,
            "polarity_scores": [float(v) for v in self.polarity_scores],
            "outlier_fraction": float(self.outlier_fraction),
            "timings": {name: float(v) for name, v in self.timings.items()},
        }


def covariance_in_parent(pose: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Re-express a source-frame ``xi`` covariance for position (mm) and rotation (rad) about ``ct`` axes.

    ``T exp(xi)`` moves the source position by ``R rho`` and rotates by ``R phi`` about ``ct`` axes.
    """
    R = pose[:3, :3].to(covariance)
    A = torch.block_diag(R, R)
    return A @ covariance @ A.T


def fit_covariance(hessian: torch.Tensor, cost: float, residuals: int) -> torch.Tensor:
    """``sigma^2 (J^T J)^-1`` (6x6, float64) of a least-squares fit with information ``hessian``
    (``J^T J``, over ``xi = (rho mm, phi rad)`` in the source frame), ``cost`` ``0.5 |r|^2`` over
    ``residuals`` residuals (``sigma^2`` their variance); inf where ``J^T J`` cannot be inverted.

    Pixel residuals are correlated, so this is a lower bound on the true spread, but it grows as the
    image constrains the pose less (:func:`covariance_in_parent`: about ``ct`` axes). Symmetric to
    the last bit: ``J^T J`` comes from a float32 product whose two triangles may round apart on some
    CPUs, and so does an LU inverse."""
    H = hessian.double()
    residual_variance = 2 * cost / max(1, residuals - 6)
    try:
        C = residual_variance * torch.linalg.inv(0.5 * (H + H.T) + 1e-12 * torch.eye(6, dtype=H.dtype))
    except RuntimeError:
        return torch.full((6, 6), float("inf"), dtype=torch.float64)
    return 0.5 * (C + C.T)
