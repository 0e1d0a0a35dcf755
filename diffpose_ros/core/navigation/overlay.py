"""The picture a user checks a pose by: the X-ray in grey with the DRR's edges at the estimate.

One helper for every caller (the node's ``~/overlay``, ``diffpose-register --overlay``,
``diffpose-evaluate``'s figure, ``diffpose-score``'s pictures), so that they all show the same thing.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from diffpose_ros.core.frames.prepare import Frame, resample_image, resample_mask
from diffpose_ros.core.io.files import to_uint8
from diffpose_ros.core.rendering.renderer import Renderer

__all__ = ["overlay_edges", "render_overlay"]

EDGE_BGR = (0, 255, 0)


def overlay_edges(
    xray: np.ndarray | torch.Tensor, drr: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None
) -> np.ndarray:
    """``(H, W, 3)`` BGR uint8: the X-ray in grey with the DRR's edges (Canny) in green.

    Both inputs are line-integral-like images on the same pixel grid (bright = more attenuation);
    pixels outside ``mask`` (bool, True = valid) are shown at half brightness.
    """
    grey = to_uint8(xray)
    edges = cv2.Canny(cv2.GaussianBlur(to_uint8(drr), (5, 5), 1.0), 30, 90) > 0
    picture = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    if mask is not None:
        outside = ~np.asarray(mask, dtype=bool)
        picture[outside] //= 2
    picture[edges] = EDGE_BGR
    return picture


@torch.no_grad()
def render_overlay(renderer: Renderer, frame: Frame, pose: torch.Tensor, width: int | None = None) -> np.ndarray:
    """:func:`overlay_edges` of ``frame`` and the DRR rendered by ``renderer`` at ``pose``
    (``T_ct_source``, 4x4, mm), at ``width`` pixels across (default and at most the frame's)."""
    k = frame.intrinsics.resized(min(width or frame.intrinsics.width, frame.intrinsics.width))
    xray = resample_image(frame.image, k.width, k.height)
    mask = resample_mask(frame.mask, k.width, k.height)
    drr = renderer.render(pose.double(), k).cpu()
    return overlay_edges(xray, drr, None if bool(mask.all()) else mask.numpy())
