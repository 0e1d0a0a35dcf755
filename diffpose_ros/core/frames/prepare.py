"""From a device frame to what the CNN and the renderer compare: line integrals on the detector grid.

:func:`prepare_frame` is the one step every caller uses (the node, the command-line tools, the bag
scorer, the evaluation): a device frame (pixels and their kind) with the intrinsics the device gave
for it becomes a :class:`Frame` of line integrals, the intrinsics of those pixels and a per-pixel
validity mask (:mod:`.field`: round field or blades, burned-in text, saturation), un-mirrored
together when the device mirrors its image.

A fluoroscopy frame is a transmission image, roughly ``I = gain * I0 * exp(-L)`` plus quantum noise,
with ``L`` the line integral of attenuation (what a DRR renders). Taking ``-log`` makes it linear
in ``L`` up to an unknown offset (``log(gain * I0)``), which NCC ignores; we still estimate ``I0``
from the brightest pixels so that values are comparable across frames (unexposed detector ~ 0).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffpose_ros.core.geometry.camera import Intrinsics

from .field import FieldSpec, validity_mask

__all__ = [
    "FRAME_KINDS",
    "Frame",
    "check_image",
    "line_integrals_from_transmission",
    "prepare_frame",
    "resample_image",
    "resample_mask",
    "sample_filled",
    "warp_to_camera",
]

FRAME_KINDS = ("transmission", "line_integrals")
"""What a frame's pixels hold: a transmission image of any bit depth (detector counts, bright =
little attenuation) or line integrals (float, e.g. a DRR; bright = much attenuation)."""


@dataclass(frozen=True)
class Frame:
    """One frame ready for registration.

    ``image``: ``(H, W)`` float32 line integrals (dimensionless, CPU); ``intrinsics``: the camera of
    those pixels (after un-mirroring); ``mask``: ``(H, W)`` bool, True where a pixel may be compared
    with a DRR (:func:`~.field.validity_mask`: inside the field, no burned-in text, not saturated);
    ``prepare_seconds``: how long :func:`prepare_frame` took (the pipeline's ``preprocess`` time).
    """

    image: torch.Tensor
    intrinsics: Intrinsics
    mask: torch.Tensor
    prepare_seconds: float = 0.0

    def __post_init__(self) -> None:
        size = (self.intrinsics.height, self.intrinsics.width)
        if tuple(self.image.shape) != size:
            raise ValueError(
                f"image is {self.image.shape[-1]}x{self.image.shape[0]} but the intrinsics say "
                f"{self.intrinsics.width}x{self.intrinsics.height}"
            )
        if tuple(self.mask.shape) != size or self.mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {size}, got {self.mask.dtype} {tuple(self.mask.shape)}"
            )
        if not bool(self.mask.any()):
            raise ValueError("the validity mask selects no pixel: nothing to register")

    @property
    def valid_fraction(self) -> float:
        """Share of the pixels that the mask keeps (0-1)."""
        return float(self.mask.float().mean())


def prepare_frame(
    pixels: np.ndarray | torch.Tensor,
    kind: str,
    intrinsics: Intrinsics,
    mirror: bool = False,
    field: FieldSpec | None = None,
) -> Frame:
    """A device frame as a :class:`Frame`.

    ``pixels``: ``(H, W)`` as the device delivered them; ``kind``: one of :data:`FRAME_KINDS`;
    ``intrinsics``: the camera of the delivered pixels (camera_info or calibration file);
    ``mirror``: the device shows the image left-right flipped (as seen from the detector side), so
    the pixels are flipped back and the intrinsics with them (``cx -> W - 1 - cx``); ``field``: how
    the validity mask is found (:mod:`.field`; default: detected in transmission frames, a given
    round field in either kind, every pixel of a line-integral frame otherwise).
    ``ValueError`` naming the problem for an unknown kind, an image that cannot be registered
    (see :func:`check_image`), a negative transmission image, or a size that the intrinsics do not
    describe.
    """
    start = time.perf_counter()
    if kind not in FRAME_KINDS:
        raise ValueError(f"unknown frame kind {kind!r}: one of {', '.join(FRAME_KINDS)}")
    if kind == "transmission":
        image = line_integrals_from_transmission(pixels)
    else:
        image = check_image(pixels, "line-integral image")
    spec = field or FieldSpec()
    if kind == "line_integrals":
        spec = dataclasses.replace(spec, auto=False)
    mask = torch.from_numpy(validity_mask(np.asarray(pixels), spec))
    if mirror:
        image, intrinsics, mask = image.flip(-1), intrinsics.mirrored(), mask.flip(-1)
    return Frame(image.contiguous(), intrinsics, mask, time.perf_counter() - start)


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


def line_integrals_from_transmission(image: np.ndarray | torch.Tensor, i0_percentile: float = 99.9) -> torch.Tensor:
    """Line integrals ``log(I0) - log(I)`` (dimensionless, >= 0) of a transmission frame (any scale).

    ``I0`` is the ``i0_percentile`` percentile of the frame (the unattenuated detector level).
    """
    frame = check_image(image, "transmission image")
    if float(frame.min()) < 0:
        raise ValueError("a transmission image cannot be negative; pass line integrals as float .npy instead")
    positive = frame[frame > 0]
    if positive.numel() == 0:
        raise ValueError("transmission image is all zero")
    floor = float(positive.min())
    i0 = float(torch.quantile(positive.flatten()[:: max(1, positive.numel() // 200_000)], i0_percentile / 100))
    return (torch.log(torch.tensor(i0)) - torch.log(frame.clamp(min=floor))).clamp(min=0)


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
    return sample_filled(img[None], target.sampling_grid(source).float()[None])[0]


def sample_filled(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Images ``(B, H, W)`` sampled bilinearly at ``grid`` ``(B, h, w, 2)`` (``grid_sample``'s
    coordinates, ``align_corners=False``): ``(B, h, w)``; points outside an image take its mean."""
    fill = images.flatten(1).mean(1)[:, None, None]
    out = F.grid_sample((images - fill)[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0] + fill


def resample_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Area-average (or bilinear, when enlarging) an ``(H, W)`` image to ``height x width``."""
    if image.shape == (height, width):
        return image
    mode = "area" if width <= image.shape[-1] else "bilinear"
    return F.interpolate(image[None, None].float(), size=(height, width), mode=mode)[0, 0]


def resample_mask(mask: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """An ``(H, W)`` bool mask on a ``height x width`` grid: a pixel stays valid only if everything it
    is resampled from is valid (so the valid region never grows)."""
    if mask.shape == (height, width):
        return mask
    return resample_image(mask.float(), width, height) > 1 - 1e-6
