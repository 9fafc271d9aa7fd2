"""A person's corrections: rows appended to the `edits` table, never rewritten.

Each request is one batch (a time-ordered id) written as one Parquet part under the workspace
lock and published at once; the latest edit of an (image, field, subject) wins (sql/edit_state.sql),
so undo is a later batch (sql/edit_undo.sql). Only real changes are written: removing a tag the
image does not have writes nothing.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from jobs.config import REPO
from store.lock import SHORT_WAIT_S, WorkspaceLock
from store.workspace import Workspace
from udfs.ingest.sidecars import categorized_tags, has_lone_surrogate, without_controls

OWNER = "review"  # the owner of the edits parts in the published generation
# Parts are merged into one when there are this many: each is a file that every query opens.
COMPACT_AT = 256
# Rows per row group of an edits part, which is sorted by key: a query of one image's edits (its
# review row, its page) reads one group, not every edit of a bulk action over the workspace.
ROW_GROUP = 10_000
# The edits that take back one batch (the app runs it on the review connection).
UNDO_SQL = (REPO / "sql" / "edit_undo.sql").read_text(encoding="utf-8")


class EditRequest:
    """What one image should become: tags to add and remove, a caption, exclusion, a character,
    whether it is no near duplicate of its group (not_duplicate: curate and the export then keep
    it on its own). None leaves a field alone; caption "" (or blanks) goes back to the generated caption.

    Tags and the character take the form ingest gives sidecar tags (`Long Hair` is `long_hair`;
    `red hair, blue eyes` two tags; control characters out), so that an added tag is the curated
    one it names, `exclude_tags` reaches it, and KEY.txt's commas stay separators."""

    def __init__(self, add_tags: list[str] | None = None, remove_tags: list[str] | None = None,
                 caption: str | None = None, exclude: bool | None = None, character: str | None = None,
                 max_tag_chars: int = 200, max_caption_chars: int = 4000, max_tags: int = 1000,
                 not_duplicate: bool | None = None) -> None:
        self.max_tags = max_tags
        self.add_tags = list(dict.fromkeys(t for item in add_tags or [] for t in _tags(item)))
        if len(self.add_tags) > max_tags:  # before any image is looked at: a bulk action multiplies them
            raise ValueError(f"{len(self.add_tags)} tags to add, over {max_tags} (ingest.max_tags)")
        # also as typed: a tag an earlier version stored unnormalised can still be removed
        self.remove_tags = [t for item in remove_tags or [] for t in (item.strip(), *_tags(item)) if t]
        self.removing = frozenset(self.remove_tags)
        named = _tags(character or "")
        too_long = [t for t in [*self.add_tags, *named] if len(t) > max_tag_chars]
        if too_long:
            raise ValueError(f"tag {too_long[0][:40]!r}... is over {max_tag_chars} characters (ingest.max_tag_chars)")
        if len(named) > 1:
            raise ValueError("character must be one tag (no commas)")
        # a caption of blanks alone is no caption: back to the generated one (stored, it made the
        # export write the tags as the image's text, with nothing on the page to say why)
        self.caption = without_controls(caption)[0].strip() if caption is not None else None
        if self.caption is not None and len(self.caption) > max_caption_chars:  # as a captioner's would be
            raise ValueError(f"the caption is {len(self.caption)} characters, over {max_caption_chars} "
                             "(caption.max_caption_chars)")
        self.exclude = exclude
        self.not_duplicate = not_duplicate
        self.character = None if character is None else "".join(named)

    @classmethod
    def from_json(cls, body: dict, max_tag_chars: int = 200, max_caption_chars: int = 4000,
                  max_tags: int = 1000) -> EditRequest:
        def strings(name: str) -> list[str]:
            value = [] if body.get(name) is None else body[name]  # not `or []`: "", 0 and {} were no tags
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings")
            return value

        for name, kind in (("caption", str), ("exclude", bool), ("character", str), ("not_duplicate", bool)):
            if body.get(name) is not None and not isinstance(body[name], kind):
                raise ValueError(f"{name} must be a {kind.__name__}")
        texts = [*strings("add_tags"), *strings("remove_tags"), body.get("caption") or "", body.get("character") or ""]
        if any(has_lone_surrogate(t) for t in texts):
            raise ValueError("half a UTF-16 pair (a \\udXXX escape) in the edit: not text")
        return cls(strings("add_tags"), strings("remove_tags"), body.get("caption"), body.get("exclude"),
                   body.get("character"), max_tag_chars, max_caption_chars, max_tags, body.get("not_duplicate"))

    def changes(self, row: dict) -> list[dict]:
        """The edit rows that turn `row` (a review_rows row) into what was asked."""
        key, tags = row["key"], set(row["tags"] or [])
        # the image's tags looked up among those to remove, never each of those in a list: a request
        # may name a million (a bulk action: on every image)
        out = [{"key": key, "field": "tags", "old": t, "new": None} for t in dict.fromkeys(row["tags"] or [])
               if t in self.removing]
        added = [{"key": key, "field": "tags", "old": None, "new": t} for t in self.add_tags
                 if t not in tags and t not in self.removing]
        after = len(tags) - len(out) + len(added)
        # as ingest bounds a sidecar's; an image over it already (a sidecar's tags and the tagger's)
        # may still have a tag replaced, not more added
        if added and after > self.max_tags and after > len(tags):
            raise ValueError(f"{key} would have {after} tags, over {self.max_tags} (ingest.max_tags)")
        out += added
        unchanged = self.caption == row["caption"] or (not self.caption and not row["caption_edited"])
        if self.caption is not None and not unchanged:
            out.append({"key": key, "field": "caption", "old": row["caption"], "new": self.caption or None})
        if self.exclude is not None and self.exclude != row["excluded"]:
            out.append({"key": key, "field": "exclude", "old": str(row["excluded"]).lower(),
                        "new": str(self.exclude).lower()})
        out += self.duplicate_change(row)
        wanted = [self.character] if self.character else []
        if self.character is not None and wanted != list(row["characters"] or []):
            out.append({"key": key, "field": "character", "old": ", ".join(row["characters"] or []),
                        "new": self.character})
        return out


    def duplicate_change(self, row: dict) -> list[dict]:
        """The not_duplicate edit, if it changes anything; refused for an image in no group."""
        marked = bool(row.get("not_duplicate"))
        if self.not_duplicate is None or self.not_duplicate == marked:
            return []
        if self.not_duplicate and row.get("dup_group") is None:
            raise ValueError(f"{row['key']} is in no near-duplicate group")
        return [{"key": row["key"], "field": "not_duplicate", "old": str(marked).lower(),
                 "new": str(self.not_duplicate).lower()}]


