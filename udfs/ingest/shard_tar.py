"""Opening a WebDataset shard with tarfile so that a damaged shard loses only what is damaged, and
says so.

tarfile stops quietly at the first bad member header after the first one (a bad checksum, a
zeroed block, a cut file), which would lose the rest of a shard without a word. Here:
- a block that is no header is skipped, as GNU tar does ("Skipping to next header"), until the
  next good header; when the skipped blocks held data, an errors row says which bytes were lost;
- two zero blocks in a row are tar's end of the archive, as for every tar reader; data after
  them (a zeroed stretch inside the shard, another archive appended, the tail of a longer shard
  the file once held) is not read, as members could be invented from stale bytes, but reported;
- a shard that ends without them, or inside a header, is reported cut short;
- a compressed shard is decompressed whole: every gzip member, every bz2, xz or zstd stream in
  turn (tarfile's own stream, "r|*", stops at the end of the first: a shard written by bgzip,
  pbzip2 or pzstd, or by concatenating pieces, lost all but its first piece).

Written on tarfile's own skipping (`ignore_zeros`, which tries each block after a bad one) with a
TarInfo subclass that watches the header reads: tarfile has no hook that says what it skipped.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager

import pyarrow as pa
import pyarrow.fs as pafs

from store.read_ahead import ReadAhead

BLOCK = tarfile.BLOCKSIZE
NAME_FIELD = 100  # bytes of a tar header's name field: a longer name needs a pax or GNU long-name header first
STREAM_PIECE = 1 << 16  # tarfile's default 10 KiB reads cost a third more (90 -> 55 ms for 100 MB)
# Object storage answers a GET in tens of ms, and Arrow's S3 stream makes each read one ranged GET:
# a shard there is read in pieces of MBs (tarfile's 64 KiB reads were 761 GETs for a 50 MB shard),
# one ahead (store/read_ahead.py).
OBJECT_PIECE = 8 << 20
Problem = tuple[str, str, str]  # (member, kind, message): an errors row of the shard or of a member
# What reading a shard may raise: tarfile's errors, a cut or damaged compressed stream (EOFError,
# OSError; gzip's inflate raises zlib.error, xz's lzma.LZMAError) and a file that cannot be read.
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
HEAD = 10  # bytes of a shard that tell its compression (bzip2's magic is the longest)


def read_past_bad_headers(tar: tarfile.TarFile) -> tarfile.TarFile:
    """`tar`, opened with WatchedHeader, reading on past a damaged member header to the next
    good one. Set after opening, so that a file that does not start with a header still fails to
    open as a plain tar (and is read as compressed, or as no tar at all)."""
    if not issubclass(tar.tarinfo, WatchedHeader):  # without it, read on past tar's end into stale bytes
        raise TypeError("open the tar with tarinfo=WatchedHeader")
    tar.ignore_zeros = True
    return tar


class WatchedHeader(tarfile.TarInfo):
    """tarfile's member header, keeping on the archive (`booruset_watch`) the blocks since the
    last good header that were no header, and how the headers ended."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as exc:
            exc.booruset_block = buf  # type: ignore[attr-defined]  # what was skipped (see _cut_name)
            raise

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        watch = _watch(tar)
        try:
            return super().fromtarfile(tar)
        except tarfile.SubsequentHeaderError as exc:
            # the header after a pax or GNU long-name header is bad: tarfile would stop reading
            # the shard; skipped like any bad block instead (with the long-name header's blocks)
            _skipped(watch, tar.offset, f"a bad header after a long-name header: {exc}", b"")
            raise tarfile.InvalidHeaderError(str(exc)) from exc
        except tarfile.EOFHeaderError:
            gap = watch["gap"]
            # two zero blocks in a row end the archive; not inside a stretch a bad header began
            # (the data of the member it stood for may hold zero blocks)
            if watch["zero_at"] == tar.offset - BLOCK and not (gap and gap["why"]):
                watch["end"] = "end-of-archive"
                raise tarfile.EmptyHeaderError("end-of-archive blocks") from None  # tarfile stops there
            watch["zero_at"] = tar.offset
            _skipped(watch, tar.offset, None, b"")
            raise
        except tarfile.InvalidHeaderError as exc:
            _skipped(watch, tar.offset, str(exc) or type(exc).__name__, getattr(exc, "booruset_block", b""))
            raise
        except tarfile.HeaderError as exc:  # the file ends: at a block boundary, or inside a header
            watch["end"] = exc
            raise


def _watch(tar: tarfile.TarFile) -> dict:
    """What WatchedHeader keeps on `tar`: the stretch being skipped (gap), the last zero block, the end."""
    watch = tar.__dict__.get("booruset_watch")
    if watch is None:
        watch = tar.booruset_watch = {"gap": None, "zero_at": None, "end": None}  # type: ignore[attr-defined]
    return watch


LAST_BLOCKS = 8  # of a stretch skipped, kept to tell a cut name (a long name's header is 1-2 blocks)


