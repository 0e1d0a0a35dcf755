"""The patient-specific pose CNN: an X-ray in, ``T_ct_source`` out.

Backbone: a timm model (default ``resnet10t``: a step costs less than with the paper's resnet18, so
more steps fit a CPU's training budget), one input channel, GroupNorm (batch statistics would tie a
prediction to its batch), not pretrained (no weights can be downloaded). Stage widths can be
narrowed (timm ResNets): at 64^2 input the last stage runs on a 2x2 map, where the backward pass of
its 512-channel 3x3 convolution is a large share of the step; the CPU training defaults use 192 and
256 channels in the last two stages (``benchmarks/bench_train_step.py`` compares them;
``docs/performance.md``).
Stem: the model's own, or ``"patch"``: one 4x4 convolution of stride 4 (a lossless linear map of
each 4x4 patch to the stem's width, as in ConvNeXt) in place of a ResNet's convolutions and
max-pool, which at 64^2 input cost more than all the stages after them.
Head: one zero-initialised linear layer with 9 outputs, so an untrained network predicts the
reference pose.

Pose representation (chosen for conditioning, not the se(3) log of the paper):

- rotation: the 6D representation (two columns, Gram-Schmidt; continuous, unlike Euler angles or
  the log map near pi) of a correction ``R_delta`` applied in the source frame,
  ``R_source_ct = R_delta R_ref``;
- translation: the position ``p`` of an anchor point (the CT centre) in the source frame, in units
  of 100 mm around the reference. In-plane position and depth of the anatomy are then separate
  outputs, instead of a translation entangled with the rotation about a far-away source.

``T_source_ct = [R_source_ct | p - R_source_ct anchor]``; the output is its inverse ``T_ct_source``
(mm, contract frames).

:meth:`PoseRegressor.estimate` is the estimate a frame gets: the mean over copies of the image turned
about the principal ray, each an exact view of the same rays (training turns its renders the same
way), which averages out part of the network's error (``docs/performance.md``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import roma
import timm
import torch
from timm.layers import GroupNorm
from torch import nn

from diffpose_ros.core.frames.prepare import sample_filled
from diffpose_ros.core.geometry import se3
from diffpose_ros.core.geometry.camera import Intrinsics

__all__ = ["PoseRegressor", "STEMS", "bfloat16_is_fast"]

_P_SCALE = 100.0  # mm per output unit of the anchor position
STEMS = (None, "patch")
"""Stems a :class:`PoseRegressor` can have: the backbone's own (``None``) or a 4x4 stride-4 patch convolution."""


