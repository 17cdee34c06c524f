"""Write small DICOM files from arrays, for tests."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
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


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric="MONOCHROME2",
    bits_stored=12,
    window=None,
    rescale=None,
    voi_lut=None,
    frames: int = 1,
    edit: Callable[[Dataset], None] | None = None,
) -> Path:
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
    if edit is not None:
        edit(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- malformed headers, as found in the wild


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """An element written as these bytes: pydicom refuses to make a malformed number from a value, so it is given raw."""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _lut(descriptor: list[int] | None, data: list[int] | None) -> Dataset:
    """A LUT item (VOI or Modality), with its LUTDescriptor and LUTData where given."""
    item = Dataset()
    if descriptor is not None:
        item.LUTDescriptor = descriptor
    if data is not None:
        item.add_new((0x0028, 0x3006), "US", data)  # LUTData
    return item


def _frames_not_a_number(ds):
    _raw(ds, 0x00280008, "IS", b"x ")  # NumberOfFrames "x"


def _window_not_a_number(ds):
    _raw(ds, 0x00281050, "DS", b"abcd")  # WindowCenter "abcd"
    ds.WindowWidth = 400


def _voi_lut_without_descriptor(ds):
    ds.VOILUTSequence = [_lut(None, list(range(4096)))]


def _voi_lut_of_two_entries(ds):
    ds.VOILUTSequence = [_lut([4096, 0, 16], [0, 65535])]  # 4,096 entries declared, 2 given


def _voi_lut_of_zero_bits(ds):
    ds.VOILUTSequence = [_lut([4096, 0, 0], list(range(4096)))]


def _modality_lut_without_data(ds):
    ds.ModalityLUTSequence = [_lut([4096, 0, 16], None)]
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"


# file name -> (the edit, the part of the header the reader's message names)
MALFORMED_HEADERS = {
    "frames_x.dcm": (_frames_not_a_number, "header"),
    "window_abcd.dcm": (_window_not_a_number, "VOI LUT or window"),
    "voi_lut_no_descriptor.dcm": (_voi_lut_without_descriptor, "VOI LUT or window"),
    "voi_lut_two_entries.dcm": (_voi_lut_of_two_entries, "VOI LUT or window"),
    "voi_lut_zero_bits.dcm": (_voi_lut_of_zero_bits, "VOI LUT or window"),
    "modality_lut_no_data.dcm": (_modality_lut_without_data, "Modality LUT or rescale"),
}


def write_malformed_dicoms(folder: Path) -> dict[str, Path]:
    """One small, otherwise valid radiograph DICOM per entry of :data:`MALFORMED_HEADERS`, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(64 * 64).reshape(64, 64) % 4096
    return {name: write_dicom(folder / name, ramp, edit=edit) for name, (edit, _) in MALFORMED_HEADERS.items()}


def write_rle_dicom(path: Path, rows: int, cols: int, *, bits_stored: int = 12) -> Path:
    """A large, highly compressible RLE Lossless DICOM (each row one value, a vertical ramp).

    The shape of a decompression-bomb-sized upload: ``rows * cols`` pixels from a
    file of about ``rows * cols / 64`` bytes (PackBits runs of 128, two byte planes).
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

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
