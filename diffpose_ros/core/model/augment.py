"""Training augmentations that make a DRR-trained network survive real fluoroscopy.

All functions take a batch of line-integral images ``(B, H, W)`` (what the renderer makes) and
return what preprocessing of a device frame would give: quantum noise is applied to the
transmission image ``I0 exp(-L)`` and undone with the same ``log``; contrast, blur, detector gain,
collimation and occluders act where they act on a real device. The clinical factors come from
:mod:`~diffpose_ros.core.simulation.clinical`, the same code that makes the evaluation's clinical
frames: steel rods are added to the line integrals, scatter and heel to the expected counts, a vendor
display chain turns the counts into 8-bit video that is then taken back to line integrals as
:func:`~diffpose_ros.core.frames.prepare.prepare_frame` does (``-log`` against the bright level), and a
round field leaves its outside at the mean of the inside, as the pipeline fills invalid pixels before
the CNN. Randomness comes from one CPU ``torch.Generator`` so a seed reproduces a batch; images may
live on any device (on a GPU the per-pixel noise comes from a device generator seeded from that one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from diffpose_ros.core.simulation.clinical import display_chain, gaussian_blur, metal_rods, scatter_and_heel

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
    and heel), ``display`` (a vendor display chain), ``round_field`` (a round field of 0.35-0.5 of the
    side).
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

    @classmethod
    def from_dict(cls, d: dict | None) -> AugmentConfig:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown augmentation keys: {sorted(unknown)}")
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


def augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmented copies of line-integral images ``(B, H, W)`` (float32, on the images' device)."""
    x = images.float()
    B, H, W = x.shape
    g, dev = generator, x.device
    # Nonlinear response first (on the physics), then quantum noise on the transmission image.
    x = x.clamp(min=0) ** _uniform(config.gamma, B, g, dev)[:, None, None]
    if config.metal > 0:
        rods = (torch.rand(B, generator=g) < config.metal) * torch.randint(1, 4, (B,), generator=g)
        x = x + metal_rods((B, H, W), rods, g).to(x)
    i0 = _uniform(config.i0, B, g, dev, log=True)[:, None, None]
    expected = i0 * torch.exp(-x)
    if config.scatter > 0:
        on = (torch.rand(B, generator=g) < config.scatter).to(dev)[:, None, None]
        expected = torch.where(on, scatter_and_heel(expected, generator=g), expected)
    counts = _poisson(expected, g)
    x = torch.log(i0) - torch.log(counts.clamp(min=0.5))
    if config.display > 0:
        on = (torch.rand(B, generator=g) < config.display).to(dev)[:, None, None]
        shown = display_chain(counts, generator=g).clamp(min=0.5 / 255)  # the 8-bit floor, as prepare_frame's
        bright = torch.quantile(shown.flatten(1), 0.999, dim=1)[:, None, None]
        x = torch.where(on, (torch.log(bright) - torch.log(shown)).clamp(min=0), x)
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
        on = (torch.rand(B, generator=g) < config.round_field).to(dev)
        radius = _uniform((0.35, 0.5), B, g, dev)[:, None, None] * min(H, W)
        r = torch.hypot(cols - (W - 1) / 2, rows - (H - 1) / 2)
        outside = (r > radius) & on[:, None, None]
        inside_mean = (x * ~outside).sum((1, 2), keepdim=True) / (~outside).sum((1, 2), keepdim=True)
        x = torch.where(outside, inside_mean, x)
    return x
