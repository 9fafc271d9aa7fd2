"""The workspace: Parquet tables, a DuckDB catalog of views over them, and job state.

Layout (local path or any pyarrow filesystem URI such as s3://bucket/ws):
    tables/<table>/<part>.parquet   one file per committed unit of work
    state/<job>/<unit>.json         marker written after a unit's parts are in place
    catalog.duckdb                  one view per table (local workspaces only)

A unit's parts have deterministic names, so a unit that is re-run after a crash overwrites
its own partial output instead of adding rows twice; the marker makes it count as done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import schemas

SQL = Path(__file__).resolve().parent.parent / "sql"
# Views derived from the tables, shared by several jobs (and there for users to query too).
DERIVED_VIEWS = ("image_tag_lists",)
CATALOG_STORAGE_VERSION = "v1.2.0"


def unit_id(*parts: str) -> str:
    """A stable, file-name-safe id for a unit of work (e.g. an input shard)."""
    digest = hashlib.sha1("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(parts[0]).stem)[-40:] if parts else ""
    return f"{readable}-{digest[:16]}"


class WorkspaceError(Exception):
    """A path that is not a workspace (for a job that only reads or continues one)."""


class Workspace:
    """Tables, catalog and state of one booruset run."""

    def __init__(self, root: str, create: bool = True) -> None:
        """Open the workspace at `root`, creating it when `create`; else WorkspaceError if absent."""
        if "://" in root:
            self.fs, self.base = pafs.FileSystem.from_uri(root)
            self.local = False
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(root).resolve())
            self.local = True
        self.root = root if not self.local else self.base
        if not create:
            if self.fs.get_file_info(f"{self.base}/tables").type != pafs.FileType.Directory:
                raise WorkspaceError(f"no workspace at {root} (run `booruset ingest -w {root} ...` first)")
            return
        try:
            self.fs.create_dir(f"{self.base}/tables", recursive=True)
            self.fs.create_dir(f"{self.base}/state", recursive=True)
        except OSError as exc:
            raise WorkspaceError(f"cannot create a workspace at {root}: {exc}") from exc

    def sweep_temp(self, before: float) -> int:
        """Delete temporary files (writes in progress) older than `before` (epoch seconds): left by
        runs that died. The caller holds the workspace lock, so no live writer owns them."""
        return sweep_temp_files(self.fs, self.base, before)

    def check_writable(self) -> None:
        """WorkspaceError unless a file can be written here (read-only mounts, permissions, ...)."""
        probe = f"{self.base}/state/.tmp-write-check-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as exc:
            raise WorkspaceError(f"workspace {self.root} is not writable: {exc}") from exc

    # ---- tables -------------------------------------------------------------------------
    def table_dir(self, name: str) -> str:
        return f"{self.base}/tables/{name}"

    def table_uri(self, name: str) -> str:
        """Where DuckDB / Ray Data find the table's files."""
        prefix = self.base if self.local else self.root.rstrip("/")
        return f"{prefix}/tables/{name}"

    def write_part(self, name: str, part: str, table: pa.Table | list[dict]) -> None:
        """Write one part of a table atomically: a temporary file, then a rename."""
        table = schemas.conform(table, name)
        folder = self.table_dir(name)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{part}-{uuid.uuid4().hex}.parquet.tmp"
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
        if self.local:
            fsync(tmp)  # the bytes are on disk before the name says the part is complete
        self.fs.move(tmp, f"{folder}/{part}.parquet")

    def read_part(self, name: str, part: str, columns: list[str]) -> list[dict]:
        """Some columns of one part (a unit's rows), [] when the part is not there."""
        path = f"{self.table_dir(name)}/{part}.parquet"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        return pq.read_table(path, filesystem=self.fs, columns=columns).to_pylist()

    def read_json(self, rel: str) -> dict | None:
        path = f"{self.base}/{rel}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def write_json(self, rel: str, value: dict) -> None:
        """Atomically: a temporary name, then a rename."""
        path = f"{self.base}/{rel}"
        tmp = f"{path.rsplit('/', 1)[0]}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(json.dumps(value, sort_keys=True, indent=1).encode())
        self.fs.move(tmp, path)

    def delete_part(self, name: str, part: str) -> None:
        path = f"{self.table_dir(name)}/{part}.parquet"
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    def part_files(self, name: str) -> list[str]:
        selector = pafs.FileSelector(self.table_dir(name), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(
            i.path
            for i in infos
            if i.is_file and i.base_name.endswith(".parquet") and not i.base_name.startswith(".")
        )

    def read_table(self, name: str) -> pa.Table:
        """The whole table (for small tables and tests; jobs stream with Ray or DuckDB)."""
        files = self.part_files(name)
        schema = schemas.TABLES[name]
        if not files:
            return schema.empty_table()
        parts = [pq.read_table(f, filesystem=self.fs, schema=schema) for f in files]
        return pa.concat_tables(parts)

    # ---- state --------------------------------------------------------------------------
    def state_dir(self, job: str) -> str:
        return f"{self.base}/state/{job}"

    def commit_unit(self, job: str, unit: str, info: dict) -> None:
        """Mark a unit done, after all its parts are written."""
        folder = self.state_dir(job)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{unit}-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(json.dumps(info, sort_keys=True).encode())
        self.fs.move(tmp, f"{folder}/{unit}.json")
        _maybe_kill_for_test()

    def forget_unit(self, job: str, unit: str) -> None:
        path = f"{self.state_dir(job)}/{unit}.json"
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    def done_units(self, job: str) -> dict[str, dict]:
        """The units `job` has committed, with the info each was committed with."""
        selector = pafs.FileSelector(self.state_dir(job), allow_not_found=True)
        done = {}
        for info in self.fs.get_file_info(selector):
            if info.is_file and info.base_name.endswith(".json") and not info.base_name.startswith("."):
                with self.fs.open_input_stream(info.path) as f:
                    done[info.base_name[: -len(".json")]] = json.loads(f.read())
        return done

    def reset_job(self, job: str, tables: list[str]) -> None:
        """Forget a job's state and delete its tables (for jobs that rebuild globally)."""
        for path in [self.state_dir(job)] + [self.table_dir(t) for t in tables]:
            if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                self.fs.delete_dir_contents(path)

    # ---- SQL ----------------------------------------------------------------------------
    def view_sql(self, name: str) -> str:
        """DDL of the view over one table.

        DuckDB cannot bind parameters in DDL, so the workspace path (the only value from the
        user here) goes in as an escaped SQL string literal.
        """
        if self.part_files(name):
            # [!.]: hidden files are writes in progress (temporary names, uncommitted generations)
            glob = f"{glob_escape(self.table_uri(name))}/[!.]*.parquet".replace("'", "''")
            body = f"select * from read_parquet('{glob}', union_by_name = true)"
        else:
            cols = ", ".join(
                f"cast(null as {duck_type(f.type)}) as \"{f.name}\"" for f in schemas.TABLES[name]
            )
            body = f"select {cols} where false"
        return f'create or replace view "{name}" as {body}'

    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with one view per table (no lock on the catalog file).

        read_only (for `booruset sql`): a local workspace's files are the only ones DuckDB may
        touch, and the setting is locked, so no query can read or write anything else.
        """
        con = duckdb.connect()
        if not self.local:
            con.execute("install httpfs; load httpfs")
        self._create_views(con)
        if read_only and self.local:
            tables = f"{self.base}/tables/"
            # the views' patterns spell the workspace path glob-escaped: allow both spellings
            con.execute("set allowed_directories = $dirs", {"dirs": [tables, glob_escape(tables)]})
            con.execute("set enable_external_access = false")
            con.execute("set lock_configuration = true")
        return con

    def _create_views(self, con: duckdb.DuckDBPyConnection) -> None:
        for name in schemas.TABLES:
            con.execute(self.view_sql(name))
        for name in DERIVED_VIEWS:
            body = (SQL / f"{name}.sql").read_text(encoding="utf-8")
            con.execute(f'create or replace view "{name}" as {body}')

    def refresh_catalog(self) -> str | None:
        """Rewrite catalog.duckdb so that `duckdb <ws>/catalog.duckdb` sees every table."""
        if not self.local:
            return None  # DuckDB cannot write a database file to object storage
        path = f"{self.base}/catalog.duckdb"
        tmp = f"{self.base}/.catalog-{uuid.uuid4().hex}.duckdb"
        # The DuckDB CLI (duckdb-cli) may be older than the Python library: write the file in a
        # storage format both read.
        con = duckdb.connect(tmp, config={"storage_compatibility_version": CATALOG_STORAGE_VERSION})
        try:
            self._create_views(con)
        finally:
            con.close()
        Path(tmp).replace(path)
        return path


_commits_in_this_process = 0


def _maybe_kill_for_test() -> None:
    """Fault injection for the resume tests: with BOORUSET_KILL_AFTER_COMMITS=N, the process that
    writes the N-th unit marker SIGKILLs its process group right after it, as a preempted node
    would, at a point that no outside poll can miss on a loaded machine."""
    global _commits_in_this_process
    limit = os.environ.get("BOORUSET_KILL_AFTER_COMMITS")
    if not limit:
        return
    _commits_in_this_process += 1
    if _commits_in_this_process >= int(limit):
        os.killpg(os.getpgrp(), signal.SIGKILL)


TEMP_PREFIXES = (".tmp-", ".catalog-")


def sweep_temp_files(fs: pafs.FileSystem, root: str, before: float) -> int:
    """Delete the files under `root` whose names mark a write in progress (TEMP_PREFIXES) and
    that were last modified before `before`; the number deleted."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    stale = [i.path for i in infos if i.is_file and i.base_name.startswith(TEMP_PREFIXES)
             and i.mtime is not None and i.mtime.timestamp() < before]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def glob_escape(path: str) -> str:
    """`path` as a literal inside a DuckDB glob pattern: `ws/g[1]` must not match `ws/g1`."""
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def duck_type(arrow_type: pa.DataType) -> str:
    """DuckDB type name for an Arrow type (for empty views of tables not written yet)."""
    if pa.types.is_fixed_size_list(arrow_type):
        return f"{duck_type(arrow_type.value_type)}[{arrow_type.list_size}]"
    if pa.types.is_list(arrow_type):
        return f"{duck_type(arrow_type.value_type)}[]"
    simple = {
        pa.string(): "varchar",
        pa.int32(): "integer",
        pa.int64(): "bigint",
        pa.uint64(): "ubigint",
        pa.float32(): "float",
        pa.float64(): "double",
        pa.bool_(): "boolean",
    }
    return simple[arrow_type]
