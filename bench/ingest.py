"""Ingest throughput against the decode floor, measured in the same run.

Makes N realistic images by compositing the bundled sample's sprites onto its backgrounds
(random sizes and positions, JPEG and PNG), writes them as WebDataset shards, then times:
  - `booruset ingest` (Ray Data on a local Ray with every core, Ray already started),
  - a plain loop that only opens and fully decodes the same images with Pillow (one core).
Prints both rates and their ratio.

    python bench/ingest.py --images 3000
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs import ingest  # noqa: E402
from jobs.config import SAMPLE_SHARDS, load_config  # noqa: E402
from jobs.ray_env import init_ray  # noqa: E402
from store.workspace import Workspace  # noqa: E402
from udfs.ingest.sources import discover_units, read_unit  # noqa: E402


def sample_art() -> tuple[list[Image.Image], list[Image.Image]]:
    """(RGBA sprites, backgrounds) from the bundled sample shards."""
    sprites, backgrounds = [], []
    for unit in discover_units([str(SAMPLE_SHARDS)], 1000):
        for sample in read_unit(unit, 1 << 30):
            ext = "png" if "png" in sample.members else "jpg"
            image = Image.open(io.BytesIO(sample.members[ext]))
            image.load()
            if sample.key.startswith("bg_"):
                backgrounds.append(image.convert("RGB"))
            elif image.mode == "RGBA":
                sprites.append(image)
    return sprites, backgrounds


def composite(rng: random.Random, sprites: list[Image.Image], backgrounds: list[Image.Image]) -> Image.Image:
    width = rng.randint(512, 1600)
    height = int(width * rng.choice([0.5625, 0.75, 1.0, 1.333, 1.5]))
    canvas = rng.choice(backgrounds).resize((width, height), Image.BILINEAR)
    for _ in range(rng.randint(0, 3)):
        sprite = rng.choice(sprites)
        scale = rng.uniform(0.3, 0.9) * height / sprite.height
        sprite = sprite.resize((max(1, int(sprite.width * scale)), max(1, int(sprite.height * scale))))
        x = rng.randint(-sprite.width // 3, max(0, width - 2 * sprite.width // 3))
        y = rng.randint(0, max(0, height - sprite.height))
        canvas.paste(sprite, (x, y), sprite)
    return canvas


def make_shards(folder: Path, n_images: int, per_shard: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sprites, backgrounds = sample_art()
    encoded: list[bytes] = []
    for start in range(0, n_images, per_shard):
        with tarfile.open(folder / f"bench-{start // per_shard:06d}.tar", "w") as tar:
            for i in range(start, min(n_images, start + per_shard)):
                image = composite(rng, sprites, backgrounds)
                buf = io.BytesIO()
                fmt, ext = ("JPEG", "jpg") if rng.random() < 0.7 else ("PNG", "png")
                image.save(buf, format=fmt, quality=92) if fmt == "JPEG" else image.save(buf, format=fmt)
                for name, data in ((f"{i:07d}.{ext}", buf.getvalue()), (f"{i:07d}.txt", b"1girl, solo, smile")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                encoded.append(buf.getvalue())
    return encoded


def decode_floor(encoded: list[bytes]) -> float:
    """Images/s of a plain loop that opens and fully decodes each image with Pillow."""
    started = time.perf_counter()
    for data in encoded:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    return len(encoded) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        print(f"making {args.images} composited images ...", flush=True)
        encoded = make_shards(shards, args.images, args.per_shard, args.seed)
        megabytes = sum(map(len, encoded)) / 1e6
        print(f"{len(encoded)} images, {megabytes:.0f} MB in {len(list(shards.glob('*.tar')))} shards")

        floor = decode_floor(encoded)
        cfg = load_config(None, [f'workspace.path="{tmp}/ws"', f'ingest.inputs=["{shards}"]'])
        init_ray(cfg)  # not part of the timing: a cluster is up before a job starts
        started = time.perf_counter()
        summary = ingest.run(cfg, Workspace(cfg["workspace"]["path"]))
        rate = summary.rows_out["images"] / (time.perf_counter() - started)
    print(f"cores: {os.cpu_count()}")
    print(f"decode floor (Pillow open + full decode, 1 process): {floor:.1f} images/s")
    print(f"booruset ingest (probe, sha256, phash, sidecars, Parquet, Ray Data): {rate:.1f} images/s")
    print(f"ratio ingest / decode floor: {rate / floor:.2f}")


if __name__ == "__main__":
    main()
