"""Decoding and per-model preprocessing, mirrored from dghs-imgutils so results match it.

Each function returns uint8 arrays: every model's float input is an exact function of these
bytes (the float conversion happens in the model actor), which keeps the arrays that Ray Data
streams from CPU tasks to the model actors four times smaller than float32.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from udfs.eight_bit import displayed
from udfs.opencv import cv2

# CCIP's normalisation (imgutils.metrics.ccip._normalize: CLIP mean and std, float64).
CCIP_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073))
CCIP_STD = np.asarray((0.26862954, 0.26130258, 0.27577711))


def decode(data: bytes, draft_size: int = 0) -> Image.Image:
    """Decode an image; JPEGs larger than 2x draft_size on both sides are decoded reduced.

    Pillow's draft mode makes libjpeg decode at 1/2, 1/4 or 1/8 scale while keeping both
    sides >= draft_size: most of the decode cost is skipped when every model input is much
    smaller than the image. Boxes are relative, so they do not depend on the decoded size.
    8-bit PNGs are decoded by libspng (udfs/png_pixels.py), to the same pixels.
    """
    image = Image.open(io.BytesIO(data))
    if draft_size and image.format == "JPEG" and min(image.size) >= 2 * draft_size:
        image.draft(image.mode, (draft_size, draft_size))
    return displayed(image, data)


def has_alpha(image: Image.Image) -> bool:
    """imgutils.data.has_alpha_channel."""
    if image.mode in ("RGBA", "LA", "PA"):
        return True
    if image.palette:
        try:
            image.palette.getcolor((0, 0, 0, 0))
            return True
        except ValueError:
            pass
    return "transparency" in image.info


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """imgutils.data.load_image(image, mode="RGB"): transparent pixels become white."""
    if has_alpha(image):
        try:
            flat = Image.new("RGBA", image.size, "white")
            flat.paste(image, (0, 0), mask=image)
        except ValueError:
            flat = image
        image = flat if flat.mode == "RGB" else flat.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def yolo_input(rgb: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """imgutils.generic.yolo._image_preprocess (allow_dynamic=False): stretch to `size` (w, h)."""
    return np.asarray(rgb.resize(size))


def yolo_tensor(batch: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> the float32 NCHW of imgutils.data.rgb_encode (x / 255.0 in float64 first)."""
    return (batch.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


# Pixels per strip of a tall picture's padded rows (tagger_input): 6 MB of RGB at a time
STRIP_PIXELS = 1 << 21


def tagger_input(image: Image.Image, target: int) -> np.ndarray:
    """imgutils.tagging.wd14._prepare_image_for_tagging: white square pad, bicubic, BGR (uint8);
    a grey or 1-bit picture as its RGB copy would be (_paste).

    Equal to it pixel for pixel, without the padded square: Pillow resizes in two passes, along
    x then along y, rounding to uint8 in between, and the x pass works row by row. A padding row
    comes out of the x pass white (a constant row stays itself: the filter's weights add up to
    one), so only the picture's rows are x-passed, into a white image of side x target rows; a
    tall picture's rows are padded and x-passed a strip at a time (a 800 x 16,000 strip was
    pasted on a 16,000-pixel square: 768 MB for a 448-pixel input). The y pass then runs on
    those rows. Pillow images all the way: the numpy round trips of the rows cost a wide
    picture 1 ms of its 8 (three copies of a 1280 x 448 image).
    """
    width, height = image.size
    side = max(width, height)
    if side == target:  # no resize: imgutils' way (a square of the model's side)
        padded = Image.new("RGB", (side, side), (255, 255, 255))
        _paste(padded, image, ((side - width) // 2, (side - height) // 2))
        return _bgr(padded)
    between = Image.new("RGB", (target, side), (255, 255, 255))
    if width < side:  # tall: padding columns, in each row
        left, strip = (side - width) // 2, max(1, STRIP_PIXELS // side)
        for y in range(0, height, strip):
            rows = Image.new("RGB", (side, min(strip, height - y)), (255, 255, 255))
            _paste(rows, image.crop((0, y, width, y + rows.height)), (left, 0))
            between.paste(rows.resize((target, rows.height), Image.BICUBIC), (0, y))
    else:  # wide or square: padding rows (or none)
        flat = image  # an RGB picture pastes as it is (an RGB image is no mask)
        if image.mode != "RGB":
            flat = Image.new("RGB", (width, height), (255, 255, 255))
            _paste(flat, image, (0, 0))
        between.paste(flat.resize((target, height), Image.BICUBIC), (0, (side - height) // 2))  # x pass
    return _bgr(between.resize((target, target), Image.BICUBIC))  # y pass


def _bgr(rgb: Image.Image) -> np.ndarray:
    # Pillow's raw encoder writes the channels swapped as it packs its 4-byte pixels out: one pass,
    # where np.asarray (that same packing, as RGB) then OpenCV's swap were two (0.8 -> 0.6 ms at 448)
    return np.frombuffer(rgb.tobytes("raw", "BGR"), np.uint8).reshape(rgb.height, rgb.width, 3)


# Modes whose paste through themselves is a paste through their alpha channel
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La"})


def _paste(canvas: Image.Image, image: Image.Image, at: tuple[int, int]) -> None:
    """imgutils' paste onto white, through the image's alpha where it has one. imgutils passes
    the image as its own mask whatever its mode: a grey or 1-bit picture then masks itself, its
    dark pixels left white (line art and manga pages reached the tagger blank, while the regions,
    crops and CCIP saw them whole). Those paste as they are here; every other mode as imgutils'."""
    if image.mode in ALPHA_MODES:
        canvas.paste(image, at, mask=image)
    else:  # RGB, P, L, 1, ...: imgutils' paste without a mask (for RGB and P after a ValueError)
        canvas.paste(image, at)


def ccip_input(rgb: Image.Image, size: int) -> np.ndarray:
    """imgutils.metrics.ccip._preprocess_image before the float conversion: bilinear resize."""
    return np.asarray(rgb.resize((size, size), resample=Image.BILINEAR))


def ccip_tensor(batch: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> CCIP's normalised float32 NCHW, computed as imgutils does (float64 normalise)."""
    data = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return ((data - CCIP_MEAN[None, :, None, None]) / CCIP_STD[None, :, None, None]).astype(np.float32)


def gray_input(rgb: Image.Image, max_side: int) -> np.ndarray:
    """Grey image for the cascade face detector, at most max_side pixels on its long side."""
    scale = min(1.0, max_side / max(rgb.size)) if max_side else 1.0
    if scale < 1.0:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    return cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2GRAY)


def pad_to(array: np.ndarray, side: int) -> np.ndarray:
    """Put a 2-D array in the top-left corner of a side x side canvas (fixed-shape batches)."""
    canvas = np.zeros((side, side), dtype=array.dtype)
    canvas[: array.shape[0], : array.shape[1]] = array
    return canvas


def crop_box(width: int, height: int, box: tuple[int, int, int, int], padding: float) -> tuple[int, int, int, int]:
    """A box grown by `padding` times its size on each side, clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * padding, (y1 - y0) * padding
    return (max(0, int(x0 - dx)), max(0, int(y0 - dy)),
            min(width, int(round(x1 + dx))), min(height, int(round(y1 + dy))))


def region_images(image: Image.Image, overlap: float) -> list[Image.Image]:
    """The 2x2 regions of a picture (top left, top right, bottom left, bottom right, as
    schemas.REGIONS), each reaching `overlap` of the picture's side past the middle into its
    neighbours, where it is blurred: the tagger sees what crosses the line, softly, and keeps to
    its own quarter. Returned in the image's mode (the tagger pastes transparency on white)."""
    if image.mode not in ("RGB", "RGBA"):  # blurs take no palette, 16-bit or CMYK images
        image = image.convert("RGBA")
    width, height = image.size
    if width < 2 or height < 2:  # no halves to cut: each region is the whole picture
        return [image] * 4
    mid_x, mid_y = width // 2, height // 2
    reach_x, reach_y = int(round(overlap * width)), int(round(overlap * height))
    radius = max(1.0, (reach_x + reach_y) / 6)
    regions = []
    for top in (True, False):
        for left in (True, False):
            x0, x1 = (0, min(width, mid_x + reach_x)) if left else (max(0, mid_x - reach_x), width)
            y0, y1 = (0, min(height, mid_y + reach_y)) if top else (max(0, mid_y - reach_y), height)
            region = image.crop((x0, y0, x1, y1))
            if reach_x or reach_y:
                # sharp inside the quarter, blurred over the overlap, with a soft edge between
                inside = Image.new("L", region.size, 0)
                qx0, qx1 = (0, mid_x - x0) if left else (mid_x - x0, x1 - x0)
                qy0, qy1 = (0, mid_y - y0) if top else (mid_y - y0, y1 - y0)
                inside.paste(255, (qx0, qy0, qx1, qy1))
                blurred = region.filter(ImageFilter.GaussianBlur(radius))
                region = Image.composite(region, blurred, inside.filter(ImageFilter.GaussianBlur(radius / 2)))
            regions.append(region)
    return regions
