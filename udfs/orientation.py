"""EXIF orientation: what `images` records and what every decode applies.

Cameras and phones store pixels as the sensor saw them and a tag that says how to turn them;
viewers apply it, many trainers do not. booruset records the tag at ingest (width and height as
displayed) and turns the pixels upright wherever it decodes (models, captions, exports).
"""

from __future__ import annotations

from PIL import ExifTags, Image, ImageOps


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or unreadable. Ask it of a decoded image
    (a JPEG's before its draft is the exception): Pillow decodes a PNG to find its EXIF, which
    may follow the pixels, and an error there is swallowed here with the broken EXIF's."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """The image as displayed: EXIF orientation applied (the tag then says 1). Every decode that
    feeds a model, a caption or an export goes through here, so boxes and sizes agree with
    `images.width/height`."""
    if exif_orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)
