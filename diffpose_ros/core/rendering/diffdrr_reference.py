"""DiffDRR 0.6.1 as an independent reference renderer, mapped onto the geometry contract.

Used by tests (the proof that our conventions are right), benchmarks (the speed peer) and
``diffpose-evaluate --renderer diffdrr`` (views from another renderer's physics). DiffDRR is a
test/evaluation dependency, imported only here and only when used.

The verified mapping (geometry contract): read the CT with ``orientation=None,
center_volume=False`` so DiffDRR's world is the NIfTI RAS world; ``F = diag(-1, -1, 1, 1)`` maps
``ct`` (LPS) into it; DiffDRR's camera is ours turned 180 degrees about z, so the pose passed is
``F T_ct_source F``; detector offsets ``x0 = dx (cx - (W/2 - 0.5))``, ``y0 = dy (cy - (H/2 - 0.5))``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffpose_ros.core.geometry.camera import Intrinsics

from .volume import Volume

__all__ = ["DiffDRRReference"]

_FLIP = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))


class DiffDRRReference:
    """DiffDRR renders of the CT at ``ct_path``.

    ``mu``: render this attenuation volume (same grid as the file; 1/mm) instead of DiffDRR's own
    HU-to-density map; ``sdd_mm``: the source-to-detector distance DiffDRR needs (it derives pixel
    size from it); ``renderer``: ``siddon`` or ``trilinear``; ``device``: torch device.
    """

    def __init__(
        self,
        ct_path: str | Path,
        mu: Volume | None = None,
        sdd_mm: float = 1020.0,
        renderer: str = "siddon",
        device=None,
    ):
        try:
            from diffdrr.data import read
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "DiffDRR is needed for reference renders: pip install --no-deps diffdrr==0.6.1 "
                "and -r requirements/diffdrr.txt"
            ) from err
        self.subject = read(str(ct_path), orientation=None, center_volume=False)
        self.mu = mu
        self.sdd = float(sdd_mm)
        self.renderer = renderer
        self.device = torch.device(device or "cpu")
        self._drrs: dict[Intrinsics, torch.nn.Module] = {}

    def module(self, k: Intrinsics) -> torch.nn.Module:
        """The ``diffdrr.drr.DRR`` module for intrinsics ``k`` (built once per intrinsics)."""
        if k not in self._drrs:
            from diffdrr.drr import DRR

            dx, dy = self.sdd / k.fx, self.sdd / k.fy
            drr = DRR(
                self.subject,
                sdd=self.sdd,
                height=k.height,
                width=k.width,
                delx=dx,
                dely=dy,
                x0=dx * (k.cx - (k.width / 2 - 0.5)),
                y0=dy * (k.cy - (k.height / 2 - 0.5)),
                reverse_x_axis=True,
                renderer=self.renderer,
            )
            if self.mu is not None:
                drr.density = self.mu.data.permute(2, 1, 0).contiguous()
            self._drrs[k] = drr.to(self.device)
        return self._drrs[k]

    @staticmethod
    def pose(T_ct_source: torch.Tensor):
        """``diffdrr.pose.RigidTransform`` for ``T_ct_source`` ``(4, 4)`` or ``(B, 4, 4)`` (mm)."""
        from diffdrr.pose import RigidTransform

        T = T_ct_source if T_ct_source.dim() == 3 else T_ct_source[None]
        return RigidTransform((_FLIP.to(T) @ T @ _FLIP.to(T)).float())

    def render(self, T_ct_source: torch.Tensor, k: Intrinsics) -> torch.Tensor:
        """DiffDRR images ``(B, H, W)`` (or ``(H, W)`` for one pose) in our pixel layout."""
        single = T_ct_source.dim() == 2
        T = T_ct_source.to(self.device)
        out = self.module(k)(self.pose(T))[:, 0]
        return out[0] if single else out

    def render_like(self, T_ct_source: torch.Tensor, k: Intrinsics, ours: torch.Tensor) -> torch.Tensor:
        """A DiffDRR image of one pose ``(H, W)`` with its own contrast (HU-to-density map, Siddon)
        scaled so that its mean line integral is that of ``ours`` (our DRR of the same view): the
        same exposure, another renderer's physics."""
        with torch.no_grad():
            theirs = self.render(T_ct_source, k).cpu().double()
        return (theirs * (ours.double().mean() / theirs.mean())).float()
