"""Test-time registration: refine ``T_ct_source`` so that the DRR matches an X-ray.

Why our own loop: it decides intraoperative latency. DiffPose runs 500 Adam steps; here each step
is a Levenberg-Marquardt (damped Gauss-Newton) step in se(3) on a least-squares cost
(:mod:`.cost`, chosen by name: ``mixed`` by default), with the renderer's exact per-pixel 6-column
Jacobian. A coarse-to-fine pyramid (small images on coarse volumes first) widens the basin of
convergence and keeps early steps cheap; each level stops when the step or the improvement becomes
negligible, so a registration takes tens of renders instead of hundreds.

A level may be sparse (``Level.sparse``): as in DiffPose, only square patches are rendered,
chosen once at the level's start where the DRR at the current pose has the strongest edges
(:func:`feature_patches`), wholly inside the frame's valid pixels and away from outliers. The cost
is the same one over those patches (:class:`~.cost.PatchCost`); a render then costs a few thousand
rays instead of the whole image, which is what makes tracking cheap.

Pose updates are right-multiplied, ``T <- T exp(xi)`` with ``xi = (rho mm, phi rad)`` in the
source frame; the similarity (the gate's measure) is the cost's, in [-1, 1]. A validity mask
(True = pixel usable) restricts the cost to the pixels it keeps, on every pyramid level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import se3
from .cost import COSTS, MaskTooSmall, PatchCost, make_cost
from .geometry import Intrinsics
from .preprocess import check_image, resample_image, resample_mask
from .render import Renderer, patch_pixels
from .similarity import sobel, standardize
from .volume import Volume

__all__ = [
    "FINEST_WIDTHS",
    "MIN_LEVEL_PIXELS",
    "MIN_SIMILARITY",
    "Level",
    "RegistrationConfig",
    "RegistrationResult",
    "Registrar",
    "feature_patches",
    "pyramid",
]


@dataclass(frozen=True)
class Level:
    """One pyramid level: image width (pixels; height keeps the aspect), volume voxel size (mm),
    iteration cap, the patch size of the cost's local term (None: global terms only), and
    ``sparse``: render only this many feature patches of that size (None: the whole image)."""

    width: int
    voxel_mm: float
    max_iterations: int = 20
    patch: int | None = None
    sparse: int | None = None

    def __post_init__(self) -> None:
        if self.sparse is not None and not (self.patch and self.patch >= 3 and self.sparse >= 1):
            raise ValueError("a sparse level needs a patch size of at least 3 and at least one patch")


FINEST_WIDTHS = (128, 256)
"""Widths (pixels) that :func:`pyramid` can end at."""


def pyramid(finest_width: int = 128) -> tuple[Level, ...]:
    """The cold-start pyramid: 32 px on a 4 mm volume, 64 px on 2 mm, 128 px on 1.4 mm and, for a
    ``finest_width`` of 256, a last level of 256 px on the same 1.4 mm volume.

    The 256-pixel level (1.2 mm pixels on the contract's detector, against 2.4 mm) constrains the
    source's depth better, which is what the 3D error of one view is mostly made of: on 200 clinical
    frames (every factor) the median 3D error fell from 0.69 to 0.47 mm and frames over 2 mm from 6.5 %
    to 2 %, for about 4 more renders of 65k rays, 2.5x the cold start's time on the CPU
    (``docs/benchmarks.md``). ``ValueError`` for another width.
    """
    if finest_width not in FINEST_WIDTHS:
        raise ValueError(f"finest pyramid width must be one of {FINEST_WIDTHS} (got {finest_width!r})")
    levels = (Level(32, 4.0, 15), Level(64, 2.0, 10, patch=8), Level(128, 1.4, 10, patch=13))
    return levels + ((Level(256, 1.4, 10, patch=16),) if finest_width == 256 else ())


MIN_SIMILARITY = 0.6
"""Smallest final similarity (of the registration cost, in [-1, 1]) of a trusted registration: the
default of :meth:`RegistrationResult.failure` and of the node's gate (``gate.min_similarity``)."""

MIN_LEVEL_PIXELS = 64
"""Fewest valid pixels a level may compare (a sixteenth of the 32-pixel level): a frame whose
validity mask leaves fewer at some level is refused there (:class:`~.cost.MaskTooSmall`)."""


@dataclass(frozen=True)
class RegistrationConfig:
    """Cost, pyramid and stopping rules.

    ``levels``: the pyramid, coarse to fine (:func:`pyramid`); ``cost``: the registration cost by
    name (:data:`~.cost.COSTS`); ``global_weight``: weight of the whole-image term of ``ncc`` (the
    rest goes to the patch term where a level has patches).
    A level ends when a step moves every point by less than ``step_tolerance_mm`` (rotation
    scaled by ``radius_mm``) or changes the similarity by less than ``cost_tolerance``,
    accepted or not: near the optimum the cost of a trial step differs from the current one by the
    renderer's interpolation noise, so a rejected step of that size means the level has converged.
    It also ends, without rendering the step, when the Gauss-Newton model predicts that the step
    improves the cost by less than ``cost_tolerance`` (one render fewer per tracked frame, at the
    same accuracy: ``docs/benchmarks.md``).
    ``deadline_step_mm``: a caller's deadline (:meth:`Registrar.register`) stops a registration only
    after an accepted step that moved every point within ``radius_mm`` of the CT's centre by less
    than this: a pose still moving by more is not trusted yet, whatever the time.
    ``outlier_sigma``: from the second level on, and on a sparse level, pixels whose standardised
    difference from the DRR at the level's start exceeds this many robust standard deviations
    (1.4826 MAD), and their neighbours, leave the cost for that level: instruments, wires and
    anything else that is not in the CT (0: keep every valid pixel). It also trims edges not yet
    aligned and noise tails: on clean frames it leaves out about a tenth of the pixels, and the pose
    gets no worse (measured in ``docs/benchmarks.md``).
    The finest level renders a 1.4 mm volume (the bundled CT's 0.7 mm in-plane voxels, 2x2
    coarsened): at 128 px (about 1.9 mm pixels at the isocentre) the full-resolution volume gave the
    same accuracy at twice the cost (``benchmarks/bench_node_latency.py``); a 256 px level on the
    full-resolution volume after it gained 0.05 mm over one on the 1.4 mm volume, at 1.6x the time.
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
        if self.cost not in COSTS:
            raise ValueError(f"unknown registration cost {self.cost!r}: one of {', '.join(COSTS)}")


@dataclass
class RegistrationResult:
    """Outcome of one registration.

    ``pose``: refined ``T_ct_source`` (4x4 float64, mm); ``similarity``: final similarity at the
    finest level; ``iterations``: LM steps tried (renders); ``seconds``: wall time; ``converged``:
    the finest level stopped on a tolerance, not on its cap; ``hessian``: 6x6 Gauss-Newton
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
    ``Registrar`` serves many frames. ``device``/``backend`` are passed to :class:`Renderer`.
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
        non-finite, constant or wrongly sized image. ``levels`` overrides the pyramid
        (e.g. a short one for tracking); every level's ``voxel_mm`` must be one this ``Registrar``
        was built with. ``mask``: ``(H, W)`` bool validity (None: every pixel). ``guide``: a DRR at
        ``init_pose`` of the same camera at any resolution, which a sparse first level then uses to
        choose its patches instead of rendering its own preview. ``deadline``: a ``time.perf_counter()``
        value; once an accepted step has moved the pose by less than ``deadline_step_mm``, no step is
        tried that would end after it (a step is taken to last as long as the last render and cost),
        and the result is ``out_of_time``. One step from a predicted tracking start gets most of the
        way (``docs/benchmarks.md``).
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
        history: list[dict] = []
        iterations = 0
        converged = False
        similarity = float("nan")
        hessian = torch.zeros(6, 6, dtype=torch.float64)
        residuals = 0
        cost = float("nan")
        settled = False  # the last accepted step moved less than deadline_step_mm
        out_of_time = False
        for li, level in enumerate(levels):
            k = intrinsics.resized(level.width)
            renderer = self._renderers[level.voxel_mm]
            target = resample_image(image, k.width, k.height).to(renderer.device)
            level_mask = None if mask is None else resample_mask(mask, k.width, k.height)
            if level_mask is not None and int(level_mask.sum()) < MIN_LEVEL_PIXELS:
                raise MaskTooSmall(
                    f"the validity mask leaves {int(level_mask.sum())} pixels at the {k.width}x{k.height} level, "
                    f"too few to register (at least {MIN_LEVEL_PIXELS})"
                )
            outlier_fraction = 0.0
            drr = rendered = None
            if level.sparse:  # a half-width preview: enough to see edges and outliers, a quarter of the rays
                if guide is None or li > 0:
                    guide = renderer.render(pose, k.resized(max(8, k.width // 2)))
                drr = resample_image(guide.cpu().float(), k.width, k.height)
            elif cfg.outlier_sigma > 0 and li > 0:  # the level's first render: its image is the outliers' DRR
                rendered = renderer.render_jacobian(pose, k)
                drr = rendered[0][0].reshape(k.height, k.width).cpu()
            if cfg.outlier_sigma > 0 and drr is not None:
                valid = torch.ones(target.shape, dtype=torch.bool) if level_mask is None else level_mask
                outliers = _outliers(drr, target.cpu(), valid, cfg.outlier_sigma)
                if bool((valid & ~outliers).sum() > valid.sum() // 2):  # never let it take half the image
                    outlier_fraction = float(outliers.sum() / valid.sum())
                    level_mask = valid & ~outliers
            pixels = None
            if level.sparse:
                centres = feature_patches(drr, level_mask, level.sparse, level.patch)
                if len(centres):
                    pixels = patch_pixels(k, centres, level.patch)
                    rows, cols = (pixels[:, c].long().to(target.device) for c in (1, 0))
                    values = target[rows, cols]  # on the renderer's device, as the DRR values will be
                    level_cost = PatchCost(cfg.cost, values.reshape(-1, level.patch, level.patch), cfg.global_weight)
            if pixels is None:  # a dense level, or no patch fits in the valid pixels
                level_cost = make_cost(cfg.cost, target, level_mask, level.patch, cfg.global_weight)
            scale = torch.tensor([1.0] * 3 + [cfg.radius_mm] * 3, dtype=torch.float64)

            def evaluate(T, rendered=None):
                values, jac = renderer.render_jacobian(T, k, pixels) if rendered is None else rendered
                r, J = level_cost.residuals(values[0], jac[0])
                return 0.5 * float(r.double().square().sum()), r, J

            t_eval = time.perf_counter()
            cost, r, J = evaluate(pose, rendered)
            step_seconds = time.perf_counter() - t_eval
            lam = cfg.damping
            level_converged = False
            for _ in range(level.max_iterations):
                A = (J.T @ J).double().cpu()  # the 6x6 step is solved on the CPU, next to the pose
                g = (J.T @ r).double().cpu()
                step = -torch.linalg.solve(A + lam * torch.diag(torch.diag(A)) + 1e-12 * torch.eye(6, dtype=A.dtype), g)
                if float(-(g @ step) - 0.5 * (step @ A @ step)) < cfg.cost_tolerance:
                    level_converged = True  # the model's improvement is negligible: not worth a render
                    break
                if deadline is not None and settled and time.perf_counter() + step_seconds > deadline:
                    out_of_time = True
                    break
                trial = pose @ se3.exp(step)
                t_eval = time.perf_counter()
                t_cost, t_r, t_J = evaluate(trial)
                step_seconds = time.perf_counter() - t_eval
                iterations += 1
                moved = float((step * scale).abs().max())
                history.append(
                    {"level": li, "cost": t_cost, "accepted": t_cost < cost, "step_mm": moved, "damping": lam}
                )
                negligible = moved < cfg.step_tolerance_mm or abs(t_cost - cost) < cfg.cost_tolerance
                if t_cost < cost:
                    settled = self._motion_mm(pose, step) < cfg.deadline_step_mm
                    pose, cost, r, J = trial, t_cost, t_r, t_J
                    lam = max(lam / 3, 1e-7)
                else:
                    lam *= 4
                if negligible:
                    level_converged = True
                    break
            converged = level_converged
            similarity = level_cost.similarity(cost)
            hessian = (J.T @ J).double().cpu()
            residuals = r.numel()
            if out_of_time:
                break
        seconds = time.perf_counter() - start
        return RegistrationResult(
            pose,
            similarity,
            iterations,
            seconds,
            converged,
            hessian,
            residuals,
            cost,
            history,
            outlier_fraction,
            out_of_time,
        )

    def _motion_mm(self, pose: torch.Tensor, step: torch.Tensor) -> float:
        """Largest motion (mm, to first order) of a point within ``radius_mm`` of the CT's centre when
        ``pose`` becomes ``pose exp(step)``: the centre's motion plus the rotation's at the radius."""
        rho, phi = step[:3], step[3:]
        centre = (se3.inverse(pose) @ self._centre)[:3]  # in the source frame
        spin = float(torch.linalg.vector_norm(phi))
        return float(torch.linalg.vector_norm(rho + torch.linalg.cross(phi, centre))) + spin * self.config.radius_mm


def feature_patches(drr: torch.Tensor, valid: torch.Tensor | None, count: int, size: int) -> torch.Tensor:
    """Centres ``(P, 2)`` (u, v; integer pixels; ``P <= count``) of non-overlapping ``size`` x ``size``
    patches where ``drr`` ``(H, W)`` has the largest mean Sobel gradient magnitude, each wholly inside
    the image and ``valid`` (None: every pixel), strongest first (greedy: the best window, then the
    best one that does not overlap it, ...). Window sums come from summed-area tables and the greedy
    choice runs in NumPy: a per-frame step of the tracking path (0.5 ms, against 4 ms with pooling
    and tensor indexing)."""
    H, W = drr.shape
    if H < size or W < size:
        return torch.zeros(0, 2, dtype=torch.long)
    magnitude = F.pad(sobel(drr.detach().cpu().float()).square().sum(0).sqrt(), (1, 1, 1, 1))
    score = _window_sums(magnitude.double().numpy(), size)  # window with top-left (i, j)
    if valid is not None:
        score[_window_sums((~valid.cpu().numpy()).astype(np.float64), size) > 0.5] = 0.0
    floor = 1e-9 * float(score.max())  # what the tables' rounding leaves of a window without edges
    chosen = []
    for _ in range(count):
        i, j = np.unravel_index(int(score.argmax()), score.shape)
        if not score[i, j] > floor:
            break
        chosen.append((j + size // 2, i + size // 2))
        score[max(0, i - size + 1) : i + size, max(0, j - size + 1) : j + size] = 0.0
    return torch.tensor(chosen, dtype=torch.long).reshape(-1, 2)


def _window_sums(x: np.ndarray, size: int) -> np.ndarray:
    """``(H - size + 1, W - size + 1)``: sums of ``x`` ``(H, W)`` over every ``size`` x ``size`` window."""
    table = np.zeros((x.shape[0] + 1, x.shape[1] + 1))
    table[1:, 1:] = x.cumsum(0).cumsum(1)
    return table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]


def _outliers(drr: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(H, W)`` bool: valid pixels whose standardised difference between ``target`` and ``drr``
    exceeds ``sigma`` robust standard deviations, grown by one pixel (within ``valid``)."""
    e = standardize(target[valid]) - standardize(drr[valid])
    scale = 1.4826 * float((e - e.median()).abs().median()) + 1e-12
    out = torch.zeros_like(valid)
    out[valid] = (e - e.median()).abs() > sigma * scale
    grown = F.max_pool2d(out.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
    return grown & valid
