"""A frame's grey values mapped onto a DRR's: the monotone intensity map of an unknown display chain.

A clinical frame is not a transmission image: the vendor's log, window/level, gamma and 8-bit video,
and scatter, bend the relation between grey value and line integral by a monotone map that differs
between devices and frames. NCC assumes that relation is affine. :func:`match_quantiles` estimates
the map without knowing the pose exactly: the histogram of the DRR at a nearby pose (the CNN start,
or the last pose when tracking) barely depends on a few millimetres of pose error, so the frame's
quantiles over its valid pixels are mapped onto the DRR's (piecewise linear between ``knots``
quantiles, so noise and quantisation steps are not copied into the map). On a frame that already is
line integrals the map is close to affine and changes nothing that NCC sees.

:func:`polarity_scores` tells whether bones are dark or bright in a frame's pixels: how well the DRRs
at the CNN's estimates for the frame and for its negative correlate with the frame and its
negative. A frame shown with the other polarity must never be registered without anyone knowing.
"""

from __future__ import annotations

import numpy as np
import torch

from .similarity import ncc

__all__ = ["POLARITIES", "match_quantiles", "polarity_scores"]

POLARITIES = ("bones_dark", "bones_bright")
"""How a frame's pixels show bone: ``bones_dark`` (a transmission image: bright where little is
attenuated, what detectors and most fluoroscopy video deliver) or ``bones_bright`` (inverted)."""


def match_quantiles(image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, knots: int = 33) -> torch.Tensor:
    """``image`` ``(H, W)`` through the increasing map that sends its quantiles over ``mask`` (True =
    valid) to the quantiles of ``reference`` (any shape, every value counts) at ``knots`` evenly
    spaced levels from 1 % to 99 %; linear between knots, constant beyond the end ones. ``image``
    itself when ``reference`` is flat between those levels (the CT hardly in view: a map onto it
    would flatten the image, and a flat image matches any flat DRR). On the CPU in NumPy, which is
    quicker than torch at this size (a step of every tracked frame)."""
    levels = np.linspace(0.01, 0.99, knots)
    ref = reference.detach().cpu().flatten().float().numpy()
    y = _quantiles(ref[:: max(1, ref.size // 100_000)], levels)
    if not y[-1] - y[0] > 0:
        return image
    pixels = image.detach().cpu().float().numpy()
    values = pixels[mask.cpu().numpy()]
    x = _quantiles(values[:: max(1, values.size // 100_000)], levels)
    # Equal quantiles (flat histograms, clipped video) would make the map a step: keep x increasing.
    x = x + np.arange(knots) * 1e-6 * (x[-1] - x[0] + 1e-6)
    mapped = np.interp(pixels, x.astype(np.float32), y.astype(np.float32))
    return torch.from_numpy(mapped.astype(np.float32)).to(image.device)


def _quantiles(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``np.quantile(values, levels)`` (linear method) from one sort of ``values``."""
    ordered = np.sort(values).astype(np.float64)
    position = levels * (ordered.size - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, ordered.size - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def polarity_scores(frame: torch.Tensor, drrs: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """``(bones_dark, bones_bright)`` scores in [-1, 1] of a frame ``(H, W)`` (line integrals as if
    bones were dark in the delivered pixels): the NCC over ``mask`` of the frame with the DRR at the
    CNN's estimate for it (``drrs[0]``), and of the negated frame with the DRR at the estimate for
    the negated frame (``drrs[1]``). The right polarity gives a clearly higher score."""
    dark = float(ncc(frame, drrs[0], mask, dims=2))
    bright = float(ncc(-frame, drrs[1], mask, dims=2))
    return dark, bright
