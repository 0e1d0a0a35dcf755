"""Levenberg-Marquardt on SE(3): a residual function in, the pose that minimises half its squares out.

Why our own loop: it decides intraoperative latency. Each step costs one evaluation of the residuals
with their exact ``(N, 6)`` Jacobian (one render), and the loop stops as soon as a further step is
not worth one.

Poses are ``T_ct_source`` (4x4 float64, mm), updated on the right, ``T <- T exp(xi)``, with
``xi = (rho mm, phi rad)`` in the source frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffpose_ros.core.geometry import se3

__all__ = ["Residuals", "Solution", "StopRules", "levenberg_marquardt"]

Residuals = Callable[[torch.Tensor], tuple[float, torch.Tensor, torch.Tensor]]
"""A pose ``(4, 4)`` in; the cost ``0.5 |r|^2``, the residuals ``r`` ``(N,)`` and their Jacobian
``J`` ``(N, 6)`` with respect to ``xi`` out."""


@dataclass(frozen=True)
class StopRules:
    """When the loop stops, and its damping.

    ``max_iterations``: steps tried at most; a step moving every point by less than
    ``step_tolerance_mm`` (rotation scaled by ``radius_mm``), or changing the cost by less than
    ``cost_tolerance``, ends the loop as converged, accepted or not; so does a step whose Gauss-Newton
    model predicts an improvement below ``cost_tolerance`` (then without evaluating it). ``damping``:
    the initial Levenberg-Marquardt ``lambda`` (scaled by the diagonal of ``J^T J``).
    ``deadline_step_mm``: a deadline stops the loop only after an accepted step whose ``motion_mm``
    was below this (the pose had settled).
    """

    max_iterations: int
    step_tolerance_mm: float
    cost_tolerance: float
    radius_mm: float
    damping: float
    deadline_step_mm: float


@dataclass
class Solution:
    """Where the loop ended.

    ``pose``: the last accepted pose (float64, mm); ``cost``, ``residuals`` ``(N,)`` and
    ``jacobian`` ``(N, 6)`` there; ``iterations``: steps evaluated; ``converged``: stopped on a
    tolerance; ``out_of_time``: stopped at the deadline; ``settled``: the last accepted step moved
    less than ``deadline_step_mm`` (carried into the next call); ``steps``: one record per evaluated
    step (``cost``, ``accepted``, ``step_mm``, ``damping``).
    """

    pose: torch.Tensor
    cost: float
    residuals: torch.Tensor
    jacobian: torch.Tensor
    iterations: int = 0
    converged: bool = False
    out_of_time: bool = False
    settled: bool = False
    steps: list[dict] = field(default_factory=list)


def levenberg_marquardt(
    residuals: Residuals,
    pose: torch.Tensor,
    rules: StopRules,
    motion_mm: Callable[[torch.Tensor, torch.Tensor], float],
    settled: bool = False,
    deadline: float | None = None,
) -> Solution:
    """Minimise ``residuals`` from ``pose`` (``(4, 4)`` float64 on the CPU).

    ``motion_mm(pose, step)``: how far (mm) ``step`` moves the points that matter, which decides
    whether the pose has settled; ``settled``: whether it already had (an earlier call's
    :attr:`Solution.settled`). ``deadline``: a ``time.perf_counter()`` value; once settled, no step is
    tried that would end after it (a step is taken to last as long as the last evaluation).
    """
    scale = torch.tensor([1.0] * 3 + [rules.radius_mm] * 3, dtype=torch.float64)
    t_eval = time.perf_counter()
    cost, r, J = residuals(pose)
    step_seconds = time.perf_counter() - t_eval
    lam = rules.damping
    out = Solution(pose, cost, r, J, settled=settled)
    for _ in range(rules.max_iterations):
        A = (J.T @ J).double().cpu()  # the 6x6 step is solved on the CPU, next to the pose
        g = (J.T @ r).double().cpu()
        step = -torch.linalg.solve(A + lam * torch.diag(torch.diag(A)) + 1e-12 * torch.eye(6, dtype=A.dtype), g)
        if float(-(g @ step) - 0.5 * (step @ A @ step)) < rules.cost_tolerance:
            out.converged = True  # the model's improvement is negligible: not worth an evaluation
            break
        if deadline is not None and out.settled and time.perf_counter() + step_seconds > deadline:
            out.out_of_time = True
            break
        trial = pose @ se3.exp(step)
        t_eval = time.perf_counter()
        t_cost, t_r, t_J = residuals(trial)
        step_seconds = time.perf_counter() - t_eval
        out.iterations += 1
        moved = float((step * scale).abs().max())
        out.steps.append({"cost": t_cost, "accepted": t_cost < cost, "step_mm": moved, "damping": lam})
        negligible = moved < rules.step_tolerance_mm or abs(t_cost - cost) < rules.cost_tolerance
        if t_cost < cost:
            out.settled = motion_mm(pose, step) < rules.deadline_step_mm
            pose, cost, r, J = trial, t_cost, t_r, t_J
            lam = max(lam / 3, 1e-7)
        else:
            lam *= 4
        if negligible:
            out.converged = True
            break
    out.pose, out.cost, out.residuals, out.jacobian = pose, cost, r, J
    return out
