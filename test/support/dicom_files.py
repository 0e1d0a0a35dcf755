"""Synthetic DICOM X-ray files for the tests (written with pydicom, uncompressed unless told)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SOP_CLASSES = {
    ("XA", None): "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
    ("DX", "FOR PRESENTATION"): "1.2.840.10008.5.1.4.1.1.1.1",
    ("DX", "FOR PROCESSING"): "1.2.840.10008.5.1.4.1.1.1.1.1",
}


def write_dicom(
    path: str | Path,
    frames: np.ndarray,
    modality: str,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    intent: str | None = None,
    tags: dict | None = None,
    transfer_syntax: str | None = None,
) -> Path:
    """Write ``frames`` (``(H, W)`` or ``(N, H, W)`` uint8/uint16) as a DICOM file; ``tags``: keyword ->
    value (e.g. ``DistanceSourceToDetector``, ``ImagerPixelSpacing``, ``FrameTime``), set last. With a
    compressed ``transfer_syntax`` the uncompressed bytes are encapsulated as they are (undecodable)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    frames = np.asarray(frames)
    multi = frames.ndim == 3
    sop_class = SOP_CLASSES.get((modality, intent), SOP_CLASSES[("DX", "FOR PRESENTATION")])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if intent:
        ds.PresentationIntentType = intent
    ds.PatientName, ds.PatientID = "Phantom^Chest", "0"
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 * frames.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if multi:
        ds.NumberOfFrames = frames.shape[0]
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    data = np.ascontiguousarray(frames).tobytes()
    # A compressed syntax gets the raw bytes in one fragment: files that claim a codec they do not hold.
    ds.PixelData = encapsulate([data]) if UID(meta.TransferSyntaxUID).is_compressed else data
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
