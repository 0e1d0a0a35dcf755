"""One frame in, one gated pose with covariance and timings out: the whole intraoperative method.

``Pipeline.process`` takes a frame's line integrals (see :mod:`.preprocess`) and its intrinsics,
and returns a :class:`FrameResult`:

1. cold start: the patient model's CNN predicts ``T_ct_source`` from the frame warped to the CNN's
   working camera; tracking: when the last accepted pose is recent (fluoroscopy is a video), it is
   the start instead and the refinement pyramid is shorter;
2. refinement: Levenberg-Marquardt on NCC through the differentiable renderer (:mod:`.register`);
3. gate: the pose is accepted only if the refinement converged, the similarity reaches the
   threshold and the pose is plausible; a failed tracking attempt falls back to a cold start.

Covariance: ``sigma^2 (J^T J)^-1`` of the final Gauss-Newton problem, with ``sigma^2`` the residual
variance; pixel residuals are correlated, so this is a lower bound on the true spread, but it grows
as the image constrains the pose less. It is reported for ``xi = (rho mm, phi rad)`` in the source
frame and, by :func:`covariance_in_parent`, for position (mm) and rotation (rad) about ``ct`` axes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .bundle import PatientModel, load_patient_model
from .geometry import Intrinsics
from .preprocess import check_image, warp_to_camera
from .register import MIN_SIMILARITY, Level, Registrar, RegistrationConfig

__all__ = ["PipelineConfig", "FrameResult", "Pipeline", "covariance_in_parent"]


@dataclass(frozen=True)
class PipelineConfig:
    """Gate thresholds, tracking rule and refinement pyramids.

    ``min_similarity``: smallest accepted final similarity (``0.5 NCC + 0.5 patch NCC``);
    ``tracking_max_age_s``: a previous accepted pose younger than this (stamp difference) starts
    tracking; ``max_source_distance_mm``: largest plausible distance of the source from the CT centre.
    """

    min_similarity: float = MIN_SIMILARITY
    tracking_max_age_s: float = 1.0
    max_source_distance_mm: float = 2000.0
    cold: RegistrationConfig = field(default_factory=RegistrationConfig)
    tracking_levels: tuple[Level, ...] = (Level(64, 2.0, 6, patch=8), Level(128, 1.4, 6, patch=13))


@dataclass
class FrameResult:
    """Outcome of one frame.

    ``pose``: ``T_ct_source`` (4x4 float64, mm; the refined estimate even when rejected);
    ``covariance``: 6x6 over ``xi = (rho mm, phi rad)`` in the source frame; ``accepted``: passed the
    gate; ``reason``: why not (empty when accepted); ``mode``: ``cold`` or ``tracking``;
    ``timings``: seconds per stage (``preprocess``, ``cnn``, ``refine``, ``total``).
    """

    pose: torch.Tensor
    covariance: torch.Tensor
    similarity: float
    iterations: int
    converged: bool
    accepted: bool
    reason: str
    mode: str
    initial_pose: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def covariance_in_parent(pose: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Re-express a source-frame ``xi`` covariance for position (mm) and rotation (rad) about ``ct`` axes.

    ``T exp(xi)`` moves the source position by ``R rho`` and rotates by ``R phi`` about ``ct`` axes.
    """
    R = pose[:3, :3].to(covariance)
    A = torch.block_diag(R, R)
    return A @ covariance @ A.T


