"""Export throughput against writing the same bytes into plain tar files, in the same run.

Makes N composited images as input shards (bench/ingest.py's generator), runs ingest (not timed;
curate and caption add only metadata columns, so the export falls back to the source tags), then times:
  - `booruset export` to WebDataset shards (Ray Data on a local Ray with every core, Ray already
    started): plan, read the input shards, write shards + manifest + wids index, commit units;
  - a plain loop that writes exactly the exported members (the bytes read back from the export's
    own shards, held in memory) into tar files with the same cuts, with Python's tarfile.
Prints both MB/s and their ratio. --max-size 0 (default) exports original bytes, so both sides
write the same bytes; --max-size 1024 adds resizing to the export side (the baseline stays a copy).

    python bench/export.py --images 2000
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import make_shards  # noqa: E402
from jobs import export, ingest  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.ray_env import init_ray  # noqa: E402
from store.workspace import Workspace  # noqa: E402


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
        with tarfile.open(folder / f"plain-{index:06d}.tar", "w") as tar:
            for name, data in shard:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in folder.glob("*.tar"))
    return size / 1e6 / seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=200, help="images per input shard")
    parser.add_argument("--max-count", type=int, default=100, help="samples per exported shard")
    parser.add_argument("--max-size", type=int, default=0, help="export.max_size (0: original bytes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        print(f"making {args.images} composited images ...", flush=True)
        make_shards(inputs, args.images, args.per_shard, args.seed)
        out = Path(tmp) / "export"
        cfg = load_config(None, [f'workspace.path="{tmp}/ws"', f'ingest.inputs=["{inputs}"]',
                                 f'export.out="{out}"', f"export.max_size={args.max_size}",
                                 f"export.max_count={args.max_count}"])
        ws = Workspace(cfg["workspace"]["path"])
        init_ray(cfg)  # not part of the timing: a cluster is up before a job starts
        ingest.run(cfg, ws)

        started = time.perf_counter()
        summary = export.run(cfg, ws)
        seconds = time.perf_counter() - started
        shards = sorted((out / "webdataset").glob("shard-*.tar"))
        size = sum(p.stat().st_size for p in shards)
        ours = size / 1e6 / seconds
        baseline, plain_size = plain_tar_rate(exported_members(shards), Path(tmp) / "plain")
    print(f"cores: {os.cpu_count()}; {summary.rows_in} samples, {len(shards)} shards, {size / 1e6:.0f} MB "
          f"(plain tars {plain_size / 1e6:.0f} MB); export.max_size={args.max_size}")
    print(f"plain tar files (same members, tarfile, 1 process, bytes already in memory): {baseline:.1f} MB/s")
    print(f"booruset export (read inputs, {'resize, ' if args.max_size else ''}write shards, manifest, "
          f"commit; Ray Data): {ours:.1f} MB/s")
    print(f"ratio export / plain tar: {ours / baseline:.2f}")


if __name__ == "__main__":
    main()
