"""Test-time registration of one X-ray: a coarse-to-fine pyramid of Levenberg-Marquardt solves.

Each level (:mod:`.levels`) is a least-squares problem on the registration cost (:mod:`.cost`,
chosen by name: ``mixed`` by default), solved by :func:`~.solver.levenberg_marquardt` with the
renderer's exact per-pixel Jacobian. Small images on coarse volumes come first: they widen the basin
of convergence and keep early steps cheap. The similarity (the gate's measure) is the cost's, in
[-1, 1]; a validity mask (True = pixel usable) restricts the cost on every level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from diffpose_ros.core.frames.prepare import check_image
from diffpose_ros.core.geometry import se3
from diffpose_ros.core.geometry.camera import Intrinsics
from diffpose_ros.core.rendering.renderer import Renderer
from diffpose_ros.core.rendering.volume import Volume

from .cost import check_cost
from .levels import Level, prepare_level, pyramid
from .solver import StopRules, levenberg_marquardt

__all__ = ["MIN_SIMILARITY", "RegistrationConfig", "RegistrationResult", "Registrar"]

MIN_SIMILARITY = 0.6
"""Smallest final similarity (of the registration cost, in [-1, 1]) of a trusted registration: the
default of :meth:`RegistrationResult.failure` and of the node's gate (``gate.min_similarity``)."""


@dataclass(frozen=True)
class RegistrationConfig:
    """Cost, pyramid and stopping rules.

    ``levels``: the pyramid, coarse to fine (:func:`~.levels.pyramid`); ``cost``: the registration
    cost by name (:data:`~.cost.COSTS`); ``global_weight``: weight of the whole-image term of ``ncc``
    (the rest goes to the patch term where a level has patches). ``step_tolerance_mm``,
    ``radius_mm``, ``cost_tolerance``, ``damping`` and ``deadline_step_mm``: each level's
    :class:`~.solver.StopRules` (a trial step near the optimum differs from the current cost by the
    renderer's interpolation noise, so a negligible step ends a level, accepted or not).
    ``outlier_sigma``: from the second level on, and on a sparse level, pixels whose standardised
    difference from the DRR at the level's start exceeds this many robust standard deviations
    (1.4826 MAD), and their neighbours, leave the cost for that level (0: keep every valid pixel).
    """

    levels: tuple[Level, ...] = pyramid()
    cost: str = "mixed"
    global_weight: float = 0.5
    step_tolerance_mm: float = 0.02
    radius_mm: float = 100.0
    cost_tolerance: float = 1e-6
    damping: float = 1e-3
    deadline_step_mm: float = 0.5
    outlier_sigma: float = 3.5

    def __post_init__(self) -> None:
        check_cost(self.cost)

    def stop_rules(self, level: Level) -> StopRules:
        """The solver's rules on ``level``."""
        return StopRules(
            level.max_iterations,
            self.step_tolerance_mm,
            self.cost_tolerance,
            self.radius_mm,
            self.damping,
            self.deadline_step_mm,
        )


@dataclass
class RegistrationResult:
    """Outcome of one registration.

    ``pose``: refined ``T_ct_source`` (4x4 float64, mm); ``similarity``: the gate's measure, the
    registration cost's similarity at the final pose on the last level that compares with that cost
    (a finer level with a cost of its own, :attr:`~.levels.Level.cost`, moves the pose but is not
    what the gate reads: 256 px gradients are dominated by quantum noise); ``iterations``: LM steps
    tried (renders); ``seconds``: wall time; ``converged``: the finest level stopped on a tolerance,
    not on its cap; ``hessian``: 6x6 Gauss-Newton
    information ``J^T J`` of the final cost in ``xi = (rho mm, phi rad)``; ``residuals``: how many
    residuals that cost sums; ``cost``: its value ``0.5 |r|^2``; ``history``: per-step records;
    ``outlier_fraction``: share of the valid pixels that the finest level left out as outliers;
    ``out_of_time``: stopped at the caller's deadline once the pose had settled
    (``deadline_step_mm``), not on a tolerance: then not ``converged``, and still trusted
    (:meth:`failure`).
    """

    pose: torch.Tensor
    similarity: float
    iterations: int
    seconds: float
    converged: bool
    hessian: torch.Tensor
    residuals: int = 0
    cost: float = float("nan")
    history: list[dict] = field(default_factory=list)
    outlier_fraction: float = 0.0
    out_of_time: bool = False

    def as_dict(self) -> dict:
        """JSON-ready summary (``T_ct_source`` as nested lists, mm)."""
        return {
            "T_ct_source": self.pose.tolist(),
            "similarity": self.similarity,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "converged": self.converged,
            "outlier_fraction": self.outlier_fraction,
            "out_of_time": self.out_of_time,
        }

    def failure(self, min_similarity: float | None = None) -> str:
        """Why this result is not to be trusted (empty when it is): not converged (unless stopped at its
        deadline once the pose had settled), or a final similarity below ``min_similarity`` (default
        :data:`MIN_SIMILARITY`)."""
        limit = MIN_SIMILARITY if min_similarity is None else min_similarity
        if not (self.converged or self.out_of_time):
            return f"refinement did not converge in {self.iterations} iterations"
        if not self.similarity >= limit:
            return f"similarity {self.similarity:.3f} below {limit:.3f}"
        return ""


