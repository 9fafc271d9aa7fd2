"""Members that ingest accepted, read back from their sources by the later jobs (export, the
captioners' images, the report's examples, the review page).

A job reads a few members of a shard at a time (an export unit is max_count images of a shard of
any size, a caption batch a few dozen). Finding them by walking the shard from the start costs each
read the headers (or, read as a stream, the bytes) of the whole shard before them: the work grows
with the square of the shard. On a 2,000-image shard (2 cores), export's tasks took 1.3 s against
0.5 s with seeks, and the captioner's reads in batches of 32 took 36 s against 0.3 s.

Ingest records where each image member's header starts (images.member_offset). In a local shard a
reader seeks there, checks that the header names the member, and reads its bytes; only members
without an offset (older workspaces, a header that no longer matches: the shard was rewritten) are
looked for by walking the headers, and the walk stops when all are found. A shard on object
storage is read as one stream from the first wanted member (ranged GETs of OBJECT_PIECE).
"""

from __future__ import annotations

import sys
import tarfile
from collections.abc import Iterator

import pyarrow.fs as pafs

from store.read_ahead import ReadAhead
from store.uris import store_failure
from udfs.ingest.shard_tar import OBJECT_PIECE, STREAM_PIECE, WatchedHeader, open_plain_tar, read_past_bad_headers
from udfs.ingest.sources import Unit, member_path, read_unit, safe_text, source_kind


def source_members(source: str, wanted: dict[str, int | None], max_member_bytes: int | None,
                   sizes: dict[str, int] | None = None) -> Iterator[tuple[str, bytes]]:
    """(member, bytes) of the wanted members (name -> header offset or None) of a shard or a
    folder (images.source, told apart by source_kind): seeks in a local plain shard; in a shard
    on object storage whose members all have offsets, one ranged stream from the first of them;
    else udfs.ingest.sources.read_unit (a stream of the shard from its start, the named files of
    a folder), stopping once all are found. What is not found is not yielded: the caller reports
    it missing. With `sizes` (name -> images.bytes), a member of another size is not the one
    ingest saw (the shard or file was rewritten since): it is not found either, rather than
    paired with the rows of the picture it replaced."""
    kind, left = source_kind(source), set(wanted)
    sizes = sizes or {}
    if kind == "tar" and "://" not in source:
        try:
            for name, data in local_tar_members(source, wanted, max_member_bytes, sizes):
                left.discard(name)  # a failure part way: read_unit looks only for the rest
                yield name, data
            return
        except (tarfile.ReadError, OSError):
            pass  # compressed (read_unit detects the format), or gone (it says so)
    if kind == "tar" and "://" in source and wanted and None not in wanted.values():
        try:  # what it finds leaves `left`
            yield from _ranged_stream(source, list(wanted.values()), left, max_member_bytes, sizes)
        except (tarfile.TarError, EOFError, OSError) as exc:
            if failed := store_failure(exc, source):  # the store does not answer: not again from the start
                raise failed from None
            # else compressed (the offsets are not the file's), or gone: read_unit says which
    if left:
        yield from _read_unit_members(source, kind, left, max_member_bytes, sizes)


