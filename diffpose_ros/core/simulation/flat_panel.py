"""A second family of clinical frames, written apart from :mod:`.clinical`: a flat-panel C-arm's look.

The registration and the training were shaped on :mod:`.clinical`'s frames; a method is only robust
if it also poses frames of a family it never saw. This family differs in every factor:

- :func:`display`: log, a sigmoid VOI LUT (DICOM's ``SIGMOID`` function) around a drawn centre and
  width, 10-bit levels (before the output type's own), contrast-limited adaptive histogram
  equalisation (CLAHE) on tiles of a drawn size, an unsharp mask of a drawn radius and strength;
  bones dark, or bright when inverted;
- :func:`shutter` and :func:`shutter_and_overlays`: a rectangular shutter with rounded corners, or a vignetted round
  field off centre and partly clipped by the image edge; grey (not black) outside; a crosshair, a
  ruler, text in another font and a boxed orientation letter;
- :func:`metal_parts`: plates with screw holes, screws with heads and a retractor blade across a
  third of the field (steel, not in the CT);
- :class:`RecursiveFilter`: on a sequence, recursive temporal filtering (frame averaging that lags
  behind motion), as a flat panel's fluoroscopy mode does;
- :func:`scatter`: a scatter field proportional to a wide box average of the primary, plus a
  linear exposure gradient across the field.

Every function works on one image (NumPy, float64 unless said) and draws from ``rng``
(``numpy.random.Generator``, the one the quantum noise draws from too): a seed reproduces a frame.
Lengths scale with ``min(H, W) / 256``.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["RecursiveFilter", "display", "metal_parts", "scatter", "shutter", "shutter_and_overlays", "voi_lut"]

STEEL_PER_MM = 0.5
"""Linear attenuation of steel (1/mm) at fluoroscopy energies, in the line integrals' units."""


