"""Ingest throughput against the decode it does itself, per core, measured in the same run.

Makes N realistic images by compositing the bundled sample's sprites onto its backgrounds
(random sizes and positions, JPEG and PNG), writes them as WebDataset shards (once: they are kept
in the bench cache, ~/.cache/booruset-bench), then times,
alternating the sides `--repeats` times (median reported):
  - `booruset ingest` (a Ray task per input shard on a local Ray with every core, Ray already
    started and one job run untimed before, a fresh workspace each time), per core: images/s / cores;
  - the baseline: one process opening and decoding each image as ingest does (JPEG in draft mode
    at the smallest DCT scale that keeps 256 pixels, for the pHash; 8-bit PNGs by libspng; other
    formats in full by Pillow), plus its sha256: the floor of what ingest must do per image. The
    same with Pillow for every image (ingest's decode before libspng) and Pillow's full decode are
    printed too.
And a new worker's start: a fresh interpreter that has Ray loaded imports ingest's worker module
and ingests a unit of one image (what the import leaves for later, the first pHash's scipy and
the first Parquet write's pandas, counts too). Ends with:

    RESULT ingest_per_core_vs_same_decode ratio=<ingest wall images/s per core / baseline> goal=0.8 met=yes|no
    RESULT ingest_per_worker_vs_same_decode ratio=<images per second of a worker's time in its units
                                                    / baseline> goal=0.8 met=yes|no
    RESULT ingest_worker_start ratio=<goal seconds / seconds to the first image> goal=1 met=yes|no   (0.5 s or less)

    python bench/ingest.py --quick      # 600 images, 3 rounds: about 2 minutes on 2 cores
    python bench/ingest.py --images 3000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.real_models import CACHE  # noqa: E402
from bench.results import result  # noqa: E402
from jobs import ingest  # noqa: E402
from jobs.config import SAMPLE_SHARDS, load_config  # noqa: E402
from jobs.ray_env import init_ray  # noqa: E402
from store.workspace import Workspace  # noqa: E402
from udfs.ingest.probe import PHASH_DRAFT_SIZE  # noqa: E402
from udfs.ingest.sources import discover_units, read_unit  # noqa: E402
from udfs.png_pixels import load_pixels  # noqa: E402


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


SHARDS_VERSION = 1  # part of the cached shards' folder name: bump when make_shard changes


def cached_shards(n_images: int, per_shard: int, seed: int) -> tuple[Path, list[bytes]]:
    """The folder of make_shards' shards for these arguments, made once and kept in the bench
    cache (bench/real_models.CACHE; 600 images: 300 MB, 40-70 s to make on 2 cores), and the
    encoded images in order. The folder is only ever read (by ingest, by export from its units)."""
    folder = CACHE / f"shards-v{SHARDS_VERSION}-{n_images}-{per_shard}-{seed}"
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        print(f"making {n_images} composited images into {folder} ...", flush=True)
        began = time.perf_counter()
        make_shards(partial, n_images, per_shard, seed)
        partial.rename(folder)  # whole or not there: a killed run leaves only the .partial
        print(f"made in {time.perf_counter() - began:.0f} s", flush=True)
    encoded = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            encoded += [tar.extractfile(m).read() for m in tar if not m.name.endswith(".txt")]
    return folder, encoded


def make_shards(folder: Path, n_images: int, per_shard: int, seed: int) -> list[bytes]:
    """Shards of n_images composited images (JPEG and PNG) and their encoded bytes, in order.
    One process per core makes them (the encoding, PNGs above all, is 70% of it: 12 s a hundred
    images on one core here); each shard has its own random stream, so the images do not depend
    on the number of processes."""
    starts = range(0, n_images, per_shard)
    with ProcessPoolExecutor(min(len(starts), os.cpu_count() or 1) or 1) as pool:
        parts = pool.map(make_shard, [folder / f"bench-{s // per_shard:06d}.tar" for s in starts], starts,
                         [min(n_images, s + per_shard) for s in starts], [seed] * len(starts))
        return [data for part in parts for data in part]


def make_shard(path: Path, first: int, end: int, seed: int) -> list[bytes]:
    """One shard of the images first..end-1 (members `<index>.jpg|png` and a `.txt` of tags)."""
    rng = random.Random(f"{seed}-{first}")
    sprites, backgrounds = sample_art()
    encoded: list[bytes] = []
    with tarfile.open(path, "w") as tar:
        for i in range(first, end):
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


PER_CORE_GOAL = 0.8
WORKER_START_GOAL_S = 0.5


def full_decode_rate(encoded: list[bytes]) -> float:
    """Images/s of a plain loop that opens and fully decodes each image with Pillow."""
    started = time.perf_counter()
    for data in encoded:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    return len(encoded) / (time.perf_counter() - started)


def same_decode_rate(encoded: list[bytes], pillow_only: bool = False) -> float:
    """Images/s of one process doing ingest's own decode (udfs/ingest/probe.decoded: JPEG in draft
    mode, 8-bit PNGs by libspng, the rest in full by Pillow) and the sha256 of the bytes; with
    `pillow_only`, every image by Pillow (ingest's decode before libspng)."""
    started = time.perf_counter()
    for data in encoded:
        hashlib.sha256(data).digest()
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("RGB", PHASH_DRAFT_SIZE)
            if pillow_only:
                image.load()
            else:
                load_pixels(image, data)
    return len(encoded) / (time.perf_counter() - started)


def ingest_rates(shards: Path, root: Path, run: int) -> tuple[float, float]:
    """(images/s of the whole job, images per second of a worker's own time in its units)."""
    cfg = load_config(None, [f'workspace.path="{root}/ws{run}"', f'ingest.inputs=["{shards}"]'])
    init_ray(cfg)  # not part of the timing: a cluster is up before a job starts
    ws = Workspace(cfg["workspace"]["path"])
    started = time.perf_counter()
    summary = ingest.run(cfg, ws)
    wall = time.perf_counter() - started
    worker_seconds = sum(info["seconds"] for info in ws.done_units("ingest").values())
    return summary.rows_out["images"] / wall, summary.rows_out["images"] / worker_seconds


WORKER_START = """
import json, sys, tempfile, time, ray
started = time.perf_counter()
from store.workspace import Workspace
from udfs.ingest.ingest_unit import UnitIngest
from udfs.ingest.sources import Unit
imported = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    unit = Unit("tar", sys.argv[1], "in0/first", [], input="in0")
    UnitIngest(Workspace(tmp + "/ws"), "first", unit, json.loads(sys.argv[2])).run()
print(imported - started, time.perf_counter() - started)
"""


def worker_start_seconds(shards: Path, folder: Path, runs: int = 5) -> tuple[float, float]:
    """(seconds to import ingest's worker module, seconds to its first image written): a fresh
    interpreter with Ray loaded imports the module, then ingests a unit of one image (the first
    pHash and the first Parquet write load what the import leaves for later), medians of `runs`."""
    one = folder / "first.tar"
    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as source, tarfile.open(one, "w") as target:
        member = next(m for m in source if m.isfile())
        target.addfile(member, source.extractfile(member))
    options = json.dumps(ingest.unit_options(load_config(None)))
    times = [tuple(map(float, subprocess.run([sys.executable, "-c", WORKER_START, str(one), options],
                                             capture_output=True, text=True, cwd=REPO, check=True).stdout.split()))
             for _ in range(runs)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="600 images (about 2 minutes on 2 cores)")
    args = parser.parse_args()
    if args.quick:
        args.images = 600
    shards, encoded = cached_shards(args.images, args.per_shard, args.seed)
    megabytes = sum(map(len, encoded)) / 1e6
    print(f"{len(encoded)} images, {megabytes:.0f} MB in {len(list(shards.glob('*.tar')))} shards", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        init_ray(load_config(None, [f'workspace.path="{tmp}/ws"']))
        cores = int(ray.cluster_resources()["CPU"])  # what ingest's tasks run on
        # a first job starts Ray's workers (2-5 s on 2 cores): a cluster that
        # has run a job has them, so that one is not timed
        ingest_rates(shards, Path(tmp), -1)
        ours, per_worker, baseline, pillow = [], [], [], []
        for run in range(args.repeats):  # alternated, so that a busy moment hits both sides
            rate, worker_rate = ingest_rates(shards, Path(tmp), run)
            ours.append(rate)
            per_worker.append(worker_rate)
            baseline.append(same_decode_rate(encoded))
            pillow.append(same_decode_rate(encoded, pillow_only=True))
            print(f"round {run + 1}: ingest {rate:.1f} images/s ({worker_rate:.1f} per worker-second), "
                  f"same decode {baseline[-1]:.1f} images/s, Pillow-only {pillow[-1]:.1f}", flush=True)
        full = full_decode_rate(encoded)
        imported, start = worker_start_seconds(shards, Path(tmp))
    rate, worker_rate, floor = statistics.median(ours), statistics.median(per_worker), statistics.median(baseline)
    print(f"cores: {cores}; median of {args.repeats}")
    print(f"full decode (Pillow open + load, 1 process): {full:.1f} images/s")
    print(f"same decode + sha256 (1 process): {floor:.1f} images/s; with Pillow for every image (ingest's "
          f"decode before libspng): {statistics.median(pillow):.1f}, ingest per core "
          f"{rate / cores / statistics.median(pillow):.2f} x that")
    print(f"booruset ingest (probe, sha256, phash, sidecars, Parquet, Ray tasks): {rate:.1f} images/s, "
          f"{rate / cores:.1f} per core; {worker_rate:.1f} per second of a worker's time in its units")
    print(f"ingest worker start: module import {imported:.2f} s, to its first image written {start:.2f} s")
    print(result("ingest_per_core_vs_same_decode", rate / cores / floor, PER_CORE_GOAL))
    print(result("ingest_per_worker_vs_same_decode", worker_rate / floor, PER_CORE_GOAL))
    print(result("ingest_worker_start", WORKER_START_GOAL_S / start, 1))


if __name__ == "__main__":
    main()
