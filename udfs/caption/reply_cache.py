"""Replies of OpenAI-compatible endpoints, kept per caption unit.

A unit of the `openai` backend (or of the `openai` rewriter) is hundreds of requests, paid for
by the token on a hosted model. A run killed half-way through one keeps the replies it got
here, and the next run sends only the requests whose replies are missing. A reply is found by
what was asked (endpoint, model and the whole request: messages with the image, limits, seed),
so the caption logic replays unchanged; requests that failed are not kept and are asked again.

A committed unit keeps its replies, with the key range of its images (RANGE): when an image is
added, removed or changed inside it, the unit that replaces it (other rows, another id) borrows
them (`previous`: jobs/caption.reply_sources), and only the requests of what changed are sent;
the others are answered as before, so the unchanged images keep their captions. The borrowed
replies it used are written to its own folder before it commits; the replaced unit's folder
goes at the end of the run.

The `vllm` backend's stream keeps its units' replies here too, when they commit (by the digest
of each request row: udfs/caption/vllm_captioner.request_digest), and its CPU tasks answer the
requests of a unit that replaces them from them (udfs/caption/caption_stream.request_messages).
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.workspace import Workspace

REPLIES = "state/caption-replies"  # <unit>/<random>.parquet: request id, reply
RANGE = "range.json"  # in a committed unit's folder: the first and last key of its images


class ReplyCache:
    """The replies a unit has got so far (from this run or a killed one), by request id
    (udfs/caption/openai_transport.request_id); ChatEndpoint.chat_many reads and adds to it. The
    replies of `previous` units (committed units this one replaces) answer what they asked too."""

    def __init__(self, ws: Workspace, unit: str, previous: list[str] = ()) -> None:
        self.ws, self.unit, self.folder = ws, unit, f"{ws.base}/{REPLIES}/{unit}"
        self.replies = read_replies(ws, unit)
        self.borrowed: dict[str, str] = {}
        for other in previous:
            self.borrowed.update(read_replies(ws, other))
        self.used: dict[str, str] = {}  # borrowed replies this unit was answered with

    def get(self, rid: str) -> str | None:
        if rid in self.replies:
            return self.replies[rid]
        if rid in self.borrowed:
            self.used[rid] = self.borrowed[rid]
        return self.borrowed.get(rid)

    def add(self, replies: dict[str, str]) -> None:
        """Keep new replies: one file per call, written whole or not at all."""
        if not replies:
            return
        table = pa.table({"id": list(replies), "reply": list(replies.values())})
        self.ws.write_parquet(f"{self.folder}/{uuid.uuid4().hex}.parquet", table)
        self.replies.update(replies)

    def settle(self, first_key: str, last_key: str) -> None:
        """Before the unit commits: the borrowed replies it used join its own, and its key range is
        written, for a unit that replaces it later to borrow them."""
        self.add({rid: reply for rid, reply in self.used.items() if rid not in self.replies})
        self.used = {}
        if self.replies:
            self.ws.write_json(f"{REPLIES}/{self.unit}/{RANGE}", {"first": first_key, "last": last_key})


def read_replies(ws: Workspace, unit: str) -> dict[str, str]:
    """{request id: reply} of a unit's folder (none: empty)."""
    replies: dict[str, str] = {}
    selector = pafs.FileSelector(f"{ws.base}/{REPLIES}/{unit}", allow_not_found=True)
    for info in ws.fs.get_file_info(selector):
        if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
            table = pq.read_table(info.path, filesystem=ws.fs)
            replies.update(zip(table["id"].to_pylist(), table["reply"].to_pylist(), strict=True))
    return replies


def reply_range(ws: Workspace, unit: str) -> tuple[str, str] | None:
    """(first, last) key of a settled unit's images; None for a unit a killed run had not settled,
    or one committed by a version that kept no replies."""
    found = ws.read_json(f"{REPLIES}/{unit}/{RANGE}")
    return (found["first"], found["last"]) if found else None


def remove_replies(ws: Workspace, units: list[str]) -> None:
    for unit in units:
        folder = f"{ws.base}/{REPLIES}/{unit}"
        if ws.fs.get_file_info(folder).type != pafs.FileType.NotFound:
            ws.fs.delete_dir(folder)


def move_replies(ws: Workspace, unit: str, to: str) -> None:
    """A unit's kept replies, under another id (jobs/caption.py adopt_units). Where the store
    cannot rename a folder (object storage) they stay, and go with the old id's at the job's end:
    the unit's images are then asked again only when it is replaced."""
    folder, moved = f"{ws.base}/{REPLIES}/{unit}", f"{ws.base}/{REPLIES}/{to}"
    try:
        if ws.fs.get_file_info(folder).type != pafs.FileType.NotFound and \
                ws.fs.get_file_info(moved).type == pafs.FileType.NotFound:
            ws.fs.move(folder, moved)
    except OSError:
        pass


def units_with_replies(ws: Workspace) -> list[str]:
    selector = pafs.FileSelector(f"{ws.base}/{REPLIES}", allow_not_found=True)
    return sorted(i.base_name for i in ws.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)
