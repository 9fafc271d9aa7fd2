"""Images for VLM captioners: read members back from their shards or folders, shrink, encode.

Captioners are bound by tokens, not by decoding, but sending a 6,000-pixel PNG costs upload
time and image tokens for nothing: images are resized to `max_side` and sent as JPEG.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from collections.abc import Callable, Iterator

from PIL import Image

from schemas import REGIONS
from udfs.annotate.images import region_images
from udfs.eight_bit import displayed, eight_bit
from udfs.orientation import upright
from udfs.png_pixels import load_pixels
from udfs.source_members import source_members

REGION_INDEX = {name: i for i, name in enumerate(REGIONS.values())}  # region_jpegs' order


def request_urls(sources: list[str], members: list[str], regions: list[str], max_side: int,
                 overlap: float, offsets: list[int | None] | None = None,
                 sizes: list[int | None] | None = None) -> list[str | None]:
    """Data URLs of what each VLM request shows: its image (region "") or one of the image's 2x2
    regions ("top left", ...: the tagger's crop); None where the image cannot be read. Each
    member is read once and cut once, however many requests show it. offsets: images.member_offset
    of each (where its shard header starts), for a seek instead of a walk through the shard.
    sizes: images.bytes of each; a member of another size is not read (read_members)."""
    made: dict[tuple[str, str, bool], list[str] | None] = {}
    out: list[str | None] = []
    read = read_members(sources, members, offsets, sizes)
    for source, member, region, data in zip(sources, members, regions, read, strict=True):
        whole = not region
        if (source, member, whole) not in made:
            encode = (lambda d: [shrink_jpeg(d, max_side)]) if whole else (lambda d: region_jpegs(d, overlap, max_side))
            made[(source, member, whole)] = jpeg_urls(data, encode)
        urls = made[(source, member, whole)]
        out.append(None if urls is None else urls[0 if whole else REGION_INDEX[region]])
    return out


def read_members(sources: list[str], members: list[str], offsets: list[int | None] | None = None,
                 sizes: list[int | None] | None = None) -> list[bytes | None]:
    """Raw bytes of each (source, member); None where it cannot be read. Each shard is opened
    once; a local one is read with seeks to the members' offsets (udfs/source_members.py).
    sizes: images.bytes of each (None: unknown). A member of another size is a picture nobody
    ingested (its shard or file was rewritten since): None, as export has it, rather than a new
    picture captioned under the old one's tags."""
    wanted: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    where: dict[str, dict[str, int | None]] = defaultdict(dict)
    seen: dict[str, dict[str, int]] = defaultdict(dict)
    for i, (source, member) in enumerate(zip(sources, members, strict=True)):
        if source and member:
            wanted[source][member].append(i)
            where[source][member] = offsets[i] if offsets else None
            if sizes and sizes[i] is not None:
                seen[source][member] = int(sizes[i])
    out: list[bytes | None] = [None] * len(sources)
    for source, names in wanted.items():
        for member, data in _read_source(source, where[source], seen[source]):
            for i in names[member]:
                out[i] = data
    return out


def _read_source(source: str, names: dict[str, int | None], sizes: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    try:
        yield from source_members(source, names, None, sizes)
    except OSError:
        return  # an unreachable source: its images are reported unreadable


def unreadable_message(row: dict) -> str:
    """An unreadable_image row's message for an image request_urls could not read."""
    return (f"cannot read {row.get('member')} from {row.get('source')}: missing, not an image, or not of the "
            "size ingest saw (moved or rewritten since ingest?)")


def shrink_jpeg(data: bytes, max_side: int, quality: int = 90) -> bytes:
    """The image as RGB JPEG whose longer side is at most `max_side` (transparency on white)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced size directly
        # the model sees what a person sees (upright after the decode: udfs/png_pixels.py)
        return _jpeg(_flat_rgb(displayed(image, data)), max_side, quality)


def region_jpegs(data: bytes, overlap: float, max_side: int, quality: int = 90) -> list[bytes]:
    """The picture's 2x2 regions (schemas.REGIONS order) as JPEGs for a VLM: the very crops the
    tagger tagged (udfs/annotate/images.region_images: same overlap, blurred there), each shrunk
    to `max_side`."""
    with Image.open(io.BytesIO(data)) as image:
        # a region is over half the picture's side: twice max_side is all a region needs, and
        # the crop, overlap and blur scale with the side (a 12 MP JPEG: 1.6 s -> 0.6 s)
        image.draft("RGB", (2 * max_side, 2 * max_side))
        image = eight_bit(load_pixels(image, data))
        factor = max(image.size) // (2 * max_side)
        image = image.reduce(factor) if factor >= 2 else image
        return [_jpeg(_flat_rgb(region), max_side, quality) for region in region_images(upright(image), overlap)]


def _flat_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency pasted on white."""
    image = image.convert("RGBA") if image.mode in ("P", "LA", "RGBA", "PA") else image.convert("RGB")
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, "white")
        white.paste(image, mask=image.getchannel("A"))
        image = white
    return image


def _jpeg(image: Image.Image, max_side: int, quality: int) -> bytes:
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def jpeg_urls(data: bytes | None, encode: Callable[[bytes], list[bytes]]) -> list[str] | None:
    """Data URLs of the JPEGs `encode` makes of an image's bytes; None when the bytes are missing
    or cannot be decoded (the caller's errors row says which)."""
    if not data:
        return None
    try:
        return [data_url(jpeg) for jpeg in encode(data)]
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
