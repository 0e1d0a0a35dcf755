"""C-arm imaging geometry: pinhole intrinsics and the clinical range of views.

Frames follow the project's geometry contract, ``docs/geometry-contract.md``:

- ``ct``: LPS, millimetres. C-arm source frame: origin at the focal spot, +z along the principal ray
  toward the detector, +x along increasing image column, +y along increasing image row.
- A pixel at (row i, column j) has its centre at (u, v) = (j, i) and takes the value of the single
  ray from the source through that centre; u = fx x / z + cx, v = fy y / z + cy.
- fx = SDD / dx and fy = SDD / dy (pixels); the detector plane is z = SDD (mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from . import se3

__all__ = [
    "Intrinsics",
    "carm_pose",
    "carm_parameters",
    "perturb_pose",
    "BASE_ROTATION",
    "CONTRACT_SDD_MM",
    "CONTRACT_PIXEL_MM",
]

CONTRACT_SDD_MM = 1020.0
"""Source-to-detector distance (mm) of the contract's detector (256 x 256 pixels of 1.2 mm, fx = fy = 850)."""
CONTRACT_PIXEL_MM = 1.2
"""Pixel spacing (mm) of the contract's 256 x 256 detector."""


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of a C-arm image: size in pixels, focal lengths and principal point in pixels."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        for name in ("fx", "fy", "cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"intrinsic {name} is not finite: {getattr(self, name)}")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(
                f"focal lengths must be positive (fx={self.fx}, fy={self.fy}); "
                "K[0] == 0 means the camera is uncalibrated"
            )

    # ----- constructors -----
    @classmethod
    def from_K(cls, K, width: int, height: int) -> Intrinsics:
        """From a row-major 3x3 (or flat 9) camera matrix, as in ``sensor_msgs/CameraInfo.k``."""
        k = [float(x) for x in torch.as_tensor(K, dtype=torch.float64).flatten().tolist()]
        if len(k) != 9:
            raise ValueError(f"camera matrix must have 9 entries, got {len(k)}")
        return cls(int(width), int(height), k[0], k[4], k[2], k[5])

    @classmethod
    def from_detector(
        cls,
        sdd: float,
        width: int,
        height: int,
        pixel_spacing: float | tuple[float, float],
        principal_point: tuple[float, float] | None = None,
    ) -> Intrinsics:
        """From a source-to-detector distance ``sdd`` (mm), detector size (pixels) and pixel spacing (mm).

        ``pixel_spacing`` is ``dx`` or ``(dx, dy)`` at the detector; ``principal_point`` is ``(cx, cy)``
        in pixels, by default the image centre ``((W - 1) / 2, (H - 1) / 2)``.
        """
        dx, dy = (pixel_spacing, pixel_spacing) if isinstance(pixel_spacing, (int, float)) else pixel_spacing
        if sdd <= 0 or dx <= 0 or dy <= 0:
            raise ValueError(f"SDD and pixel spacing must be positive (sdd={sdd}, spacing=({dx}, {dy}))")
        cx, cy = principal_point if principal_point is not None else ((width - 1) / 2, (height - 1) / 2)
        return cls(int(width), int(height), sdd / dx, sdd / dy, float(cx), float(cy))

    @classmethod
    def from_yaml(cls, path: str | Path) -> Intrinsics:
        """Read a ROS camera-calibration YAML (``image_width``, ``image_height``, ``camera_matrix.data``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"camera-info file not found: {path}")
        try:
            doc = yaml.safe_load(path.read_text())
            return cls.from_K(doc["camera_matrix"]["data"], doc["image_width"], doc["image_height"])
        except (KeyError, TypeError, yaml.YAMLError) as err:
            raise ValueError(
                f"{path} is not a camera-calibration YAML with image_width, image_height and camera_matrix.data: {err}"
            ) from err

    def to_yaml(self, path: str | Path, camera_name: str = "carm") -> None:
        """Write the camera-calibration YAML that :meth:`from_yaml` and ``camera_info_manager`` read."""
        doc = {
            "image_width": self.width,
            "image_height": self.height,
            "camera_name": camera_name,
            "camera_matrix": {"rows": 3, "cols": 3, "data": self.K.flatten().tolist()},
            "distortion_model": "plumb_bob",
            "distortion_coefficients": {"rows": 1, "cols": 5, "data": [0.0] * 5},
            "rectification_matrix": {"rows": 3, "cols": 3, "data": torch.eye(3).flatten().tolist()},
            "projection_matrix": {
                "rows": 3,
                "cols": 4,
                "data": torch.cat([self.K, torch.zeros(3, 1, dtype=torch.float64)], 1).flatten().tolist(),
            },
        }
        Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))

    # ----- derived quantities -----
    @property
    def K(self) -> torch.Tensor:
        """3x3 camera matrix (float64, pixels)."""
        return torch.tensor([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=torch.float64)

    def resized(self, width: int, height: int | None = None) -> Intrinsics:
        """The same detector resampled to ``width x height`` pixels (aspect kept when ``height`` is None).

        Pixel edges stay fixed: a pixel-centre coordinate maps as ``u' = (u + 0.5) * W'/W - 0.5``.
        """
        if height is None:
            height = max(1, round(self.height * width / self.width))
        sx, sy = width / self.width, height / self.height
        return replace(
            self,
            width=int(width),
            height=int(height),
            fx=self.fx * sx,
            fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5,
            cy=(self.cy + 0.5) * sy - 0.5,
        )

    def mirrored(self) -> Intrinsics:
        """Intrinsics of the left-right flipped image (column j -> W - 1 - j)."""
        return replace(self, cx=self.width - 1 - self.cx)

    def pixel_grid(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """``(H*W, 2)`` pixel-centre coordinates ``(u, v) = (column, row)``, row-major."""
        v, u = torch.meshgrid(
            torch.arange(self.height, dtype=dtype, device=device),
            torch.arange(self.width, dtype=dtype, device=device),
            indexing="ij",
        )
        return torch.stack([u.flatten(), v.flatten()], dim=-1)

    def rays(self, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Source-frame ray directions ``((u - cx)/fx, (v - cy)/fy, 1)`` for ``(N, 2)`` pixels (u, v).

        The direction has z = 1, so a point at depth z (mm) along the ray is ``z * direction``.
        Default: every pixel, row-major.
        """
        if pixels is None:
            pixels = self.pixel_grid(torch.float64)
        pixels = pixels.to(torch.float64)
        x = (pixels[..., 0] - self.cx) / self.fx
        y = (pixels[..., 1] - self.cy) / self.fy
        return torch.stack([x, y, torch.ones_like(x)], dim=-1)

    def project(self, points_source: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates ``(..., 2)`` (u, v) of ``(..., 3)`` points in the source frame (mm)."""
        z = points_source[..., 2]
        u = self.fx * points_source[..., 0] / z + self.cx
        v = self.fy * points_source[..., 1] / z + self.cy
        return torch.stack([u, v], dim=-1)

    def sampling_grid(self, source: Intrinsics, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """``grid_sample`` grid (``align_corners=False``) that resamples an image of camera ``source``
        into this camera, both with the same focal spot: ``(..., H, W, 2)`` (float64).

        ``rotation`` ``(..., 3, 3)``: this camera's axes in ``source``'s frame (``x_source = R x_this``,
        i.e. ``T_ct_this = T_ct_source [R | 0]``); default identity. A camera turned about its focal
        spot sees the same rays, so the warp is an exact homography: this camera's pixel ``u`` reads
        ``source`` at ``K_source R K^-1 u``.
        """
        # One 3x3 map per rotation, from this camera's rays to source grid coordinates: the pixel
        # ``u = K_source R d``, then ``(2u + 1) / size - 1``.
        w, h = source.width, source.height
        to_grid = (
            torch.tensor([[2 / w, 0.0, 1 / w - 1], [0.0, 2 / h, 1 / h - 1], [0.0, 0.0, 1.0]], dtype=torch.float64)
            @ source.K
        )
        if rotation is not None:
            to_grid = to_grid @ rotation.to(torch.float64)
        q = to_grid @ self.rays().T  # (..., 3, H*W)
        grid = (q[..., :2, :] / q[..., 2:, :]).transpose(-1, -2)
        return grid.reshape(*q.shape[:-2], self.height, self.width, 2)

    def sdd(self, pixel_spacing: float) -> float:
        """Source-to-detector distance (mm) for a detector pixel spacing ``dx`` (mm): ``fx * dx``."""
        return self.fx * pixel_spacing


# Columns: source x, y, z axes in LPS (source anterior, beam anterior -> posterior, rows toward feet).
BASE_ROTATION = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)


def _rot(axis: str, angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    o, i = torch.zeros_like(angle), torch.ones_like(angle)
    rows = {
        "x": [i, o, o, o, c, -s, o, s, c],
        "z": [c, -s, o, s, c, o, o, o, i],
    }[axis]
    return torch.stack(rows, dim=-1).reshape(*angle.shape, 3, 3)


def carm_pose(
    alpha: torch.Tensor | float,
    beta: torch.Tensor | float,
    gamma: torch.Tensor | float,
    sod: torch.Tensor | float,
    isocenter: torch.Tensor,
) -> torch.Tensor:
    """``T_ct_source`` (``(..., 4, 4)``, mm) of a C-arm view in the contract's parameterisation.

    ``T = Trans(isocenter) Rz(alpha) Rx(beta) B Rz(gamma) Trans(0, 0, -sod)`` with angles in radians
    (alpha about the CT's superior z axis, beta about its x axis, gamma in-plane roll about the
    principal ray), ``sod`` the source-to-isocentre distance (mm) and ``isocenter`` ``(..., 3)`` in
    ``ct`` (LPS, mm). Batched over broadcastable leading dimensions; float64 unless tensors say otherwise.
    """
    isocenter = torch.as_tensor(isocenter, dtype=torch.float64)
    dtype, device = isocenter.dtype, isocenter.device
    alpha, beta, gamma, sod = (torch.as_tensor(x, dtype=dtype, device=device) for x in (alpha, beta, gamma, sod))
    shape = torch.broadcast_shapes(alpha.shape, beta.shape, gamma.shape, sod.shape, isocenter.shape[:-1])
    alpha, beta, gamma, sod = (x.expand(shape) for x in (alpha, beta, gamma, sod))
    R = _rot("z", alpha) @ _rot("x", beta) @ BASE_ROTATION.to(dtype=dtype, device=device) @ _rot("z", gamma)
    # Source at -sod along the rotated principal ray from the isocentre.
    t = isocenter.expand(*shape, 3) - sod[..., None] * R[..., :, 2]
    return se3.make_pose(R, t)


def carm_parameters(pose: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """The C-arm parameters ``(..., 7)`` of views ``T_ct_source`` ``(..., 4, 4)`` (mm): alpha, beta,
    gamma (rad), SOD (mm) and the isocentre (``ct``, mm, 3), which :func:`carm_pose` maps back to
    the same poses.

    Of the points on the principal ray, the isocentre is the one nearest ``center`` (``ct``, mm).
    alpha lies in ``(-pi, pi]`` and beta in ``[-pi/2, pi/2]``; at ``beta = +-pi/2`` alpha is arbitrary.
    """
    pose = pose.to(torch.float64)
    R, source = pose[..., :3, :3], pose[..., :3, 3]
    d = R[..., :, 2]  # the principal ray: (-sin(alpha) cos(beta), cos(alpha) cos(beta), sin(beta))
    beta = torch.asin(d[..., 2].clamp(-1.0, 1.0))
    alpha = torch.atan2(-d[..., 0], d[..., 1])
    rest = (_rot("z", alpha) @ _rot("x", beta) @ BASE_ROTATION.to(pose)).transpose(-1, -2) @ R  # Rz(gamma)
    gamma = torch.atan2(rest[..., 1, 0], rest[..., 0, 0])
    sod = ((center.to(pose) - source) * d).sum(-1)
    isocenter = source + sod[..., None] * d
    return torch.cat([torch.stack([alpha, beta, gamma, sod], -1), isocenter], -1)


def perturb_pose(
    pose: torch.Tensor,
    angle_deg: float,
    shift_mm: float,
    center: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``pose`` (``T_ct_source``, mm) rotated by ``angle_deg`` about a random axis through ``center``
    (``ct``, mm) and then shifted by ``shift_mm`` in a random direction of ``ct``."""
    axis = torch.randn(3, generator=generator, dtype=torch.float64)
    direction = torch.randn(3, generator=generator, dtype=torch.float64)
    twist = torch.cat([torch.zeros(3, dtype=torch.float64), axis / axis.norm() * math.radians(angle_deg)])
    eye = torch.eye(3, dtype=torch.float64)
    to_center = se3.make_pose(eye, center.to(torch.float64))
    move = se3.make_pose(eye, direction / direction.norm() * shift_mm)
    return move @ to_center @ se3.exp(twist) @ se3.inverse(to_center) @ pose.to(torch.float64)
