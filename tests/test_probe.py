"""udfs/ingest/probe.py: the pHash is imagehash.phash's, bit for bit (stored hashes of earlier
ingests are compared with new ones); the colour signature is the 2x2 grid it says; the quick look
for stealth metadata says yes exactly where imgutils' own reader finds it."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from imgutils.metadata import LSBReadError, read_lsb_raw_bytes, write_lsb_raw_bytes
from PIL import Image

from udfs.ingest.probe import ProbeError, colour_signature, dct_phash, probe_image, starts_with_stealth_magic


def imagehash_bits(picture: Image.Image) -> int:
    return int(str(imagehash.phash(picture)), 16)


def pictures_32() -> list[Image.Image]:
    """32x32 grey pictures of every kind the median meets: noise, flat (all 64 values tie),
    two-valued, stripes and gradients (many ties), and real art shrunk as probe shrinks it."""
    rng = np.random.default_rng(7)
    ramp = np.arange(32, dtype=np.uint8) * 8
    arrays = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(200)]
    arrays += [np.full((32, 32), value, np.uint8) for value in (0, 1, 128, 255)]
    arrays += [(rng.integers(0, 2, (32, 32)) * 255).astype(np.uint8) for _ in range(50)]
    arrays += [np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)), np.add.outer(ramp, ramp) // 2,
               np.tile(np.array([0, 255] * 16, np.uint8), (32, 1))]
    art = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).convert("L")
    arrays.append(np.asarray(art.resize((32, 32), Image.Resampling.LANCZOS)))
    return [Image.fromarray(a, "L") for a in arrays]


def test_phash_is_imagehashs():
    for picture in pictures_32():
        assert dct_phash(picture) == imagehash_bits(picture)


def test_probed_phash_is_imagehashs_of_the_reduced_picture():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    for fmt, size in (("PNG", (300, 200)), ("PNG", (1400, 900)), ("JPEG", (1100, 800))):
        image = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, fmt)
        decoded = Image.open(io.BytesIO(out.getvalue()))
        decoded.draft("RGB", (256, 256))  # what probe decodes a JPEG to
        decoded = decoded.convert("L")
        factor = min(decoded.size) // 256
        reduced = decoded.reduce(factor) if factor >= 2 else decoded
        expected = imagehash_bits(reduced.resize((32, 32), Image.Resampling.LANCZOS))
        assert probe_image(out.getvalue(), 10**8)["phash"] == expected, (fmt, size)


def test_colour_signature_is_the_4_bit_mean_of_each_quarter():
    quarters = np.zeros((8, 8, 3), np.uint8)
    quarters[:4, :4] = (255, 0, 0)
    quarters[:4, 4:] = (0, 255, 0)
    quarters[4:, :4] = (0, 0, 255)
    quarters[4:, 4:] = (200, 100, 50)  # 0xC, 0x6, 0x3 in four bits
    rgb = Image.fromarray(quarters, "RGB")
    expected = 0xF00_0F0_00F_C63
    assert colour_signature(rgb) == expected
    assert colour_signature(rgb.convert("RGBA")) == expected  # other modes are converted first
    assert colour_signature(Image.new("L", (8, 8), 255)) == 0xFFF_FFF_FFF_FFF


def imgutils_reads_stealth(image: Image.Image) -> bool:
    try:
        read_lsb_raw_bytes(image)
    except LSBReadError:
        return False
    return True


def test_stealth_magic_is_found_where_imgutils_finds_it():
    rng = np.random.default_rng(11)
    # tall (the magic in one column), short (spread over two or more), too small to hold it
    for size in ((256, 256), (1024, 64), (640, 100), (90, 300), (400, 17), (5, 5), (1, 119)):
        plain = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
        assert not starts_with_stealth_magic(plain) and not imgutils_reads_stealth(plain), size
        if min(size) >= 64 and size[0] >= 256:  # room for imgutils' writer (its error correction's tiles)
            marked = write_lsb_raw_bytes(plain, b'{"prompt": "1girl"}')
            assert starts_with_stealth_magic(marked) and imgutils_reads_stealth(marked), size


def test_a_picture_in_a_mode_pillow_cannot_convert_says_so():
    out = io.BytesIO()
    Image.new("LAB", (40, 40)).save(out, "TIFF")
    with pytest.raises(ProbeError) as refused:
        probe_image(out.getvalue(), 10**8)
    assert refused.value.kind == "unsupported_mode"  # not corrupt_image: the file is whole


@pytest.mark.parametrize("keep", [400, 0.5], ids=["in-its-headers", "in-its-scan"])
def test_a_jpeg_cut_short_is_a_truncated_image(keep):
    """A JPEG cut inside its headers fails with Pillow's "Truncated File Read" (capital T): it was
    called a corrupt_image, as if its bytes were damaged rather than missing."""
    out = io.BytesIO()
    Image.effect_noise((300, 300), 64).convert("RGB").save(out, "JPEG")
    data = out.getvalue()
    with pytest.raises(ProbeError) as refused:
        probe_image(data[: keep if isinstance(keep, int) else int(len(data) * keep)], 10**8)
    assert refused.value.kind == "truncated_image", refused.value


@pytest.mark.parametrize(("mode", "fmt"), [("P", "PNG"), ("P", "GIF"), ("1", "PNG")])
def test_palette_and_one_bit_pictures_of_any_size_are_hashed_as_their_colours(mode, fmt):
    """Image.reduce refuses P and 1 ("image has wrong mode"): every such image of 512 pixels a side
    or more was dropped as corrupt_image. Small ones keep the hashes they had."""
    rng = np.random.default_rng(5)
    colours = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((1200, 900))
    for size in ((400, 300), (1200, 900)):
        picture = colours.resize(size).quantize(32) if mode != "1" else colours.resize(size).convert("1")
        out = io.BytesIO()
        picture.save(out, fmt)
        probed = probe_image(out.getvalue(), 10**8)
        stored = Image.open(io.BytesIO(out.getvalue()))
        assert probed["mode"] == stored.mode and probed["width"] == size[0]
        as_colours = io.BytesIO()
        stored.convert("L" if stored.mode == "1" else "RGB").save(as_colours, "PNG")
        expected = probe_image(as_colours.getvalue(), 10**8)
        assert (probed["phash"], probed["colour"]) == (expected["phash"], expected["colour"]), (mode, size)


def damaged_avif() -> bytes:
    """An AVIF whose coded pixels are zeros: libavif refuses them with a RuntimeError."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(out, "AVIF")
    data = out.getvalue()
    start = data.find(b"mdat") + 4
    return data[:start] + bytes(len(data) - start)


def tiff_with_a_broken_next_ifd() -> bytes:
    """A TIFF whose pointer to a second page points far past its end: Pillow's TiffImagePlugin
    raises TypeError("Missing dimensions")."""
    out = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(out, "TIFF")
    data = bytearray(out.getvalue())
    first = int.from_bytes(data[4:8], "little")
    entries = int.from_bytes(data[first:first + 2], "little")
    data[first + 2 + 12 * entries + 3] = 34  # the next IFD's offset, now 0x22000000
    return bytes(data)


@pytest.mark.parametrize("data", [damaged_avif(), tiff_with_a_broken_next_ifd()], ids=["avif", "tiff"])
def test_every_error_a_decoder_raises_is_a_corrupt_image(data):
    """Errors of other types than OSError / ValueError escaped probe and failed the ingest job
    (Ray retried the unit, then gave up): one bad AVIF or TIFF stopped a run of millions."""
    with pytest.raises(ProbeError) as refused:
        probe_image(data, 10**8)
    assert refused.value.kind == "corrupt_image"
