"""Which pixels of a device frame show the patient: the validity mask of a clinical frame.

A C-arm frame is not all image: an image intensifier gives a round field, collimator blades shut
bands along the borders, the vendor burns text and markers into the video, and a detector clips.
:func:`validity_mask` finds these in the delivered pixels (before any log or flip):

- **field**: the region outside a round field or beyond collimator blades or a shutter reaches the
  image border, and is dark or one flat grey (what a display puts outside a shutter). Dense anatomy
  can be just as dark, so a dark border region is only taken for a field edge when it has the
  field's shape: the complement of a circle (fitted to the convex hull of the valid pixels) or bands
  of whole dark rows and columns along the borders. A flat grey is outside whatever its shape (no
  anatomy is that flat). ``FieldSpec`` overrides the detection with a known round field (radius and
  centre, pixels).
- **burned-in text and graphics**: thin strokes near the frame's brightest level (a white top-hat
  response of at least a quarter of the range), grown by two pixels.
- **saturated pixels**: integer frames at their type's largest value.

The field is shrunk by ``FieldSpec.margin_px`` for its soft edge. The mask is True where a pixel may
be compared with a DRR. Our own code, because the decision rules (shape tests against dense anatomy)
are the point; OpenCV does the image operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["FieldSpec", "validity_mask"]

DARK_FRACTION = 0.06
"""A pixel is dark below this fraction of the frame's bright level (its 99.9th percentile)."""

GREY_BORDER_SHARE = 0.2
"""A flat grey outside a shutter is looked for when one bin of the border's values (bins of
``GREY_TOLERANCE`` times the bright level) holds at least this share of the border pixels, and its
mean lies between the dark level and half the bright one."""

GREY_TOLERANCE = 0.004
"""How far (a fraction of the bright level) a pixel of a flat grey, and its 3x3 neighbours, may lie
from the border's value."""


@dataclass(frozen=True)
class FieldSpec:
    """How to find the field: ``auto`` detection (else every pixel is valid), or a known round field
    of ``radius_px`` (> 0) about ``center_px`` (``(cx, cy)`` in delivered pixels; None: the centre);
    ``margin_px``: how far inside the detected or given edge pixels become valid."""

    auto: bool = True
    radius_px: float = 0.0
    center_px: tuple[float, float] | None = None
    margin_px: float = 3.0


def validity_mask(pixels: np.ndarray, spec: FieldSpec | None = None) -> np.ndarray:
    """``(H, W)`` bool mask of the pixels of a transmission frame that show the patient (see the
    module). Without ``spec.auto`` only a given round field is applied (text and saturation are
    not looked for either): what line-integral frames get."""
    spec = spec or FieldSpec()
    a = np.asarray(pixels)
    h, w = a.shape
    field = None
    if spec.radius_px > 0:
        cx, cy = spec.center_px if spec.center_px is not None else ((w - 1) / 2, (h - 1) / 2)
        field = _disk(h, w, cx, cy, spec.radius_px - spec.margin_px)
    if not spec.auto:
        return field if field is not None else np.ones((h, w), dtype=bool)
    values = a.astype(np.float32)
    text = _burned_in(values)
    saturated = a >= np.iinfo(a.dtype).max if np.issubdtype(a.dtype, np.integer) else np.zeros((h, w), dtype=bool)
    if field is None:
        field = _detect_field(values, text, saturated, spec.margin_px)
    return field & ~text & ~saturated


