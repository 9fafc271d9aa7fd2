"""Ingest's reading of shards on object storage: a worker's read and probe of each image, with the
next 8 MiB piece fetched while the current one is probed (store/read_ahead.py), against the loop a
competent engineer would write without it: tarfile over Arrow's S3 stream buffered in 8 MiB
pieces (each piece one GET, made when it is needed), the same probe of each image.

The shards are the ingest bench's (bench/ingest.py cached_shards), put on a real S3-compatible
server on loopback (moto's server, a test dependency). The server runs on the same cores as the
worker, so the time a GET takes here is CPU taken from the probe: on a cluster, where the storage
is elsewhere and a GET waits on the network, the overlap is worth more than the ratio shows. Both
sides alternate `--repeats` times (median); ends with:

    RESULT object_storage_read_ahead_vs_buffered_stream ratio=<baseline s / ours s> goal=1.0 met=yes|no

    python bench/object_storage.py --quick      # 200 images: about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.fs as pafs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from s3_server import AWS, free_port  # noqa: E402

from bench.ingest import cached_shards  # noqa: E402
from bench.results import alternated, result  # noqa: E402
from udfs.ingest.probe import ProbeError, probe_image  # noqa: E402
from udfs.ingest.shard_tar import OBJECT_PIECE  # noqa: E402
from udfs.ingest.sources import Unit, read_unit  # noqa: E402

IMAGE_EXTS = ("jpg", "png", "webp")
MAX_PIXELS = 178956970


def start_server(log: Path) -> tuple[subprocess.Popen, pafs.S3FileSystem, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"127.0.0.1:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True,
                           access_key=AWS["AWS_ACCESS_KEY_ID"], secret_key=AWS["AWS_SECRET_ACCESS_KEY"])
    deadline = time.monotonic() + 60
    while True:
        try:
            fs.create_dir("bench-bucket")
            return server, fs, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def probe(data: bytes) -> None:
    try:
        probe_image(data, MAX_PIXELS)
    except ProbeError:
        pass


def ours(uris: list[str]) -> int:
    """Ingest's reader (read ahead) and the probe of each image."""
    images = 0
    for uri in uris:
        for sample in read_unit(Unit("tar", uri, "b"), 1 << 30):
            if not isinstance(sample, tuple):
                ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
                if ext:
                    probe(sample.members[ext])
                    images += 1
    return images


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
    folder, _ = cached_shards(600, 100, 0)  # the ingest bench's --quick shards
    shards = sorted(folder.glob("*.tar"))[: (200 if args.quick else args.images) // 100]
    server, fs, endpoint = start_server(Path("/tmp") / f"bench-moto-{os.getpid()}.log")
    try:
        for shard in shards:
            with fs.open_output_stream(f"bench-bucket/{shard.name}", compression=None) as out:
                out.write(shard.read_bytes())
        paths = [f"bench-bucket/{s.name}" for s in shards]
        uris = [f"s3://{p}?endpoint_override={endpoint}&scheme=http&region=us-east-1" for p in paths]
        counts = {ours(uris), buffered_loop(fs, paths)}  # warm: imports, first connection
        assert len(counts) == 1, counts
        seconds = alternated({"read ahead": lambda: ours(uris), "buffered stream": lambda: buffered_loop(fs, paths)},
                             args.repeats)
    finally:
        server.kill()
    images = counts.pop()
    for side, took in seconds.items():
        print(f"{side:>16}: {took:.2f} s, {images / took:.1f} images/s ({len(shards)} shards, {images} images)")
    print(result("object_storage_read_ahead_vs_buffered_stream", seconds["buffered stream"] / seconds["read ahead"],
                 1.0))


if __name__ == "__main__":
    main()
