"""Unit markers are read once per process while they stay as they were (publishing lists every
job's markers every minute: on object storage each read is a request)."""

from __future__ import annotations

import json
import os
import time

from store.workspace import Workspace


def rewrite_same_size(path, marker: dict, mtime: float) -> None:
    text = json.dumps(marker, sort_keys=True)
    assert len(text) == os.path.getsize(path)
    with open(path, "w") as f:
        f.write(text)
    os.utime(path, (mtime, mtime))


def test_a_settled_marker_is_read_once_and_a_rewritten_one_again(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    ws.commit_unit("ingest", "old", {"images": 1}, parts={"images": ["a"]})
    ws.commit_unit("ingest", "new", {"images": 1}, parts={"images": ["b"]})
    old, new = (f"{ws.state_dir('ingest')}/{u}.json" for u in ("old", "new"))
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    first = ws.done_units("ingest")
    first["old"]["images"] = 99  # what a caller does to its copy stays there
    # same size and mtime, other bytes: a settled marker is not read again
    rewrite_same_size(old, {"images": 7, "parts": {"images": ["a"]}}, an_hour_ago)
    # a marker written just now is always read
    rewrite_same_size(new, {"images": 8, "parts": {"images": ["b"]}}, time.time())
    second = ws.done_units("ingest")
    assert second["old"]["images"] == 1 and second["new"]["images"] == 8
    os.utime(old, (an_hour_ago + 1, an_hour_ago + 1))  # rewritten: another mtime
    assert ws.done_units("ingest")["old"]["images"] == 7
    assert Workspace(str(tmp_path / "ws")).done_units("ingest")["old"]["images"] == 7  # another process reads it
