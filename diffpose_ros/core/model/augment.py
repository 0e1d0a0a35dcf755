"""Training augmentations that make a DRR-trained network survive real fluoroscopy.

All functions take a batch of line-integral images ``(B, H, W)`` (what the renderer makes) and
return what preprocessing of a device frame would give: quantum noise is applied to the
transmission image ``I0 exp(-L)`` and undone with the same ``log``; contrast, blur, detector gain,
collimation and occluders act where they act on a real device. The clinical factors come from the
code that makes the evaluation's clinical frames, for each image from one of the configured
families (:attr:`AugmentConfig.families`): the image intensifier's
(:mod:`~diffpose_ros.core.simulation.clinical`: steel rods, scatter and heel, an 8-bit display
chain, a round field) or the flat panel's (:mod:`~diffpose_ros.core.simulation.flat_panel`: plates,
screws and blades, box scatter and a gradient, a 10-bit chain with a sigmoid LUT, CLAHE and an
unsharp mask, a shutter). Metal is added to the line integrals, scatter to the expected counts; a
display chain turns the counts into video that is taken back to line integrals as
:func:`~diffpose_ros.core.frames.prepare.prepare_frame` does (``-log`` against the bright level); a
field leaves its outside at the mean of the inside, as the pipeline fills invalid pixels before the
CNN. Beyond either family, a random monotone map and a random local contrast change stand for the
display chains of devices nobody modelled. Randomness comes from one CPU ``torch.Generator`` (the
flat panel's NumPy functions from a NumPy generator seeded by it) so a seed reproduces a batch;
images may live on any device (on a GPU the per-pixel noise comes from a device generator seeded
from that one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from diffpose_ros.core.simulation import flat_panel
from diffpose_ros.core.simulation.clinical import (
    ClinicalFactors,
    display_chain,
    gaussian_blur,
    metal_rods,
    scatter_and_heel,
)

from .keys import known_fields

__all__ = ["AugmentConfig", "augment"]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the augmentations (see ``config/training.yaml``).

    ``i0``: photons per unattenuated pixel of the image augmented (the CNN input: one 64² pixel
    gathers the photons of 16 pixels of 1.2 mm), drawn log-uniformly; ``gamma``: exponent on the line
    integrals (nonlinear detector response / scatter); ``blur_px``: Gaussian detector blur sigma;
    ``collimation``: probability and largest fraction of the width cut off per side (set to the
    collimator's level); ``erase``: probability of one random occluding rectangle (tools, leads) of
    up to ``erase_size`` of the image side; ``offset``: additive line-integral offset (scatter, unknown
    I0 estimate), as a fraction of the image's mean. Probabilities per image of the clinical factors
    (:mod:`~diffpose_ros.core.simulation.clinical`): ``metal`` (1-3 steel rods), ``scatter`` (scatter
    and heel), ``display`` (a vendor display chain), ``round_field`` (a field: the image
    intensifier's round one of 0.35-0.5 of the side, or the flat panel's shutter), each from one of
    ``families`` (:attr:`~diffpose_ros.core.simulation.clinical.ClinicalFactors.FAMILIES`, drawn per
    image); ``monotone``: probability of a random increasing map of the line integrals (piecewise
    linear, 6 pieces); ``local_contrast``: probability of a random local contrast change (the
    difference from a local mean of 1-8 % of the side scaled by -0.5 to 1.5) with a smooth
    exposure gradient of up to 30 % of the mean line integral.
    """

    i0: tuple[float, float] = (4e3, 4e5)
    gamma: tuple[float, float] = (0.8, 1.25)
    blur_px: tuple[float, float] = (0.0, 0.5)
    collimation: tuple[float, float] = (0.2, 0.15)
    erase: float = 0.2
    erase_size: float = 0.25
    offset: tuple[float, float] = (-0.1, 0.1)
    metal: float = 0.25
    scatter: float = 0.35
    display: float = 0.4
    round_field: float = 0.3
    families: tuple[str, ...] = ClinicalFactors.FAMILIES
    monotone: float = 0.3
    local_contrast: float = 0.3

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(ClinicalFactors.FAMILIES)
        if unknown or not self.families:
            raise ValueError(
                f"augmentation families: some of {', '.join(ClinicalFactors.FAMILIES)}, got {list(self.families)}"
            )

    @classmethod
    def from_dict(cls, d: dict | None) -> AugmentConfig:
        d = known_fields(cls, d, "augmentation")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _uniform(lo_hi, n, g, device, log=False):
    """``n`` draws from ``[lo, hi]`` (log-uniform if ``log``) on ``device``, from the CPU generator ``g``."""
    lo, hi = lo_hi
    u = torch.rand(n, generator=g)
    if log:
        u = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    else:
        u = lo + u * (hi - lo)
    return u.to(device)


