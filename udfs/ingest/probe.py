"""Probe one image: size, format, mode, frames, hashes, and the metadata embedded in it."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading
import warnings

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from udfs.orientation import exif_orientation
from udfs.png_pixels import load_pixels

# The hash needs 32x32 pixels: decoding a JPEG at 1/8 scale (draft mode) still reads and
# checks the whole stream, at a fraction of the cost of a full decode.
PHASH_DRAFT_SIZE = (256, 256)
# Where imgutils' readers look for generation text (imgutils/metadata/geninfo.py: `parameters`,
# the EXIF UserComment, a GIF `comment`; imgutils/sd/nai.py: a PNG `Comment`, and the alpha
# channel's low bits of an RGBA picture). imgutils.sd imports torch (its model module), 1.5 s a
# worker: it is imported only for an image that holds one of these.
TEXT_INFO_KEYS = ("parameters", "comment", "Comment")
# What imgutils' stealth reader (imgutils/metadata/lsb/read.py, ImageLsbDataExtractor) expects
# first in the alpha channel's low bits, read column by column, top to bottom.
STEALTH_MAGIC = b"stealth_pngcomp"


_TEXT_LIMIT_RAISED = threading.Lock()
# What Pillow's plugins raise for bytes they cannot read: OSError and the like, and from some
# more: libavif's RuntimeError ("Decoding of color planes failed"), a TIFF's TypeError ("Missing
# dimensions") or KeyError, index and struct errors of a header that lies. Each is a bad image,
# never the job's failure.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, RuntimeError, TypeError, KeyError, IndexError,
                 struct.error, ZeroDivisionError)


class ProbeError(Exception):
    """A sample that cannot be ingested; `kind` is the errors row's kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def probe_image(data: bytes, max_pixels: int, max_text_chars: int = 20_000) -> dict:
    """The `images` columns of one encoded image, plus its embedded texts under "texts".

    Pillow refuses a PNG whose compressed text chunk inflates past MAX_TEXT_CHUNK (1 MB): such
    a file is probed again with text chunks allowed up to MAX_TEXT_MEMORY (all its text chunks
    together, 64 MB), so that the image is kept and the text is refused by ingest's own limit
    (max_text_chars: a text_too_long row), as an uncompressed one is."""
    try:
        return _probe(data, max_pixels, max_text_chars)
    except ProbeError as exc:
        if "MAX_TEXT_CHUNK" not in str(exc):
            raise
    with _TEXT_LIMIT_RAISED:  # a module global of Pillow's: one thread at a time raises it
        chunk = PngImagePlugin.MAX_TEXT_CHUNK
        PngImagePlugin.MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_MEMORY
        try:
            return _probe(data, max_pixels, max_text_chars)
        finally:
            PngImagePlugin.MAX_TEXT_CHUNK = chunk


