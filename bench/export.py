"""Export throughput against competent one-process loops, in the same run.

Makes N composited images as input shards (bench/ingest.py: made once, kept in the bench cache),
runs ingest (not timed; curate and caption add only metadata columns, so the export falls back to
the source tags), then, alternating the sides `--repeats` times (median reported; before each
side, what the sides before wrote is removed and the page cache written back: `clean_slate`),
times:
  - `booruset export` of original bytes (Ray tasks on a local Ray with every core, Ray already
    started; plan, read the input shards, write shards + manifest + wids index, commit units)
    against a plain loop writing exactly the exported members (read back from the export's own
    shards, held in memory) into tar files with the same cuts, with Python's tarfile; the job's
    Ray stage (the tasks that read and write the shards) is also reported alone, against the same
    loop, with the seconds of the job's other steps: the selection (a worker's SQL), the plan (a
    task per unit, ~50 us an image) and the rest (publishes, manifest, wids index);
  - `booruset export` with export.max_size (default 1024: decode, resize, encode) per core against
    one process doing the same decode -> resize -> encode (udfs/export/resize.resize_image) of the
    same images and writing the tar files;
  - the codec path itself, one process each: resize_image against the path it replaced (Pillow
    Lanczos with reducing_gap 3, JPEG with optimize, PNG at zlib level 6), the same images.
Ends with:

    RESULT export_original_vs_plain_tar ratio=<export MB/s / tar MB/s> goal=0.8 met=yes|no
    RESULT export_resized_per_core_vs_same_loop ratio=<export MB/s per core / loop MB/s> goal=0.8 met=yes|no
    RESULT export_resize_codec_vs_previous ratio=<previous path s / resize_image s> goal=1.5 met=yes|no

    python bench/export.py --quick          # 600 images (50 through the codecs), 3 rounds: about 3 minutes
    python bench/export.py --images 2000
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import ray
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import cached_shards  # noqa: E402
from bench.results import result  # noqa: E402
from jobs import export, ingest  # noqa: E402
from jobs.config import load_config, merge  # noqa: E402
from jobs.ray_env import init_ray  # noqa: E402
from store.workspace import Workspace  # noqa: E402
from udfs.caption.caption_images import read_members  # noqa: E402
from udfs.export.resize import output_extension, resize_image, target_size  # noqa: E402

# tarfile copies a member in 16 KiB pieces unless told: in 1 MiB pieces an image is one or two
# writes, 2-2.5x faster (what a careful loop would set)
COPY_PIECE = 1 << 20


def exported_members(shards: list[Path]) -> list[list[tuple[str, bytes]]]:
    """Every member of every exported shard, in order (the baseline writes these bytes)."""
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out.append([(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()])
    return out


def plain_tar_rate(members: list[list[tuple[str, bytes]]], folder: Path) -> tuple[float, int]:
    """(MB/s, bytes) of writing the members into plain tar files, one file per exported shard."""
    folder.mkdir()
    started = time.perf_counter()
    for index, shard in enumerate(members):
        with tarfile.open(folder / f"plain-{index:06d}.tar", "w", copybufsize=COPY_PIECE) as tar:
            for name, data in shard:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in folder.glob("*.tar"))
    return size / 1e6 / seconds, size


ORIGINAL_GOAL, RESIZED_GOAL, CODEC_GOAL = 0.8, 0.8, 1.5


PARTS = {"run_in_worker": "selection", "plan_units": "plan", "run_units": "stage"}  # export's steps timed apart


def export_rate(cfg: dict, ws: Workspace, out: Path, max_size: int) -> tuple[float, dict[str, float], list[Path]]:
    """(MB/s written by the whole job, seconds of each of its PARTS and of the rest, the shards) of
    one export into a fresh folder (new unit ids: nothing is reused). The Ray stage
    (export.run_units: the tasks that read the inputs and write the shards) is timed apart from
    the selection (a worker's SQL), the plan (a task per unit) and the rest (publishes, manifest,
    wids index)."""
    cfg = merged(cfg, {"export": {"out": str(out), "max_size": max_size}})
    seconds = dict.fromkeys([*PARTS.values(), "rest"], 0.0)
    originals = {name: getattr(export, name) for name in PARTS}

    def timed(name: str):
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                seconds[PARTS[name]] += time.perf_counter() - began
        return run

    for name in PARTS:
        setattr(export, name, timed(name))
    try:
        started = time.perf_counter()
        export.run(cfg, ws)
        total = time.perf_counter() - started
    finally:
        for name, original in originals.items():
            setattr(export, name, original)
    seconds["rest"] = total - sum(seconds.values())
    shards = sorted((out / "webdataset").glob("shard-*.tar"))
    size = sum(p.stat().st_size for p in shards) / 1e6
    return size / total, seconds | {"MB": size}, shards


def clean_slate(*folders: Path) -> None:
    """Remove what the sides before wrote and write back the page cache's dirty pages, so that no
    side is timed while the kernel writes back another side's files (by the second or third round,
    the plain tar write fell from ~2 GB/s to ~300 MB/s: a measure of the disk, not of either side)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    os.sync()


