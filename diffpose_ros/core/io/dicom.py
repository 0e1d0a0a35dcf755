"""DICOM X-rays (pydicom): frames, geometry, frame times and what the pixels mean.

:func:`read_dicom` reads one file (single- or multi-frame), :func:`read_dicom_series` a folder of
single-frame files; both give a :class:`DicomXray`.

**Pixels.** The stored values go through the modality LUT (``apply_modality_lut``: Modality LUT
Sequence, or Rescale Slope/Intercept), MONOCHROME1 is inverted to MONOCHROME2 (high value shown
bright), and then the frames are put in the project's *transmission* polarity (high value = little
attenuation, bones dark; :data:`~diffpose_ros.core.frames.prepare.FRAME_KINDS`):

- fluoroscopy and angiography (XA, RF) are shown with bones dark, like a transmission image:
  kept as they are;
- radiographs (DX, CR, and any other modality) are shown with bones bright: inverted.

Inverting maps ``v`` to ``lo + hi - v``, with ``[lo, hi]`` the range the modality LUT gives the
stored range (Bits Stored, Pixel Representation), so a DX MONOCHROME1 file (raw counts shown
inverted) keeps its raw counts. Values are shifted by ``-lo`` when ``lo < 0``, so frames are never
negative. The VOI LUT (window) is a display setting and is not applied. Frames are ``uint8`` or
``uint16`` when the values are integers that fit (so saturation stays visible to
:mod:`~diffpose_ros.core.frames.field`), else ``float32``.

**Geometry** (:attr:`DicomXray.intrinsics`, :mod:`~diffpose_ros.core.geometry.camera`'s pinhole model): SDD is Distance
Source to Detector (0018,1110); the pixel spacing at the detector is Imager Pixel Spacing
(0018,1164), else Pixel Spacing (0028,0030) times Estimated Radiographic Magnification Factor
(0018,1114) when that is given (Pixel Spacing may be calibrated at the patient), else Pixel Spacing.
DICOM spacings are ``[row spacing dy, column spacing dx]``, so ``fx = SDD / dx`` and ``fy = SDD / dy``.
The principal point is the image centre ``((W - 1) / 2, (H - 1) / 2)``: no standard tag of these
IODs places the central ray elsewhere; a calibrated camera-info file must say so when it does.
A round field (Field of View Shape (0018,1147) ``ROUND``, diameter Field of View Dimensions
(0018,1149) in mm at the detector) becomes :attr:`DicomXray.field_radius_px`. Tags are looked up in
the dataset, then in the enhanced IODs' shared and first per-frame functional groups.

**Times** (:attr:`DicomXray.frame_times_s`, seconds from the first frame): Frame Time (0018,1063,
ms per frame), Frame Time Vector (0018,1065, ms increments), Cine Rate (0018,0040) or Recommended
Display Frame Rate (0008,2144), in that order; a series uses each file's acquisition date-time
(Acquisition DateTime, else a date with Acquisition Time or Content Time). Unknown: None.

Errors are ``ValueError`` naming the file: not DICOM, no pixel data, colour, a transfer syntax that
cannot be decoded here (naming it and the package that would decode it), and, from
:meth:`DicomXray.require_intrinsics`, the missing geometry tags.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from diffpose_ros.core.geometry.camera import Intrinsics

__all__ = ["DicomXray", "is_dicom", "read_dicom", "read_dicom_series", "tag_name"]

FLUOROSCOPY_MODALITIES = ("XA", "RF")
"""Modalities displayed with bones dark (transmission polarity); every other one is inverted."""


def tag_name(keyword: str) -> str:
    """``"(gggg,eeee) Keyword"`` of a DICOM keyword."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}" if tag is not None else keyword


