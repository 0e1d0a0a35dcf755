"""One frame in, one gated pose with covariance and timings out: the whole intraoperative method.

``Pipeline.process`` takes a :class:`~diffpose_ros.core.frames.prepare.Frame` (line integrals, their intrinsics and
validity mask, from :func:`~diffpose_ros.core.frames.prepare.prepare_frame`) and returns a :class:`FrameResult`:

1. cold start: the patient model's CNN predicts ``T_ct_source`` from the frame warped to the CNN's
   working camera (the mean over copies turned about the principal ray, ``cnn_turns_deg``);
   tracking: when the last accepted pose is recent (fluoroscopy is a video), the start is that pose
   moved on at the velocity of the last two accepted poses (constant velocity in se(3)), and the
   refinement is one level on sparse feature patches (cheap by design);
2. polarity and intensities (:mod:`.intensity`): the DRRs at the CNN's estimates for the frame and
   for its negative (or at the given or tracked start) score whether bones are dark or bright in
   the frame. Unless the configured polarity wins clearly, the frame is refined both ways, and it
   is refused when the other polarity's refinement passes the gate and matches clearly better
   (``polarity: auto`` registers either). The frame's grey values are mapped onto the DRR's by
   their quantiles over the valid pixels (the unknown display chain's monotone map);
3. refinement: Levenberg-Marquardt on the registration cost (``mixed`` by default, :mod:`.cost`)
   through the differentiable renderer (:mod:`.registrar`), on the frame's valid pixels (a frame
   whose valid pixels are too few at some level is refused there);
4. gate: the pose is accepted only if the refinement converged (or a tracking refinement reached
   the caller's deadline once its pose had settled: the node's ``tracking.frame_budget``, so that
   it keeps up with the stream), the similarity reaches the threshold and the pose is plausible. A
   tracking attempt must also stay near its start and keep the similarity of the last tracked frame;
   when it fails, the full pyramid runs from the same start (``pyramid``), then the CNN (``cold``);
   a cold start that fails the gate gets a second chance from starts around it within
   ``multistart_budget_s`` (``multistart``, :mod:`.multistart`; ``FrameResult.start`` names the winner).
   A tracking result that moved far from its start is a jump to another view, where the predicted
   start is no guide: the CNN takes over at once. A rejected frame ends tracking: the next one
   starts cold. ``FrameResult.path`` says which paths a frame took; its covariance is the final
   fit's (:func:`~.result.fit_covariance`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from diffpose_ros.core.frames.prepare import Frame, resample_image, resample_mask, warp_to_camera
from diffpose_ros.core.geometry import se3
from diffpose_ros.core.geometry.camera import Intrinsics
from diffpose_ros.core.geometry.metrics import mtre
from diffpose_ros.core.model.bundle import PatientModel, load_patient_model
from diffpose_ros.core.navigation.overlay import render_overlay
from diffpose_ros.core.rendering.renderer import BACKENDS

from .attempt import Attempt, Start
from .cost import MaskTooSmall
from .intensity import POLARITIES, match_quantiles, polarity_scores
from .levels import Level
from .multistart import multistart
from .registrar import MIN_SIMILARITY, Registrar, RegistrationConfig, RegistrationResult
from .result import FrameResult, Route, fit_covariance

__all__ = ["POLARITY_MARGIN", "REFINED_POLARITY_MARGIN", "Pipeline", "PipelineConfig", "set_torch_threads"]

POLARITY_MARGIN = 0.1
"""The start's polarity is clear when the configured polarity's score
(:func:`~.intensity.polarity_scores`, an NCC in [-1, 1]) beats the other's by at least this; otherwise
the frame is refined both ways."""

REFINED_POLARITY_MARGIN = 0.1
"""Of two refinements of a frame, one per polarity, one wins when its final similarity (the cost's,
in [-1, 1]) beats the other's by more than this."""