def _ranged_stream(uri: str, wanted: list[int], names: set[str], max_member_bytes: int | None,
                   sizes: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    """The named members of a plain shard on object storage, read as one stream from the first of
    their headers' offsets (`wanted`) in OBJECT_PIECE reads, each one ranged GET: an export unit
    or a caption batch reads its own span of the shard, not the shard up to it."""
    fs, path = pafs.FileSystem.from_uri(uri)
    start = min(wanted)
    raw = fs.open_input_file(path)
    raw.seek(start)  # only sets the position
    # ReadAhead closes `raw`; it reads ahead while the last wanted header is not yet fetched, the
    # pieces after it only when asked for. tarfile's buffer stays small: it copies what is left of
    # it at each header read (8 MiB ones took 1.1 s for 2,000 members against 0.08 s).
    with ReadAhead(raw, OBJECT_PIECE, ahead_until=max(wanted) - start + 1) as stream, \
            tarfile.open(fileobj=stream, mode="r|", bufsize=STREAM_PIECE, tarinfo=WatchedHeader) as tar:
        yield from _found(read_past_bad_headers(tar), names, max_member_bytes, sizes)


def _read_unit_members(source: str, kind: str, names: set[str], max_member_bytes: int | None,
                       sizes: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    # in name order: a set's order changes with each process's hash seed, and so did the order
    # of an export shard's samples from a folder input
    files = [member_path(source, m) for m in sorted(names)] if kind == "folder" else []
    for sample in read_unit(Unit(kind, source, "", files), max_member_bytes or sys.maxsize):
        if isinstance(sample, tuple):
            continue  # shard-level problems: ingest reported them
        for ext, name in sample.member_names.items():
            if name in names and _as_seen(name, len(sample.members[ext]), sizes):
                names.discard(name)
                yield name, sample.members[ext]
        if not names:
            return


def local_tar_members(path: str, wanted: dict[str, int | None], max_member_bytes: int | None,
                      sizes: dict[str, int] | None = None) -> Iterator[tuple[str, bytes]]:
    """(member, bytes) of the wanted members (name -> header offset or None) of a local,
    uncompressed shard: those with an offset in shard order, then the rest as the walk finds
    them (the first of repeated names, as ingest took it). tarfile.ReadError when the file is
    not a plain tar (compressed?): the caller reads it as a stream. Names go through the same
    safe_text as at ingest; a member over max_member_bytes (None: no limit) is not read."""
    with tarfile.open(path, mode="r:") as tar:
        left = {name for name, offset in wanted.items() if offset is None}
        for name, offset in sorted(((n, o) for n, o in wanted.items() if o is not None), key=lambda item: item[1]):
            info = _header_at(tar, int(offset))
            rewritten = info is None or safe_text(info.name) != name or not info.isfile()
            if rewritten or not _as_seen(name, info.size, sizes):
                left.add(name)  # moved or rewritten since ingest: walk for it
            elif _fits(info, max_member_bytes):
                data = _member_bytes(tar, info)
                if data is not None:  # else cut short since ingest: reported missing
                    yield name, data
    if left:
        yield from _walk(path, left, max_member_bytes, sizes)


def _header_at(tar: tarfile.TarFile, offset: int) -> tarfile.TarInfo | None:
    """The member whose header (its pax header first, if any) starts at `offset`; None where
    there is none (a shard cut short, rewritten since ingest)."""
    try:
        tar.fileobj.seek(offset)
        return tarfile.TarInfo.fromtarfile(tar)
    except (tarfile.TarError, EOFError, OSError):
        return None


def _member_bytes(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes | None:
    """The member's bytes; None where the shard ends before them (cut short since ingest). Read
    from the shard's file in one read, as tarfile's extractfile gives them for a member that is
    not sparse: its file object reads them in 8 KiB pieces through two more objects, ~75 us a
    member (a third of an export unit's reads of its source)."""
    try:
        if info.sparse is not None:  # its bytes are pieces with holes between: tarfile puts them together
            return tar.extractfile(info).read()
        tar.fileobj.seek(info.offset_data)
        data = tar.fileobj.read(info.size)
    except (tarfile.TarError, EOFError, OSError):
        return None
    return data if len(data) == info.size else None


def _fits(info: tarfile.TarInfo, max_member_bytes: int | None) -> bool:
    return max_member_bytes is None or info.size <= max_member_bytes


def _as_seen(name: str, size: int, sizes: dict[str, int] | None) -> bool:
    """Whether the member `name` of `size` bytes has the size ingest saw (when it is known)."""
    return not sizes or sizes.get(name, size) == size


def _walk(path: str, names: set[str], max_member_bytes: int | None, sizes: dict[str, int] | None
          ) -> Iterator[tuple[str, bytes]]:
    """The named members found walking the headers from the start, stopping once all are found."""
    try:
        with open_plain_tar(path) as tar:
            yield from _found(tar, names, max_member_bytes, sizes)
    except (tarfile.TarError, EOFError, OSError):
        return  # a truncated shard: the members not read are reported as missing


def _found(tar: tarfile.TarFile, names: set[str], max_member_bytes: int | None, sizes: dict[str, int] | None
           ) -> Iterator[tuple[str, bytes]]:
    """The named members of `tar` from where it stands, the first of each name that fits (as
    ingest took it) and has the size ingest saw, until all are found (`names` is emptied)."""
    for info in tar:
        name = safe_text(info.name)
        if name in names and info.isfile() and _fits(info, max_member_bytes) and _as_seen(name, info.size, sizes):
            names.discard(name)
            yield name, tar.extractfile(info).read()
            if not names:
                return
