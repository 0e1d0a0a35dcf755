"""Registration costs: what the refinement minimises and what its gate reads, chosen by name.

Every cost is least squares: residuals ``r`` whose half squared norm is the cost, with their
``(M, 6)`` Jacobian in ``xi = (rho mm, phi rad)`` carried through from the renderer's per-pixel
Jacobian, so that :class:`~.registrar.Registrar` minimises any of them with the same
Levenberg-Marquardt loop. A cost is built once per pyramid level for one target image; its
similarity ``1 - cost`` lies in [-1, 1] (1: identical up to an affine intensity change) and is what
the gate compares with ``min_similarity``.

- ``ncc``: ``w NCC + (1 - w) mean patch NCC`` of the line integrals, the DiffPose-style
  multiscale NCC; ``w`` is ``RegistrationConfig.global_weight`` on levels with patches, else 1.
- ``gradient_ncc``: the mean NCC of the horizontal and vertical Sobel gradients (insensitive to a
  smooth offset across the field, such as scatter or a heel effect).
- ``mixed`` (the default of :class:`~.registrar.RegistrationConfig`): half of each.
- ``gradient_gain`` (a dense level's own cost, :data:`DENSE_COSTS`): the frame's gradients fitted by
  the DRR's times a gain that varies smoothly with the frame's brightness and across the field
  (what scatter and the heel effect do to a gradient).

Masks (``(H, W)`` bool, True = valid pixel) restrict a cost to the pixels they keep: the global
terms standardise and compare kept pixels only, the patch term keeps only patches whose pixels are
all valid, the gradient term only gradients whose 3x3 neighbourhood is.

:class:`PatchCost` is the same cost on a sparse render: ``P`` square patches (the tracking path
renders only those), the whole-image terms taken over the union of the patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .similarity import patches, sobel, standardize, standardize_with_jacobian

__all__ = [
    "COSTS",
    "DENSE_COSTS",
    "Cost",
    "GradientGain",
    "GradientNCC",
    "MaskTooSmall",
    "Mixed",
    "NCC",
    "PatchCost",
    "check_cost",
    "make_cost",
]


class MaskTooSmall(ValueError):
    """A validity mask leaves too few pixels to compare on some level: that frame cannot be registered."""


class Cost:
    """One cost for one target image on one pyramid level (subclasses fill :meth:`residuals`)."""

    name = ""

    def residuals(self, values: torch.Tensor, jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals ``(M,)`` and Jacobian ``(M, 6)`` of the DRR ``values`` ``(H*W,)`` (row-major) with
        per-pixel Jacobian ``jac`` ``(H*W, 6)``; the cost is ``0.5 * r.square().sum()``."""
        raise NotImplementedError

    @staticmethod
    def similarity(cost: float) -> float:
        """Similarity in [-1, 1] of a cost value (``0.5 |r|^2`` in [0, 2])."""
        return 1.0 - cost


def _weighted(values, jac, target_hat, weight):
    """Residuals ``sqrt(w / n) (x_hat - y_hat)`` per group: their half squared sum is ``w (1 - NCC)``."""
    xh, jh = standardize_with_jacobian(values, jac)
    scale = (weight / values.shape[-1]) ** 0.5
    return scale * (xh - target_hat).reshape(-1), scale * jh.reshape(-1, jac.shape[-1])


class NCC(Cost):
    """``w NCC + (1 - w) mean patch NCC`` (``patch``: patch size in pixels, None: global NCC only)."""

    name = "ncc"

    def __init__(self, target: torch.Tensor, mask: torch.Tensor | None, patch: int | None, global_weight: float):
        self.shape = tuple(target.shape)
        self.patch = patch
        self.weight = global_weight if patch else 1.0
        full = mask is None or bool(mask.all())
        self.keep = None if full else mask.flatten().nonzero()[:, 0].to(target.device)
        flat = target.reshape(-1)
        self.target_hat = standardize(flat[None] if self.keep is None else flat[self.keep][None])
        if patch:
            self.keep_patches = None
            if not full:
                whole = patches(mask.to(target.device).float(), patch).amin(-1) > 0
                self.keep_patches = whole.nonzero()[:, 0]
                if self.keep_patches.numel() == 0:
                    raise MaskTooSmall(f"no {patch}x{patch} patch lies wholly inside the validity mask")
            self.patch_hat = standardize(self._patches(target))

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        p = patches(x, self.patch)
        return p if self.keep_patches is None else p[..., self.keep_patches, :]

    def residuals(self, values, jac):
        g_values, g_jac = (values, jac) if self.keep is None else (values[self.keep], jac[self.keep])
        r, J = _weighted(g_values[None], g_jac[None], self.target_hat, self.weight)
        if not self.patch:
            return r, J
        H, W = self.shape
        pv = self._patches(values.reshape(H, W))
        pj = self._patches(jac.reshape(H, W, 6).permute(2, 0, 1)).permute(1, 2, 0)
        # Patch residuals are scaled by the total patch pixel count: the mean over patches of 1 - NCC.
        pr, pJ = _weighted(pv, pj, self.patch_hat, (1 - self.weight) * pv.shape[-1] / pv.numel())
        return torch.cat([r, pr]), torch.cat([J, pJ])


