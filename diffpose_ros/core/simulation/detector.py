"""Synthetic fluoroscopy: a DRR turned into what a detector, and a clinical C-arm, would deliver.

``I = gain * Poisson(I0 * exp(-L))`` blurred by the detector, quantised to the output type; with
:class:`ClinicalFactors`, what an operating-room C-arm adds (:mod:`.clinical`): steel rods that are not
in the CT, scatter and the heel effect, the vendor's display chain (8-bit video, possibly inverted),
an image intensifier's round field and burned-in text; or, with ``family="fp"``, a flat panel's
factors of the same names (:mod:`.flat_panel`). Used by the evaluation, the bag tools and the tests;
training draws the image intensifier's factors as augmentations (:mod:`~diffpose_ros.core.model.augment`).
"""

from __future__ import annotations

import numpy as np
import torch

from . import flat_panel
from .clinical import ClinicalFactors, display_chain, gaussian_blur, metal_rods, scatter_and_heel

__all__ = ["COLLIMATOR_TRANSMISSION", "round_field_and_text", "simulate_transmission"]

COLLIMATOR_TRANSMISSION = 0.02
"""Fraction of the beam that passes the collimator leaves."""


def simulate_transmission(
    line_integrals: torch.Tensor,
    i0: float = 5e3,
    gain: float | None = None,
    blur_sigma_px: float = 0.7,
    dtype: str = "uint16",
    rng: np.random.Generator | None = None,
    collimation: float = 0.0,
    clinical: ClinicalFactors | None = None,
    mirror: bool = False,
) -> np.ndarray:
    """A device-like frame ``(H, W)`` from line integrals (dimensionless).

    ``i0``: mean photon count of an unattenuated pixel (quantum noise; ``0`` disables noise);
    ``gain``: detector counts per photon (default: the unattenuated level at 90 % of an integer
    type's range, 1 for float32; unused by a display chain, which spans the type's range);
    ``blur_sigma_px``: detector blur (pixels, 0 = none); ``dtype``: ``uint16`` (mono16), ``uint8``
    (mono8) or ``float32`` (32FC1); ``collimation``: fraction of the width and of the height shut by
    the collimator leaves on each side (0 = open; the leaves let ``COLLIMATOR_TRANSMISSION`` of the
    beam through); ``clinical``: the clinical factors to add; ``mirror``: deliver the image
    left-right flipped (burned-in text is drawn after the flip, so it stays readable).
    """
    if not 0.0 <= collimation < 0.5:
        raise ValueError(f"collimation is a fraction per side in [0, 0.5), got {collimation}")
    top = {"uint16": 65535, "uint8": 255, "float32": None}
    if dtype not in top:
        raise ValueError(f"unsupported frame type {dtype!r} (uint16, uint8 or float32)")
    clinical = clinical or ClinicalFactors()
    rng = rng or np.random.default_rng()
    family = _FlatPanel(clinical, rng) if clinical.family == "fp" else _ImageIntensifier(clinical, rng)
    L = line_integrals.detach().double().cpu()
    if clinical.metal:
        L = L + family.metal(L.shape)
    photons = i0 if i0 > 0 else 1.0
    expected = photons * torch.exp(-L)
    if collimation > 0:
        h, w = expected.shape
        dy, dx = round(collimation * h), round(collimation * w)
        shut = torch.ones_like(expected, dtype=torch.bool)
        shut[dy : h - dy, dx : w - dx] = False
        expected = torch.where(shut, expected * COLLIMATOR_TRANSMISSION, expected)
    if clinical.scatter:
        expected = family.scatter(expected)
    counts = torch.from_numpy(rng.poisson(expected.numpy()).astype(np.float64)) if i0 > 0 else expected
    if blur_sigma_px > 0:
        counts = gaussian_blur(counts[None], blur_sigma_px)[0]
    if clinical.display:
        frame = family.display(counts) * (top[dtype] or 1.0)
    else:
        if clinical.inverted:
            raise ValueError("an inverted frame needs the display chain ('display,inverted')")
        frame = counts * (gain if gain is not None else (0.9 * top[dtype] / photons if top[dtype] else 1.0))
    frame = frame.numpy()
    if mirror:
        frame = np.ascontiguousarray(frame[:, ::-1])
    frame = frame.astype(np.float32) if top[dtype] is None else np.clip(np.rint(frame), 0, top[dtype]).astype(dtype)
    if clinical.field > 0 or clinical.text:
        frame = family.overlay(frame)
    return frame


class _ImageIntensifier:
    """The ``ii`` family's factors (:mod:`.clinical`), drawn from one torch generator seeded by ``rng``."""

    def __init__(self, clinical: ClinicalFactors, rng: np.random.Generator):
        self.clinical = clinical
        drawn = clinical.metal or clinical.scatter or clinical.display  # no extra draw: clean frames stay as they were
        self.g = torch.Generator().manual_seed(int(rng.integers(2**62))) if drawn else None

    def metal(self, shape: tuple[int, int]) -> torch.Tensor:
        return metal_rods((1, *shape), torch.tensor([self.clinical.metal]), self.g)[0]

    def scatter(self, expected: torch.Tensor) -> torch.Tensor:
        return scatter_and_heel(expected[None], generator=self.g)[0]

    def display(self, counts: torch.Tensor) -> torch.Tensor:
        return display_chain(counts[None], inverted=self.clinical.inverted, generator=self.g)[0].double()

    def overlay(self, frame: np.ndarray) -> np.ndarray:
        return round_field_and_text(frame, self.clinical.field, self.clinical.text)


class _FlatPanel:
    """The ``fp`` family's factors (:mod:`.flat_panel`), drawn from ``rng``."""

    def __init__(self, clinical: ClinicalFactors, rng: np.random.Generator):
        self.clinical, self.rng = clinical, rng

    def metal(self, shape: tuple[int, int]) -> torch.Tensor:
        return torch.from_numpy(flat_panel.metal_parts(shape, self.clinical.metal, self.rng))

    def scatter(self, expected: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(flat_panel.scatter(expected.numpy(), self.rng))

    def display(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(flat_panel.display(counts.numpy(), self.rng, self.clinical.inverted))

    def overlay(self, frame: np.ndarray) -> np.ndarray:
        return flat_panel.shutter_and_overlays(frame, self.clinical.field > 0, self.clinical.text, self.rng)


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
