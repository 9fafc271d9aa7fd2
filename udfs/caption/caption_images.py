"""Images for VLM captioners: read members back from their shards or folders, shrink, encode.

Captioners are bound by tokens, not by decoding, but sending a 6,000-pixel PNG costs upload
time and image tokens for nothing: images are resized to `max_side` and sent as JPEG.
"""

from __future__ import annotations

import base64
import io
import os
import tarfile
from collections import defaultdict

import pyarrow.fs as pafs
from PIL import Image

from udfs.orientation import upright


def read_members(sources: list[str], members: list[str]) -> list[bytes | None]:
    """Raw bytes of each (source, member); None where it cannot be read. Each shard is opened once."""
    wanted: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (source, member) in enumerate(zip(sources, members, strict=True)):
        if source and member:
            wanted[source][member].append(i)
    out: list[bytes | None] = [None] * len(sources)
    for source, names in wanted.items():
        for member, data in _read_source(source, set(names)):
            for i in names[member]:
                out[i] = data
    return out


def _read_source(source: str, names: set[str]):
    if ".tar" in source.rsplit("/", 1)[-1]:
        try:
            with _open(source) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if info.isfile() and info.name in names:
                        yield info.name, tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError):
            return
        return
    for name in names:
        path = os.path.join(source, name)
        try:
            with _open(path) as f:
                yield name, f.read()
        except OSError:
            continue


def _open(uri: str):
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs.open_input_stream(path)
    return open(uri, "rb")


def shrink_jpeg(data: bytes, max_side: int, quality: int = 90) -> bytes:
    """The image as RGB JPEG whose longer side is at most `max_side` (transparency on white)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced size directly
        image = upright(image)  # the model sees what a person sees
        image = image.convert("RGBA") if image.mode in ("P", "LA", "RGBA", "PA") else image.convert("RGB")
        if image.mode == "RGBA":
            white = Image.new("RGB", image.size, "white")
            white.paste(image, mask=image.getchannel("A"))
            image = white
        image.thumbnail((max_side, max_side))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        return out.getvalue()


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