def _disk(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    v, u = np.mgrid[0:h, 0:w]
    return (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def _border_connected(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` connected (8-neighbourhood) to the image border."""
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def _detect_field(a: np.ndarray, text: np.ndarray, saturated: np.ndarray, margin: float) -> np.ndarray:
    """The field inside a round edge or collimator blades (burned-in ``text`` counts as outside; the
    bright level that sets "dark" is taken without it and without ``saturated`` pixels)."""
    h, w = a.shape
    image = ~(text | saturated)
    bright = float(np.percentile(a[image] if image.any() else a, 99.9))
    grey = _grey_outside(a, bright)
    outside = _border_connected((a <= DARK_FRACTION * bright) | text | grey)
    valid = np.ones((h, w), dtype=bool)
    if outside.mean() < 0.01:
        return valid
    if grey.any():  # no anatomy is this flat: whatever its shape, it is outside
        grown = cv2.dilate(grey.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, round(margin)))
        valid &= grown == 0
    circle = _round_field(~outside, outside)
    if circle is not None:
        cx, cy, r = circle
        return valid & _disk(h, w, cx, cy, r - margin)
    # Blades: whole dark rows and columns from each border inwards.
    m = int(math.ceil(margin))
    rows, cols = outside.mean(1) >= 0.97, outside.mean(0) >= 0.97
    top, bottom = _run(rows), _run(rows[::-1])
    left, right = _run(cols), _run(cols[::-1])
    if top + bottom >= h or left + right >= w:
        return valid
    if top or bottom:
        valid[: top + m if top else 0] = False
        valid[h - bottom - m if bottom else h :] = False
    if left or right:
        valid[:, : left + m if left else 0] = False
        valid[:, w - right - m if right else w :] = False
    return valid


def _grey_outside(a: np.ndarray, bright: float) -> np.ndarray:
    """The border-connected pixels of one flat grey, not dark and below half the ``bright`` level:
    the border's most common value (see :data:`GREY_BORDER_SHARE`) where the 3x3 neighbourhood stays
    within :data:`GREY_TOLERANCE` of it; all False when the border holds no such value."""
    tolerance = GREY_TOLERANCE * bright
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    binned = np.round(border / max(tolerance, 1e-12))
    bins, counts = np.unique(binned, return_counts=True)
    level = float(border[binned == bins[counts.argmax()]].mean())
    if counts.max() < GREY_BORDER_SHARE * border.size or not DARK_FRACTION * bright < level < 0.5 * bright:
        return np.zeros(a.shape, dtype=bool)
    kernel = np.ones((3, 3), np.uint8)
    near = np.abs(a - level) <= tolerance
    flat = (cv2.dilate(a, kernel) - cv2.erode(a, kernel)) <= 2 * tolerance
    return _border_connected(near & flat)


def _run(flags: np.ndarray) -> int:
    """How many leading entries of ``flags`` are True."""
    return int(np.argmin(flags)) if not flags.all() else len(flags)


def _round_field(valid: np.ndarray, outside: np.ndarray) -> tuple[float, float, float] | None:
    """``(cx, cy, r)`` of a round field, or None (full frames, blades, irregular dark borders).

    The circle is fitted to the convex hull of the valid pixels, sampled every pixel along its edges:
    where dense anatomy reaches the rim the hull cuts a chord, whose points are dropped as more than
    2 px off the circle. A round field needs half the hull on the circle, the circle (90 %) inside
    the image, and 97 % of the pixels outside it dark.
    """
    h, w = valid.shape
    if valid.sum() < 100:
        return None
    # The hull of the valid pixels is the hull of each row's first and last one (a 100th of the points).
    rows = np.flatnonzero(valid.any(1))
    first, last = valid[rows].argmax(1), w - 1 - valid[rows, ::-1].argmax(1)
    ends = np.concatenate([np.stack([first, rows], 1), np.stack([last, rows], 1)])
    hull = cv2.convexHull(ends.astype(np.float32))[:, 0].astype(np.float64)
    segments = [(a, b) for a, b in zip(hull, np.roll(hull, -1, axis=0))]
    points = np.concatenate(
        [a + np.linspace(0, 1, max(2, int(np.hypot(*(b - a)))), endpoint=False)[:, None] * (b - a) for a, b in segments]
    )
    circle = _ransac_circle(points)
    if circle is None:
        return None
    cx, cy, r = circle
    disk = _disk(h, w, cx, cy, r)
    if r < 0.2 * min(h, w) or disk.sum() < 0.9 * math.pi * r * r or outside[~disk].mean() < 0.97:
        return None
    return cx, cy, r


def _ransac_circle(
    points: np.ndarray, tolerance: float = 2.0, tries: int = 300, scored: int = 256
) -> tuple[float, float, float] | None:
    """The circle through most of ``points`` ``(N, 2)`` (within ``tolerance`` px), refined by least
    squares on them; None when fewer than half lie on any circle tried. Tries are scored on at most
    ``scored`` evenly spaced points (a quarter of a 256-pixel frame's hull), which bounds its cost.
    Seeded: deterministic."""
    triples = np.random.default_rng(0).integers(0, len(points), size=(tries, 3))
    a, b, c = points[triples[:, 0]], points[triples[:, 1]], points[triples[:, 2]]
    cx, cy, r = _circles_through(a, b, c)  # all tries at once: (tries,) each, NaN where degenerate
    sample = points[:: max(1, -(-len(points) // scored))]
    counts = (_off_circle(sample[None], cx[:, None], cy[:, None], r[:, None]) <= tolerance).sum(1)  # NaN: False
    i = int(np.argmax(counts))  # the first of the largest, as a loop keeping strict gains
    best = _off_circle(points, cx[i], cy[i], r[i]) <= tolerance
    if counts[i] < 0.5 * len(sample) or best.sum() < 0.5 * len(points):
        return None
    x, y = points[best, 0], points[best, 1]
    (p, q, c), *_ = np.linalg.lstsq(np.stack([x, y, np.ones_like(x)], 1), x * x + y * y, rcond=None)
    cx, cy = p / 2, q / 2
    return cx, cy, math.sqrt(max(c + cx * cx + cy * cy, 0.0))


def _off_circle(points: np.ndarray, cx, cy, r) -> np.ndarray:
    """Distances (px) of ``points`` ``(..., 2)`` from the circle(s) of centre ``(cx, cy)`` and radius ``r``
    (broadcast against the points' leading axes)."""
    return np.abs(np.hypot(points[..., 0] - cx, points[..., 1] - cy) - r)


def _circles_through(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres and radii of the circles through the point triples ``a[i], b[i], c[i]`` (``(n, 2)``
    each); NaN where the three are (nearly) on a line."""
    d = 2 * (a[:, 0] * (b[:, 1] - c[:, 1]) + b[:, 0] * (c[:, 1] - a[:, 1]) + c[:, 0] * (a[:, 1] - b[:, 1]))
    d = np.where(np.abs(d) < 1e-6, np.nan, d)
    sa, sb, sc = (p[:, 0] ** 2 + p[:, 1] ** 2 for p in (a, b, c))
    cx = (sa * (b[:, 1] - c[:, 1]) + sb * (c[:, 1] - a[:, 1]) + sc * (a[:, 1] - b[:, 1])) / d
    cy = (sa * (c[:, 0] - b[:, 0]) + sb * (a[:, 0] - c[:, 0]) + sc * (b[:, 0] - a[:, 0])) / d
    return cx, cy, np.hypot(a[:, 0] - cx, a[:, 1] - cy)


def _burned_in(a: np.ndarray) -> np.ndarray:
    """Thin strokes at the frame's brightest level: text, scale marks and markers burned into the video."""
    lo, top = float(np.percentile(a, 0.5)), float(a.max())
    if top <= lo:
        return np.zeros(a.shape, dtype=bool)
    tophat = cv2.morphologyEx(a, cv2.MORPH_TOPHAT, np.ones((9, 9), np.uint8))
    strokes = ((tophat >= 0.25 * (top - lo)) & (a >= top - 0.02 * (top - lo))).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(strokes, connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < 6)  # an isolated bright pixel is no stroke
    strokes[np.isin(labels, small[small > 0])] = 0
    return cv2.dilate(strokes, np.ones((5, 5), np.uint8)).astype(bool)
