"""One frame in, one gated pose with covariance and timings out: the whole intraoperative method.

``Pipeline.process`` takes a :class:`~.preprocess.Frame` (line integrals, their intrinsics and
validity mask, from :func:`~.preprocess.prepare_frame`) and returns a :class:`FrameResult`:

1. cold start: the patient model's CNN predicts ``T_ct_source`` from the frame warped to the CNN's
   working camera; tracking: when the last accepted pose is recent (fluoroscopy is a video), it is
   the start instead and the refinement pyramid is shorter;
2. refinement: Levenberg-Marquardt on the registration cost (NCC by default, :mod:`.cost`) through
   the differentiable renderer (:mod:`.register`), on the frame's valid pixels;
3. gate: the pose is accepted only if the refinement converged, the similarity reaches the
   threshold and the pose is plausible; a failed tracking attempt falls back to a cold start.

``Pipeline.render`` and ``Pipeline.overlay`` show the DRR at a pose (the node's ``~/overlay``, the
tools' pictures).

Covariance: ``sigma^2 (J^T J)^-1`` of the final Gauss-Newton problem, with ``sigma^2`` the residual
variance; pixel residuals are correlated, so this is a lower bound on the true spread, but it grows
as the image constrains the pose less. It is reported for ``xi = (rho mm, phi rad)`` in the source
frame and, by :func:`covariance_in_parent`, for position (mm) and rotation (rad) about ``ct`` axes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .bundle import PatientModel, load_patient_model
from .geometry import Intrinsics
from .overlay import render_overlay
from .preprocess import Frame, warp_to_camera
from .register import MIN_SIMILARITY, Level, Registrar, RegistrationConfig

__all__ = ["PipelineConfig", "FrameResult", "Pipeline", "covariance_in_parent"]


@dataclass(frozen=True)
class PipelineConfig:
    """Gate thresholds, tracking rule and refinement pyramids.

    ``min_similarity``: smallest accepted final similarity (the cost's, in [-1, 1]);
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
    def initial_pose(self, frame: Frame) -> torch.Tensor:
        """The CNN's ``T_ct_source`` (4x4 float64, mm) for ``frame`` (invalid pixels at the valid mean,
        as the warp fills what the frame does not cover)."""
        image = frame.image
        if not bool(frame.mask.all()):
            image = torch.where(frame.mask, image, image[frame.mask].mean())
        x = warp_to_camera(image, frame.intrinsics, self.model.intrinsics)
        x = self.regressor.prepare(x[None]).to(self.device)
        return self.regressor(x)[0].double().cpu()

    @torch.no_grad()
    def render(self, pose: torch.Tensor, intrinsics: Intrinsics) -> torch.Tensor:
        """The DRR (line integrals, ``(H, W)`` on the CPU) at ``pose`` (``T_ct_source``, mm) seen by
        ``intrinsics``, from the finest refinement volume."""
        return self.registrar.renderer().render(pose.double(), intrinsics).cpu()

    def overlay(self, frame: Frame, pose: torch.Tensor, width: int | None = None) -> np.ndarray:
        """BGR picture of ``frame`` with the DRR's edges at ``pose`` (:func:`~.overlay.render_overlay`)."""
        return render_overlay(self.registrar.renderer(), frame, pose, width)

    def warm_up(self, intrinsics: Intrinsics | None = None) -> float:
        """Run one synthetic frame through every stage (JIT compilation, allocations); returns seconds."""
        start = time.perf_counter()
        k = (intrinsics or self.model.intrinsics).resized(64)
        pose = self.regressor.decode(torch.zeros(1, 9, device=self.device))[0].double().cpu()
        image = self.render(pose, k)
        self.process(Frame(image, k, torch.ones(image.shape, dtype=torch.bool)), stamp=None, track=False)
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
        residual_variance = 2 * result.cost / max(1, result.residuals - 6)
        try:
            return residual_variance * torch.linalg.inv(H + 1e-12 * torch.eye(6, dtype=H.dtype))
        except RuntimeError:
            return torch.full((6, 6), float("inf"), dtype=torch.float64)

    def process(self, frame: Frame, stamp: float | None = None, track: bool = True) -> FrameResult:
        """Register one :class:`~.preprocess.Frame` taken at ``stamp`` (s; None: no tracking).

        Every outcome is a :class:`FrameResult` (bad input was refused when the frame was prepared).
        """
        t0 = time.perf_counter()
        timings = {"preprocess": frame.prepare_seconds, "cnn": 0.0, "refine": 0.0}
        attempts = []
        if (
            track
            and self._last is not None
            and stamp is not None
            and 0 < stamp - self._last[0] <= self.config.tracking_max_age_s
        ):
            attempts.append(("tracking", self._last[1], self.config.tracking_levels))
        attempts.append(("cold", None, None))
        for mode, start, levels in attempts:  # noqa: B007 - the last attempt's mode is reported
            if start is None:
                t = time.perf_counter()
                start = self.initial_pose(frame)
                timings["cnn"] += time.perf_counter() - t
            t = time.perf_counter()
            result = self.registrar.register(frame.image, frame.intrinsics, start, levels=levels, mask=frame.mask)
            timings["refine"] += time.perf_counter() - t
            reason = self._gate(result)
            if not reason:
                break
        timings["total"] = frame.prepare_seconds + time.perf_counter() - t0
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