def merged(cfg: dict, changes: dict) -> dict:
    out = copy.deepcopy(cfg)
    merge(out, changes)
    return out


def resize_jobs(ws: Workspace, max_size: int) -> list[tuple[bytes, tuple[int, int] | None, str]]:
    """(bytes, target size or None where the image fits, extension) of every image the export writes."""
    rows = ws.read_table("images").select(["source", "member", "width", "height", "format"]).to_pylist()
    raw = read_members([r["source"] for r in rows], [r["member"] for r in rows])
    jobs = []
    for row, data in zip(rows, raw, strict=True):
        size = target_size(row["width"], row["height"], {"buckets": False, "max_size": max_size})
        fits = size == (row["width"], row["height"])
        jobs.append((data, None if fits else size, output_extension(row["format"])))
    return jobs


def same_loop_rate(jobs: list, folder: Path, per_shard: int) -> float:
    """MB/s of one process writing the tar files: resize_image where the image is too large, its
    original bytes where it fits (as the export does)."""
    folder.mkdir()
    started = time.perf_counter()
    for index in range(0, len(jobs), per_shard):
        with tarfile.open(folder / f"loop-{index:06d}.tar", "w", copybufsize=COPY_PIECE) as tar:
            for i, (data, target, ext) in enumerate(jobs[index:index + per_shard]):
                image = data if target is None else resize_image(data, target, ext, 95, False)
                info = tarfile.TarInfo(f"{index + i:07d}.{ext}")
                info.size = len(image)
                tar.addfile(info, io.BytesIO(image))
    seconds = time.perf_counter() - started
    return sum(p.stat().st_size for p in folder.glob("*.tar")) / 1e6 / seconds


