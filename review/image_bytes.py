"""An image's bytes by its row (source, member), and thumbnails cached under the workspace.

Only keys found in the `images` table reach here: the request names a key, the table names the
file. Nothing from the request becomes a path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tarfile
import threading
from pathlib import Path

from udfs.ingest.shard_tar import open_plain_tar
from udfs.ingest.sources import member_path, safe_text, source_kind
from udfs.source_members import source_members
from udfs.thumbnails import thumbnail_jpeg

MAX_MEMBER_BYTES = 1 << 30
# Member offsets of the last shards read, for rows without images.member_offset (ingested by an
# older version): a grid page shows many images of one shard, and tarfile finds a member only by
# walking every header before it.
SHARD_INDEXES = 16


@functools.lru_cache(maxsize=SHARD_INDEXES)
def shard_index(path: str, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """{member: (data offset, size)} of a local shard (the mtime in the key: a rewritten shard is
    read again)."""
    with open_plain_tar(path) as tar:
        return {safe_text(m.name): (m.offset_data, m.size) for m in tar if m.isfile()}


def image_bytes(source: str, member: str, offset: int | None = None, follow_links_out: bool = False,
                size: int | None = None) -> bytes | None:
    """The stored bytes of one image, None when its source no longer has it. offset: where its
    header starts in its shard (images.member_offset), read with one seek; without it, from the
    shard's index (a plain local shard) or a read of the shard (compressed, on object storage).
    follow_links_out: ingest.follow_links_out, under which ingest took a folder's links out of it.
    size: images.bytes; bytes of another size are another picture (the file was rewritten since
    ingest), None as the export has it (missing_member): not shown under the rows of the old one."""
    data = stored_bytes(source, member, offset, follow_links_out, size)
    return data if data is None or size is None or len(data) == size else None


def stored_bytes(source: str, member: str, offset: int | None, follow_links_out: bool, size: int | None
                 ) -> bytes | None:
    if source_kind(source) == "folder" and "://" not in source:  # on object storage: source_members below
        return folder_file(source, member, follow_links_out)
    if offset is None and "://" not in source:
        try:
            index = shard_index(source, os.stat(source).st_mtime_ns)
        except OSError:
            return None  # gone
        except tarfile.ReadError:
            index = None  # compressed: read as a stream below
        if index is not None:
            found = index.get(member)
            if found is None:
                return None
            with open(source, "rb") as f:
                f.seek(found[0])
                return f.read(found[1])
    sizes = None if size is None else {member: size}  # a shard's repeated name: the one of ingest's size
    return dict(source_members(source, {member: offset}, MAX_MEMBER_BYTES, sizes)).get(member)


def folder_file(folder: str, member: str, follow_links_out: bool) -> bytes | None:
    """A folder member's bytes, by ingest's rule: a file in the folder, or behind a link out of it
    only with ingest.follow_links_out (as ingest, export and the report read it); never a name that
    climbs out of the folder (`..`)."""
    path = Path(member_path(folder, member))  # a name that is not UTF-8: its bytes put back
    if follow_links_out:  # the names as written: a link may lead anywhere, `..` may not
        inside = Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    else:
        inside = path.resolve().is_relative_to(Path(folder).resolve())
    if not inside or not path.is_file():
        return None
    return path.read_bytes()


class Thumbnails:
    """Thumbnails made on demand and kept in `folder` (the workspace's review/thumbs)."""

    def __init__(self, folder: Path, size: int, follow_links_out: bool = False) -> None:
        self.folder, self.size, self.follow_links_out = folder, size, follow_links_out

    def get(self, key: str, sha256: str | None, source: str, member: str, offset: int | None = None,
            size: int | None = None) -> bytes | None:
        # named by the image's content hash when known: a changed image gets a new thumbnail
        name = hashlib.sha1(f"{key}\x00{sha256 or ''}\x00{self.size}".encode("utf-8", "surrogateescape")).hexdigest()
        path = self.folder / name[:2] / f"{name}.jpg"
        if path.is_file():
            return path.read_bytes()
        data = image_bytes(source, member, offset, self.follow_links_out, size)
        if data is None:
            return None
        thumb = thumbnail_jpeg(data, self.size)
        tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(thumb)
            os.replace(tmp, path)
        except OSError:  # a workspace review may read but not write (a read-only mount): served, not kept
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return thumb