class GradientNCC(Cost):
    """Mean NCC of the horizontal and vertical Sobel gradients (``patch`` and the weight unused)."""

    name = "gradient_ncc"

    def __init__(self, target: torch.Tensor, mask: torch.Tensor | None, patch: int | None, global_weight: float):
        self.shape = tuple(target.shape)
        self.keep = _valid_gradients(mask, target.device)
        self.target_hat = standardize(_kept_gradients(target[None], self.keep))

    def residuals(self, values, jac):
        H, W = self.shape
        gv = _kept_gradients(values.reshape(1, H, W), self.keep)[0]  # (2, n)
        gj = _kept_gradients(jac.reshape(H, W, 6).permute(2, 0, 1), self.keep).permute(1, 2, 0)  # (2, n, 6)
        return _weighted(gv, gj, self.target_hat[0], 0.5)


def _valid_gradients(mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Indices into the flattened Sobel output of the gradients whose whole 3x3 neighbourhood is valid
    (None: all); ``MaskTooSmall`` when fewer than two are."""
    if mask is None or bool(mask.all()):
        return None
    inner = -F.max_pool2d(-mask.to(device).float()[None, None], 3, stride=1)[0, 0] > 0
    keep = inner.flatten().nonzero()[:, 0]
    if keep.numel() < 2:
        raise MaskTooSmall("the validity mask leaves no pixel with a valid 3x3 neighbourhood")
    return keep


def _kept_gradients(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``(C, H, W)`` -> ``(C, 2, n)``: the Sobel gradients of each channel and direction at ``keep``
    (:func:`_valid_gradients`; None: all)."""
    g = sobel(x).flatten(-2)
    return g if keep is None else g[..., keep]


class GradientGain(Cost):
    """The frame's Sobel gradients fitted by least squares by the DRR's times a smooth gain
    ``w = c0 + c1 f + c2 u + c3 v``, plus a constant per direction (``f``: the frame's standardised
    value at the gradient; ``u, v``: its position, -1 to 1), the coefficients solved anew at each
    evaluation (variable projection). Scatter scales a gradient by the local share of primary
    ``P / (P + S)``, least where the body attenuates most, and the heel effect by the position
    along the anode axis; this gain absorbs both, which one NCC over the whole field cannot.

    Residuals ``sqrt(1 / (2 n)) (y - G c)`` over the ``2 n`` valid gradients, ``y`` the frame's
    centred per direction and scaled to unit RMS over both: the cost is ``(1 - R^2) / 2`` and the
    similarity ``R^2``. The Jacobian holds ``c`` and is projected off the fitted columns, so
    ``J^T r`` is the cost's exact gradient. ``patch`` and the weight are unused."""

    name = "gradient_gain"

    def __init__(self, target: torch.Tensor, mask: torch.Tensor | None, patch: int | None, global_weight: float):
        H, W = self.shape = tuple(target.shape)
        self.keep = _valid_gradients(mask, target.device)
        g = _kept_gradients(target[None], self.keep)[0]  # (2, n)
        n = g.shape[-1]
        centred = g - g.mean(-1, keepdim=True)
        self.y = (centred / (centred.square().mean().sqrt() + 1e-12)).reshape(-1).double()  # one scale for both
        v, u = torch.meshgrid(
            torch.linspace(-1, 1, H - 2, dtype=target.dtype, device=target.device),
            torch.linspace(-1, 1, W - 2, dtype=target.dtype, device=target.device),
            indexing="ij",
        )
        columns = torch.stack([target[1:-1, 1:-1], u, v]).flatten(-2)  # the gradient's centre pixel
        if self.keep is not None:
            columns = columns[:, self.keep]
        columns[0] = standardize(columns[0])
        basis = torch.cat([torch.ones_like(columns[:1]), columns]).T.double()  # (n, 4)
        self.basis = torch.cat([basis, basis])  # (2 n, 4): the same gain in both directions
        self.offsets = torch.zeros(2 * n, 2, dtype=torch.float64, device=target.device)
        self.offsets[:n, 0] = self.offsets[n:, 1] = 1.0
        self.scale = (0.5 / n) ** 0.5

    @staticmethod
    def similarity(cost: float) -> float:
        """``R^2`` in [0, 1] of a cost value ``(1 - R^2) / 2`` (not the [-1, 1] scale of :data:`COSTS`)."""
        return 1.0 - 2.0 * cost

    def residuals(self, values, jac):
        H, W = self.shape
        gv = _kept_gradients(values.reshape(1, H, W), self.keep)[0].reshape(-1).double()  # (2 n,)
        gj = _kept_gradients(jac.reshape(H, W, 6).permute(2, 0, 1), self.keep)  # (6, 2, n)
        gj = gj.permute(1, 2, 0).reshape(-1, 6).double()
        size = gv.square().mean().sqrt() + 1e-12  # the fit's columns at unit scale
        gv, gj = gv / size, gj / size
        G = torch.cat([self.basis * gv[:, None], self.offsets], 1)  # (2 n, 6)
        normal = G.T @ G + 1e-9 * torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
        c = torch.linalg.solve(normal, G.T @ self.y)
        r = self.y - G @ c
        moved = (self.basis @ c[: self.basis.shape[1]])[:, None] * gj  # d(G c) at fixed c
        J = G @ torch.linalg.solve(normal, G.T @ moved) - moved
        return (self.scale * r).to(values.dtype), (self.scale * J).to(values.dtype)


class Mixed(Cost):
    """Half ``ncc`` (on the levels with patches, its global and patch terms) and half
    ``gradient_ncc``: the intensity terms keep a wide basin, the gradient term ignores smooth haze."""

    name = "mixed"

    def __init__(self, target: torch.Tensor, mask: torch.Tensor | None, patch: int | None, global_weight: float):
        self.parts = (NCC(target, mask, patch, global_weight), GradientNCC(target, mask, patch, global_weight))

    def residuals(self, values, jac):
        out = [part.residuals(values, jac) for part in self.parts]
        scale = 0.5**0.5
        return torch.cat([scale * r for r, _ in out]), torch.cat([scale * J for _, J in out])


COSTS: dict[str, type[Cost]] = {cls.name: cls for cls in (NCC, GradientNCC, Mixed)}
"""The registration costs by name: each compares whole images and sparse patches (:class:`PatchCost`)."""

DENSE_COSTS: dict[str, type[Cost]] = {**COSTS, GradientGain.name: GradientGain}
"""The costs a dense pyramid level may name (:attr:`~.levels.Level.cost`): :data:`COSTS` and
``gradient_gain``."""


def check_cost(name: str, dense: bool = False) -> str:
    """``name`` when it names one of :data:`COSTS` (with ``dense``, of :data:`DENSE_COSTS`);
    ``ValueError`` otherwise."""
    known = DENSE_COSTS if dense else COSTS
    if name not in known:
        raise ValueError(f"unknown registration cost {name!r}: one of {', '.join(known)}")
    return name


def make_cost(
    name: str, target: torch.Tensor, mask: torch.Tensor | None, patch: int | None, global_weight: float
) -> Cost:
    """The cost ``name`` (one of :data:`DENSE_COSTS`) for ``target`` ``(H, W)`` (and its validity
    ``mask``); ``ValueError`` for an unknown name."""
    return DENSE_COSTS[check_cost(name, dense=True)](target, mask, patch, global_weight)


class PatchCost(Cost):
    """The cost ``name`` on ``P`` square patches of side ``s`` (a sparse render in
    :func:`~diffpose_ros.core.rendering.renderer.patch_pixels` order): ``ncc`` is ``w`` NCC over all
    patch pixels plus ``1 - w`` mean patch NCC, ``gradient_ncc`` the NCC of the Sobel gradients
    inside the patches, ``mixed`` half of each, as on a whole image. ``target``: ``(P, s, s)``.
    """

    def __init__(self, name: str, target: torch.Tensor, global_weight: float):
        self.name = check_cost(name)
        self.shape = tuple(target.shape)
        intensity, gradient = name in ("ncc", "mixed"), name in ("gradient_ncc", "mixed")
        share = 0.5 if intensity and gradient else 1.0
        # (weight, groups): groups maps (P, s, s, C) to (G, n, C), each row one standardised group.
        self.terms = []
        if intensity:
            self.terms.append((share * global_weight, lambda x: x.reshape(1, -1, x.shape[-1])))
            self.terms.append((share * (1 - global_weight), lambda x: x.flatten(1, 2)))
        if gradient:
            self.terms.append((share, self._gradients))
        self.targets = [standardize(groups(target[..., None])[..., 0]) for _, groups in self.terms]

    @staticmethod
    def _gradients(x: torch.Tensor) -> torch.Tensor:
        """``(P, s, s, C)`` -> ``(2, P * (s - 2)^2, C)``: horizontal and vertical Sobel values."""
        g = sobel(x.permute(3, 0, 1, 2))  # (C, P, 2, s - 2, s - 2)
        return g.permute(2, 1, 3, 4, 0).flatten(1, 3)

    def residuals(self, values, jac):
        x = torch.cat([values[:, None], jac], -1).reshape(*self.shape, 7)
        rs, Js = [], []
        for (weight, groups), target_hat in zip(self.terms, self.targets):
            g = groups(x)
            # The term's weight is shared out over its groups: the mean of their (1 - NCC).
            r, J = _weighted(g[..., 0], g[..., 1:], target_hat, weight / g.shape[0])
            rs.append(r)
            Js.append(J)
        return torch.cat(rs), torch.cat(Js)
