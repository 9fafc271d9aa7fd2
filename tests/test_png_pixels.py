"""udfs/png_pixels.py: 8-bit PNGs decoded by libspng give Pillow's pixels, mode and info; every
other file, and every file libspng refuses, is Pillow's to decode (and to report)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from udfs.ingest.probe import ProbeError, image_hashes, probe_image
from udfs.orientation import exif_orientation
from udfs.png_pixels import load_pixels, plain_png_mode


def png_bytes(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **params)
    return out.getvalue()


def picture(mode: str, size: tuple[int, int] = (67, 41)) -> Image.Image:
    rng = np.random.default_rng(len(mode))
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if bands == 1 else pixels, mode)


def pillow_pixels(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def with_chunk_after_pixels(data: bytes, kind: bytes, body: bytes) -> bytes:
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + chunk + data[iend:]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_8bit_pngs_are_decoded_by_libspng_with_pillows_pixels(mode):
    data = png_bytes(picture(mode))
    opened = Image.open(io.BytesIO(data))
    decoded = load_pixels(opened, data)
    assert decoded is not opened  # the libspng path, not Pillow's load
    expected = pillow_pixels(data)
    assert decoded.mode == expected.mode == mode
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_transparency_and_exif_orientation_are_kept():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotated 90 degrees
    data = png_bytes(picture("RGB"), transparency=(1, 2, 3), exif=exif)
    opened = Image.open(io.BytesIO(data))
    decoded = load_pixels(opened, data)
    assert decoded is not opened
    assert decoded.info["transparency"] == (1, 2, 3)
    assert exif_orientation(decoded) == 6


@pytest.mark.parametrize("image", [
    picture("RGB").convert("P", palette=Image.Palette.ADAPTIVE),  # palette
    Image.fromarray(np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 31),  # 16-bit grey
    picture("L").convert("1"),  # 1-bit
    picture("LA"),  # grey + alpha
], ids=["palette", "16-bit", "1-bit", "grey-alpha"])
def test_other_pngs_are_pillows_to_decode(image):
    data = png_bytes(image)
    assert plain_png_mode(data) is None
    opened = Image.open(io.BytesIO(data))
    decoded = load_pixels(opened, data)
    assert decoded is opened
    assert np.array_equal(np.asarray(decoded), np.asarray(pillow_pixels(data)))


def test_animated_png_goes_to_pillow():
    frames = [picture("RGB"), picture("RGB").transpose(Image.Transpose.ROTATE_180)]
    animated = png_bytes(frames[0], save_all=True, append_images=frames[1:])
    assert plain_png_mode(animated) is None


def test_text_and_exif_after_the_pixels_are_read_as_pillow_loads_them():
    """Many tools write tEXt (dates, prompts) or eXIf after the pixel data: such a PNG is still
    libspng's to decode, with the info Pillow's load reads from those chunks (an orientation too)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = png_bytes(picture("RGBA"), pnginfo=_text_before("Software", "x"))
    data = with_chunk_after_pixels(data, b"tEXt", b"parameters\x00a prompt")
    data = with_chunk_after_pixels(data, b"zTXt", b"date:modify\x00\x00" + zlib.compress(b"2024-01-01"))
    data = with_chunk_after_pixels(data, b"tIME", bytes(7))
    data = with_chunk_after_pixels(data, b"eXIf", exif.tobytes())
    opened = Image.open(io.BytesIO(data))
    decoded = load_pixels(opened, data)
    expected = pillow_pixels(data)
    assert decoded is not opened  # the libspng path
    assert decoded.info == expected.info and decoded.info["parameters"] == "a prompt"
    assert exif_orientation(decoded) == exif_orientation(expected) == 6
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))
    for kind in (b"IDAT", b"fdAT", b"prVt"):  # pixels, frames or a chunk Pillow keeps: Pillow's
        assert plain_png_mode(with_chunk_after_pixels(data, kind, b"\0")) is None


def _text_before(key: str, value: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(key, value)
    return info


def test_rows_too_wide_for_pyspng_and_other_buffers_go_to_pillow():
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 600_000_000, 1, 8, 6, 0, 0, 0))
    wide = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    assert plain_png_mode(wide) is None  # 2.4 GB a row: pyspng's stride would overflow
    data = png_bytes(picture("RGB"))
    opened = Image.open(io.BytesIO(data))
    assert load_pixels(opened, bytearray(data)) is opened  # pyspng takes bytes only


def test_broken_pngs_get_pillows_errors():
    data = png_bytes(picture("RGB", (300, 200)))
    truncated = data[: len(data) // 2]
    assert plain_png_mode(truncated) is None
    with pytest.raises(OSError):
        load_pixels(Image.open(io.BytesIO(truncated)), truncated)
    start = data.index(b"IDAT") + 4 + 40  # inside the compressed pixels: whole chunks, IEND present
    corrupt = data[:start] + bytes(200) + data[start + 200:]
    assert plain_png_mode(corrupt) is None  # its CRC does not match: libspng would decode noise
    with pytest.raises(OSError, match="broken data stream"):
        load_pixels(Image.open(io.BytesIO(corrupt)), corrupt)
    with pytest.raises(ProbeError) as caught:
        probe_image(corrupt, 10**8)
    assert caught.value.kind == "corrupt_image"


def test_probe_hashes_equal_pillows():
    for mode in ("RGB", "RGBA", "L", "LA"):  # LA: Pillow's path
        data = png_bytes(picture(mode, (900, 700)))
        row = probe_image(data, 10**8)
        expected = image_hashes(pillow_pixels(data))
        assert (row["phash"], row["detail"], row["colour"]) == (expected["phash"], expected["detail"],
                                                                expected["colour"])
        assert (row["format"], row["mode"], row["width"], row["height"]) == ("PNG", mode, 900, 700)


def test_previews_of_a_turned_png_are_upright():
    """The caption's JPEG and the report's thumbnail decode through load_pixels, then turn the
    picture by its EXIF orientation (kept in the decoded image's info)."""
    from udfs.caption.caption_images import shrink_jpeg
    from udfs.thumbnails import thumbnail_jpeg

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 wide, 40 high; displayed 40 wide, 80 high
    data = png_bytes(picture("RGBA", (80, 40)), exif=exif)
    assert plain_png_mode(data) == "RGBA"
    for preview in (shrink_jpeg(data, 64), thumbnail_jpeg(data, 64)):
        with Image.open(io.BytesIO(preview)) as image:
            assert (image.format, image.size) == ("JPEG", (32, 64))