@dataclass(frozen=True)
class DicomXray:
    """An X-ray read from DICOM.

    ``frames``: ``(N, H, W)`` in transmission polarity (see the module), non-negative;
    ``intrinsics``: from the tags, None when ``missing_tags`` (``"(gggg,eeee) Keyword"``) lack;
    ``frame_times_s``: ``(N,)`` seconds from the first frame, None when the file gives no timing;
    ``acquired``: date-time of the first frame (None: not given; aware when the file gives its UTC
    offset); ``field_radius_px``: a round field's radius (pixels, centred), None if not given;
    ``sdd_mm`` and ``pixel_spacing_mm`` (``(dx, dy)`` at the detector) as far as the tags give them.
    """

    path: Path
    frames: np.ndarray
    modality: str
    photometric: str
    presentation_intent: str | None
    bits_stored: int
    intrinsics: Intrinsics | None
    missing_tags: tuple[str, ...] = ()
    frame_times_s: np.ndarray | None = None
    acquired: dt.datetime | None = None
    field_radius_px: float | None = None
    sdd_mm: float | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    instance_number: int | None = None

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    def require_intrinsics(self) -> Intrinsics:
        """:attr:`intrinsics`, or ``ValueError`` naming the missing geometry tags."""
        if self.intrinsics is None:
            raise ValueError(
                f"{self.path}: the DICOM file gives no imaging geometry; missing or invalid: "
                + ", ".join(self.missing_tags)
                + ". Give the camera with --camera-info CAM.yaml"
            )
        return self.intrinsics


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a file with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_dicom(path: str | Path) -> DicomXray:
    """The X-ray in the DICOM file ``path`` (single- or multi-frame; see the module)."""
    path = Path(path)
    ds = _open(path)
    frames = _decode(ds, path)
    return _xray(ds, path, frames, _frame_times(ds, frames.shape[0]))