class Pipeline:
    """The intraoperative method for one preloaded patient model, on ``device`` (``cpu`` or ``cuda``)."""

    def __init__(self, model: PatientModel, device: str | torch.device = "cpu", config: PipelineConfig | None = None):
        self.model = model
        self.device = torch.device(device)
        self.config = config or PipelineConfig()
        self.regressor = model.regressor.to(self.device).eval()
        self.registrar = Registrar(model.mu, self.config.cold, device=self.device)
        self._last: tuple[float, torch.Tensor] | None = None

    @classmethod
    def from_file(cls, path, device: str | torch.device = "cpu", config: PipelineConfig | None = None) -> Pipeline:
        """Load a patient model file (refused with ``PatientModelError`` when bad) and build the pipeline."""
        return cls(load_patient_model(path, device="cpu"), device, config)

    def reset_tracking(self) -> None:
        """Forget the last accepted pose: the next frame starts cold."""
        self._last = None

    @torch.no_grad()
    def initial_pose(self, image: torch.Tensor, intrinsics: Intrinsics) -> torch.Tensor:
        """The CNN's ``T_ct_source`` (4x4 float64, mm) for line integrals ``image`` seen by ``intrinsics``."""
        x = warp_to_camera(image, intrinsics, self.model.intrinsics)
        x = self.regressor.prepare(x[None]).to(self.device)
        return self.regressor(x)[0].double().cpu()

    def warm_up(self, intrinsics: Intrinsics | None = None) -> float:
        """Run one synthetic frame through every stage (JIT compilation, allocations); returns seconds."""
        start = time.perf_counter()
        k = intrinsics or self.model.intrinsics
        pose = self.regressor.decode(torch.zeros(1, 9, device=self.device))[0].double().cpu()
        with torch.no_grad():
            image = self.registrar.renderer().render(pose, k.resized(64)).cpu()
        self.process(image, k.resized(64), stamp=None, track=False)
        self.reset_tracking()
        return time.perf_counter() - start

    def _gate(self, result) -> str:
        cfg = self.config
        pose = result.pose
        if not torch.isfinite(pose).all():
            return "pose is not finite"
        failure = result.failure(cfg.min_similarity)
        if failure:
            return failure
        distance = float(torch.linalg.vector_norm(pose[:3, 3] - self.model.mu.center))
        if distance > cfg.max_source_distance_mm:
            return f"source {distance:.0f} mm from the CT centre (limit {cfg.max_source_distance_mm:.0f} mm)"
        return ""

    def _covariance(self, result) -> torch.Tensor:
        H = result.hessian
        residual_variance = 2 * (1 - result.similarity) / max(1, result.residuals - 6)
        try:
            return residual_variance * torch.linalg.inv(H + 1e-12 * torch.eye(6, dtype=H.dtype))
        except RuntimeError:
            return torch.full((6, 6), float("inf"), dtype=torch.float64)

    def process(
        self, image: torch.Tensor, intrinsics: Intrinsics, stamp: float | None = None, track: bool = True
    ) -> FrameResult:
        """Register one frame: ``image`` ``(H, W)`` line integrals, ``intrinsics`` of its pixels, ``stamp`` (s).

        Raises ``ValueError`` for an image that cannot be registered (empty, non-finite, constant,
        size not matching ``intrinsics``); every other outcome is a :class:`FrameResult`.
        """
        t0 = time.perf_counter()
        image = check_image(image)
        if tuple(image.shape) != (intrinsics.height, intrinsics.width):
            raise ValueError(
                f"image is {image.shape[1]}x{image.shape[0]} but intrinsics say {intrinsics.width}x{intrinsics.height}"
            )
        timings = {"preprocess": time.perf_counter() - t0, "cnn": 0.0, "refine": 0.0}
        attempts = []
        if (
            track
            and self._last is not None
            and stamp is not None
            and 0 < stamp - self._last[0] <= self.config.tracking_max_age_s
        ):
            attempts.append(("tracking", self._last[1], self.config.tracking_levels))
        attempts.append(("cold", None, None))
        for mode, start, levels in attempts:
            if start is None:
                t = time.perf_counter()
                start = self.initial_pose(image, intrinsics)
                timings["cnn"] += time.perf_counter() - t
            t = time.perf_counter()
            result = self.registrar.register(image, intrinsics, start, levels=levels)
            timings["refine"] += time.perf_counter() - t
            reason = self._gate(result)
            if not reason:
                break
        timings["total"] = time.perf_counter() - t0
        accepted = not reason
        if accepted and stamp is not None:
            self._last = (stamp, result.pose)
        return FrameResult(
            pose=result.pose,
            covariance=self._covariance(result),
            similarity=result.similarity,
            iterations=result.iterations,
            converged=result.converged,
            accepted=accepted,
            reason=reason,
            mode=mode,
            initial_pose=start,
            timings=timings,
        )