def bfloat16_is_fast(device: str | torch.device) -> bool:
    """Whether bfloat16 autocast speeds ``device`` up: CUDA with bf16 support, or a CPU whose oneDNN
    has native bfloat16 kernels (AVX-512 BF16/AMX class). Elsewhere bfloat16 is emulated, far slower
    than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


class PoseRegressor(nn.Module):
    """CNN pose regressor for one patient.

    ``reference_pose``: ``T_ct_source`` (4x4, mm) the head's zero output stands for (the centre of
    the training range); ``anchor_ct``: the anchor point (``ct``, mm); ``backbone``: a timm model
    name; ``channels``: widths of its four stages where not the model's own (timm ResNets only);
    ``image_size``: the square input size in pixels (inputs from :meth:`prepare`); ``stem``:
    ``None`` for the model's own, ``"patch"`` for a 4x4 stride-4 convolution (timm ResNets only).
    """

    def __init__(
        self,
        reference_pose: torch.Tensor,
        anchor_ct: torch.Tensor,
        backbone: str = "resnet10t",
        image_size: int = 64,
        channels: tuple[int, ...] | None = None,
        stem: str | None = None,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {list(STEMS)}, got {stem!r}")
        self.backbone_name = backbone
        self.channels = tuple(int(c) for c in channels) if channels else None
        self.stem = stem
        self.image_size = int(image_size)
        # No global pooling: the head sees where features are (the final map is S/32 x S/32), which
        # in-plane position needs; pooling would leave it to padding artefacts.
        widths = {"channels": self.channels} if self.channels else {}
        self.backbone = timm.create_model(
            backbone,
            pretrained=False,
            in_chans=1,
            num_classes=0,
            global_pool="",
            norm_layer=functools.partial(GroupNorm, num_groups=8),
            **widths,
        )
        if stem == "patch":
            net = self.backbone
            if not all(hasattr(net, name) for name in ("conv1", "bn1", "maxpool")):
                raise ValueError(f"the patch stem needs a timm ResNet backbone, not {backbone}")
            width = net.bn1.num_channels
            net.conv1 = nn.Conv2d(1, width, kernel_size=4, stride=4)
            net.bn1 = GroupNorm(width, num_groups=8)
            net.maxpool = nn.Identity()
        cells = math.ceil(self.image_size / 32) ** 2
        self.head = nn.Linear(self.backbone.num_features * cells, 9)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        T_source_ct = se3.inverse(reference_pose.to(torch.float64))
        anchor = anchor_ct.to(torch.float64)
        self.register_buffer("ref_rotation", T_source_ct[:3, :3].float())
        self.register_buffer("ref_anchor_source", (T_source_ct[:3, :3] @ anchor + T_source_ct[:3, 3]).float())
        self.register_buffer("anchor_ct", anchor.float())

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Network input ``(B, 1, S, S)`` from line-integral images ``(B, S, S)``: per-image zero mean, unit std."""
        x = images.float().flatten(1)
        x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
        return x.reshape(images.shape[0], 1, *images.shape[-2:])

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """``T_ct_source`` ``(B, 4, 4)`` (float32, mm) from head outputs ``(B, 9)``."""
        eye = torch.eye(3, 2, dtype=out.dtype, device=out.device)
        R_delta = roma.special_gramschmidt(eye + out[:, :6].reshape(-1, 3, 2))
        R = R_delta @ self.ref_rotation
        p = self.ref_anchor_source + _P_SCALE * out[:, 6:9]
        t = p - R @ self.anchor_ct
        return se3.inverse(se3.make_pose(R, t))

    def forward(self, x: torch.Tensor, mixed_precision: bool = False) -> torch.Tensor:
        """Poses ``T_ct_source`` ``(B, 4, 4)`` for prepared inputs ``(B, 1, S, S)``.

        ``mixed_precision``: run the backbone in bfloat16 autocast (a little faster where the device
        has native bfloat16, far slower where it is emulated: ask :func:`bfloat16_is_fast`); the
        head and the pose decoding stay in float32.
        """
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=mixed_precision):
            features = self.backbone(x)
        return self.decode(self.head(features.float().flatten(1)))

    @torch.no_grad()
    def estimate(self, images: torch.Tensor, camera: Intrinsics, turns_deg: Sequence[float] = (0.0,)) -> torch.Tensor:
        """Poses ``T_ct_source`` ``(B, 4, 4)`` (float64 on the CPU, mm) of line-integral images ``(B, S, S)`` seen by
        ``camera`` (the working camera at ``image_size``): for each image, the mean of the network's
        poses for copies turned by ``turns_deg`` (degrees) about the principal ray, each turned back.

        A camera turned about its focal spot sees the same rays, so each copy is an exact view (pixels
        a turn brings in from outside the image take its mean). Rotations are averaged on SO(3) (the
        chordal mean), source positions in the CT as points. ``(0,)``: the network's pose as it is;
        ``ValueError`` for no turns.
        """
        if not len(turns_deg):
            raise ValueError("estimate needs at least one turn (0 for the image as it is)")
        if tuple(turns_deg) == (0.0,):
            return self(self.prepare(images)).double().cpu()
        angles = torch.deg2rad(torch.as_tensor(turns_deg, dtype=torch.float64))
        zero = torch.zeros_like(angles)
        turns = roma.rotvec_to_rotmat(torch.stack([zero, zero, angles], -1))  # (K, 3, 3): this camera in the frame's
        B, K = images.shape[0], len(angles)
        grid = camera.sampling_grid(camera, turns).float().to(images.device)  # (K, S, S, 2)
        turned = sample_filled(images.float().repeat_interleave(K, 0), grid.repeat(B, 1, 1, 1))
        poses = self(self.prepare(turned)).double().cpu().reshape(B, K, 4, 4)
        back = poses @ se3.make_pose(turns.transpose(-1, -2), torch.zeros(K, 3, dtype=torch.float64))
        rotation = roma.special_procrustes(back[..., :3, :3].mean(1))
        return se3.make_pose(rotation, back[..., :3, 3].mean(1))
