"""Build shards full of the bad input a real collection has, with the outcome each must have."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from imgutils.sd import NAIMetaData, add_naimeta_to_image
from PIL import Image, PngImagePlugin


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def picture(width: int = 96, height: int = 64, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels; its data is never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def a1111_png() -> bytes:
    """The `parameters` text chunk exactly as AUTOMATIC1111's web UI writes it."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "1girl, solo, red hair\nNegative prompt: lowres, bad hands\n"
                  "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 96x64, Model hash: abcdef12")
    return encode(picture(seed=5), "PNG", pnginfo=info)


def nai_png(stealth_only: bool) -> bytes:
    """NovelAI metadata in PNG text chunks, or only hidden in the alpha channel's LSBs."""
    meta = NAIMetaData("NovelAI", "NovelAI Diffusion V3", {"prompt": "2girls, hug", "uc": "blurry", "steps": 28})
    image = add_naimeta_to_image(picture(512, 512, "RGBA", seed=6), meta)  # its code needs room
    if stealth_only:
        return encode(image, "PNG")  # no pnginfo: only the LSB copy remains
    info = PngImagePlugin.PngInfo()
    for k, v in [("Software", "NovelAI"), ("Source", "NovelAI Diffusion V3"), ("Comment", json.dumps(meta.parameters))]:
        info.add_text(k, v)
    return encode(picture(seed=7), "PNG", pnginfo=info)


def hostile_members() -> list[tuple[str, bytes]]:
    """(member name, bytes) in shard order."""
    jpeg = encode(picture(seed=1), "JPEG", quality=90)
    gif_frames = [picture(40, 40, seed=i).convert("P") for i in range(3)]
    gif = io.BytesIO()
    gif_frames[0].save(gif, format="GIF", save_all=True, append_images=gif_frames[1:], duration=50)
    palette = picture(seed=2).convert("P")
    palette.info["transparency"] = 0
    i16 = Image.fromarray(np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10)
    post = {"tag_string_general": "1girl solo long_hair", "tag_string_character": "hatsune_miku",
            "tag_string_copyright": "vocaloid", "tag_string_artist": "someone", "tag_string_meta": "highres",
            "rating": "s"}
    return [
        ("good.jpg", jpeg),
        ("good.txt", b"1girl, solo, short hair, red_hair, \\(cosplay\\)"),
        ("booru.png", encode(picture(seed=3), "PNG")),
        ("booru.tags", b"1boy solo black_hair"),
        ("three.png", encode(picture(seed=4), "PNG")),
        ("three.txt", b"copyright: touhou\ncharacter: hakurei reimu\ngeneral tags: 1girl, bow, red skirt"),
        ("post.webp", encode(picture(seed=8), "WEBP")),
        ("post.json", json.dumps(post).encode()),
        ("cap.jpg", jpeg),
        ("cap.caption", "A girl waves — “hello”.".encode()),
        ("nosidecar.png", encode(picture(seed=9), "PNG")),
        ("corrupt.jpg", b"this is not an image at all" * 10),
        ("truncated.jpg", jpeg[: len(jpeg) // 2]),
        ("empty.png", b""),
        ("bomb.png", png_bomb()),
        ("cmyk.jpg", encode(picture(seed=10).convert("CMYK"), "JPEG")),
        ("sixteen.png", encode(i16, "PNG")),
        ("palette.png", encode(palette, "PNG", transparency=0)),
        ("animated.gif", gif.getvalue()),
        ("cp1252.png", encode(picture(seed=11), "PNG")),
        ("cp1252.txt", "café, naïve, crème brûlée, garçon, déjà vu".encode("cp1252")),
        ("hugeside.png", encode(picture(seed=12), "PNG")),
        ("hugeside.txt", b"tag, " * 300_000),
        ("../escape.png", encode(picture(seed=13), "PNG")),
        ("dir/ünïcödé 🎨.png", encode(picture(seed=14), "PNG")),
        ("orphan.txt", b"1girl, solo"),
        ("a1111.png", a1111_png()),
        ("nai.png", nai_png(stealth_only=False)),
        ("stealth.png", nai_png(stealth_only=True)),
        # sidecars that once failed the whole job, or became tags with NULs in them
        ("bigint.png", encode(picture(seed=15), "PNG")),
        ("bigint.json", b'{"tags": ["1girl"], "id": ' + b"9" * 5000 + b"}"),
        ("deep.png", encode(picture(seed=16), "PNG")),
        ("deep.json", b"[" * 200_000),
        ("surrogate.png", encode(picture(seed=17), "PNG")),
        ("surrogate.json", b'{"tags": ["ok", "bad\\ud800tag"]}'),
        ("tagsdict.png", encode(picture(seed=18), "PNG")),
        ("tagsdict.json", b'{"tags": {"a": 1, "b": null}}'),
        ("utf16.png", encode(picture(seed=19), "PNG")),
        ("utf16.txt", "1girl, solo".encode("utf-16-le")),
        ("nul.png", encode(picture(seed=20), "PNG")),
        ("nul.txt", b"1girl\x00, \x00solo, \x00"),
        ("nuljson.png", encode(picture(seed=21), "PNG")),
        ("nuljson.json", b'{"tags": ["long\\u0000hair", "ok", "\\u0007"], '
                         b'"caption": "a girl\\u0000 with \\u001b[31mred hair\\nand a bow"}'),
    ]


# key -> expected outcome: ("image", mode) or ("error", kind)
EXPECTED = {
    "good": ("image", "RGB"), "booru": ("image", "RGB"), "three": ("image", "RGB"), "post": ("image", "RGB"),
    "cap": ("image", "RGB"), "nosidecar": ("image", "RGB"), "corrupt": ("error", "not_an_image"),
    "truncated": ("error", "truncated_image"), "empty": ("error", "empty_file"),
    "bomb": ("error", "decompression_bomb"), "cmyk": ("image", "CMYK"), "sixteen": ("image", "I;16"),
    "palette": ("image", "P"), "animated": ("image", "P"), "cp1252": ("image", "RGB"),
    "hugeside": ("image", "RGB"), "../escape": ("image", "RGB"), "dir/ünïcödé 🎨": ("image", "RGB"),
    "orphan": ("error", "no_image"), "a1111": ("image", "RGB"), "nai": ("image", "RGB"),
    "stealth": ("image", "RGBA"), "bigint": ("image", "RGB"), "deep": ("image", "RGB"), "surrogate": ("image", "RGB"),
    "tagsdict": ("image", "RGB"), "utf16": ("image", "RGB"), "nul": ("image", "RGB"), "nuljson": ("image", "RGB"),
}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