def _skipped(watch: dict, offset: int, why: str | None, block: bytes) -> None:
    """Note a block that is no header at `offset` (why: None for a zero block)."""
    gap = watch["gap"]
    if gap is None:
        gap = watch["gap"] = {"start": offset, "why": None, "zeros_first": why is None, "blocks": []}
    if gap["why"] is None and why is not None:
        gap["why"] = "a zeroed header" if gap["zeros_first"] else why
    if block:
        gap["blocks"] = [*gap["blocks"][1 - LAST_BLOCKS:], block]


def problems_before(tar: tarfile.TarFile, info: tarfile.TarInfo) -> tuple[list[Problem], bool]:
    """(problems, skip the member) for the member `info` just read: the blocks skipped before it
    (a damaged header and the member it stood for), and `info` itself when its name was cut (its
    long-name header was among them)."""
    watch = _watch(tar)
    gap, watch["gap"] = watch["gap"], None
    if gap is None:
        return [], False
    why = gap["why"] or "a zeroed header"  # zero blocks alone inside an archive: an empty member's header, say
    problems = [("", "corrupt_shard", f"bad member header at byte {gap['start']} ({why}): read on from the "
                                      f"next good header, at byte {info.offset}; the member(s) in the "
                                      f"{info.offset - gap['start']} bytes between are lost")]
    cut = _cut_name(info.name, gap["blocks"])
    if cut:
        problems.append((info.name, "corrupt_shard", "its header holds only the start of its name: the long-name "
                                                     "header before it was damaged; not read"))
    return problems, cut


def _cut_name(name: str, skipped: list[bytes]) -> bool:
    """Whether `name`, of a member right after skipped blocks, is the start of a longer name those
    blocks hold (a lost pax `path=` record or GNU long-name data): a member's own header keeps
    only the first 99 or 100 bytes of a long name."""
    start = name.encode("utf-8", "surrogateescape")
    if len(start) < NAME_FIELD - 1:
        return False
    held = b"".join(skipped)
    at = held.find(start)
    return at >= 0 and held[at + len(start):at + len(start) + 1] not in (b"", b"\0", b"\n")


def how_it_ended(tar: tarfile.TarFile) -> Problem | None:
    """The problem of a shard whose headers did not end with tar's end-of-archive blocks and only
    zeros after them, as a (member, kind, message) item; None for a whole shard."""
    watch = _watch(tar)
    end, gap = watch["end"], watch["gap"]
    if gap is not None and gap["why"] is not None:
        if not tar.members and gap["start"] == 0:
            return ("", "corrupt_shard", f"no tar member header anywhere in the file ({gap['why']} at byte 0): "
                                         "is it a tar?")
        return ("", "corrupt_shard", f"bad member header at byte {gap['start']} ({gap['why']}) and no good header "
                                     "after it: the members from there on are lost")
    if end == "end-of-archive":
        try:
            after = _data_after(tar.fileobj)
        except EOFError:
            return None  # a compressed stream cut inside the padding after the end: the members were whole
        except READ_ERRORS as exc:  # gzip checks a member's CRC only after its last byte: here, at the end
            return ("", "corrupt_shard", f"reading on after tar's end-of-archive blocks failed ({type(exc).__name__}: "
                                         f"{exc}): where a compressed shard's check came out wrong, some member's "
                                         "bytes are damaged")
        if after is None:
            return None
        return ("", "corrupt_shard", f"tar's end-of-archive blocks at byte {tar.offset - BLOCK}, then data again from "
                                     f"byte {after}: not read (a zeroed stretch of the shard, another archive "
                                     "appended, or the tail of a longer shard this file once held)")
    if gap is not None:  # zero blocks, then the end of the file: the end blocks or their padding cut short
        return None
    if isinstance(end, tarfile.EmptyHeaderError):
        return ("", "truncated_shard", f"shard ends at byte {tar.offset} without tar's end-of-archive blocks: "
                                       "cut short after a member? any members after it are lost")
    return ("", "truncated_shard", f"shard ends inside the member header at byte {tar.offset}: "
                                   "the members from there on are lost")


def _data_after(fileobj) -> int | None:
    """Where the first byte other than zero lies from the file's position on, None when there is
    none: past tar's end-of-archive blocks come only zeros (a record's padding), normally."""
    position = fileobj.tell()
    while piece := fileobj.read(1 << 20):
        data = piece.lstrip(b"\0")
        if data:
            return position + len(piece) - len(data)
        position += len(piece)
    return None


@contextmanager
def open_tar(uri: str) -> Iterator[tarfile.TarFile]:
    """A shard opened for reading its members in order, past damaged headers. A local
    uncompressed one is opened for seeks (open_plain_tar). Anything else (object storage, a
    compressed shard) is read as a stream, decompressed as its first bytes say (not its name),
    which says what is wrong with the rest. A stream whose first header is bad (it does not
    open) or zeroed (it opens as an empty archive) is read again looking for its first good
    header; a file that is no tar at all is read through once to find none."""
    if "://" not in uri:
        try:
            tar = open_plain_tar(uri)
        except tarfile.ReadError:
            tar = None
        if tar is not None:
            with tar:
                yield tar
            return
    with tar_stream(uri) as stream:
        tar = _opened(lambda: tarfile.open(fileobj=stream, mode="r|", bufsize=STREAM_PIECE, tarinfo=WatchedHeader))
        if tar is not None:
            with tar:
                yield read_past_bad_headers(tar)
            return
    with tar_stream(uri) as stream, tarfile.open(fileobj=stream, mode="r|", bufsize=STREAM_PIECE,
                                                 tarinfo=WatchedHeader, ignore_zeros=True) as tar:
        yield tar


