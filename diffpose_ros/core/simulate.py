"""Synthetic fluoroscopy: a DRR turned into what a detector would deliver.

``I = gain * Poisson(I0 * exp(-L))`` blurred by the detector, quantised to the output type. Used by
the demo, the evaluation and the bag tools, and by training as augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["simulate_transmission", "round_field_and_text", "COLLIMATOR_TRANSMISSION"]

COLLIMATOR_TRANSMISSION = 0.02
"""Fraction of the beam that passes the collimator leaves."""


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    img = F.pad(image[None, None], (radius, radius, radius, radius), mode="replicate")
    img = F.conv2d(img, k.reshape(1, 1, 1, -1))
    return F.conv2d(img, k.reshape(1, 1, -1, 1))[0, 0]


def simulate_transmission(
    line_integrals: torch.Tensor,
    i0: float = 5e3,
    gain: float | None = None,
    blur_sigma_px: float = 0.7,
    dtype: str = "uint16",
    rng: np.random.Generator | None = None,
    collimation: float = 0.0,
) -> np.ndarray:
    """A device-like transmission frame ``(H, W)`` from line integrals (dimensionless).

    ``i0``: mean photon count of an unattenuated pixel (quantum noise; ``0`` disables noise);
    ``gain``: detector counts per photon (default: the unattenuated level at 90 % of an integer
    type's range, 1 for float32); ``blur_sigma_px``: detector blur (pixels, 0 = none);
    ``dtype``: ``uint16`` (mono16), ``uint8`` (mono8) or ``float32`` (32FC1); ``collimation``: fraction
    of the width and of the height shut by the collimator leaves on each side (0 = open; the leaves
    let ``COLLIMATOR_TRANSMISSION`` of the beam through).
    """
    if not 0.0 <= collimation < 0.5:
        raise ValueError(f"collimation is a fraction per side in [0, 0.5), got {collimation}")
    rng = rng or np.random.default_rng()
    photons = i0 if i0 > 0 else 1.0
    expected = photons * torch.exp(-line_integrals.detach().double().cpu())
    if collimation > 0:
        h, w = expected.shape
        dy, dx = round(collimation * h), round(collimation * w)
        shut = torch.ones_like(expected, dtype=torch.bool)
        shut[dy : h - dy, dx : w - dx] = False
        expected = torch.where(shut, expected * COLLIMATOR_TRANSMISSION, expected)
    counts = torch.from_numpy(rng.poisson(expected.numpy()).astype(np.float64)) if i0 > 0 else expected
    if blur_sigma_px > 0:
        counts = _gaussian_blur(counts, blur_sigma_px)
    if dtype == "float32":
        return (counts * (gain or 1.0)).numpy().astype(np.float32)
    top = {"uint16": 65535, "uint8": 255}.get(dtype)
    if top is None:
        raise ValueError(f"unsupported frame type {dtype!r} (uint16, uint8 or float32)")
    frame = counts * (gain if gain is not None else 0.9 * top / photons)
    return np.clip(np.rint(frame.numpy()), 0, top).astype(dtype)


def round_field_and_text(frame: np.ndarray, radius_fraction: float = 0.45, text: bool = True) -> np.ndarray:
    """``frame`` as an image intensifier and a video chain deliver it: black outside a round field
    of ``radius_fraction`` of the smaller side (centred, 2-pixel soft edge; 0: no field) and, with
    ``text``, white burned-in text in two corners and an orientation marker. Same type and size."""
    import cv2

    h, w = frame.shape
    top = np.iinfo(frame.dtype).max if np.issubdtype(frame.dtype, np.integer) else float(frame.max())
    out = frame.copy()
    if radius_fraction > 0:
        v, u = np.mgrid[0:h, 0:w]
        radius = radius_fraction * min(h, w)
        weight = np.clip((radius - np.hypot(u - (w - 1) / 2, v - (h - 1) / 2)) / 2.0, 0.0, 1.0)
        out = (frame.astype(np.float64) * weight).astype(frame.dtype)
    if text:
        layer = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
        scale, thick = max(h, w) / 700, max(1, round(max(h, w) / 250))
        for label, (x, y) in (("70 kV 2.1 mA", (0.02, 0.06)), ("00:12:47", (0.02, 0.97)), ("L", (0.9, 0.1))):
            cv2.putText(layer, label, (round(x * w), round(y * h)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick)
        out[layer > 0] = top
    return out
