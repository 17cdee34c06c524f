import io
import warnings

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data.decode import read_image, resize_image
from pneumoscope.errors import ImageReadError


def _save(tmp_path, name, img: Image.Image, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_grayscale_jpeg_is_float_in_unit_range(tmp_path):
    arr = np.tile(np.arange(256, dtype=np.uint8), (16, 1))
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(arr)))
    assert out.dtype == np.float32 and out.shape == (16, 256)
    assert out.min() == 0.0 and out.max() == 1.0


def test_rgba_drops_alpha_and_matches_gray(tmp_path):
    gray = np.full((20, 30), 128, np.uint8)
    rgba = np.dstack([gray, gray, gray, np.zeros_like(gray)])
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    np.testing.assert_allclose(out, 128 / 255, atol=1e-6)


def test_cmyk_is_converted(tmp_path):
    img = Image.new("CMYK", (10, 12), (0, 0, 0, 0))  # white
    out = read_image(_save(tmp_path, "a.jpeg", img))
    assert out.shape == (12, 10) and out.mean() > 0.95


def test_16bit_png_scaled_by_bit_depth(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(arr)))
    np.testing.assert_allclose(out, [[0, 32768 / 65535, 1]], atol=1e-6)


def test_zero_byte_file_names_the_file(tmp_path):
    path = tmp_path / "empty.jpeg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpeg.*empty"):
        read_image(path)


def test_non_image_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpeg"
    path.write_text("this is not a picture")
    with pytest.raises(ImageReadError, match="notes.jpeg.*not a readable image"):
        read_image(path)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpeg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="cut.jpeg.*truncated"):
        read_image(path)


def test_decompression_bomb_over_our_limit(tmp_path):
    path = _save(tmp_path, "big.png", Image.new("L", (300, 300)))
    with pytest.raises(ImageReadError, match="big.png.*decompression bomb"):
        read_image(path, max_pixels=10_000)


def test_decompression_bomb_pillow_limit_is_an_error_not_a_warning(tmp_path):
    # 12,000 x 12,000 1-bit PNG: tiny on disk, 144 MP; Pillow warns above ~89 MP
    path = _save(tmp_path, "bomb.png", Image.new("1", (12_000, 12_000)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError, match="bomb.png.*(too large|decompression bomb)"):
            read_image(path, max_pixels=10**10)


def test_draft_keeps_both_sides_at_least_the_requested_size(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (1500, 1100), dtype=np.uint8)
    path = _save(tmp_path, "large.jpeg", Image.fromarray(arr))
    out = read_image(path, draft_size=224)
    assert min(out.shape) >= 224 and out.shape[0] < 1500


def test_resize_squashes_to_square():
    out = resize_image(np.ones((300, 200), np.float32), 64)
    assert out.shape == (64, 64)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


# --------------------------------------------------------------------------- read_many: the one decode-or-skip loop


def test_read_many_skips_a_corrupt_file_among_good_ones_in_order_losing_nothing(tmp_path, caplog):
    import logging

    from pneumoscope.data.decode import read_many

    rng = np.random.default_rng(0)
    good = [_save(tmp_path, f"{k}.png", Image.fromarray(rng.integers(0, 255, (20 + k, 16), dtype=np.uint8))) for k in range(3)]
    corrupt, empty = tmp_path / "corrupt.png", tmp_path / "empty.png"
    corrupt.write_bytes(b"not a png")
    empty.write_bytes(b"")
    paths = [good[0], corrupt, good[1], empty, good[2]]
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        decoded = read_many(paths, read_image, log=logging.getLogger("pneumoscope.caller"))
    assert decoded.index == [0, 2, 4]
    assert [im.shape for im in decoded.images] == [(20, 16), (21, 16), (22, 16)]  # each image with its own file
    for k, im in zip(decoded.index, decoded.images, strict=True):
        np.testing.assert_array_equal(im, read_image(paths[k]))
    assert decoded.skipped == [
        (str(corrupt), "not a readable image (unknown format or not an image). Remove it or convert it to PNG or JPEG."),
        (str(empty), "file is empty (0 bytes). Re-copy or remove the file."),
    ]
    assert len(decoded.index) + len(decoded.skipped) == len(paths)
    # on the caller's logger, the error's whole message: as predict and explain logged it
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("pneumoscope.caller", "WARNING", f"{path}: {why}") for path, why in decoded.skipped
    ]