def voi_lut(log_counts: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM's sigmoid VOI LUT: ``1 / (1 + exp(-4 (x - centre) / width))`` in (0, 1), increasing in
    ``log_counts``; ``width > 0`` (``ValueError`` otherwise)."""
    if not width > 0:
        raise ValueError(f"a VOI LUT needs a positive width, got {width}")
    return 1.0 / (1.0 + np.exp(-4.0 * (log_counts - centre) / width))


def display(counts: np.ndarray, rng: np.random.Generator, inverted: bool = False) -> np.ndarray:
    """Display values ``(H, W)`` in [0, 1] of detector ``counts`` ``(H, W)`` (bright = many counts,
    unless ``inverted``), through the chain of the module docstring."""
    h, w = counts.shape
    log = np.log1p(np.clip(counts, 0, None))
    lo, hi = np.percentile(log, [1, 99])
    span = max(hi - lo, 1e-6)
    centre = (lo + hi) / 2 + rng.uniform(-0.15, 0.15) * span
    shown = voi_lut(log, centre, rng.uniform(0.5, 1.1) * span)
    ten_bit = np.round(shown * 1023).astype(np.uint16) * 64  # 10-bit levels spread over the 16-bit range
    tiles = int(rng.choice([4, 6, 8]))
    clahe = cv2.createCLAHE(clipLimit=float(rng.uniform(1.2, 3.0)), tileGridSize=(tiles, tiles))
    z = clahe.apply(ten_bit).astype(np.float64) / 65535
    sigma = rng.uniform(1.0, 6.0) * min(h, w) / 256
    z = np.clip(z + rng.uniform(0.3, 1.5) * (z - cv2.GaussianBlur(z, (0, 0), sigma)), 0.0, 1.0)
    z = np.round(z * 1023) / 1023
    return 1.0 - z if inverted else z


def metal_parts(shape: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """Line integrals ``shape`` of ``count`` steel parts (plates with holes, screws with heads, a
    retractor blade), each placed and turned at random."""
    h, w = shape
    scale = min(h, w) / 256
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros(shape)
    for _ in range(count):
        kind = rng.choice(["plate", "screw", "blade"])
        cx, cy, angle = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0, np.pi)
        a = (u - cx) * np.cos(angle) + (v - cy) * np.sin(angle)  # along the part
        b = -(u - cx) * np.sin(angle) + (v - cy) * np.cos(angle)  # across it
        if kind == "plate":
            length, half_width, thick = rng.uniform(60, 110) * scale, rng.uniform(5, 8) * scale, rng.uniform(2, 4)
            body = (np.abs(a) < length / 2) & (np.abs(b) < half_width)
            holes = np.zeros(shape, dtype=bool)
            for x in np.linspace(-length / 2 + 2 * half_width, length / 2 - 2 * half_width, 4):
                holes |= np.hypot(a - x, b) < 0.5 * half_width
            out += STEEL_PER_MM * thick * (body & ~holes)
        elif kind == "screw":
            length, radius = rng.uniform(25, 50) * scale, rng.uniform(1.5, 2.5) * scale
            shaft = (a > 0) & (a < length) & (np.abs(b) < radius)
            chord = 2 * np.sqrt(np.clip(radius**2 - b**2, 0, None)) / scale
            head = (a <= 0) & (a > -2.5 * radius) & (np.abs(b) < 2.2 * radius)
            out += STEEL_PER_MM * (chord * shaft + 2.2 * 2 * radius / scale * head)
        else:
            half_width = rng.uniform(10, 16) * scale
            blade = (np.abs(b) < half_width) & (a > -w) & (a < rng.uniform(0.2, 0.4) * w)
            out += STEEL_PER_MM * rng.uniform(1.0, 2.0) * blade
    return out


def scatter(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Expected counts ``(H, W)`` with scatter added: a scatter-to-primary ratio drawn in [0.2, 1.0]
    times a box average of the primary over a third of the field, and a linear exposure gradient of
    up to 25 % across it in a random direction."""
    h, w = expected.shape
    size = max(3, min(h, w) // 3) | 1
    haze = cv2.blur(expected, (size, size), borderType=cv2.BORDER_REFLECT)
    v, u = np.mgrid[0:h, 0:w]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((u - w / 2) * np.cos(angle) + (v - h / 2) * np.sin(angle)) / max(h, w)
    return (expected + rng.uniform(0.2, 1.0) * haze) * (1.0 + rng.uniform(0.0, 0.25) * ramp)


def shutter(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Transmission ``shape`` of a shutter in [0, 1] (0 outside): a rectangle with rounded corners, or
    a vignetted round field off centre and clipped by the image's edge (half the draws each)."""
    h, w = shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    if rng.uniform() < 0.5:  # rectangular shutter with rounded corners
        half_w, half_h = rng.uniform(0.32, 0.46) * w, rng.uniform(0.32, 0.46) * h
        corner = rng.uniform(0.05, 0.15) * min(h, w)
        dx = np.clip(np.abs(u - (w - 1) / 2) - (half_w - corner), 0, None)
        dy = np.clip(np.abs(v - (h - 1) / 2) - (half_h - corner), 0, None)
        return np.clip((corner - np.hypot(dx, dy)) / 1.5, 0.0, 1.0)
    cx, cy = (0.5 + rng.uniform(-0.08, 0.08)) * w, (0.5 + rng.uniform(-0.08, 0.08)) * h
    radius = rng.uniform(0.48, 0.58) * min(h, w)
    d = np.hypot(u - cx, v - cy)
    return np.clip((radius - d) / 4.0, 0.0, 1.0) * np.clip(1.0 - 0.4 * (d / radius) ** 2, 0.5, 1.0)


def shutter_and_overlays(frame: np.ndarray, field: bool, text: bool, rng: np.random.Generator) -> np.ndarray:
    """``frame`` with, when ``field``, a :func:`shutter` and grey outside it, and, when ``text``, a
    crosshair, a ruler, text and an orientation letter in the frame's white; same type and size."""
    h, w = frame.shape
    integer = np.issubdtype(frame.dtype, np.integer)
    top = np.iinfo(frame.dtype).max if integer else float(frame.max())
    out = frame.astype(np.float64)
    if field:
        inside = shutter((h, w), rng)
        grey = rng.uniform(0.07, 0.25) * np.percentile(out, 99.9)  # a dark grey for the frame's own levels
        out = out * inside + grey * (1.0 - inside)
    out = np.clip(np.rint(out) if integer else out, 0, top).astype(frame.dtype)
    if text:
        s = min(h, w) / 256
        layer = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
        c, arm = (w // 2, h // 2), int(12 * s)
        cv2.line(layer, (c[0] - arm, c[1]), (c[0] + arm, c[1]), 255, 1)
        cv2.line(layer, (c[0], c[1] - arm), (c[0], c[1] + arm), 255, 1)
        for k in range(11):
            x = int((20 + 8 * k) * s)
            cv2.line(layer, (x, h - int(10 * s)), (x, h - int((16 if k % 5 else 22) * s)), 255, 1)
        place = (int(6 * s), int(14 * s))
        cv2.putText(layer, "SN 4471  71 kV  2.1 mA", place, cv2.FONT_HERSHEY_COMPLEX_SMALL, 0.6 * s, 255, 1)
        x0, y0 = w - int(30 * s), int(8 * s)
        cv2.rectangle(layer, (x0, y0), (x0 + int(20 * s), y0 + int(20 * s)), 255, 1)
        cv2.putText(layer, "L", (x0 + int(4 * s), y0 + int(16 * s)), cv2.FONT_HERSHEY_DUPLEX, 0.55 * s, 255, 1)
        out = np.where(layer > 0, top, out).astype(frame.dtype)
    return out


class RecursiveFilter:
    """A sequence's recursive temporal filter: ``out_t = weight x_t + (1 - weight) out_{t-1}`` (``out_0 =
    x_0``), each output rounded to the frames' type when it is an integer one. ``weight`` in (0, 1]
    (1: no filtering; smaller: more noise averaged away, more lag behind motion); ``ValueError`` for
    another weight, or for a frame whose shape or type differs from the first one's."""

    def __init__(self, weight: float):
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"a recursive filter's weight lies in (0, 1], got {weight}")
        self.weight = float(weight)
        self._state: np.ndarray | None = None
        self._like: tuple[tuple[int, ...], np.dtype] | None = None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        like = (frame.shape, frame.dtype)
        if self._like is not None and like != self._like:
            raise ValueError(f"frame is {frame.shape} {frame.dtype}, the sequence's {self._like[0]} {self._like[1]}")
        x = frame.astype(np.float64)
        self._state = x if self._state is None else self.weight * x + (1.0 - self.weight) * self._state
        self._like = like
        return (
            np.rint(self._state).astype(frame.dtype)
            if np.issubdtype(frame.dtype, np.integer)
            else self._state.astype(frame.dtype)
        )