def _tags(text: str) -> list[str]:
    """A person's tag as ingest reads a sidecar's: Danbooru form, split at commas, no controls, a
    category prefix off (`character:eileen` is eileen; its category is the vocabulary's, as for
    any added tag: an edit names a tag, not its category)."""
    return [tag for tag, _ in categorized_tags(without_controls(text)[0], ",")]


class EditLog:
    """Appends batches of edits to one workspace's `edits` table."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def append(self, changes: list[dict]) -> str | None:
        """Write one batch; its id (None when there is nothing to write)."""
        if not changes:
            return None
        with WorkspaceLock(self.ws, "review", SHORT_WAIT_S):  # WorkspaceBusy while a job runs
            return self.write(changes)

    def undo(self, batch: str) -> tuple[str | None, list[dict]]:
        """Write the edits that take back what `batch` still decides (sql/edit_undo.sql), worked
        out with the workspace held, over the edits published now: another server's later edit of
        a field, written while this one waited, stands. The new batch's id and its edits."""
        with WorkspaceLock(self.ws, "review", SHORT_WAIT_S):
            con = duckdb.connect()
            try:
                self.ws.attach_tables(con, ["edits"])
                cur = con.execute(UNDO_SQL, {"batch": batch})
                names = [d[0] for d in cur.description]
                changes = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            finally:
                con.close()
            return self.write(changes), changes

    def write(self, changes: list[dict]) -> str | None:
        """Write one batch, the caller holding the workspace lock; its id (None: nothing to write)."""
        if not changes:
            return None
        batch = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        now = datetime.now(UTC)
        rows = [{**c, "time": now, "seq": i, "batch": batch} for i, c in enumerate(changes)]
        part = f"review-{batch}"
        self.ws.write_part("edits", part, by_key(rows), ROW_GROUP)
        parts = self.ws.published()["owned"].get(OWNER, {}).get("edits", []) + [part]
        if len(parts) >= COMPACT_AT:
            parts = [self.compact(parts, batch)]
        self.ws.publish({OWNER: {"edits": parts}})
        return batch

    def compact(self, parts: list[str], batch: str) -> str:
        """One part with every row of `parts` (rows unchanged: the log stays append-only); the
        old files go at the next job's start, as any part no generation names."""
        folder = self.ws.table_dir("edits")
        tables = [pq.read_table(f"{folder}/{p}.parquet", filesystem=self.ws.fs, schema=schemas.edits) for p in parts]
        merged = f"review-merged-{batch}"
        self.ws.write_part("edits", merged, pa.concat_tables(tables).sort_by("key"), ROW_GROUP)
        return merged


def by_key(rows: list[dict]) -> pa.Table:
    """The rows of one batch as a table in key order (each keeps its seq: the order within the batch)."""
    return schemas.conform(rows, "edits").sort_by("key")
