"""A second chance for a cold start that failed the gate: starts around it, ranked on the coarse levels.

A poor CNN estimate (a frame unlike the training images) can leave the pyramid's coarse levels in
the wrong basin, and a refinement that crept towards the optimum can meet its iteration cap. Both
are local failures of the start, so :func:`multistart` tries a fixed set of nearby starts
(:data:`OFFSETS`: the failed refinement's own pose first, then moves along the directions a single
view pins down least: depth along the principal ray, roll about it, shifts across it), runs the
pyramid's coarse levels (up to 64 px: a few milliseconds each) from each, and refines the best one
through the whole pyramid. Starts are tried in order while the time budget allows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from diffpose_ros.core.geometry import se3
from diffpose_ros.core.geometry.camera import Intrinsics

from .registrar import Registrar, RegistrationResult

__all__ = ["COARSE_WIDTH", "OFFSETS", "Rescue", "multistart"]

COARSE_WIDTH = 64
"""The coarse levels (width at most this, pixels) rank the starts."""

_DEG = math.radians(1.0)
OFFSETS: tuple[tuple[str, tuple[float, float, float, float, float, float]], ...] = (
    ("depth -50 mm", (0.0, 0.0, -50.0, 0.0, 0.0, 0.0)),
    ("depth +50 mm", (0.0, 0.0, 50.0, 0.0, 0.0, 0.0)),
    ("roll -12 deg", (0.0, 0.0, 0.0, 0.0, 0.0, -12 * _DEG)),
    ("roll +12 deg", (0.0, 0.0, 0.0, 0.0, 0.0, 12 * _DEG)),
    ("x -20 mm", (-20.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    ("x +20 mm", (20.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    ("y -20 mm", (0.0, -20.0, 0.0, 0.0, 0.0, 0.0)),
    ("y +20 mm", (0.0, 20.0, 0.0, 0.0, 0.0, 0.0)),
)
"""Named moves ``xi = (rho mm, phi rad)`` of the CNN's estimate in its source frame (``T exp(xi)``;
z is the principal ray), tried after the failed refinement's pose, in this order."""


@dataclass
class Rescue:
    """What :func:`multistart` found: the ``name`` of the winning start (``refined``: the failed
    refinement's pose; else an :data:`OFFSETS` name), its ``pose`` and the whole pyramid's
    ``result`` from it; ``tried``: how many starts were ranked."""

    name: str
    pose: torch.Tensor
    result: RegistrationResult
    tried: int


def multistart(
    registrar: Registrar,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    mask: torch.Tensor | None,
    cnn_pose: torch.Tensor,
    failed: RegistrationResult | None,
    budget_s: float,
) -> Rescue | None:
    """Rank the starts around ``cnn_pose`` (``T_ct_source``, mm; see the module) on the coarse
    levels of ``registrar``'s pyramid, then refine the best one (highest coarse similarity) through
    the whole pyramid. ``target``, ``intrinsics``, ``mask``: as :meth:`.registrar.Registrar.register`
    takes them; ``failed``: the refinement that failed (its pose is ranked first unless not finite;
    its time stands for the last pyramid's). ``budget_s``: the seconds the whole call may take: a
    start is ranked only while the time spent, one more ranking (as long as the longest so far) and
    the last pyramid fit in it. None when not even one start fits (the first ranking is taken to
    last a tenth of the pyramid: its two coarse levels cost a few percent of it)."""
    t0 = time.perf_counter()
    levels = registrar.config.levels
    coarse = tuple(level for level in levels if level.width <= COARSE_WIDTH) or levels[:1]
    moves = [(name, cnn_pose @ se3.exp(torch.tensor(xi, dtype=torch.float64))) for name, xi in OFFSETS]
    refined = [] if failed is None or not bool(torch.isfinite(failed.pose).all()) else [("refined", failed.pose)]
    pyramid_s = 0.0 if failed is None else failed.seconds
    best: tuple[float, str, torch.Tensor] | None = None
    longest = 0.1 * pyramid_s
    tried = 0
    for name, pose in refined + moves:
        if time.perf_counter() - t0 + longest + pyramid_s > budget_s:
            break
        t = time.perf_counter()
        similarity = registrar.register(target, intrinsics, pose, levels=coarse, mask=mask).similarity
        longest = max(longest, time.perf_counter() - t) if tried else time.perf_counter() - t
        tried += 1
        score = similarity if math.isfinite(similarity) else -math.inf
        if best is None or score > best[0]:
            best = (score, name, pose)
    if best is None:
        return None
    _, name, pose = best
    return Rescue(name, pose, registrar.register(target, intrinsics, pose, mask=mask), tried)
