"""Build the bundled sample WebDataset shards from the Ren'Py art and sample/tags.toml.

Usage: python sample/build_sample.py [SOURCE_DIR] [--out DIR]

SOURCE_DIR defaults to ../shared/samples/renpy relative to the repository root. The output
is byte-for-byte reproducible (fixed member order and tar metadata), so the committed shards
can be checked against a rebuild.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "samples" / "renpy"
DEFAULT_OUT = REPO_ROOT / "sample" / "shards"
TAGS_TOML = REPO_ROOT / "sample" / "tags.toml"
N_SHARDS = 3
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
RATING_LETTER = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}
JPEG_QUALITY = 90
CATEGORIES = ("general", "character", "copyright", "artist", "meta")


@dataclass(frozen=True)
class Rule:
    """How one kind of source image is stored: longest side cap and forced format."""

    max_side: int | None
    force_jpeg: bool


# The concert CGs are 2400 px painted scenes stored as 4 MB PNGs: as 1024 px JPEGs they
# shrink ~20x, which is what keeps the bundled sample a few MB. Sprites are left alone so their
# alpha channel and exact bytes reach the ingest job.
RULES = {"concert": Rule(1024, True), "bg_": Rule(1280, False)}
KEEP = Rule(None, False)


def rule_for(stem: str) -> Rule:
    return next((r for prefix, r in RULES.items() if stem.startswith(prefix)), KEEP)


def encode_image(path: Path, rule: Rule) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, size) of the image as it goes into the shard."""
    raw = path.read_bytes()
    ext = "jpg" if path.suffix.lower() in {".jpg", ".jpeg"} else "png"
    with Image.open(io.BytesIO(raw)) as im:
        size = im.size
        too_big = rule.max_side is not None and max(size) > rule.max_side
        if not too_big and not rule.force_jpeg:
            return raw, ext, size  # unchanged bytes keep EXIF/ICC for the metadata parsers
        im.load()
        out = im
        if too_big:
            out = _downscale(im, rule.max_side or max(size))
        ext = "jpg" if rule.force_jpeg else ext
        return _save(out, ext), ext, out.size


def _downscale(im: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(im.size)
    size = (round(im.width * scale), round(im.height * scale))
    return im.resize(size, Image.Resampling.LANCZOS)


def _save(im: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        # Fixed subsampling and no optimize pass: same Pillow, same bytes.
        im.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def tag_text(tags: list[str], underscores: bool) -> str:
    return ", ".join(tags if underscores else [t.replace("_", " ") for t in tags])


def kohya_txt(entry: dict) -> str:
    # Character and copyright first, as kohya users keep them as leading (keep_tokens) tags.
    tags = entry["character"] + entry["copyright"] + entry["general"]
    return tag_text(tags, entry.get("underscores", False)) + "\n"


def three_line(entry: dict) -> str:
    lines = [
        f"copyright: {tag_text(entry['copyright'], False)}",
        f"character: {tag_text(entry['character'], False)}",
        f"general tags: {tag_text(entry['general'], False)}",
    ]
    # rstrip: an empty category (backgrounds have no character) leaves "character:" bare.
    return "\n".join(line.rstrip() for line in lines) + "\n"


def danbooru_json(entry: dict, image: bytes, ext: str, size: tuple[int, int]) -> str:
    # Danbooru stores each tag string sorted alphabetically; mimic that and the few post
    # fields a real dump carries that we can state truthfully (no invented post ids).
    fields = {f"tag_string_{c}": " ".join(sorted(entry.get(c, []))) for c in CATEGORIES}
    all_tags = sorted(t for c in CATEGORIES for t in entry.get(c, []))
    post = {
        **fields,
        "tag_string": " ".join(all_tags),
        "rating": RATING_LETTER[entry["rating"]],
        "image_width": size[0],
        "image_height": size[1],
        "file_ext": ext,
        "file_size": len(image),
        "md5": hashlib.md5(image).hexdigest(),
    }
    return json.dumps(post, sort_keys=True, ensure_ascii=False) + "\n"


def sidecars(entry: dict, image: bytes, ext: str, size: tuple[int, int]) -> dict[str, str]:
    kind = entry["sidecar"]
    if kind == "txt":
        files = {"txt": kohya_txt(entry)}
    elif kind == "tags":
        files = {"tags": three_line(entry)}
    elif kind == "json":
        files = {"json": danbooru_json(entry, image, ext, size)}
    else:
        raise ValueError(f"unknown sidecar kind {kind!r}")
    if entry.get("caption"):
        files["caption"] = entry["caption"].strip() + "\n"
    return files


def sample_members(path: Path, entry: dict) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one sample: the image first, then sidecars by extension."""
    image, ext, size = encode_image(path, rule_for(path.stem))
    members = [(f"{path.stem}.{ext}", image)]
    texts = sidecars(entry, image, ext, size)
    members += [(f"{path.stem}.{e}", texts[e].encode("utf-8")) for e in sorted(texts)]
    return members


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Zeroed owner, time and a fixed mode so a rebuild on any machine gives identical tars.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(out: Path, samples: list[tuple[Path, dict]]) -> None:
    tmp = out.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for path, entry in samples:
            for name, data in sample_members(path, entry):
                add_member(tar, name, data)
    tmp.replace(out)  # atomic: a half-written shard never carries the final name


def load_sources(source: Path, tags: dict) -> list[tuple[Path, dict]]:
    """Source images in name order, each with its tags.toml table; both sides must match."""
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    names = {p.name for p in images}
    if names != set(tags):
        missing, extra = sorted(names - set(tags)), sorted(set(tags) - names)
        raise SystemExit(f"tags.toml mismatch: untagged {missing}, no such image {extra}")
    return [(p, tags[p.name]) for p in images]


def build(source: Path, out: Path) -> list[Path]:
    tags = tomllib.loads(TAGS_TOML.read_text(encoding="utf-8"))
    samples = load_sources(source, tags)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(N_SHARDS):
        # Round-robin rather than contiguous slices: every shard then mixes sprites,
        # backgrounds and sidecar formats, and the three near-duplicate concert CGs land in
        # three different shards (the harder case for duplicate detection).
        shard = out / f"renpy-{i:06d}.tar"
        write_shard(shard, samples[i::N_SHARDS])
        shards.append(shard)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for shard in build(args.source, args.out):
        digest = hashlib.sha256(shard.read_bytes()).hexdigest()
        print(f"{shard.stat().st_size:>9} {digest[:16]} {shard}")


if __name__ == "__main__":
    main()
