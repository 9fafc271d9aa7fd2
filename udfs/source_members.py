"""Members that ingest accepted, read back from their local shards by the later jobs (export,
the captioner's images).

A job reads a few members of a shard at a time (an export unit is max_count images of a shard of
any size, a caption batch a few dozen). Finding them by walking the shard from the start costs each
read the headers (or, read as a stream, the bytes) of the whole shard before them: the work grows
with the square of the shard. On a 2,000-image shard (2 cores), export's tasks took 1.3 s against
0.5 s with seeks, and the captioner's reads in batches of 32 took 36 s against 0.3 s.
Ingest records where each image member's header starts (images.member_offset),
so a reader seeks there, checks that the header names the member, and reads its bytes; only
members without an offset (older workspaces, a header that no longer matches: the shard was
rewritten) are looked for by walking the headers, and the walk stops when all are found.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from udfs.ingest.sources import Unit, member_path, read_unit, safe_text


def source_members(source: str, kind: str, wanted: dict[str, int | None], max_member_bytes: int
                   ) -> Iterator[tuple[str, bytes]]:
    """(member, bytes) of the wanted members (name -> header offset or None) of a shard (kind
    "tar") or a folder: seeks in a local plain shard, else udfs.ingest.sources.read_unit (a stream
    of the shard, the named files of a folder). What is not found is not yielded: the caller
    reports it missing."""
    if kind == "tar" and "://" not in source:
        try:
            yield from local_tar_members(source, wanted, max_member_bytes)
            return
        except (tarfile.ReadError, OSError):
            pass  # compressed (read_unit detects the format), or gone (it says so)
    files = [member_path(source, m) for m in wanted] if kind == "folder" else []
    for sample in read_unit(Unit(kind, source, "", files), max_member_bytes):
        if isinstance(sample, tuple):
            continue  # shard-level problems: ingest reported them
        for ext, name in sample.member_names.items():
            if name in wanted:
                yield name, sample.members[ext]


def local_tar_members(path: str, wanted: dict[str, int | None], max_member_bytes: int | None
                      ) -> Iterator[tuple[str, bytes]]:
    """(member, bytes) of the wanted members (name -> header offset or None) of a local,
    uncompressed shard: those with an offset in shard order, then the rest as the walk finds
    them (the first of repeated names, as ingest took it). tarfile.ReadError when the file is
    not a plain tar (compressed?): the caller reads it as a stream. Names go through the same
    safe_text as at ingest; a member over max_member_bytes (None: no limit) is not read."""
    with tarfile.open(path, mode="r:") as tar:
        left = {name for name, offset in wanted.items() if offset is None}
        for name, offset in sorted(((n, o) for n, o in wanted.items() if o is not None), key=lambda item: item[1]):
            info = _header_at(tar, int(offset))
            if info is None or safe_text(info.name) != name or not info.isfile():
                left.add(name)  # moved or rewritten since ingest: walk for it
            elif _fits(info, max_member_bytes):
                data = _member_bytes(tar, info)
                if data is not None:  # else cut short since ingest: reported missing
                    yield name, data
    if left:
        yield from _walk(path, left, max_member_bytes)


def _header_at(tar: tarfile.TarFile, offset: int) -> tarfile.TarInfo | None:
    """The member whose header (its pax header first, if any) starts at `offset`; None where
    there is none (a shard cut short, rewritten since ingest)."""
    try:
        tar.fileobj.seek(offset)
        return tarfile.TarInfo.fromtarfile(tar)
    except (tarfile.TarError, EOFError, OSError):
        return None


def _member_bytes(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes | None:
    try:
        return tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError):
        return None


def _fits(info: tarfile.TarInfo, max_member_bytes: int | None) -> bool:
    return max_member_bytes is None or info.size <= max_member_bytes


def _walk(path: str, names: set[str], max_member_bytes: int | None) -> Iterator[tuple[str, bytes]]:
    """The named members found walking the headers from the start, stopping once all are found."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                name = safe_text(info.name)
                if name in names and info.isfile() and _fits(info, max_member_bytes):
                    names.discard(name)  # a later one of the name is not read (ingest took this one)
                    yield name, tar.extractfile(info).read()
                    if not names:
                        return
    except (tarfile.TarError, EOFError, OSError):
        return  # a truncated shard: the members not read are reported as missing