def test_read_many_names_items_as_asked_raises_what_is_not_skippable_and_lets_other_errors_through(tmp_path, caplog):
    from pneumoscope.data.decode import read_many, to_image

    items = [np.full((4, 4), 0.5, np.float32), np.full((4, 4), 7, np.int32)]
    decoded = read_many(items, lambda a: to_image(a, "x"), name=lambda a: f"array {a.dtype}")
    assert decoded.index == [0] and decoded.skipped[0][0] == "array int32" and "dtype int32" in decoded.skipped[0][1]
    assert not caplog.records  # no logger given: nothing logged
    with pytest.raises(ImageReadError, match="dtype int32"):
        read_many(items, lambda a: to_image(a, "x"), skippable=lambda a: a.dtype != np.int32)

    def broken(_):
        raise RuntimeError("a bug, not a bad file")

    with pytest.raises(RuntimeError, match="a bug"):
        read_many([tmp_path], broken)


# --------------------------------------------------------------------------- zip members: checked before they are read, read with a bound


def _zip_of(path, members: dict[str, bytes]):
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def one_mib_members(monkeypatch):
    """A 1 MiB bound on a member, so that 5 MB of zeros is a bomb (and the test fast); the bound is read when called."""
    import pneumoscope.data.bounded as bounded

    monkeypatch.setattr(bounded, "MAX_MEMBER_BYTES", 1 << 20)
    return 1 << 20


