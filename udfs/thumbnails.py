"""Small JPEG previews of an image (the report's examples, the review page's grid)."""

from __future__ import annotations

import io

from PIL import Image

from udfs.eight_bit import displayed


def thumbnail_jpeg(data: bytes, size: int) -> bytes:
    """A JPEG at most `size` pixels on its long side: the first frame, upright, transparency on white."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        image = displayed(image, data)
        image.thumbnail((size, size))
        rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    out = io.BytesIO()
    flat.save(out, "JPEG", quality=85)
    return out.getvalue()
