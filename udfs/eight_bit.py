"""Pictures of more than 8 bits a sample (16-bit PNGs, int32 and float TIFFs) as 8-bit grey.

Pillow's convert("RGB") clips such samples at 255: a 16-bit PNG came out nearly white, a float
TIFF black, in what the models saw and what the export wrote. Ingest's hash keeps its own
scaling (udfs/ingest/probe.py), so that hashes stay as they were.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from udfs.orientation import upright
from udfs.png_pixels import load_pixels

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def displayed(image: Image.Image, data: bytes) -> Image.Image:
    """An opened image (`data`, its bytes) as a person sees it: its pixels loaded (8-bit PNGs by
    libspng, udfs/png_pixels.py), turned upright after the decode (Pillow decodes a PNG to find
    its EXIF: asked first, it decoded twice), at 8 bits a sample."""
    return eight_bit(upright(load_pixels(image, data)))


def eight_bit(image: Image.Image) -> Image.Image:
    """`image` itself, or for a wide mode an "L" picture of its samples scaled to 0..255."""
    if image.mode not in WIDE_MODES:
        return image
    samples = np.asarray(image, dtype=np.float32)  # exact for 16-bit; float32 TIFFs are float32
    finite = np.isfinite(samples)
    present = samples[finite] if not finite.all() else samples  # a NaN or inf does not set the range
    low, high = sample_range(image.mode, *((present.min(), present.max()) if present.size else (0.0, 0.0)))
    scale = np.float32(255.0 / (high - low) if high > low else 0.0)
    scaled = (np.nan_to_num(samples, nan=low, posinf=high, neginf=low) - low) * scale
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    # EXIF orientation and the rest; not a 16-bit transparency key, which means nothing in "L"
    grey.info = {k: v for k, v in image.info.items() if k != "transparency"}
    return grey


def sample_range(mode: str, low: float, high: float) -> tuple[float, float]:
    """What black and white are: 16-bit samples by their full range, floats of 0..1 and
    integers of 0..255 or 0..65535 as such, anything else by its own lowest and highest."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    if 0 <= low and mode == "F" and high <= 1:
        return 0.0, 1.0
    if 0 <= low and mode == "I" and high <= 65535:
        return 0.0, 255.0 if high <= 255 else 65535.0
    return float(low), float(high)
