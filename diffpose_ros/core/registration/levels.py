"""The refinement's pyramid levels, and what one level compares: its image, mask, patches and cost.

A level renders at its own width on a volume of its own voxel size. From the second level on (and on
a sparse level) the pixels that disagree with the DRR far beyond the noise leave the cost: whatever
the CT does not hold (instruments, wires). A sparse level (:attr:`Level.sparse`) renders only square
patches where the DRR has the strongest edges (:func:`feature_patches`), as DiffPose does, which is
what makes tracking cheap. A level may compare with a cost of its own (:attr:`Level.cost`) and map
the frame's grey values anew onto its own DRR (:attr:`Level.remap`): the 256 px level of
:func:`pyramid` does both, and compares gradients only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffpose_ros.core.frames.prepare import resample_image, resample_mask
from diffpose_ros.core.geometry.camera import Intrinsics
from diffpose_ros.core.rendering.renderer import Renderer, patch_pixels

from .cost import Cost, MaskTooSmall, PatchCost, check_cost, make_cost
from .intensity import match_quantiles
from .similarity import sobel, standardize

__all__ = ["FINEST_WIDTHS", "MIN_LEVEL_PIXELS", "Level", "LevelProblem", "feature_patches", "prepare_level", "pyramid"]


@dataclass(frozen=True)
class Level:
    """One pyramid level: image width (pixels; height keeps the aspect), volume voxel size (mm),
    iteration cap, the patch size of the cost's local term (None: global terms only),
    ``sparse``: render only this many feature patches of that size (None: the whole image),
    ``cost``: this level's cost by name (None: the registration's own, the one its gate reads; a
    sparse level one of :data:`~.cost.COSTS`, a dense one of :data:`~.cost.DENSE_COSTS`), and
    ``remap``: a dense level after the pyramid's first maps the frame's grey values anew onto its
    own DRR at its start pose (:func:`~.intensity.match_quantiles`) before comparing, since the
    caller's map came from a coarse DRR at the CNN's start and a wrong map moves the optimum."""

    width: int
    voxel_mm: float
    max_iterations: int = 20
    patch: int | None = None
    sparse: int | None = None
    cost: str | None = None
    remap: bool = False

    def __post_init__(self) -> None:
        if self.sparse is not None and not (self.patch and self.patch >= 3 and self.sparse >= 1):
            raise ValueError("a sparse level needs a patch size of at least 3 and at least one patch")
        if self.remap and self.sparse is not None:
            raise ValueError("only a dense level can map the frame's grey values onto its own DRR")
        if self.cost is not None:
            check_cost(self.cost, dense=self.sparse is None)


FINEST_WIDTHS = (128, 256)
"""Widths (pixels) that :func:`pyramid` can end at."""


def pyramid(finest_width: int = 128) -> tuple[Level, ...]:
    """The cold-start pyramid: 32 px on a 4 mm volume, 64 px on 2 mm, 128 px on 1.4 mm and, for a
    ``finest_width`` of 256, a last level of 256 px on the same 1.4 mm volume that maps the frame's
    grey values anew onto its own DRR (``remap``) and compares image gradients only, up to a smooth
    gain (``gradient_gain``); ``ValueError`` for another width.

    The 256-pixel level constrains the source's depth, the largest part of a single view's 3D error,
    better; gradients are what a display chain's local contrast changes (CLAHE, unsharp masks,
    vignetting) leave in place, the gain absorbs scatter, and the map taken at the level's start
    pose no longer moves the optimum as the CNN start's did (all measured in docs/performance.md).
    """
    if finest_width not in FINEST_WIDTHS:
        raise ValueError(f"finest pyramid width must be one of {FINEST_WIDTHS} (got {finest_width!r})")
    levels = (Level(32, 4.0, 15), Level(64, 2.0, 10, patch=8), Level(128, 1.4, 10, patch=13))
    return levels + ((Level(256, 1.4, 10, cost="gradient_gain", remap=True),) if finest_width == 256 else ())


MIN_LEVEL_PIXELS = 64
"""Fewest valid pixels a level may compare (a sixteenth of the 32-pixel level): a frame whose
validity mask leaves fewer at some level is refused there (:class:`~.cost.MaskTooSmall`)."""


@dataclass
class LevelProblem:
    """One level's least-squares problem: the ``cost`` of the DRR at ``intrinsics`` (the level's
    camera) rendered by ``renderer``, over ``pixels`` ``(P, 2)`` (patch pixels of a sparse level;
    None: the whole image); ``outlier_fraction``: the share of the valid pixels left out;
    ``first_render``: the level's render at its start pose when preparing it took one."""

    intrinsics: Intrinsics
    renderer: Renderer
    cost: Cost
    pixels: torch.Tensor | None
    outlier_fraction: float
    first_render: tuple[torch.Tensor, torch.Tensor] | None = None

    def residuals(self, pose: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``(0.5 |r|^2, r, J)`` at ``pose`` (``T_ct_source``, mm): a :data:`~.solver.Residuals`."""
        rendered, self.first_render = self.first_render, None
        if rendered is None:
            rendered = self.renderer.render_jacobian(pose, self.intrinsics, self.pixels)
        values, jac = rendered
        r, J = self.cost.residuals(values[0], jac[0])
        return 0.5 * float(r.double().square().sum()), r, J


def prepare_level(
    level: Level,
    first: bool,
    image: torch.Tensor,
    intrinsics: Intrinsics,
    mask: torch.Tensor | None,
    pose: torch.Tensor,
    renderer: Renderer,
    cost: str,
    global_weight: float,
    outlier_sigma: float,
    guide: torch.Tensor | None = None,
) -> LevelProblem:
    """The :class:`LevelProblem` of ``level`` for ``image`` ``(H, W)`` seen by ``intrinsics``, from ``pose``.

    ``first``: the pyramid's first level (no outliers are looked for on a dense one); ``mask``:
    ``(H, W)`` bool validity (None: every pixel); ``cost``, ``global_weight``: the registration cost
    (:func:`~.cost.make_cost`; the level's own when it names one); ``outlier_sigma``: robust standard
    deviations beyond which a pixel is an outlier (0: none); ``guide``: a DRR at ``pose``, any
    resolution, from which a sparse level picks its patches instead of rendering a half-width
    preview. ``MaskTooSmall`` when the mask leaves
    fewer than :data:`MIN_LEVEL_PIXELS` pixels at this level.
    """
    k = intrinsics.resized(level.width)
    cost = level.cost or cost
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
        if guide is None:
            guide = renderer.render(pose, k.resized(max(8, k.width // 2)))
        drr = resample_image(guide.cpu().float(), k.width, k.height)
    elif (outlier_sigma > 0 or level.remap) and not first:  # the level's first render: the outliers' DRR
        rendered = renderer.render_jacobian(pose, k)
        drr = rendered[0][0].reshape(k.height, k.width).cpu()
        if level.remap:
            valid = torch.ones(target.shape, dtype=torch.bool) if level_mask is None else level_mask
            target = match_quantiles(target, drr[valid.cpu()], valid)
    if outlier_sigma > 0 and drr is not None:
        valid = torch.ones(target.shape, dtype=torch.bool) if level_mask is None else level_mask
        outliers = _outliers(drr, target.cpu(), valid, outlier_sigma)
        if bool((valid & ~outliers).sum() > valid.sum() // 2):  # never let it take half the image
            outlier_fraction = float(outliers.sum() / valid.sum())
            level_mask = valid & ~outliers
    if level.sparse:
        centres = feature_patches(drr, level_mask, level.sparse, level.patch)
        if len(centres):
            pixels = patch_pixels(k, centres, level.patch)
            rows, cols = (pixels[:, c].long().to(target.device) for c in (1, 0))
            values = target[rows, cols]  # on the renderer's device, as the DRR values will be
            patch_cost = PatchCost(cost, values.reshape(-1, level.patch, level.patch), global_weight)
            return LevelProblem(k, renderer, patch_cost, pixels, outlier_fraction, rendered)
    # a dense level, or no patch fits in the valid pixels
    dense_cost = make_cost(cost, target, level_mask, level.patch, global_weight)
    return LevelProblem(k, renderer, dense_cost, None, outlier_fraction, rendered)


def feature_patches(drr: torch.Tensor, valid: torch.Tensor | None, count: int, size: int) -> torch.Tensor:
    """Centres ``(P, 2)`` (u, v; integer pixels; ``P <= count``) of non-overlapping ``size`` x ``size``
    patches where ``drr`` ``(H, W)`` has the largest mean Sobel gradient magnitude, each wholly inside
    the image and ``valid`` (None: every pixel), strongest first (greedy: the best window, then the
    best one that does not overlap it, ...). Window sums come from summed-area tables and the greedy
    choice runs in NumPy (a per-frame step of the tracking path)."""
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
