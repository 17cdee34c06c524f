"""Write small DICOM files from arrays, for tests."""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def _cr_dataset(rows: int, cols: int, transfer_syntax: str, photometric: str, bits_stored: int) -> Dataset:
    """A grayscale CR image's attributes, without pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    return ds


def write_dicom(path: Path, stored: np.ndarray, *, photometric="MONOCHROME2", bits_stored=12, window=None, rescale=None,
                voi_lut=None, frames: int = 1) -> Path:  # fmt: skip
    stored = np.asarray(stored, dtype=np.uint16)
    ds = _cr_dataset(*stored.shape[-2:], ExplicitVRLittleEndian, photometric, bits_stored)
    if frames > 1:
        ds.NumberOfFrames = frames
        stored = np.stack([stored] * frames)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new((0x0028, 0x3006), "US", [int(v) for v in voi_lut])  # LUTData
        ds.VOILUTSequence = [item]
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rle_dicom(path: Path, rows: int, cols: int, *, bits_stored: int = 12) -> Path:
    """A large, highly compressible RLE Lossless DICOM (each row one value, a vertical ramp).

    The shape of a decompression-bomb-sized upload: ``rows * cols`` pixels from a
    file of about ``rows * cols / 64`` bytes (PackBits runs of 128, two byte planes).
    """
    from pydicom.uid import RLELossless
    from pydicom.encaps import encapsulate

    values = (np.arange(rows) * ((1 << bits_stored) - 1) // max(1, rows - 1)).astype(np.uint16)  # (rows,)
    full, rest = divmod(cols, 128)

    def plane(byte_values: np.ndarray) -> bytes:
        # PackBits per row: `full` replicate runs of 128 (header 0x81) and one shorter run
        row = np.empty((rows, 2 * full + (2 if rest else 0)), np.uint8)
        row[:, 0 : 2 * full : 2] = 0x81
        row[:, 1 : 2 * full : 2] = byte_values[:, None]
        if rest:
            row[:, -2] = (257 - rest) & 0xFF
            row[:, -1] = byte_values
        data = row.tobytes()
        return data + b"\0" * (len(data) % 2)

    hi, lo = plane((values >> 8).astype(np.uint8)), plane((values & 0xFF).astype(np.uint8))
    header = np.zeros(16, "<u4")
    header[0], header[1], header[2] = 2, 64, 64 + len(hi)
    frame = header.tobytes() + hi + lo
    ds = _cr_dataset(rows, cols, RLELossless, "MONOCHROME2", bits_stored)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path
