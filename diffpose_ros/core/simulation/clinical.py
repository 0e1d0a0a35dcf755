"""What a clinical C-arm adds to an X-ray, as batched tensor operations: metal, scatter, heel, display.

One place for the physics and the vendor's image processing that our DRRs lack, used both to make
clinical-looking test frames (:func:`~.detector.simulate_transmission`: evaluation, bags, tests) and to
augment training images (:mod:`~diffpose_ros.core.model.augment`), so that the network is trained on
what it is tested on.
Every function works on a batch ``(B, H, W)`` and draws its per-image parameters from one CPU
``torch.Generator`` (a seed reproduces a batch). Pixel sizes are in pixels of the image given;
parameters that describe a length scale with ``min(H, W) / 256`` (tuned on 256² frames of 1.2 mm).

- :func:`metal_rods`: line integrals of 1-3 K-wires (thin, long) or screws (thick, short) of steel
  that are not in the CT; the chord length through a cylinder, so a rod has a rounded profile.
- :func:`scatter_and_heel`: a smooth scatter haze (scatter-to-primary ratio ``spr``, the primary
  blurred over a sixth of the field) and the anode heel effect (the tube output falls by ``heel``
  across the field along a random direction), on the expected photon counts.
- :func:`display_chain`: the vendor's chain from detector counts to 8-bit video: log, window/level
  between two percentiles, gamma, unsharp masking (edge enhancement), quantisation; optionally
  inverted (bones bright). Monotone in the counts except for the edge enhancement and clipping.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ClinicalFactors", "DisplayChain", "display_chain", "gaussian_blur", "metal_rods", "scatter_and_heel"]


@dataclass(frozen=True)
class ClinicalFactors:
    """Which clinical factors a simulated frame has (all off: a raw transmission frame).

    ``display``: the vendor display chain (log, window/level, gamma, edge enhancement, 8-bit levels);
    ``field``: an image intensifier's round field, radius as a fraction of the smaller side (0: none);
    ``text``: burned-in text and an orientation marker; ``metal``: number of steel rods (K-wires,
    screws); ``scatter``: scatter haze and anode heel effect; ``inverted``: the display shows bones
    bright (the polarity that a frame must never be registered with silently). ``family``: whose
    factors these are (:attr:`FAMILIES`): ``ii``, this module's image intensifier, or ``fp``, the
    flat panel of :mod:`.flat_panel` (its own shutter, overlays, metal parts and scatter for the same
    names; ``field`` then only switches its shutter on).
    """

    display: bool = False
    field: float = 0.0
    text: bool = False
    metal: int = 0
    scatter: bool = False
    inverted: bool = False
    family: str = "ii"

    NAMES = ("display", "field", "text", "metal", "scatter", "inverted")
    """The names :meth:`parse` reads; ``all`` stands for every one but ``inverted``."""
    FAMILIES = ("ii", "fp")
    """The families of frames: an image intensifier (:mod:`.clinical`) and a flat panel (:mod:`.flat_panel`)."""

    def __post_init__(self) -> None:
        if self.family not in self.FAMILIES:
            raise ValueError(f"unknown family of clinical frames {self.family!r}: one of {', '.join(self.FAMILIES)}")

    @classmethod
    def parse(cls, spec: str) -> ClinicalFactors:
        """Factors from a comma-separated list of :attr:`NAMES` (``field`` = a 0.45 radius, ``metal`` =
        2 rods) or ``all``, optionally after a family and a colon (``fp:all``; default ``ii``);
        ``""`` or ``none``: no factor. ``ValueError`` for an unknown name or family."""
        family, _, spec = spec.rpartition(":")
        family = family.strip() or "ii"
        names = {n.strip() for n in spec.split(",") if n.strip() and n.strip() != "none"}
        if "all" in names:
            names = (names - {"all"}) | set(cls.NAMES[:-1])
        unknown = names - set(cls.NAMES)
        if unknown:
            raise ValueError(f"unknown clinical factor(s) {sorted(unknown)}: use {', '.join(cls.NAMES)} or all")
        return cls(
            display="display" in names,
            field=0.45 if "field" in names else 0.0,
            text="text" in names,
            metal=2 if "metal" in names else 0,
            scatter="scatter" in names,
            inverted="inverted" in names,
            family=family,
        )

    def names(self) -> list[str]:
        """The factors that are on, by name."""
        return [f.name for f in dataclasses.fields(self) if f.name != "family" and getattr(self, f.name)]


def _uniform(lo: float, hi: float, n: int, g: torch.Generator | None, device=None) -> torch.Tensor:
    """``n`` float64 draws from ``[lo, hi]`` by the CPU generator ``g``, on ``device``."""
    return (lo + torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo)).to(device)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, H, W)`` with one sigma per image (pixels; a float for all),
    replicate padding, kernel radius ``radius`` (default ``3 * max(sigma)`` rounded)."""
    B = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(B).clamp(min=1e-3)
    if radius is None:
        radius = max(1, min(int(3 * float(sigma.max()) + 0.5), min(x.shape[-2:]) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    y = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=B)
    return F.conv2d(y, k[:, None, :, None], groups=B)[0]


def metal_rods(
    shape: tuple[int, int, int], counts: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Line integrals ``(B, H, W)`` of ``counts[b]`` steel rods per image (0 for none).

    Each rod is a K-wire (60 %: 1.5-3 px wide at 256², across most of the field, 1.5-3 through its
    axis) or a screw (5-8 px wide, a fifth to a third of the field long, 3-5 through its axis), at a
    random place and angle; at least a pixel wide on small images. On the CPU, float64.
    """
    B, H, W = shape
    g = generator
    scale = min(H, W) / 256
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    out = torch.zeros(shape, dtype=torch.float64)
    for b in range(B):
        for _ in range(int(counts[b])):
            wire = bool(torch.rand(1, generator=g) < 0.6)
            radius = max(0.5, float(_uniform(0.75, 1.5, 1, g) if wire else _uniform(2.5, 4.0, 1, g)) * scale)
            length = float(_uniform(0.6, 1.2, 1, g) if wire else _uniform(0.2, 0.33, 1, g)) * min(H, W)
            peak = float(_uniform(1.5, 3.0, 1, g) if wire else _uniform(3.0, 5.0, 1, g))
            cx, cy = float(_uniform(0.2, 0.8, 1, g)) * W, float(_uniform(0.2, 0.8, 1, g)) * H
            angle = float(_uniform(0, math.pi, 1, g))
            d = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
            along = (u - cx) * d[0] + (v - cy) * d[1]
            across = -(u - cx) * d[1] + (v - cy) * d[0]
            inside = (along.abs() <= length / 2).to(torch.float64)
            chord = (1 - (across / radius) ** 2).clamp(min=0).sqrt()
            out[b] += peak * chord * inside
    return out


def scatter_and_heel(
    photons: torch.Tensor,
    spr: tuple[float, float] = (0.3, 1.0),
    heel: tuple[float, float] = (0.1, 0.3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Expected counts ``(B, H, W)`` with scatter and the heel effect added (see the module).

    ``spr``: range of the scatter-to-primary ratio (scatter = ``spr`` x the mean primary, shaped by
    the primary blurred over a sixth of the smaller side); ``heel``: range of the relative fall of
    the tube output from one side of the field to the other.
    """
    B, H, W = photons.shape
    g = generator
    p = photons.double()
    # The haze is smooth: blur a 4x smaller image (cheap at any size) and bring it back.
    small = F.avg_pool2d(p[:, None].float(), 4, ceil_mode=True)[:, 0]
    wide = gaussian_blur(small, min(H, W) / 24)
    blurred = F.interpolate(wide[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0].double()
    dev = photons.device
    ratio = _uniform(*spr, B, g, dev)[:, None, None]
    scatter = ratio * blurred.mean((1, 2), keepdim=True) * blurred / blurred.mean((1, 2), keepdim=True).clamp(min=1e-12)
    angle = _uniform(0, 2 * math.pi, B, g, dev)
    f64 = torch.float64
    axes = torch.linspace(-0.5, 0.5, H, dtype=f64, device=dev), torch.linspace(-0.5, 0.5, W, dtype=f64, device=dev)
    v, u = torch.meshgrid(*axes, indexing="ij")
    ramp = u[None] * angle.cos()[:, None, None] + v[None] * angle.sin()[:, None, None]
    tube = 1 - _uniform(*heel, B, g, dev)[:, None, None] * (ramp + 0.5)
    return ((p + scatter) * tube).to(photons.dtype)


@dataclass(frozen=True)
class DisplayChain:
    """Ranges of the vendor display chain drawn per image.

    ``window``: percentile ranges (0-1) of the log counts that map to black and to white;
    ``gamma``: exponent on the windowed value; ``unsharp``: edge-enhancement amount;
    ``unsharp_sigma_px``: its blur (pixels at 256²); ``levels``: grey levels of the output.
    """

    window: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.02), (0.98, 1.0))
    gamma: tuple[float, float] = (0.6, 1.6)
    unsharp: tuple[float, float] = (0.0, 1.5)
    unsharp_sigma_px: tuple[float, float] = (2.0, 8.0)
    levels: int = 256


def display_chain(
    counts: torch.Tensor,
    chain: DisplayChain = DisplayChain(),
    inverted: torch.Tensor | bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Display values ``(B, H, W)`` in [0, 1] (``chain.levels`` steps; bright = many counts, unless
    ``inverted``) of detector ``counts`` ``(B, H, W)`` (see the module)."""
    B, H, W = counts.shape
    g, dev = generator, counts.device
    y = torch.log1p(counts.double().clamp(min=0))
    flat = y.flatten(1)
    (lo_a, lo_b), (hi_a, hi_b) = chain.window
    q_lo, q_hi = _uniform(lo_a, lo_b, B, g, dev), _uniform(hi_a, hi_b, B, g, dev)
    sorted_values = flat.sort(1).values
    n = flat.shape[1]
    lo = sorted_values.gather(1, (q_lo * (n - 1)).round().long()[:, None])
    hi = sorted_values.gather(1, (q_hi * (n - 1)).round().long()[:, None])
    z = ((flat - lo) / (hi - lo).clamp(min=1e-9)).clamp(0, 1).reshape(B, H, W)
    z = z ** _uniform(*chain.gamma, B, g, dev)[:, None, None]
    sigma = _uniform(*chain.unsharp_sigma_px, B, g, dev) * min(H, W) / 256
    amount = _uniform(*chain.unsharp, B, g, dev)[:, None, None]
    z = (z + amount * (z - gaussian_blur(z, sigma))).clamp(0, 1)
    z = torch.round(z * (chain.levels - 1)) / (chain.levels - 1)
    inverted = torch.as_tensor(inverted, dtype=torch.bool, device=dev).expand(B)[:, None, None]
    return torch.where(inverted, 1 - z, z).to(torch.float32)
