"""Stamps of what a global job reads (curate's build, caption's related tags): the published
parts of its tables and the files it names, by name, size and time, so that a rerun with none of
them changed keeps the job's tables instead of rebuilding the same rows. Size and time, as make
and rsync judge a file: a part written again keeps its name."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow.fs as pafs

from store.workspace import Workspace


def part_stamps(ws: Workspace, table: str, parts: list[str]) -> list[tuple[str, int, int]]:
    """(part, size, mtime in ns) of each of `parts` of `table`: one listing of its folder."""
    selector = pafs.FileSelector(ws.table_dir(table), allow_not_found=True)
    listed = {info.base_name: info for info in ws.fs.get_file_info(selector)}
    stamps = []
    for part in sorted(parts):
        info = listed.get(f"{part}.parquet")
        stamps.append((part, info.size, info.mtime_ns) if info else (part, -1, -1))
    return stamps


def file_stamps(path: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of a file, or of every file under a folder; [] when not there."""
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.is_file() else []
    return [(str(p), (s := p.stat()).st_size, s.st_mtime_ns) for p in files]


def code_digest(paths: Iterable[Path]) -> str:
    """A digest of the .sql and .py files among `paths` and under the folders among them."""
    digest = hashlib.sha256()
    files = {p for root in paths for p in ([root] if root.is_file() else root.rglob("*.*"))
             if p.suffix in (".sql", ".py")}
    for path in sorted(files):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def fingerprint(ws: Workspace, tables: Iterable[str], skip: Callable[[str, str], bool] = lambda table, part: False,
                **more: object) -> str:
    """The digest of the published parts of `tables` (but those `skip(table, part)` says) and of
    `more` (options, file stamps, ...)."""
    published = ws.published()["tables"]
    what = {"parts": {table: part_stamps(ws, table, [p for p in published.get(table, []) if not skip(table, p)])
                      for table in tables}, **more}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