class Registrar:
    """Registers X-rays against one attenuation volume ``mu`` (1/mm, ``ct`` frame).

    Renderers for the pyramid's volume resolutions are built once here (the heavy part), so one
    ``Registrar`` serves many frames; ``device`` and ``backend`` are the renderers'.
    """

    def __init__(self, mu: Volume, config: RegistrationConfig | None = None, backend: str = "auto", device=None):
        self.config = config or RegistrationConfig()
        self._centre = torch.cat([mu.center.to(torch.float64), torch.ones(1, dtype=torch.float64)])
        self._renderers: dict[float, Renderer] = {}
        for level in self.config.levels:
            if level.voxel_mm not in self._renderers:
                vol = mu.coarsened_to(level.voxel_mm) if level.voxel_mm > 0 else mu
                self._renderers[level.voxel_mm] = Renderer(vol, backend=backend, device=device)

    def renderer(self, voxel_mm: float | None = None) -> Renderer:
        """The renderer of a pyramid volume (``0``: full resolution; None: the finest level's)."""
        return self._renderers[self.config.levels[-1].voxel_mm if voxel_mm is None else voxel_mm]

    def register(
        self,
        image: torch.Tensor,
        intrinsics: Intrinsics,
        init_pose: torch.Tensor,
        levels: tuple[Level, ...] | None = None,
        mask: torch.Tensor | None = None,
        guide: torch.Tensor | None = None,
        deadline: float | None = None,
    ) -> RegistrationResult:
        """Refine ``init_pose`` (``T_ct_source``, 4x4, mm) against ``image``.

        ``image``: ``(H, W)`` line integrals (or any image linear in them: log-transformed
        fluoroscopy) with ``intrinsics`` describing its pixels; ``ValueError`` for an empty,
        non-finite, constant or wrongly sized image, ``MaskTooSmall`` (a ``ValueError``) when the
        mask leaves too few pixels at some level. ``levels`` overrides the pyramid (e.g. a short one
        for tracking); every level's ``voxel_mm`` must be one this ``Registrar`` was built with.
        ``mask``: ``(H, W)`` bool validity (None: every pixel). ``guide``: a DRR at ``init_pose`` of
        the same camera at any resolution, from which a sparse first level picks its patches.
        ``deadline``: a ``time.perf_counter()`` value; once an accepted step has moved the pose by
        less than ``deadline_step_mm``, no step is tried that would end after it, and the result is
        ``out_of_time``.
        """
        cfg = self.config
        levels = levels or cfg.levels
        start = time.perf_counter()
        pose = init_pose.detach().to(torch.float64).cpu().clone()
        image = check_image(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
        if image.shape != (intrinsics.height, intrinsics.width):
            raise ValueError(f"image is {tuple(image.shape)} but intrinsics say {intrinsics.height}x{intrinsics.width}")
        if mask is not None and tuple(mask.shape) != tuple(image.shape):
            raise ValueError(f"mask is {tuple(mask.shape)} but the image is {tuple(image.shape)}")
        result = RegistrationResult(pose, float("nan"), 0, 0.0, False, torch.zeros(6, 6, dtype=torch.float64))
        settled = False  # the last accepted step moved less than deadline_step_mm
        gauge = None  # the last level that compares with the registration's own cost: the gate's
        for li, level in enumerate(levels):
            problem = prepare_level(
                level,
                li == 0,
                image,
                intrinsics,
                mask,
                pose,
                self._renderers[level.voxel_mm],
                cfg.cost,
                cfg.global_weight,
                cfg.outlier_sigma,
                guide if li == 0 else None,
            )
            solution = levenberg_marquardt(
                problem.residuals, pose, cfg.stop_rules(level), self._motion_mm, settled, deadline
            )
            pose, settled = solution.pose, solution.settled
            J, r = solution.jacobian, solution.residuals
            result.iterations += solution.iterations
            result.history += [{"level": li, **step} for step in solution.steps]
            result.pose, result.converged, result.out_of_time = pose, solution.converged, solution.out_of_time
            result.similarity = problem.cost.similarity(solution.cost)
            result.hessian = (J.T @ J).double().cpu()
            result.residuals, result.cost = r.numel(), solution.cost
            result.outlier_fraction = problem.outlier_fraction
            if level.cost in (None, cfg.cost):
                gauge = problem
            if solution.out_of_time:
                break
        if gauge is not None and gauge is not problem:  # the gate reads the registration's cost at the final pose
            result.similarity = gauge.cost.similarity(gauge.residuals(pose)[0])
        result.seconds = time.perf_counter() - start
        return result

    def _motion_mm(self, pose: torch.Tensor, step: torch.Tensor) -> float:
        """Largest motion (mm, to first order) of a point within ``radius_mm`` of the CT's centre when
        ``pose`` becomes ``pose exp(step)``: the centre's motion plus the rotation's at the radius."""
        rho, phi = step[:3], step[3:]
        centre = (se3.inverse(pose) @ self._centre)[:3]  # in the source frame
        spin = float(torch.linalg.vector_norm(phi))
        return float(torch.linalg.vector_norm(rho + torch.linalg.cross(phi, centre))) + spin * self.config.radius_mm
