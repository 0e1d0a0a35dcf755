"""What one refinement of a frame starts from (:class:`Start`) and what came of it (:class:`Attempt`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registrar import RegistrationResult
from .result import Route

__all__ = ["Attempt", "Start"]


@dataclass(frozen=True)
class Start:
    """Where a refinement starts: ``pose`` (``T_ct_source``, mm), the frame's ``polarity`` (detected,
    or the configured one), the ``scores`` ``(bones_dark, bones_bright)`` it was judged by, the
    ``target`` the refinement compares DRRs with (the frame's line integrals, negated for bones
    bright, intensity-mapped), and the 64-pixel-wide ``drr`` at ``pose`` that all this was judged on
    (it also guides a sparse refinement's choice of patches); ``other``: the other polarity's start,
    when the scores do not favour the configured polarity clearly (then refinements decide)."""

    pose: torch.Tensor
    polarity: str
    scores: tuple[float, float]
    target: torch.Tensor
    drr: torch.Tensor
    other: Start | None = None


@dataclass
class Attempt:
    """One refinement of a frame: its ``route``, ``start``, ``result`` (None when refused before
    refining), ``reason`` (why it is not accepted; empty when it is), ``inverted`` (refused because
    the other polarity's refinement matched the frame clearly better) and ``origin``: which start
    (:attr:`~.result.FrameResult.start`)."""

    route: Route
    start: Start
    result: RegistrationResult | None
    reason: str
    inverted: bool = False
    origin: str = ""

    def __post_init__(self) -> None:
        self.origin = self.origin or {Route.GIVEN: "given", Route.COLD: "cnn"}.get(self.route, "predicted")

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes this attempt took (a multistart follows a cold refinement)."""
        return (Route.COLD, self.route) if self.route is Route.MULTISTART else (self.route,)
