"""Ingest's reading of images on object storage, one worker's read and probe of each image:

- shards: the next 8 MiB piece fetched while the current one is probed (store/read_ahead.py),
  against the loop a competent engineer would write without it: tarfile over Arrow's S3 stream
  buffered in 8 MiB pieces (each piece one GET, made when it is needed), the same probe;
- a folder of the same images as loose files: ingest's folder reader (eight samples fetched at
  once), against the same images read from local disk, in this process's CPU seconds (what a
  worker's core pays for the store: the loopback server's own CPU is left out, as a cluster's
  store is elsewhere), and in wall time, for scale, with one object fetched at a time too.

The images are the ingest bench's (bench/ingest.py cached_shards), put on a real S3-compatible
server on loopback (moto's server, a test dependency). The server runs on the same cores as the
worker, so the time a GET takes here is CPU taken from the probe: on a cluster, where the storage
is elsewhere and a GET waits on the network, fetching ahead is worth more than the ratios show.
The sides alternate `--repeats` times (median); ends with:

    RESULT object_storage_read_ahead_vs_buffered_stream ratio=<baseline s / ours s> goal=1.0 met=yes|no
    RESULT object_storage_folder_vs_disk_folder_cpu ratio=<disk CPU s / object storage CPU s> goal=0.8 met=yes|no

    python bench/object_storage.py --quick      # 200 images: about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.fs as pafs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from s3_server import AWS, s3_filesystem, start_moto  # noqa: E402

from bench.ingest import cached_shards  # noqa: E402
from bench.results import alternated, result  # noqa: E402
from udfs.ingest import sources  # noqa: E402
from udfs.ingest.probe import ProbeError, probe_image  # noqa: E402
from udfs.ingest.shard_tar import OBJECT_PIECE  # noqa: E402
from udfs.ingest.sources import Unit, discover_units, read_unit  # noqa: E402

IMAGE_EXTS = ("jpg", "png", "webp")
MAX_PIXELS = 178956970


def start_server(log: Path) -> tuple[subprocess.Popen, pafs.S3FileSystem, str]:
    server, endpoint = start_moto(log, "bench-bucket")
    return server, s3_filesystem(endpoint), endpoint


def probe(data: bytes) -> None:
    try:
        probe_image(data, MAX_PIXELS)
    except ProbeError:
        pass


def ours(uris: list[str]) -> int:
    """Ingest's reader (read ahead) and the probe of each image."""
    return probe_units([Unit("tar", uri, "b") for uri in uris])


def probe_units(units: list[Unit]) -> int:
    images = 0
    for unit in units:
        for sample in read_unit(unit, 1 << 30):
            if not isinstance(sample, tuple):
                ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
                if ext:
                    probe(sample.members[ext])
                    images += 1
    return images


def folder_of(shards: list[Path], folder: Path) -> Path:
    """The shards' members as loose files (once: kept in the bench cache beside the shards)."""
    if not folder.exists():
        staging = folder.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for shard in shards:
            with tarfile.open(shard) as tar:
                tar.extractall(staging / shard.stem, filter="data")
        staging.rename(folder)
    return folder


def one_at_a_time(units: list[Unit]) -> int:
    """The folder reader fetching one object at a time."""
    ahead, sources.OBJECT_SAMPLES_AHEAD = sources.OBJECT_SAMPLES_AHEAD, 1
    try:
        return probe_units(units)
    finally:
        sources.OBJECT_SAMPLES_AHEAD = ahead


def buffered_loop(fs: pafs.S3FileSystem, paths: list[str]) -> int:
    """tarfile over Arrow's S3 stream in 8 MiB buffered pieces, the same probe of each image."""
    images = 0
    for path in paths:
        with fs.open_input_stream(path, compression=None, buffer_size=OBJECT_PIECE) as raw, \
                tarfile.open(fileobj=raw, mode="r|", bufsize=1 << 16) as tar:
            for info in tar:
                if info.isfile() and info.name.rsplit(".", 1)[-1] in IMAGE_EXTS:
                    probe(tar.extractfile(info).read())
                    images += 1
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the first 200 images (2 shards), 3 rounds")
    args = parser.parse_args()
    os.environ.update(AWS)
    folder_path, _ = cached_shards(600, 100, 0)  # the ingest bench's --quick shards
    shards = sorted(folder_path.glob("*.tar"))[: (200 if args.quick else args.images) // 100]
    server, fs, endpoint = start_server(Path("/tmp") / f"bench-moto-{os.getpid()}.log")
    try:
        for shard in shards:
            with fs.open_output_stream(f"bench-bucket/{shard.name}", compression=None) as out:
                out.write(shard.read_bytes())
        folder = folder_of(shards, folder_path.parent / f"{folder_path.name}-loose-{len(shards)}")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with fs.open_output_stream(f"bench-bucket/loose/{path.relative_to(folder)}", compression=None) as out:
                out.write(path.read_bytes())
        paths = [f"bench-bucket/{s.name}" for s in shards]
        query = f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        uris = [f"s3://{p}{query}" for p in paths]
        s3_folder = discover_units([f"s3://bench-bucket/loose{query}"], 1000)
        disk_folder = discover_units([str(folder)], 1000)
        counts = {ours(uris), buffered_loop(fs, paths), probe_units(s3_folder), probe_units(disk_folder)}  # warm
        assert len(counts) == 1, counts
        seconds = alternated({"read ahead": lambda: ours(uris), "buffered stream": lambda: buffered_loop(fs, paths),
                              "s3 folder": lambda: probe_units(s3_folder),
                              "disk folder": lambda: probe_units(disk_folder),
                              "s3 folder, 1 at a time": lambda: one_at_a_time(s3_folder)}, args.repeats)
        cpu = alternated({"s3 folder": lambda: probe_units(s3_folder), "disk folder": lambda: probe_units(disk_folder)},
                         args.repeats, clock=time.process_time)  # this process's CPU, all its threads
    finally:
        server.kill()
    images = counts.pop()
    for side, took in seconds.items():
        print(f"{side:>22}: {took:.2f} s, {images / took:.1f} images/s ({len(shards)} shards, {images} images)")
    print(result("object_storage_read_ahead_vs_buffered_stream", seconds["buffered stream"] / seconds["read ahead"],
                 1.0))
    for side, took in cpu.items():
        print(f"{side:>22}: {took:.2f} CPU s of this process")
    print(result("object_storage_folder_vs_disk_folder_cpu", cpu["disk folder"] / cpu["s3 folder"], 0.8))


if __name__ == "__main__":
    main()
