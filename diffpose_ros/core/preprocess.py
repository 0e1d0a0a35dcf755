"""From a device frame to what the renderer compares: line integrals on the detector grid.

A fluoroscopy frame is a transmission image, roughly ``I = gain * I0 * exp(-L)`` plus quantum noise,
with ``L`` the line integral of attenuation (what a DRR renders). Taking ``-log`` makes it linear
in ``L`` up to an unknown offset (``log(gain * I0)``), which NCC ignores; we still estimate ``I0``
from the brightest pixels so that values are comparable across frames (unexposed detector ~ 0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Intrinsics

__all__ = ["line_integrals_from_transmission", "check_image", "warp_to_camera"]


def check_image(image: np.ndarray | torch.Tensor, name: str = "image") -> torch.Tensor:
    """A 2D float32 tensor copy of ``image``; ``ValueError`` naming the problem for empty, non-2D,
    non-finite or constant images (they carry no information to register)."""
    a = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if a.dim() != 2:
        raise ValueError(f"{name} must be a 2D single-channel image, got shape {tuple(a.shape)}")
    if a.numel() == 0:
        raise ValueError(f"{name} is empty ({tuple(a.shape)})")
    a = a.to(torch.float32)
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(a)).sum())} NaN/Inf pixels")
    if float(a.max() - a.min()) <= 0:
        raise ValueError(f"{name} is constant ({float(a[0, 0])}): nothing to register")
    return a.clone()


def line_integrals_from_transmission(
    image: np.ndarray | torch.Tensor, mirror: bool = False, i0_percentile: float = 99.9
) -> torch.Tensor:
    """Line integrals ``log(I0) - log(I)`` (dimensionless, >= 0) of a transmission frame (any scale).

    ``I0`` is the ``i0_percentile`` percentile of the frame (the unattenuated detector level);
    ``mirror`` flips columns (devices that show the image as seen from the detector side).
    """
    frame = check_image(image, "transmission image")
    if float(frame.min()) < 0:
        raise ValueError("a transmission image cannot be negative; pass line integrals as float .npy instead")
    positive = frame[frame > 0]
    if positive.numel() == 0:
        raise ValueError("transmission image is all zero")
    floor = float(positive.min())
    i0 = float(torch.quantile(positive.flatten()[:: max(1, positive.numel() // 200_000)], i0_percentile / 100))
    L = (torch.log(torch.tensor(i0)) - torch.log(frame.clamp(min=floor))).clamp(min=0)
    return L.flip(-1) if mirror else L


def warp_to_camera(image: torch.Tensor, source: Intrinsics, target: Intrinsics) -> torch.Tensor:
    """Resample an ``(H, W)`` image from camera ``source`` into camera ``target`` (same source point).

    Both cameras share the focal spot and orientation, so each target pixel's ray meets the source
    image at ``u_s = fx_s (u_t - cx_t) / fx_t + cx_s`` (and likewise for v): an exact axis-aligned
    affine map, no pose change. The image is first area-averaged toward the target's pixel size so
    that shrinking does not alias. Pixels outside the source image become the image's mean.
    """
    sx, sy = target.fx / source.fx, target.fy / source.fy
    img = image.float()
    if sx < 1 or sy < 1:
        h, w = max(1, round(img.shape[0] * min(sy, 1))), max(1, round(img.shape[1] * min(sx, 1)))
        small = F.interpolate(img[None, None], size=(h, w), mode="area")[0, 0]
        source = source.resized(w, h)
        img = small
    grid = target.sampling_grid(source).float()
    fill = img.mean()
    out = F.grid_sample(
        (img - fill)[None, None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out[0, 0] + fill