@dataclass(frozen=True)
class PipelineConfig:
    """Gate thresholds, tracking rule and refinement pyramids.

    ``min_similarity``: smallest accepted final similarity (the cost's, in [-1, 1]);
    ``tracking_max_age_s``: a previous accepted pose younger than this (stamp difference) starts
    tracking; ``predict``: move that start on at the velocity of the last two accepted poses;
    ``tracking_levels``: the tracking refinement (one sparse level); a tracking result falls back
    to the full pyramid when it fails the gate or its similarity fell more than
    ``tracking_similarity_drop`` below the last tracked frame's, and to the CNN at once when it moved
    the CT centre by more than ``tracking_max_step_mm`` in the source frame (a jump to another view,
    outside the sparse level's basin); ``max_source_distance_mm``:
    largest plausible distance of the source from the CT centre;
    ``polarity``: how the frames show bone (:data:`~.intensity.POLARITIES`; a frame that looks the
    other way is refused, see :meth:`Pipeline._refine`) or ``auto`` (each frame registered with the polarity it shows);
    ``linearize``: map the frame's grey values onto the DRR's (:func:`~.intensity.match_quantiles`);
    ``renderer``: the renderer backend (:data:`~diffpose_ros.core.rendering.renderer.BACKENDS` or ``auto``, see
    :class:`~diffpose_ros.core.rendering.renderer.Renderer`); ``multistart_budget_s``: seconds a cold
    refinement that failed the gate (each polarity's, when both were refined) may spend on
    :func:`~.multistart.multistart` (0: none); ``cnn_turns_deg``: the in-plane turns (degrees) whose
    mean is the CNN's estimate (:meth:`~diffpose_ros.core.model.regressor.PoseRegressor.estimate`;
    ``(0,)``: one pass).
    """

    min_similarity: float = MIN_SIMILARITY
    tracking_max_age_s: float = 1.0
    max_source_distance_mm: float = 2000.0
    polarity: str = "bones_dark"
    linearize: bool = True
    cold: RegistrationConfig = field(default_factory=RegistrationConfig)
    tracking_levels: tuple[Level, ...] = (Level(128, 1.4, 10, patch=15, sparse=32),)
    predict: bool = True
    tracking_max_step_mm: float = 5.0
    tracking_similarity_drop: float = 0.1
    renderer: str = "auto"
    multistart_budget_s: float = 1.0
    cnn_turns_deg: tuple[float, ...] = (-4.0, 0.0, 4.0)

    def __post_init__(self) -> None:
        if self.polarity not in (*POLARITIES, "auto"):
            raise ValueError(f"unknown polarity {self.polarity!r}: one of {', '.join(POLARITIES)}, auto")
        if self.renderer not in (*BACKENDS, "auto"):
            raise ValueError(f"unknown renderer backend {self.renderer!r}: one of {', '.join(BACKENDS)}, auto")
        if not self.cnn_turns_deg:
            raise ValueError("cnn_turns_deg needs at least one turn ((0,) for one pass of the CNN)")


def set_torch_threads(device: str | torch.device, requested: int = 0) -> int:
    """Set torch's intra-op threads for a pipeline on ``device`` and return their number: ``requested``
    when positive, else one on the CPU and torch's default elsewhere.

    On the CPU the renderer (numba) runs on every core in threads of its own, and torch's OpenMP
    workers, spinning after each small tensor operation between renders, would compete for them.
    """
    if requested > 0:
        torch.set_num_threads(requested)
    elif torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    return torch.get_num_threads()


