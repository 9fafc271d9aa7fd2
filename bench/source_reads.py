"""Reads of a few members of a large shard at a time, as export units and caption batches make
them: seeks at images.member_offset (udfs/source_members.py) against a walk of the shard's headers
that stops once all members are found (tarfile's random-access mode, what the readers did with no
offset: the competent way without an index), alternated, median of the rounds.

One shard of N composited images (bench/ingest.py, made once and kept in the bench cache), read
  - in export units of --unit images (local_tar_members, one call per unit), and
  - in caption batches of --batch images (udfs/caption/caption_images.read_members).
Ends with:

    RESULT source_reads_export_units_seek_vs_walk ratio=<walk s / seek s> goal=1 met=yes|no
    RESULT source_reads_caption_batches_seek_vs_walk ratio=<walk s / seek s> goal=1 met=yes|no

    python bench/source_reads.py --quick        # one 600-image shard, 3 rounds (about 1 minute, first time 2)
    python bench/source_reads.py --images 2000
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import cached_shards  # noqa: E402
from bench.results import alternated, result  # noqa: E402
from udfs.caption.caption_images import read_members  # noqa: E402
from udfs.source_members import local_tar_members  # noqa: E402


def image_members(shard: Path) -> list[tuple[str, int]]:
    """(member, header offset) of the shard's images, in shard order (as ingest records them)."""
    with tarfile.open(shard) as tar:
        return [(m.name, m.offset) for m in tar if not m.name.endswith((".txt", ".json"))]


def unit_reads(shard: Path, members: list[tuple[str, int]], unit: int, seek: bool) -> int:
    """Bytes read, one local_tar_members call per unit of `unit` images."""
    read = 0
    for i in range(0, len(members), unit):
        wanted = {name: offset if seek else None for name, offset in members[i:i + unit]}
        read += sum(len(data) for _, data in local_tar_members(str(shard), wanted, None))
    return read


def batch_reads(shard: Path, members: list[tuple[str, int]], batch: int, seek: bool) -> int:
    """Bytes read, one read_members call per caption batch of `batch` images."""
    read = 0
    for i in range(0, len(members), batch):
        names = [name for name, _ in members[i:i + batch]]
        offsets = [offset for _, offset in members[i:i + batch]] if seek else None
        read += sum(len(data or b"") for data in read_members([str(shard)] * len(names), names, offsets))
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images in the one shard")
    parser.add_argument("--unit", type=int, default=100, help="images per export unit (export.max_count)")
    parser.add_argument("--batch", type=int, default=32, help="images per caption batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a 600-image shard")
    args = parser.parse_args()
    if args.quick:
        args.images = 600
    folder = cached_shards(args.images, args.images, 0)[0]
    shard = next(folder.glob("*.tar"))
    members = image_members(shard)
    size = unit_reads(shard, members, args.unit, True)
    assert size == unit_reads(shard, members, args.unit, False) == batch_reads(shard, members, args.batch, True)
    seconds = alternated({
        "units, seek": lambda: unit_reads(shard, members, args.unit, True),
        "units, walk": lambda: unit_reads(shard, members, args.unit, False),
        "batches, seek": lambda: batch_reads(shard, members, args.batch, True),
        "batches, walk": lambda: batch_reads(shard, members, args.batch, False),
    }, args.rounds)
    print(f"one shard of {len(members)} images, {size / 1e6:.0f} MB of them; median of {args.rounds} rounds")
    for name, value in seconds.items():
        print(f"  {name}: {value:.3f} s, {size / 1e6 / value:.0f} MB/s")
    print(result("source_reads_export_units_seek_vs_walk", seconds["units, walk"] / seconds["units, seek"], 1))
    print(result("source_reads_caption_batches_seek_vs_walk", seconds["batches, walk"] / seconds["batches, seek"], 1))


if __name__ == "__main__":
    main()