def _poisson(rate: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Poisson counts for ``rate``; on another device than ``g``'s, from a device generator seeded by ``g``."""
    if g is not None and g.device != rate.device:
        seed = int(torch.randint(2**62, (1,), generator=g))
        g = torch.Generator(device=rate.device).manual_seed(seed)
    return torch.poisson(rate, generator=g)


def _per_image(x: torch.Tensor, rows: torch.Tensor, make) -> torch.Tensor:
    """``x`` ``(B, H, W)`` with each image ``i`` of the boolean ``rows`` ``(B,)`` replaced by ``make(i)``
    (a NumPy ``(H, W)`` array: the flat panel's functions work on one image at a time)."""
    out = x.clone()
    for i in rows.nonzero()[:, 0].tolist():
        out[i] = torch.from_numpy(make(i)).to(out)
    return out


def _rows(x: torch.Tensor, rows: torch.Tensor, make, rest: torch.Tensor | None = None) -> torch.Tensor:
    """``rest`` (default ``x``) ``(B, H, W)`` with the images of the boolean ``rows`` ``(B,)`` replaced by
    ``make`` of those images of ``x`` (batched: a factor is computed only for the images it changes)."""
    out = (x if rest is None else rest).clone()
    index = rows.nonzero()[:, 0].to(x.device)
    if len(index):
        out[index] = make(x[index]).to(out)
    return out


def _line_integrals(shown: torch.Tensor) -> torch.Tensor:
    """Display values ``(B, H, W)`` (> 0) taken back to line integrals: ``-log`` against each image's
    bright level (its 99.9th percentile), as :func:`~diffpose_ros.core.frames.prepare.prepare_frame` does."""
    bright = torch.quantile(shown.flatten(1), 0.999, dim=1)[:, None, None]
    return (torch.log(bright) - torch.log(shown)).clamp(min=0)


def _numpy(image: torch.Tensor) -> np.ndarray:
    return image.detach().cpu().double().numpy()


def _monotone(x: torch.Tensor, on: torch.Tensor, g: torch.Generator | None, pieces: int = 6) -> torch.Tensor:
    """``x`` ``(B, H, W)`` with images ``on`` ``(B,)`` through a random increasing piecewise-linear map
    of ``[0, max]`` onto itself (increments of each piece drawn in [0.1, 1.1])."""
    B = x.shape[0]
    top = x.flatten(1).amax(1).clamp(min=1e-6)[:, None, None]
    knots = torch.cat([torch.zeros(B, 1), (torch.rand(B, pieces, generator=g) + 0.1).cumsum(1)], 1)
    knots = (knots / knots[:, -1:]).to(x)
    u = (x.clamp(min=0) / top).clamp(max=1) * pieces
    index = u.floor().clamp(max=pieces - 1).long()
    low = knots.gather(1, index.flatten(1)).view_as(x)
    high = knots.gather(1, (index + 1).flatten(1)).view_as(x)
    mapped = top * (low + (u - index) * (high - low))
    return torch.where(on.to(x.device)[:, None, None], mapped, x)


def _local_contrast(x: torch.Tensor, on: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """``x`` ``(B, H, W)`` with images ``on`` ``(B,)`` given a random local contrast change and a smooth
    exposure gradient (see :class:`AugmentConfig`)."""
    B, H, W = x.shape
    dev = x.device
    sigma = _uniform((0.01, 0.08), B, g, dev) * min(H, W)
    gain = _uniform((-0.5, 1.5), B, g, dev)[:, None, None]
    changed = x + gain * (x - gaussian_blur(x, sigma))
    angle = _uniform((0.0, 2 * math.pi), B, g, dev)[:, None, None]
    rows = torch.linspace(-0.5, 0.5, H, device=dev)[None, :, None]
    cols = torch.linspace(-0.5, 0.5, W, device=dev)[None, None, :]
    ramp = cols * torch.cos(angle) + rows * torch.sin(angle)
    changed = changed + _uniform((-0.3, 0.3), B, g, dev)[:, None, None] * x.mean((1, 2), keepdim=True) * ramp
    return torch.where(on.to(dev)[:, None, None], changed.clamp(min=0), x)


def augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmented copies of line-integral images ``(B, H, W)`` (float32, on the images' device)."""
    x = images.float()
    B, H, W = x.shape
    g, dev = generator, x.device
    # Whose clinical factors each image gets: True = the flat panel's.
    fp = torch.full((B,), "fp" in config.families)
    if len(config.families) > 1:
        fp = torch.rand(B, generator=g) < 0.5
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
    # Nonlinear response first (on the physics), then quantum noise on the transmission image.
    x = x.clamp(min=0) ** _uniform(config.gamma, B, g, dev)[:, None, None]
    if config.metal > 0:
        count = (torch.rand(B, generator=g) < config.metal) * torch.randint(1, 4, (B,), generator=g)
        x = x + metal_rods((B, H, W), count * ~fp, g).to(x)
        steel = x
        x = _per_image(
            steel, fp & (count > 0), lambda i: _numpy(steel[i]) + flat_panel.metal_parts((H, W), int(count[i]), rng)
        )
    i0 = _uniform(config.i0, B, g, dev, log=True)[:, None, None]
    expected = i0 * torch.exp(-x)
    if config.scatter > 0:
        on = torch.rand(B, generator=g) < config.scatter
        expected = _rows(expected, on & ~fp, lambda rows: scatter_and_heel(rows, generator=g))
        primary = expected
        expected = _per_image(primary, on & fp, lambda i: flat_panel.scatter(_numpy(primary[i]), rng))
    counts = _poisson(expected, g)
    x = torch.log(i0) - torch.log(counts.clamp(min=0.5))
    if config.display > 0:
        on = torch.rand(B, generator=g) < config.display
        # Each chain's floor (half its lowest level: 8 bit, 10 bit), as prepare_frame's.
        shown = _rows(counts, on & ~fp, lambda rows: display_chain(rows, generator=g).clamp(min=0.5 / 255))
        shown = _per_image(shown, on & fp, lambda i: flat_panel.display(_numpy(counts[i]), rng).clip(0.5 / 1023, None))
        x = _rows(shown, on, _line_integrals, x)
    if config.monotone > 0:
        x = _monotone(x, torch.rand(B, generator=g) < config.monotone, g)
    if config.local_contrast > 0:
        x = _local_contrast(x, torch.rand(B, generator=g) < config.local_contrast, g)
    x = gaussian_blur(x, _uniform(config.blur_px, B, g, dev), radius=3)
    x = x + _uniform(config.offset, B, g, dev)[:, None, None] * x.mean((1, 2), keepdim=True)
    # Collimation: a band at each side at the collimator's (high-attenuation) level.
    p_col, max_frac = config.collimation
    level = x.amax((1, 2)) * 1.1
    cols = torch.arange(W, device=dev)[None, None, :]
    rows = torch.arange(H, device=dev)[None, :, None]
    for edge in range(4):
        on = torch.rand(B, generator=g) < p_col
        width = (torch.rand(B, generator=g) * max_frac * (W if edge < 2 else H)).long() * on
        w = width.to(dev)[:, None, None]
        mask = [cols < w, cols >= W - w, rows < w, rows >= H - w][edge]
        x = torch.where(mask, level[:, None, None], x)
    # One random occluder (a tool or lead) per chosen image, opaque-ish.
    on = torch.rand(B, generator=g) < config.erase
    size = (torch.rand(B, 2, generator=g) * config.erase_size * torch.tensor([H, W])).long() + 1
    top = (torch.rand(B, generator=g) * H).long()
    left = (torch.rand(B, generator=g) * W).long()
    top, left, size, on = (v.to(dev) for v in (top, left, size, on))
    box = (rows >= top[:, None, None]) & (rows < (top + size[:, 0])[:, None, None])
    box = box & (cols >= left[:, None, None]) & (cols < (left + size[:, 1])[:, None, None]) & on[:, None, None]
    x = torch.where(box, level[:, None, None] * torch.rand(B, 1, 1, generator=g).to(dev), x)
    if config.round_field > 0:
        on = torch.rand(B, generator=g) < config.round_field
        radius = _uniform((0.35, 0.5), B, g, dev)[:, None, None] * min(H, W)
        r = torch.hypot(cols - (W - 1) / 2, rows - (H - 1) / 2)
        outside = ((r > radius) & (on & ~fp).to(dev)[:, None, None]).float()
        outside = _per_image(outside, on & fp, lambda i: 1.0 * (flat_panel.shutter((H, W), rng) < 0.5)) > 0.5
        inside_mean = (x * ~outside).sum((1, 2), keepdim=True) / (~outside).sum((1, 2), keepdim=True)
        x = torch.where(outside, inside_mean, x)
    return x
