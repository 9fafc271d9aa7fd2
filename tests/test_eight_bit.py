"""16-bit, int32 and float pictures reach the models, the export, the captioner and the previews
with their tones: Pillow's convert("RGB") clipped them (a 16-bit PNG nearly white, a float TIFF black)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from udfs.annotate.images import decode
from udfs.caption.caption_images import shrink_jpeg
from udfs.export.resize import resize_image
from udfs.thumbnails import thumbnail_jpeg

RAMP = np.linspace(0.0, 1.0, 96 * 64).reshape(64, 96)  # black to white: mean 0.5


def encoded(samples: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(samples).save(out, fmt)
    return out.getvalue()


PICTURES = {
    "png16": encoded((RAMP * 65535).astype(np.uint16), "PNG"),
    "tiff_float": encoded(RAMP.astype(np.float32), "TIFF"),
    "tiff_int32": encoded((RAMP * 4_000_000).astype(np.int32), "TIFF"),
    "tiff_float_nan": encoded(np.where(RAMP == RAMP[0, 5], np.nan, RAMP).astype(np.float32), "TIFF"),  # not black
}


def mean_tone(data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as image:
        return float(np.asarray(image.convert("L"), dtype=np.float64).mean()) / 255


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_wide_samples_keep_their_tones(name):
    data = PICTURES[name]
    assert abs(np.asarray(decode(data), dtype=np.float64).mean() / 255 - 0.5) < 0.02  # what annotate's models see
    assert abs(mean_tone(resize_image(data, (48, 32), "png", 95, False)) - 0.5) < 0.02  # what the export writes
    assert abs(mean_tone(thumbnail_jpeg(data, 48)) - 0.5) < 0.03
    assert abs(mean_tone(shrink_jpeg(data, 48)) - 0.5) < 0.03  # what a VLM is shown