def test_a_member_declaring_more_than_the_bound_is_refused_before_any_byte_is_read(tmp_path, one_mib_members, monkeypatch):
    import zipfile

    from pneumoscope.data.bounded import read_zip_member

    png = _save(tmp_path, "a.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))).read_bytes()
    archive = _zip_of(tmp_path / "a.zip", {"a.png": png, "bomb.png": bytes(5 << 20)})
    with zipfile.ZipFile(archive) as zf:
        assert read_zip_member(zf, "a.png", "a.zip::a.png") == png
        monkeypatch.setattr(zf, "open", lambda *a, **kw: pytest.fail("the member was opened"))
        with pytest.raises(
            ImageReadError, match=r"a.zip::bomb.png: archive member declares 5,242,880 bytes .* over the limit of 1,048,576"
        ):
            read_zip_member(zf, "bomb.png", "a.zip::bomb.png")


def test_a_member_that_expands_past_the_ratio_is_refused_and_a_small_one_is_not(tmp_path):
    import zipfile

    from pneumoscope.data.bounded import MAX_COMPRESSION_RATIO, MAX_MEMBER_BYTES, MIN_RATIO_CHECKED, read_zip_member

    assert MIN_RATIO_CHECKED < 2 << 20 < MAX_MEMBER_BYTES  # under the size bound: only the ratio refuses it
    archive = _zip_of(tmp_path / "a.zip", {"zeros.png": bytes(2 << 20), "flat.dcm": bytes(64 << 10)})
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("zeros.png").file_size > MAX_COMPRESSION_RATIO * zf.getinfo("zeros.png").compress_size
        with pytest.raises(ImageReadError, match=rf"expands [\d,]+x .* over the limit of {MAX_COMPRESSION_RATIO}x \(possible zip bomb\)"):
            read_zip_member(zf, "zeros.png", "zeros.png")
        assert read_zip_member(zf, "flat.dcm", "flat.dcm") == bytes(64 << 10)  # as compressible, but too small to cost anything
        with pytest.raises(ImageReadError, match="no such member"):
            read_zip_member(zf, "missing.png", "missing.png")


class _LyingArchive:
    """A member declared 100 bytes that yields 5 MB. zipfile itself stops at the declared size (and then fails the
    CRC check); the bound must not depend on that. Counts the bytes handed out."""

    def __init__(self, data: bytes):
        self.data, self.handed_out = data, 0

    def getinfo(self, name):
        import zipfile

        info = zipfile.ZipInfo(name)
        info.file_size = info.compress_size = 100
        return info

    def open(self, info):
        archive = self

        class Member(io.BytesIO):
            def read(self, n=-1):
                out = super().read(n)
                archive.handed_out += len(out)
                return out

        return Member(self.data)


def test_a_member_whose_header_lies_is_cut_off_at_the_bound(one_mib_members):
    from pneumoscope.data.bounded import read_zip_member

    archive = _LyingArchive(bytes(5 << 20))
    with pytest.raises(ImageReadError, match="holds more than 1,048,576 bytes .* although its header declares 100"):
        read_zip_member(archive, "liar.png", "liar.png")
    assert archive.handed_out <= one_mib_members + 1


def test_a_real_member_whose_header_understates_its_size_is_refused_as_damaged(tmp_path):
    import struct
    import zipfile

    from pneumoscope.data.bounded import read_zip_member

    archive = _zip_of(tmp_path / "a.zip", {"x.png": bytes(300_000)})
    raw = bytearray(archive.read_bytes())
    struct.pack_into("<I", raw, raw.rindex(b"PK\x01\x02") + 24, 1000)  # the central directory's uncompressed size
    archive.write_bytes(bytes(raw))
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("x.png").file_size == 1000
        with pytest.raises(ImageReadError, match=r"x.png: cannot be read from the archive \(Bad CRC-32"):
            read_zip_member(zf, "x.png", "a.zip::x.png")


def test_a_masked_array_is_refused_with_the_fix_not_read_through_its_mask():
    """Issue 23 item 11: the API raised numpy's MaskError, not the ValueError its docstring promises."""
    from pneumoscope.data.decode import to_image

    x = np.ma.masked_array(np.full((64, 64), 0.5, np.float32), mask=np.eye(64, dtype=bool))
    with pytest.raises(ValueError, match=r"masked array.*x.filled\(0\)"):
        to_image(x, "scan")


@pytest.mark.parametrize("make", [lambda: np.broadcast_to(np.uint8(0), (8001, 8000)), lambda: Image.new("L", (8000, 8001))])
def test_an_image_given_in_memory_is_bounded_like_a_file(make):
    """Issue 23 item 11: a 400-MP array was accepted (4.35 GB); files and uploads stop at 64 MP."""
    from pneumoscope.data.decode import to_image
    from pneumoscope.errors import ImageReadError

    with pytest.raises(ImageReadError, match=r"8000 x 8001 pixels is over the 64,000,000-pixel limit.*Downscale"):
        to_image(make(), "big")


def _dicom_pydicom_cannot_parse(tmp_path, monkeypatch):
    import pydicom
    from pydicom.errors import InvalidDicomError

    def refuse(*a, **kw):
        raise InvalidDicomError("File is missing DICOM File Meta Information header")

    monkeypatch.setattr(pydicom, "dcmread", refuse)
    return "x.dcm", b"\0" * 132


def _truncated_jpeg_bytes(tmp_path, monkeypatch):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(buf, "JPEG")
    return "cut.jpeg", buf.getvalue()[:2000]


@pytest.mark.parametrize(
    "make,kind",
    [
        (lambda tmp_path, mp: ("notes.png", b"this is not an image"), "unsupported"),
        (lambda tmp_path, mp: ("x.png", b"\x89PNG\r\n\x1a\n" + bytes(50)), "unsupported"),
        (_dicom_pydicom_cannot_parse, "unsupported"),
        (lambda tmp_path, mp: ("empty.jpeg", b""), "damaged"),
        (_truncated_jpeg_bytes, "damaged"),
        (lambda tmp_path, mp: ("x.dcm", b"this is not an image"), "damaged"),  # parsed (force=True), no pixel data
    ],
    ids=["text", "png-magic", "dicom-unparsable", "empty", "truncated-jpeg", "dicom-no-pixels"],
)
def test_an_image_read_error_carries_its_kind_set_where_it_is_raised(make, kind, tmp_path, monkeypatch):
    """Issue 21: serve told not-an-image (415) from a damaged image (422) by matching the message text."""
    name, data = make(tmp_path, monkeypatch)
    with pytest.raises(ImageReadError) as err:
        read_image(name, data)
    assert err.value.kind == kind


def test_an_image_read_error_is_damaged_unless_said_and_refuses_an_unknown_kind():
    from pneumoscope.errors import ERROR_KINDS

    assert ImageReadError("a.png", "r", "f").kind == "damaged" and set(ERROR_KINDS) == {"damaged", "unsupported"}
    with pytest.raises(ValueError, match="kind must be one of"):
        ImageReadError("a.png", "r", "f", kind="broken")