def _probe(data: bytes, max_pixels: int, max_text_chars: int) -> dict:
    if not data:
        raise ProbeError("empty_file", "zero-byte image member")
    image = _open_checked(data, max_pixels)
    with image:
        size, fmt, mode = image.size, image.format or "", image.mode  # as stored: a JPEG's draft decode shrinks it
        n_frames = frame_count(image)
        pixels = decoded(image, data)  # before any other pixel access: JPEG draft mode
        # from the decoded picture: Pillow looks for a PNG's EXIF by decoding it (its eXIf chunk
        # may follow the pixels), which, asked first, both decoded twice and hid a broken stream
        orientation = exif_orientation(pixels)
        width, height = (size[1], size[0]) if orientation >= 5 else size
        row = {
            "width": width,
            "height": height,
            "format": fmt,
            "mode": mode,
            "n_frames": n_frames,
            "orientation": orientation,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        row.update(image_hashes(pixels))
        texts = embedded_texts(pixels, fmt, max_text_chars)
    row["texts"] = texts
    return row


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse decompression bombs before any decoding."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProbeError("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        # Pillow's message names the BytesIO object's address: not the same on a rerun
        raise ProbeError("not_an_image", "no image format recognises these bytes") from exc
    except DECODE_ERRORS as exc:  # the header itself: cut short (a JPEG's), or damaged
        raise _decode_error(exc) from exc
    if image.width * image.height > max_pixels:  # formats whose plugin skips the check
        raise ProbeError("decompression_bomb", f"{image.width}x{image.height} > {max_pixels} pixels")
    return image


def frame_count(image: Image.Image) -> int:
    """How many frames the file holds; counting them reads every frame's header (a GIF's, a
    TIFF's pages), which may be broken."""
    try:
        return int(getattr(image, "n_frames", 1))
    except DECODE_ERRORS as exc:
        raise _decode_error(exc) from exc


def decoded(image: Image.Image, data: bytes) -> Image.Image:
    """The first frame's pixels (a JPEG at the smallest DCT scale that keeps PHASH_DRAFT_SIZE,
    an 8-bit PNG by libspng: udfs/png_pixels.py); decoding it also proves the file is whole."""
    try:
        if image.format == "JPEG":
            image.draft("RGB", PHASH_DRAFT_SIZE)
        return load_pixels(image, data)
    except DECODE_ERRORS as exc:
        raise _decode_error(exc) from exc


def image_hashes(image: Image.Image) -> dict:
    """pHash, detail and colour signature of a picture (loaded here if it is not yet)."""
    try:
        small = _reduced(_hashable(image))
        return {**grey_hashes(small.convert("L")), "colour": colour_signature(small)}
    except DECODE_ERRORS as exc:
        raise _decode_error(exc) from exc


def _decode_error(exc: Exception) -> ProbeError:
    text = str(exc)
    if "conversion from" in text and "not supported" in text:  # a whole picture in a mode Pillow can't convert (LAB)
        return ProbeError("unsupported_mode", f"{type(exc).__name__}: {text}")
    kind = "truncated_image" if "truncated" in text.lower() or isinstance(exc, EOFError) else "corrupt_image"
    return ProbeError(kind, f"{type(exc).__name__}: {text}")


def grey_hashes(grey: Image.Image) -> dict:
    """pHash and detail of a grey picture (box-reduced first when large)."""
    small = np.asarray(_reduced(grey).resize((32, 32), Image.Resampling.LANCZOS))  # one copy for both
    return {"phash": dct_phash(small), "detail": float(small.astype(np.float32).std())}


def dct_phash(small: Image.Image | np.ndarray) -> int:
    """imagehash.phash of a 32x32 grey picture as a 64-bit integer: the same two scipy DCTs and
    median. Written here because imagehash converts and resizes the picture again (copies, at
    this size) and hands back booleans to be turned into bits: half the cost of the hash.
    tests/test_probe.py holds it equal to imagehash's."""
    # at the first hash, not with the module: scipy.fft loads scipy.special, 0.18 s before a worker
    # can take its task. numpy's own DCT gives other bits where coefficients tie (flat pictures)
    import scipy.fftpack

    return bits_above_median(scipy.fftpack.dct(scipy.fftpack.dct(np.asarray(small), axis=0), axis=1)[:8, :8])


def bits_above_median(low: np.ndarray) -> int:
    """The 8x8 low frequencies of a DCT as pHash bits: 1 where above their median, in row
    order, the first the highest (imagehash's order)."""
    ordered = np.sort(low, axis=None)  # numpy.median of 64 values: the mean of the middle two
    return int.from_bytes(np.packbits(low > (ordered[31] + ordered[32]) / 2).tobytes(), "big")


def colour_signature(picture: Image.Image) -> int:
    """2x2 grid of mean RGB, 4 bits a channel (12 values)."""
    rgb = picture if picture.mode == "RGB" else picture.convert("RGB")  # converting RGB to RGB copies it
    signature = 0
    for value in rgb.resize((2, 2), Image.Resampling.BOX).tobytes():  # R, G, B of each quarter in turn
        signature = (signature << 4) | (value >> 4)
    return signature


def _reduced(image: Image.Image) -> Image.Image:
    """Box-reduce large images before the hash's Lanczos resize to 32x32: same hash for
    near-identical images, a fraction of the cost (the JPEG path gets this from draft mode)."""
    factor = min(image.width, image.height) // PHASH_DRAFT_SIZE[0]
    return image.reduce(factor) if factor >= 2 else image


# Modes whose pixels Image.reduce can't average ("image has wrong mode"; a PA's indices it would
# average as numbers): the same hashes from their colours (tests/test_probe.py holds them equal).
REDUCED_AS = {"P": "RGB", "PA": "RGBA", "1": "L"}


def _hashable(image: Image.Image) -> Image.Image:
    """16-bit and float modes do not convert straight to L in Pillow: scale them first."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return image.point(lambda v: v / 256).convert("L")
    if image.mode == "F":
        return image.convert("L")
    if image.mode in REDUCED_AS and min(image.size) >= 2 * PHASH_DRAFT_SIZE[0]:  # what _reduced reduces
        return image.convert(REDUCED_AS[image.mode])
    return image


def may_hold_generation_text(image: Image.Image, fmt: str) -> bool:
    """Whether the image (of format `fmt`) holds anything imgutils' SD and NovelAI readers read (TEXT_INFO_KEYS)."""
    if any(key in image.info for key in TEXT_INFO_KEYS):
        return True
    if "exif" in image.info and image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment):
        return True
    if fmt in ("PNG", "WEBP") and image.mode == "RGBA":
        if not starts_with_stealth_magic(image):
            return False
        from imgutils.metadata import LSBReadError, read_lsb_raw_bytes  # no torch in this one

        try:
            read_lsb_raw_bytes(image)  # raises unless the stealth magic is in the alpha channel
        except LSBReadError:
            return False
        return True
    return False