def previous_resize(data: bytes, target: tuple[int, int], ext: str) -> bytes:
    """The codec path resize_image replaced: Pillow Lanczos, JPEG optimize, PNG at zlib level 6."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft(image.mode, target)
        image.load()
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGB")
        image = image.resize(target, Image.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        if ext == "jpg":
            (image if image.mode == "RGB" else image.convert("RGB")).save(out, "JPEG", quality=95, optimize=True)
        else:
            image.save(out, "PNG")
        return out.getvalue()


def codec_seconds(jobs: list, new: bool, limit: int | None) -> float:
    """Seconds of resizing the images too large to copy (the first `limit` of them), with
    resize_image or the previous path."""
    started = time.perf_counter()
    for data, target, ext in [job for job in jobs if job[1] is not None][:limit]:
        resize_image(data, target, ext, 95, False) if new else previous_resize(data, target, ext)
    return time.perf_counter() - started



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=200, help="images per input shard")
    parser.add_argument("--max-count", type=int, default=100, help="samples per exported shard")
    parser.add_argument("--max-size", type=int, default=1024, help="export.max_size of the resized export")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec-images", type=int, help="images through the codec comparison (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="600 images, 50 of them through the codec comparison (about 3 minutes on 2 cores)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.codec_images = 600, 50
    sides = ("original", "stage", "tar", "resized", "loop", "new", "old")
    figures: dict[str, list[float]] = {name: [] for name in sides}
    split: dict[str, list[float]] = {name: [] for name in ("selection", "plan", "stage", "rest")}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = cached_shards(args.images, args.per_shard, args.seed)[0]
        cfg = load_config(None, [f'workspace.path="{tmp}/ws"', f'ingest.inputs=["{inputs}"]',
                                 f"export.max_count={args.max_count}"])
        ws = Workspace(cfg["workspace"]["path"])
        init_ray(cfg)  # not part of the timing: a cluster is up before a job starts
        cores = int(ray.cluster_resources()["CPU"])  # what the export's tasks run on
        ingest.run(cfg, ws)
        jobs = resize_jobs(ws, args.max_size)
        for run in range(args.repeats):  # alternated, so that a busy moment hits both sides
            out = {side: Path(tmp) / f"{side}{run}" for side in ("original", "plain", "resized", "loop")}
            clean_slate()
            rate, parts, shards = export_rate(cfg, ws, out["original"], 0)
            figures["original"].append(rate)
            figures["stage"].append(parts["MB"] / parts["stage"])
            for name in ("selection", "plan", "stage", "rest"):
                split[name].append(parts[name])
            members = exported_members(shards)
            clean_slate(out["original"])
            figures["tar"].append(plain_tar_rate(members, out["plain"])[0])
            clean_slate(out["plain"])
            figures["resized"].append(export_rate(cfg, ws, out["resized"], args.max_size)[0])
            clean_slate(out["resized"])
            figures["loop"].append(same_loop_rate(jobs, out["loop"], args.max_count))
            clean_slate(out["loop"])
            for new in (run % 2 == 0, run % 2 == 1):  # which goes first alternates too
                figures["new" if new else "old"].append(codec_seconds(jobs, new=new, limit=args.codec_images))
            print(f"round {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in figures.items()), flush=True)
    median = {name: statistics.median(values) for name, values in figures.items()}
    resized = sum(job[1] is not None for job in jobs)
    print(f"cores: {cores}; {args.images} images, {resized} resized to max_size {args.max_size}; "
          f"median of {args.repeats}")
    print(f"export, original bytes: {median['original']:.1f} MB/s; plain tar write of the same members "
          f"(bytes in memory, 1 process): {median['tar']:.1f} MB/s")
    print(f"export, original bytes, its Ray stage alone (tasks reading the input shards and writing the "
          f"shards): {median['stage']:.1f} MB/s, {median['stage'] / median['tar']:.2f} x the plain tar write; "
          f"the rest of the job: " + ", ".join(f"{name} {statistics.median(v):.3f} s" for name, v in split.items()
                                                if name != "stage"))
    print(f"export, resized: {median['resized']:.1f} MB/s ({median['resized'] / cores:.1f} per core); "
          f"the same decode -> resize -> encode (or copy) + tar in 1 process: {median['loop']:.1f} MB/s")
    codec = min(resized, args.codec_images or resized)
    print(f"codec path, 1 process, {codec} images: resize_image {median['new']:.2f} s, the previous path "
          f"{median['old']:.2f} s")
    print(result("export_original_vs_plain_tar", median["original"] / median["tar"], ORIGINAL_GOAL))
    print(result("export_resized_per_core_vs_same_loop", median["resized"] / cores / median["loop"], RESIZED_GOAL))
    print(result("export_resize_codec_vs_previous", median["old"] / median["new"], CODEC_GOAL))


if __name__ == "__main__":
    main()
