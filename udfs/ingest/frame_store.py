"""The workspace's frame store: one tar of encoded frames per ingest batch, `frames/<part>.tar`
(the batch's `images` part).

Frames are stored once, as members `<frame key>.<ext>` of a plain tar, so annotate, caption
and export read them like the members of any input shard (`images.source` names the tar).
The tar is named after the batch's part, so a rerun of the batch overwrites it, and it appears
atomically (a temporary name, then a rename) before the batch is marked done.
"""

from __future__ import annotations

import io
import tarfile
import uuid

import pyarrow.fs as pafs

from store.workspace import Workspace

FRAMES_DIR = "frames"


class FrameStore:
    """Writes the frames of one batch; opened on the first frame, so batches without clips write nothing."""

    def __init__(self, ws: Workspace, part: str) -> None:
        self.ws, self.part = ws, part
        self.path = f"{ws.base}/{FRAMES_DIR}/{part}.tar"
        self.uri = ws.uri(f"{FRAMES_DIR}/{part}.tar")
        self._tmp = f"{ws.base}/{FRAMES_DIR}/.tmp-{part}-{uuid.uuid4().hex}.tar.tmp"
        self._stream = None
        self._tar: tarfile.TarFile | None = None

    def add(self, member: str, data: bytes) -> int:
        """Store one frame; returns where its header starts in the tar (images.member_offset)."""
        if self._tar is None:
            self.ws.fs.create_dir(f"{self.ws.base}/{FRAMES_DIR}", recursive=True)
            self._stream = self.ws.fs.open_output_stream(self._tmp)
            # stream mode: object stores give write-only streams; fixed header fields make a
            # rerun write the same bytes
            self._tar = tarfile.open(fileobj=self._stream, mode="w|", format=tarfile.PAX_FORMAT)
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        offset = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        return offset

    def close(self) -> None:
        """Finish the tar and give it its name. With no frame added, a tar of that name (from
        a run whose batch kept frames with other options) goes: no row of the batch names it."""
        if self._tar is None:
            if self.ws.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
                self.ws.fs.delete_file(self.path)
            return
        self._tar.close()
        self._stream.close()
        self.ws.fs.move(self._tmp, self.path)
        self._tar = None

    def abort(self) -> None:
        if self._tar is not None:
            self._stream.close()
            self.ws.fs.delete_file(self._tmp)
            self._tar = None
