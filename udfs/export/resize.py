"""Export sizes: cap the longer side at max_size, or fit aspect-ratio buckets (kohya sd-scripts).

The target size is computed from the width and height in `images`, so the driver knows every
output size (and the json that states it) before any pixel is decoded.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image

from udfs.eight_bit import displayed
from udfs.opencv import cv2
from udfs.orientation import exif_orientation

# Formats trainers read as they are; anything else (GIF, BMP, TIFF, ...) is re-encoded.
PASSTHROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Modes a trainer's `Image.convert("RGB")` reads right. Pillow clips the samples of 16-bit and
# float pictures (I;16, I, F) to 255: such a file copied as it is trains as a white image.
PASSTHROUGH_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
# Modes that can hold transparency: flattened onto export.alpha_background when it is set.
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "P"})
Image.MAX_IMAGE_PIXELS = None  # ingest already refused decompression bombs (max_pixels)


def bucket_sides(min_side: int, max_side: int, step: int) -> tuple[int, int]:
    """The smallest and largest bucket sides as kohya uses them (its adjust_min_max_bucket_reso_by_steps):
    the smallest rounded down, the largest up, to a multiple of `step`."""
    return min_side - min_side % step, max_side + (-max_side) % step


@lru_cache(maxsize=16)
def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> tuple[tuple[int, int], ...]:
    """kohya sd-scripts' make_bucket_resolutions: sizes of area <= resolution^2 in steps of `step`,
    between the sides kohya makes of min_side and max_side (bucket_sides): with 300 and 2000 kohya
    buckets from 256 to 2048, and an image at a 300-wide bucket of ours was resized again.

    Written out here because sd-scripts is not an installable library; same algorithm.
    """
    min_side, max_side = bucket_sides(min_side, max_side, step)
    max_area = resolution * resolution
    sizes = {(int(math.sqrt(max_area) // step) * step,) * 2}
    width = min_side
    while width <= max_side:
        height = min(max_side, int((max_area // width) // step) * step)
        if height >= min_side:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return tuple(sorted(sizes))


def nearest_bucket(width: int, height: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket kohya's BucketManager.select_bucket gives the image, so that a trainer that
    buckets again keeps it there: its own size when that is a bucket, else the bucket of the
    smallest |bucket width/height - image width/height|, the first of `sizes` (sorted, as kohya's)
    on a tie."""
    if (width, height) in sizes:
        return width, height
    aspect = width / height
    return min(sizes, key=lambda s: abs(s[0] / s[1] - aspect))


def target_size(width: int, height: int, opts: dict) -> tuple[int, int]:
    """The exported size: a bucket when `buckets` is on, else the longer side capped at max_size."""
    if opts["buckets"]:
        sizes = bucket_sizes(int(opts["max_size"]), int(opts["bucket_min_side"]), int(opts["bucket_max_side"]),
                             int(opts["bucket_step"]))
        return nearest_bucket(width, height, sizes)
    max_size = int(opts["max_size"])
    longer = max(width, height)
    if max_size <= 0 or longer <= max_size:
        return width, height
    scale = max_size / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def output_extension(fmt: str) -> str:
    """Extension of the exported image: the source format when trainers read it, else PNG."""
    return PASSTHROUGH.get((fmt or "").upper(), "png")


def needs_reencode(fmt: str, width: int, height: int, target: tuple[int, int], turned: bool = False,
                   mode: str | None = None) -> bool:
    """Whether the exported image is re-encoded: a format or `mode` trainers do not read right,
    another size, or stored pixels that must be turned upright (`turned`: EXIF orientation to apply)."""
    return ((fmt or "").upper() not in PASSTHROUGH or (width, height) != tuple(target) or turned
            or (mode is not None and mode not in PASSTHROUGH_MODES))


def resize_image(data: bytes, target: tuple[int, int], ext: str, jpeg_quality: int, crop: bool,
                 png_compress_level: int = 1, background: str = "") -> bytes:
    """Decode (JPEG: reduced in the DCT, never below the target), flatten transparency onto
    `background` when one is given, one resample (for buckets: of the centre part that covers the
    bucket), encode as `ext`.

    The resample is OpenCV's, as kohya sd-scripts resizes its buckets (INTER_AREA down, Lanczos up):
    4-7x faster than Pillow's Lanczos on these sizes. JPEG is encoded without Pillow's `optimize`
    pass (2.5x the encode time for a few per cent of bytes) and PNG at `png_compress_level`
    (zlib level 1 is 4x faster than Pillow's default 6; PNG stays lossless at any level).
    """
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)  # first frame of animations
        if image.format == "JPEG":
            turned = exif_orientation(image) >= 5  # target is as displayed; the stored pixels are turned
            image.draft(image.mode, tuple(reversed(target)) if turned else tuple(target))
        # upright after the decode: Pillow decodes a PNG to look for its EXIF (it may follow the
        # pixels), which, asked first, decoded it twice and hid a broken stream
        image = displayed(image, data)  # re-encoded images are upright, with no orientation tag
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            # not `"A" in getbands()`: LAB's bands are L, A, B, and its A is a colour axis
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        if background and image.mode in ("RGBA", "LA"):
            flat = Image.new("RGB", image.size, background)
            flat.paste(image.convert("RGB"), mask=image.getchannel("A"))
            image = flat
        width, height = target
        if crop:
            # cut what the bucket shows before the resample: covering the bucket with the whole
            # picture first made a 1x8000 strip 256x2,048,000 pixels (gigabytes) for one crop
            scale = max(width / image.width, height / image.height)
            keep = (max(1, min(image.width, round(width / scale))), max(1, min(image.height, round(height / scale))))
            left, top = (image.width - keep[0]) // 2, (image.height - keep[1]) // 2
            image = resampled(image.crop((left, top, left + keep[0], top + keep[1])), (width, height))
        elif image.size != (width, height):
            image = resampled(image, (width, height))
        out = io.BytesIO()
        if ext == "jpg":
            if image.mode != "RGB":
                image = image.convert("RGB")
            image.save(out, "JPEG", quality=jpeg_quality)
        elif ext == "webp":
            image.save(out, "WEBP", quality=jpeg_quality)
        else:
            image.save(out, "PNG", compress_level=png_compress_level)
        return out.getvalue()


def resampled(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` (RGB, RGBA, L or LA) at `size`: area averaging down, Lanczos up. Transparent images
    are resampled premultiplied, as Pillow does, so that no colour bleeds from invisible pixels."""
    if image.size == size:
        return image
    shrinking = size[0] * size[1] < image.width * image.height
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    mode = {"RGBA": "RGBa", "LA": "La"}.get(image.mode, image.mode)
    pixels = np.asarray(image.convert(mode) if mode != image.mode else image)
    resized = np.ascontiguousarray(cv2.resize(pixels, size, interpolation=interpolation))
    out = Image.frombytes(mode, size, resized.tobytes())
    return out.convert(image.mode) if mode != image.mode else out


def estimated_bytes(original: int, width: int, height: int, target: tuple[int, int], reencoded: bool) -> int:
    """Planned size of the exported image: exact for original bytes, scaled by area when re-encoded."""
    if not reencoded:
        return int(original)
    return max(1024, int(original * (target[0] * target[1]) / max(1, width * height)))