class Pipeline:
    """The intraoperative method for one preloaded patient model, on ``device`` (``cpu`` or ``cuda``)."""

    def __init__(self, model: PatientModel, device: str | torch.device = "cpu", config: PipelineConfig | None = None):
        self.model = model
        self.device = torch.device(device)
        self.config = config or PipelineConfig()
        self.regressor = model.regressor.to(self.device).eval()
        self.registrar = Registrar(model.mu, self.config.cold, backend=self.config.renderer, device=self.device)
        self.views = model.trained_views  # a pose outside them is flagged (FrameResult.in_view_range)
        # Polarity and the intensity map look at 64-pixel DRRs: the volume of a pyramid level of that size.
        self._coarse_voxel_mm = min(self.config.cold.levels, key=lambda level: abs(level.width - 64)).voxel_mm
        self._tracked: list[tuple[float, torch.Tensor]] = []  # the last (at most 2) accepted (stamp, pose)
        self._tracked_similarity: float | None = None  # of the last frame accepted by the tracking path

    @classmethod
    def from_file(cls, path, device: str | torch.device = "cpu", config: PipelineConfig | None = None) -> Pipeline:
        """Load a patient model file (refused with ``PatientModelError`` when bad) and build the pipeline."""
        return cls(load_patient_model(path, device="cpu"), device, config)

    def reset_tracking(self) -> None:
        """Forget the last accepted poses: the next frame starts cold."""
        self._tracked = []
        self._tracked_similarity = None

    def predicted_pose(self, stamp: float) -> torch.Tensor | None:
        """Where tracking starts for a frame at ``stamp`` (s): the last accepted pose when it is younger
        than ``tracking_max_age_s``, moved on at the velocity (se(3), source frame) between the last
        two accepted poses when ``predict``; None when there is nothing to track from."""
        if not self._tracked or not 0 < stamp - self._tracked[-1][0] <= self.config.tracking_max_age_s:
            return None
        t1, T1 = self._tracked[-1]
        if not self.config.predict or len(self._tracked) < 2:
            return T1
        t0, T0 = self._tracked[0]
        velocity = se3.log(se3.inverse(T0) @ T1) / (t1 - t0)
        return T1 @ se3.exp(velocity * (stamp - t1))

    def _moved_mm(self, before: torch.Tensor, after: torch.Tensor) -> float:
        """How far the CT centre moved in the source frame between two poses (mm): their 3D mTRE on it."""
        return float(mtre(before, after, self.model.mu.center[None]))

    def _tracking_problem(self, moved: float, result) -> str:
        """Why a tracking result that moved the CT centre ``moved`` mm must fall back (empty when it need not)."""
        if moved > self.config.tracking_max_step_mm:
            return f"tracking moved the CT centre {moved:.1f} mm (limit {self.config.tracking_max_step_mm:g} mm)"
        last = self._tracked_similarity
        if last is not None and result.similarity < last - self.config.tracking_similarity_drop:
            return f"tracking similarity fell from {last:.3f} to {result.similarity:.3f}"
        return ""

    def _cnn(self, frame: Frame) -> torch.Tensor:
        """The CNN's estimates ``(2, 4, 4)`` (``T_ct_source``, mm) for the frame and its negative; invalid
        pixels at the valid mean, as the warp fills what the frame does not cover."""
        image = frame.image
        if not bool(frame.mask.all()):
            image = torch.where(frame.mask, image, image[frame.mask].mean())
        camera = self.model.intrinsics
        x = warp_to_camera(image, frame.intrinsics, camera)[None]
        return self.regressor.estimate(torch.cat([x, -x]).to(self.device), camera, self.config.cnn_turns_deg)

    @torch.no_grad()
    def start(self, frame: Frame, pose: torch.Tensor | None = None, timings: dict | None = None) -> Start:
        """The :class:`Start` of a refinement of ``frame``: from ``pose`` (given, or the last one when
        tracking) or, when None, from the CNN's estimates for the frame and for its negative.
        ``timings`` (optional) gets the seconds of the ``cnn`` and of the rest of the ``start``."""
        timings = {} if timings is None else timings
        t = time.perf_counter()
        poses = self._cnn(frame) if pose is None else pose.double()[None]
        timings["cnn"] = timings.get("cnn", 0.0) + (time.perf_counter() - t if pose is None else 0.0)
        t = time.perf_counter()
        k = frame.intrinsics.resized(64)
        small = resample_image(frame.image, k.width, k.height)
        mask = resample_mask(frame.mask, k.width, k.height)
        if not bool(mask.any()):
            mask = torch.ones_like(mask)
        drrs = self.registrar.renderer(self._coarse_voxel_mm).render(poses, k).cpu().expand(2, -1, -1)
        poses = poses.expand(2, 4, 4)
        scores = polarity_scores(small, drrs, mask)
        configured = self.config.polarity
        index = int(scores[1] > scores[0]) if configured == "auto" else POLARITIES.index(configured)

        def start_as(i: int, other: Start | None = None) -> Start:
            target = frame.image if i == 0 else -frame.image
            if self.config.linearize:
                target = match_quantiles(target, drrs[i][mask], frame.mask)
            return Start(poses[i].clone(), POLARITIES[i], scores, target, drrs[i], other)

        unclear = configured != "auto" and scores[index] < scores[1 - index] + POLARITY_MARGIN
        start = start_as(index, start_as(1 - index) if unclear else None)
        timings["start"] = timings.get("start", 0.0) + time.perf_counter() - t
        return start

    @torch.no_grad()
    def render(self, pose: torch.Tensor, intrinsics: Intrinsics) -> torch.Tensor:
        """The DRR (line integrals, ``(H, W)`` on the CPU) at ``pose`` (``T_ct_source``, mm) seen by
        ``intrinsics``, from the finest refinement volume."""
        return self.registrar.renderer().render(pose.double(), intrinsics).cpu()

    def overlay(self, frame: Frame, pose: torch.Tensor, width: int | None = None) -> np.ndarray:
        """BGR picture of ``frame`` with the DRR's edges at ``pose``
        (:func:`~diffpose_ros.core.navigation.overlay.render_overlay`)."""
        return render_overlay(self.registrar.renderer(), frame, pose, width)

    def warm_up(self, intrinsics: Intrinsics | None = None) -> float:
        """Run a synthetic frame through every stage, cold and then tracked (JIT compilation,
        allocations, the shapes of the sparse level); returns seconds. The frame is 256 pixels wide
        on the model's detector, or ``intrinsics``' own: the first real frames then find everything
        ready, and no frame of a stream is lost behind a first one that had to set up."""
        start = time.perf_counter()
        k = intrinsics or self.model.intrinsics.resized(256)
        pose = self.regressor.decode(torch.zeros(1, 9, device=self.device))[0].double().cpu()
        image = self.render(pose, k)
        frame = Frame(image, k, torch.ones(image.shape, dtype=torch.bool))
        for stamp in (0.0, 0.1):
            self.process(frame, stamp=stamp)
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

    def process(
        self,
        frame: Frame,
        stamp: float | None = None,
        track: bool = True,
        initial_pose: torch.Tensor | None = None,
        deadline: float | None = None,
    ) -> FrameResult:
        """Register one :class:`~diffpose_ros.core.frames.prepare.Frame` taken at ``stamp`` (s; None: no
        tracking), from ``initial_pose`` (``T_ct_source``, mm) when given instead of the CNN or tracking.
        ``deadline`` (a ``time.perf_counter()`` value): when the tracking refinement stops stepping
        (:meth:`~.registrar.Registrar.register`); the pyramid and cold starts take what they need.

        Every outcome is a :class:`~.result.FrameResult` (bad input was refused when the frame was
        prepared; a frame whose valid pixels are too few at some pyramid level is refused, with that
        reason).
        """
        t0 = time.perf_counter()
        timings = {"preprocess": frame.prepare_seconds, "cnn": 0.0, "start": 0.0, "refine": 0.0}
        if initial_pose is not None:
            start = self.start(frame, initial_pose, timings)
            attempts = [self._refine(Route.GIVEN, frame, start, self.config.cold.levels, timings)]
        else:
            predicted = self.predicted_pose(stamp) if track and stamp is not None else None
            attempts = [] if predicted is None else self._track(frame, predicted, deadline, timings)
            if not attempts or (attempts[-1].reason and not attempts[-1].inverted):  # inverted: the verdict
                attempts.append(self._refine(Route.COLD, frame, self.start(frame, None, timings), None, timings))
        timings["total"] = frame.prepare_seconds + time.perf_counter() - t0
        last = attempts[-1]
        accepted = not last.reason
        self._remember(accepted, stamp, last.route, last.result)
        pose = last.start.pose if last.result is None else last.result.pose
        common = dict(
            in_view_range=bool(self.views.contains(pose, self.model.mu.center)),
            accepted=accepted,
            reason=last.reason,
            mode=last.route,
            initial_pose=last.start.pose,
            timings=timings,
            polarity=last.start.polarity,
            polarity_scores=last.start.scores,
            routes=tuple(route for attempt in attempts for route in attempt.routes),
            start=last.origin,
        )
        if last.result is None:  # refused before any refinement
            return FrameResult(
                pose=pose,
                covariance=torch.full((6, 6), float("inf"), dtype=torch.float64),
                similarity=float("nan"),
                iterations=0,
                converged=False,
                **common,
            )
        return FrameResult(
            pose=pose,
            covariance=fit_covariance(last.result.hessian, last.result.cost, last.result.residuals),
            similarity=last.result.similarity,
            iterations=last.result.iterations,
            converged=last.result.converged,
            outlier_fraction=last.result.outlier_fraction,
            out_of_time=last.result.out_of_time,
            **common,
        )

    def _track(self, frame: Frame, predicted: torch.Tensor, deadline: float | None, timings: dict) -> list[Attempt]:
        """Tracking from ``predicted``: one sparse level, then, when its result fails the gate or its
        tracking checks without having jumped to another view, the full pyramid from the same start."""
        start = self.start(frame, predicted, timings)
        tracked = self._refine(Route.TRACKING, frame, start, self.config.tracking_levels, timings, deadline)
        if tracked.result is None or tracked.inverted:  # a refused start or polarity: the CNN's turn
            return [tracked]
        moved = self._moved_mm(start.pose, tracked.result.pose)
        tracked.reason = tracked.reason or self._tracking_problem(moved, tracked.result)
        if not tracked.reason or moved > self.config.tracking_max_step_mm:  # accepted, or a jump: the CNN's turn
            return [tracked]
        return [tracked, self._refine(Route.PYRAMID, frame, start, None, timings)]

    def _refine(
        self,
        route: Route,
        frame: Frame,
        start: Start,
        levels: tuple[Level, ...] | None,
        timings: dict,
        deadline: float | None = None,
    ) -> Attempt:
        """Refine ``frame`` from ``start`` on ``levels`` (None: the cold pyramid) and gate the result; a
        mask too small for some level gives no result, with the reason. When the start's polarity is
        unclear (``start.other``), the other polarity is refined too, and the frame is refused as
        inverted (both refined similarities in the reason) when the other's result passes the gate
        and wins by :data:`REFINED_POLARITY_MARGIN`, or when the start scores favoured the other by
        :data:`POLARITY_MARGIN` and the configured polarity's result does not pass the gate and win.
        When no cold refinement passes the gate, each gets its :meth:`_rescue` before the polarities
        are compared."""
        rescue = route is Route.COLD

        def attempt(s: Start) -> Attempt:
            t = time.perf_counter()
            try:
                result = self.registrar.register(
                    s.target, frame.intrinsics, s.pose, levels=levels, mask=frame.mask, guide=s.drr, deadline=deadline
                )
            except MaskTooSmall as err:  # the frame cannot be compared at some level
                return Attempt(route, s, None, f"cannot register this frame: {err}")
            finally:
                timings["refine"] += time.perf_counter() - t
            return Attempt(route, s, result, self._gate(result))

        mine = attempt(start)
        if start.other is None or mine.result is None:
            return self._rescue(frame, mine, timings) if rescue else mine
        theirs = attempt(start.other)
        if rescue and mine.reason and theirs.reason:  # neither passes: both get the same second chance
            mine, theirs = self._rescue(frame, mine, timings), self._rescue(frame, theirs, timings)
        ours = mine.result.similarity
        other = theirs.result.similarity if theirs.result is not None else float("nan")
        side = POLARITIES.index(start.polarity)
        scores_favour_other = start.scores[1 - side] > start.scores[side] + POLARITY_MARGIN
        theirs_wins = not theirs.reason and other > ours + REFINED_POLARITY_MARGIN
        mine_wins = not mine.reason and not ours <= other + REFINED_POLARITY_MARGIN  # a NaN other loses
        if theirs_wins or (scores_favour_other and not mine_wins):
            mine.reason = (
                f"frame polarity looks inverted (refined similarity {theirs.start.polarity} {other:.3f} against "
                f"{start.polarity} {ours:.3f}; start scores {start.scores[0]:.2f} dark, {start.scores[1]:.2f} "
                f"bright); set polarity to {theirs.start.polarity} or auto if the device shows bone that way"
            )
            mine.inverted = True
        return mine

    def _rescue(self, frame: Frame, cold: Attempt, timings: dict) -> Attempt:
        """``cold``, or when it failed the gate after refining, the :func:`~.multistart.multistart`
        around its start within ``multistart_budget_s`` (0: none) as a ``multistart`` attempt, compared
        with the same target (a map taken at each start could flatten the frame where a start shows
        little of the CT, and a flat target matches a flat DRR)."""
        budget = self.config.multistart_budget_s
        if not cold.reason or cold.result is None or budget <= 0:
            return cold
        t = time.perf_counter()
        s = cold.start
        found = multistart(self.registrar, s.target, frame.intrinsics, frame.mask, s.pose, cold.result, budget)
        timings["refine"] += time.perf_counter() - t
        if found is None:  # the budget does not hold one more pyramid
            return cold
        return Attempt(Route.MULTISTART, s, found.result, self._gate(found.result), origin=found.name)

    def _remember(self, accepted: bool, stamp: float | None, mode: Route, result: RegistrationResult | None) -> None:
        """Tracking state after a frame: an accepted pose extends the track (a cold or given one starts
        a new track); a rejected frame ends it; an accepted one without a stamp leaves it as it is."""
        if not accepted:
            self.reset_tracking()
            return
        if stamp is None:
            return
        if mode in (Route.COLD, Route.GIVEN):
            self.reset_tracking()
        self._tracked = [*self._tracked, (stamp, result.pose)][-2:]
        if mode == Route.TRACKING:
            self._tracked_similarity = result.similarity