def generation_texts(image: Image.Image) -> list[str]:
    """The texts imgutils' A1111 parser would read (`parameters`, a GIF `comment`, the EXIF
    UserComment), as they are: what embedded_texts measures before it lets them be parsed.
    NovelAI's `Comment` is JSON, read by json.loads in linear time: not measured."""
    texts = [str(image.info[key]) for key in ("parameters", "comment") if key in image.info]
    if "exif" in image.info:
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
        if isinstance(comment, bytes):  # an 8-byte charset header, then UTF-16 or single bytes
            wide = comment.startswith(b"UNICODE")
            texts.append(comment[8:].decode("utf-16-be" if wide else "latin-1", errors="replace"))
        elif comment:
            texts.append(str(comment))
    return texts


def starts_with_stealth_magic(image: Image.Image) -> bool:
    """Whether an RGBA picture's alpha low bits begin with STEALTH_MAGIC, read in imgutils'
    order from only the columns that hold it. imgutils' reader copies the whole picture into an
    array before it looks (12 ms for a 1000x1400 RGBA here), and almost no picture has the
    magic: a match is then read by imgutils itself."""
    bits = 8 * len(STEALTH_MAGIC)
    columns = -(-bits // image.height)
    if columns > image.width:  # fewer pixels than the magic has bits: imgutils fails to read it
        return False
    alpha = np.asarray(image.crop((0, 0, columns, image.height)).getchannel("A"))
    return np.packbits(alpha.T.reshape(-1)[:bits] & 1).tobytes() == STEALTH_MAGIC


def embedded_texts(image: Image.Image, fmt: str, max_chars: int) -> list[tuple[str, str]]:
    """(kind, text) pairs from PNG text chunks, EXIF and stealth PNG info of a decoded image
    (its info as opened) whose file is of format `fmt`.

    imgutils reads A1111 `parameters` and NovelAI metadata, including the stealth form that
    hides it in the least significant bits of the alpha channel. A text longer than `max_chars`
    is not parsed (imgutils' A1111 parser takes seconds on 20,000 characters of one line, and
    minutes on 100,000): it comes back whole as `generation_text`, which ingest then leaves out
    as too long.
    """
    texts: list[tuple[str, str]] = []
    if not may_hold_generation_text(image, fmt):
        return texts
    longest = max(generation_texts(image), key=len, default="")
    if len(longest) > max_chars:
        return [("generation_text", longest)]
    from imgutils.sd import get_naimeta_from_image, get_sdmeta_from_image

    try:
        sd = get_sdmeta_from_image(image)
    except Exception:  # noqa: BLE001 - a bad chunk is not a bad image
        sd = None
    # EXIF comments of ordinary photos parse as empty or NUL-filled "prompts": not SD metadata
    if sd is not None and (sd.prompt or "").strip("\x00 \t\r\n"):
        texts.append(("sd_prompt", sd.prompt))
        if sd.neg_prompt:
            texts.append(("sd_negative", sd.neg_prompt))
        if sd.parameters:
            texts.append(("sd_params", json.dumps(sd.parameters, sort_keys=True, default=str)))
        return texts
    if fmt not in ("PNG", "WEBP"):
        return texts
    try:
        nai = get_naimeta_from_image(image)
    except Exception:  # noqa: BLE001
        nai = None
    if nai is not None:
        params = dict(nai.parameters)
        prompt = params.pop("prompt", None) or nai.description or ""
        negative = params.pop("uc", None) or params.pop("negative_prompt", None)
        texts.append(("sd_prompt", prompt))
        if negative:
            texts.append(("sd_negative", negative))
        texts.append(("sd_params", json.dumps(params, sort_keys=True, default=str)))
    return texts