def decompressor(head: bytes):
    """What reads all of a shard that begins with `head` (its first HEAD bytes); None for one that
    is no compressed file. Python's readers where it has one: they read every gzip member or bz2
    and xz stream, and gzip's takes the zero padding a tape or block writer adds after the last
    member. Arrow's for zstd (in the standard library from Python 3.14 only), which also skips the
    skippable frames pzstd writes before each frame. The magics are tarfile's, whole: a plain tar
    whose first name begins "BZh" is no bzip2 file."""
    if head.startswith(b"\x1f\x8b\x08"):
        return GzipMembers
    if re.match(rb"BZh[1-9]1AY&SY", head):
        return lambda raw: DecompressedPieces(bz2.BZ2File(raw))
    if head.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")):  # xz, and the older .lzma
        return lambda raw: DecompressedPieces(lzma.LZMAFile(raw))
    if head.startswith(b"\x28\xb5\x2f\xfd") or re.match(rb"[\x50-\x5f]\x2a\x4d\x18", head):
        return lambda raw: DecompressedPieces(pa.CompressedInputStream(raw, "zstd"))
    return None


class DecompressedPieces:
    """A decompressing reader read piece by piece (read1): its read(size) decompresses until it has
    `size` bytes, and where the compressed file is cut short raises there and drops what the same
    call had decompressed (up to tarfile's 64 KiB: a cut .tar.xz of six small samples gave none).
    A piece at a time, the error comes on a read that holds nothing yet, after the pieces before
    the cut were handed on."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def read(self, size: int = -1) -> bytes:
        """At most `size` bytes (a piece for -1), b"" only at the end: what tarfile's stream asks."""
        return self.reader.read1(size if size >= 0 else STREAM_PIECE)

    def close(self) -> None:
        self.reader.close()


class GzipMembers(DecompressedPieces):
    """Python's gzip reader over every member of a shard, ending where what follows a member is no
    gzip (junk after the last one; as its bz2 and xz readers end) rather than raising there and
    losing the members decompressed in the same read: read1 decompresses one member's data at a
    time, so the junk is met by a read that holds nothing yet. Junk in the middle of the shard
    ends its tar stream inside a member, which is reported (how_it_ended)."""

    def __init__(self, raw) -> None:
        super().__init__(gzip.GzipFile(fileobj=raw, mode="rb"))
        self.started = False

    def read(self, size: int = -1) -> bytes:
        try:
            data = super().read(size)
        except gzip.BadGzipFile as exc:
            # no gzip at all where it began: said, not read as an empty shard; a damaged member
            # (a CRC that does not match) is said too
            if not self.started or not str(exc).startswith("Not a gzipped file"):
                raise
            return b""
        self.started = True
        return data


@contextmanager
def tar_stream(uri: str) -> Iterator:
    """The bytes of the shard at `uri` as a tar stream: decompressed when its first bytes are a
    compressed format's magic (decompressor), as they are. The file is opened once: its first
    bytes are peeked at, not read (on object storage a second open is a HEAD and a GET more)."""
    with ExitStack() as opened:
        stream = opened.enter_context(_open(uri))
        decompress = decompressor(stream.peek(HEAD)[:HEAD])
        yield opened.enter_context(closing(decompress(stream))) if decompress else stream


def open_plain_tar(path: str) -> tarfile.TarFile:
    """A local uncompressed shard opened for seeks, reading past damaged headers: each member is
    one read of its own bytes, not pieces copied through a stream buffer and joined. ReadError
    when it is no plain tar (compressed), or its first header is bad (open_tar reads it as a
    stream from its first good header)."""
    tar = tarfile.open(path, mode="r:", tarinfo=WatchedHeader)
    if tar.firstmember is None:  # a zeroed first header reads as an empty archive: look past it
        tar.close()  # it began with a zero block, so it is no compressed file: read as plain
        tar = tarfile.open(path, mode="r:", tarinfo=WatchedHeader, ignore_zeros=True)
    return read_past_bad_headers(tar)


def _opened(open_tar_file) -> tarfile.TarFile | None:
    """The tar that open_tar_file() opens, None when it does not (a bad first header, a compressed
    file opened as plain, no tar), or when it opens on a zeroed first header (no first member)."""
    try:
        tar = open_tar_file()
    except tarfile.ReadError:
        return None
    if tar.firstmember is None:
        tar.close()
        return None
    return tar


def _open(uri: str):
    """The file at `uri` as it is stored, with peek(): from object storage in OBJECT_PIECEs, each
    fetched while the one before is used."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        # compression=None: Arrow would otherwise decompress by the name's ending
        return ReadAhead(fs.open_input_stream(path, compression=None), OBJECT_PIECE)
    return open(uri, "rb")  # a BufferedReader: its peek() reads the first 8 KiB
