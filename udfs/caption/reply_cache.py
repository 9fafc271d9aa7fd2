"""Replies of OpenAI-compatible endpoints, kept per caption unit until the unit commits.

A unit of the `openai` backend (or of the `openai` rewriter) is hundreds of requests, paid for
by the token on a hosted model. A run killed half-way through one keeps the replies it got
here, and the next run sends only the requests whose replies are missing. A reply is found by
what was asked (endpoint, model and the whole request: messages with the image, limits, seed),
so the caption logic replays unchanged; requests that failed are not kept and are asked again.
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.workspace import Workspace

REPLIES = "state/caption-replies"  # <unit>/<random>.parquet: request id, reply


class ReplyCache:
    """The replies a unit has got so far (from this run or a killed one), by request id
    (udfs/caption/openai_transport.request_id); ChatEndpoint.chat_many reads and adds to it."""

    def __init__(self, ws: Workspace, unit: str) -> None:
        self.ws, self.unit, self.folder = ws, unit, f"{ws.base}/{REPLIES}/{unit}"
        self.replies: dict[str, str] = {}
        selector = pafs.FileSelector(self.folder, allow_not_found=True)
        for info in ws.fs.get_file_info(selector):
            if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
                table = pq.read_table(info.path, filesystem=ws.fs)
                self.replies.update(zip(table["id"].to_pylist(), table["reply"].to_pylist(), strict=True))

    def get(self, rid: str) -> str | None:
        return self.replies.get(rid)

    def add(self, replies: dict[str, str]) -> None:
        """Keep new replies: one file per call, written whole or not at all."""
        if not replies:
            return
        table = pa.table({"id": list(replies), "reply": list(replies.values())})
        self.ws.write_parquet(f"{self.folder}/{uuid.uuid4().hex}.parquet", table)
        self.replies.update(replies)

    def clear(self) -> None:
        """Once the unit is committed: its captions hold what the replies were for."""
        remove_replies(self.ws, [self.unit])
        self.replies = {}


def remove_replies(ws: Workspace, units: list[str]) -> None:
    for unit in units:
        folder = f"{ws.base}/{REPLIES}/{unit}"
        if ws.fs.get_file_info(folder).type != pafs.FileType.NotFound:
            ws.fs.delete_dir(folder)


def units_with_replies(ws: Workspace) -> list[str]:
    selector = pafs.FileSelector(f"{ws.base}/{REPLIES}", allow_not_found=True)
    return sorted(i.base_name for i in ws.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)