def read_dicom_series(folder: str | Path) -> DicomXray:
    """The frames of a folder of single-frame DICOM files as one sequence (files named ``DICOMDIR``
    and starting with ``.`` are skipped). Order: acquisition date-time when every file has one,
    else Instance Number (0020,0013), then the file name. Every file must be single-frame, of the
    same size and the same geometry."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "DICOMDIR" and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no DICOM files in the folder")
    items = [read_dicom(p) for p in files]
    for x in items:
        if x.frame_count != 1:
            raise ValueError(f"{x.path}: a series folder must hold single-frame files; this has {x.frame_count} frames")
    timed = all(x.acquired is not None for x in items)

    def order(x: DicomXray) -> tuple:  # unnumbered files last; the sort is stable: then by file name
        numbered = (x.instance_number is None, x.instance_number or 0)
        return (_utc(x.acquired), *numbered) if timed else numbered

    items.sort(key=order)
    first = items[0]
    for x in items[1:]:
        if x.frames.shape[1:] != first.frames.shape[1:]:
            raise ValueError(
                f"{x.path}: {x.frames.shape[2]}x{x.frames.shape[1]} pixels, but {first.path} has "
                f"{first.frames.shape[2]}x{first.frames.shape[1]}; a series must have one size"
            )
        if x.intrinsics != first.intrinsics:
            raise ValueError(
                f"{x.path}: its geometry differs from {first.path}'s ({x.intrinsics} vs "
                f"{first.intrinsics}); a series must have one camera"
            )
    frames = np.stack([x.frames[0] for x in items]).astype(np.result_type(*[x.frames.dtype for x in items]))
    times = np.array([(_utc(x.acquired) - _utc(first.acquired)).total_seconds() for x in items]) if timed else None
    return replace(first, path=folder, frames=frames, frame_times_s=times)


# ------------------------------------------------------------------------------------------ reading
def _open(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise FileNotFoundError(f"DICOM file not found: {path}")
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable DICOM file: {err}") from err


def _decode(ds, path: Path) -> np.ndarray:
    """``(N, H, W)`` frames in transmission polarity (see the module)."""
    from pydicom.pixels import apply_modality_lut, get_decoder
    from pydicom.uid import UID

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError(f"{path}: no pixel data: {tag_name('PixelData')} is absent; the DICOM file is not an image")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ValueError(
            f"{path}: {samples} samples per pixel ({ds.get('PhotometricInterpretation', '?')}); "
            "an X-ray must be single-channel (MONOCHROME1 or MONOCHROME2)"
        )
    meta = getattr(ds, "file_meta", None)
    syntax = UID(meta.get("TransferSyntaxUID", "") if meta is not None else "")
    what = f"{syntax.name} ({syntax})" if syntax else "an unknown transfer syntax"
    if syntax and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ValueError(
                f"{path}: cannot decode the pixel data: no decoder exists in pydicom for {what}; "
                "convert the file to an uncompressed transfer syntax first (e.g. gdcmconv --raw, or ffmpeg for video)"
            ) from None
        if not decoder.is_available:
            raise ValueError(
                f"{path}: cannot decode the pixel data: {what} needs a decoder that is not installed here; "
                f"install one of: {'; '.join(decoder.missing_dependencies)}"
            )
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as err:  # decoders raise anything: report the syntax and the reason
        reason = " ".join(str(err).split())  # pydicom's messages span lines
        raise ValueError(f"{path}: cannot decode the pixel data ({what}): {reason}") from err
    stored = stored.reshape(int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
    lut = _modality_lut_dataset(ds)
    lo, hi, integral = _lut_range(ds, lut, stored, apply_modality_lut)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    inverted = (photometric == "MONOCHROME1") != (_modality(ds) not in FLUOROSCOPY_MODALITIES)
    shift = -lo if lo < 0 else 0.0
    top = hi + shift
    dtype = (np.uint8 if top <= 255 else np.uint16) if integral and top <= 65535 else np.float32
    out = np.empty(stored.shape, dtype)
    for i, frame in enumerate(stored):  # frame by frame: a long cine stays in its stored size
        values = apply_modality_lut(frame, lut).astype(np.float64)
        out[i] = (lo + hi - values if inverted else values) + shift
    return out


def _modality_lut_dataset(ds):
    """A dataset with the modality LUT of ``ds``: its own, else an enhanced IOD's Pixel Value
    Transformation Sequence (shared, else the first frame's)."""
    from pydicom.dataset import Dataset

    if "ModalityLUTSequence" in ds or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return ds
    out = Dataset()
    for item in _functional_items(ds):
        if "PixelValueTransformationSequence" in item and item.PixelValueTransformationSequence:
            t = item.PixelValueTransformationSequence[0]
            if "RescaleSlope" in t and "RescaleIntercept" in t:
                out.RescaleSlope, out.RescaleIntercept = t.RescaleSlope, t.RescaleIntercept
                break
    return out


def _lut_range(ds, lut, stored: np.ndarray, apply) -> tuple[float, float, bool]:
    """``(lo, hi, integral)``: the range of the modality LUT's output over the stored range (Bits
    Stored, Pixel Representation, widened to the stored values if they exceed it), and whether all
    its outputs there are integers."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    smin, smax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    smin, smax = min(smin, int(stored.min())), max(smax, int(stored.max()))
    levels = np.arange(smin, smax + 1) if smax - smin <= 1 << 17 else np.array([smin, smax])
    levels = np.asarray(apply(levels, lut), dtype=np.float64)
    return float(levels.min()), float(levels.max()), bool(np.all(levels == np.rint(levels)))


def _xray(ds, path: Path, frames: np.ndarray, times: np.ndarray | None) -> DicomXray:
    intrinsics, missing, sdd, spacing = _geometry(ds, frames.shape[2], frames.shape[1])
    intent = _first(ds, "PresentationIntentType")
    number = _floats(_first(ds, "InstanceNumber"))
    return DicomXray(
        path,
        frames,
        _modality(ds),
        str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper(),
        str(intent).upper() if intent else None,
        int(ds.get("BitsStored", 8 * frames.dtype.itemsize) or 8 * frames.dtype.itemsize),
        intrinsics,
        missing,
        times,
        _acquired(ds),
        _field_radius(ds, spacing),
        sdd,
        spacing,
        int(number[0]) if number else None,
    )


def _modality(ds) -> str:
    return str(ds.get("Modality", "") or "").upper()


def _functional_items(ds):
    """Items of an enhanced IOD's shared and first per-frame functional groups (their nested items)."""
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(seq)
        if groups:
            for element in groups[0]:
                if element.VR == "SQ":
                    yield from element.value


def _first(ds, keyword: str):
    """The value of ``keyword`` in ``ds``, else in its functional groups; None when absent or empty."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for item in _functional_items(ds):
        if keyword in item and item[keyword].value not in (None, ""):
            return item[keyword].value
    return None


def _floats(value) -> list[float] | None:
    """The numbers of a DICOM value (single or multi-valued); None when absent or not numeric."""
    if value is None:
        return None
    items = value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


def _positive(value, count: int) -> tuple[float, ...] | None:
    """``count`` positive finite numbers from a DICOM value, else None."""
    values = _floats(value)
    if values is None or len(values) != count or not all(np.isfinite(v) and v > 0 for v in values):
        return None
    return tuple(values)


def _geometry(ds, width: int, height: int):
    """``(intrinsics or None, missing tags, sdd_mm, (dx, dy) mm)`` from the tags (see the module)."""
    missing = []
    sdd_value = _first(ds, "DistanceSourceToDetector")
    sdd = _positive(sdd_value, 1)
    if sdd is None:
        missing.append(tag_name("DistanceSourceToDetector") + ("" if sdd_value is None else f" (invalid: {sdd_value})"))
    spacing = _positive(_first(ds, "ImagerPixelSpacing"), 2)
    if spacing is None:
        spacing = _positive(_first(ds, "PixelSpacing"), 2)
        magnification = _positive(_first(ds, "EstimatedRadiographicMagnificationFactor"), 1)
        if spacing is not None and magnification is not None:
            spacing = (spacing[0] * magnification[0], spacing[1] * magnification[0])
    if spacing is None:
        missing.append(f"{tag_name('ImagerPixelSpacing')} (or {tag_name('PixelSpacing')})")
    if missing:
        return None, tuple(missing), sdd and sdd[0], spacing and (spacing[1], spacing[0])
    dy, dx = spacing  # DICOM: [row spacing, column spacing]
    return Intrinsics.from_detector(sdd[0], width, height, (dx, dy)), (), sdd[0], (dx, dy)


def _field_radius(ds, spacing: tuple[float, float] | None) -> float | None:
    shape = str(_first(ds, "FieldOfViewShape") or "").upper()
    dims = _first(ds, "FieldOfViewDimensions")
    if shape != "ROUND" or dims is None or spacing is None:
        return None
    values = _floats(dims)  # ROUND: one value, the diameter (mm)
    if not values or not np.isfinite(values[0]) or values[0] <= 0:
        return None
    return values[0] / 2 / ((spacing[0] + spacing[1]) / 2)


def _frame_times(ds, n: int) -> np.ndarray | None:
    index = np.arange(n, dtype=np.float64)
    frame_time = _positive(_first(ds, "FrameTime"), 1)
    if frame_time is not None:
        return index * frame_time[0] / 1000
    vector = _first(ds, "FrameTimeVector")
    if vector is not None:
        increments = np.asarray(_floats(vector) or [], dtype=np.float64)
        if increments.shape == (n,) and np.all(increments[1:] > 0):
            return np.cumsum(np.concatenate([[0.0], increments[1:]])) / 1000
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _positive(_first(ds, keyword), 1)
        if rate is not None:
            return index / rate[0]
    return np.zeros(1) if n == 1 else None


def _acquired(ds) -> dt.datetime | None:
    """Date-time of the (first) frame: Acquisition DateTime, else a date (Acquisition, Content,
    Series, Study) with Acquisition Time or Content Time; None when not given or unreadable."""
    from pydicom.valuerep import DA, DT, TM

    try:
        value = _first(ds, "AcquisitionDateTime")
        when = DT(value) if value else None
        if when is None:
            date = next(
                (ds.get(k) for k in ("AcquisitionDate", "ContentDate", "SeriesDate", "StudyDate") if ds.get(k)), None
            )
            time = next((ds.get(k) for k in ("AcquisitionTime", "ContentTime") if ds.get(k)), None)
            if not date or not time:
                return None
            when = dt.datetime.combine(DA(date), TM(time))
    except (ValueError, TypeError):
        return None
    offset = ds.get("TimezoneOffsetFromUTC")
    if when.tzinfo is None and offset:
        try:
            sign = -1 if str(offset).startswith("-") else 1
            hours, minutes = int(str(offset)[1:3]), int(str(offset)[3:5])
            when = when.replace(tzinfo=dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes)))
        except (ValueError, IndexError):
            pass
    return dt.datetime(*when.timetuple()[:6], when.microsecond, tzinfo=when.tzinfo)


def _utc(when: dt.datetime) -> dt.datetime:
    """``when`` as a naive UTC date-time (naive values are taken as UTC)."""
    return when.astimezone(dt.timezone.utc).replace(tzinfo=None) if when.tzinfo else when
