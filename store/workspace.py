"""The workspace: Parquet tables, a DuckDB catalog of views over them, and job state.

Layout (local path or any pyarrow filesystem URI such as s3://bucket/ws):
    tables/<table>/<part>.parquet   one file per unit of work (or per global job's output)
    state/<job>/<unit>.json         marker written after a unit's parts are in place; it names them
    state/<job>/batches/<unit>/<batch>.json
                                    marker of one finished batch of a unit not yet committed
                                    (ingest, annotate): kept by a killed run, its parts are
                                    not redone
    state/published.json            the published generation: the files readers see, per table
    catalog.duckdb                  one view per table (local workspaces only)
    state/catalog.json              a fingerprint of the views catalog.duckdb holds

A unit's parts have deterministic names, so a unit that is re-run after a crash overwrites
its own partial output instead of adding rows twice; the marker makes it count as done.

Readers never see half-done work: views and read_table list exactly the files of the published
generation, which names the parts of every committed unit plus the outputs of global jobs
(curate) at one moment. A job publishes at its start (rolling forward what a killed run had
committed), while it runs and at its end; publishing is one atomic write of published.json.
Files that no generation names any more are deleted at the next job's start (under the lock),
once the generation that dropped them is RETIRED_GRACE_S old: a reader that opened the previous
generation just before a publish goes on reading its files (files that were never published,
such as the parts of a unit that never committed, go at once).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import schemas
from store.part_ranges import PartKeyRanges
from store.scratch import process_folder, temporary_folder
from store.uris import filesystem_of

if TYPE_CHECKING:  # imported where a connection is opened: ingest's workers write Parquet only
    import duckdb

SQL = Path(__file__).resolve().parent.parent / "sql"
# Views derived from the tables, shared by several jobs (and there for users to query too).
DERIVED_VIEWS = ("edit_state", "image_tag_lists")  # in order: the second reads the first
CATALOG_STORAGE_VERSION = "v1.2.0"
PUBLISHED = "state/published.json"
INPUT_REGISTRY = "state/inputs.json"  # input location -> input id (the first part of its keys), from ingest
CATALOG_STATE = "state/catalog.json"  # the fingerprint of the views catalog.duckdb holds
HOLDS = "state/holds"  # <job>.json: the parts readers keep while a run of the job replaces units
JSON_READ_TRIES = 5  # reads of a JSON file met half-replaced by another process (Workspace.read_json)
# Jobs whose unit markers name parts (state/<job>/<unit>.json with "parts").
UNIT_JOBS = ("ingest", "annotate", "caption", "export")
# DuckDB's own default is 80% of the machine's memory, and it keeps what it may use: a
# co-occurrence join over 20k images grew the driver to 14 GB. Past the limit it spills to disk.
DUCKDB_MEMORY_LIMIT = "2GB"
# How long a part file dropped by a publish stays on disk for readers of the generation before:
# longer than a query over the old file list runs (`booruset sql`, the report, a job's scan).
RETIRED_GRACE_S = 900.0
# A marker file last written this long ago may be kept in memory by its mtime and size
# (Workspace._markers): a rewrite within the same second of the clock that stamps it (object
# storage's, a second apart) could otherwise look unchanged.
MARKER_SETTLED_S = 60.0


def unit_id(*parts: str) -> str:
    """A stable, file-name-safe id for a unit of work (e.g. an input shard)."""
    digest = hashlib.sha1("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(parts[0]).stem)[-40:] if parts else ""
    return f"{readable}-{digest[:16]}"


class WorkspaceError(Exception):
    """A path that is not a workspace (for a job that only reads or continues one)."""


class Workspace:
    """Tables, catalog and state of one booruset run."""

    def __init__(self, root: str, create: bool = True, memory_limit: str = DUCKDB_MEMORY_LIMIT) -> None:
        """Open the workspace at `root`, creating it when `create`; else WorkspaceError if absent."""
        if "://" in root:
            try:
                self.fs, self.base = filesystem_of(root)
            except ValueError as exc:
                raise WorkspaceError(f"workspace: {exc}") from exc
            self.local = False
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(root).resolve())
            self.local = True
        self.root = root if not self.local else self.base
        self.memory_limit = memory_limit  # of the DuckDB that connect() opens
        self._published_at = time.monotonic()
        self._hold = False  # no publish mid-run (see hold_publishing)
        # folder -> {path: ((mtime_ns, size), its bytes)}, of the markers its last listing found
        self._marker_cache: dict[str, dict[str, tuple[tuple[int, int], bytes]]] = {}
        self.part_key_ranges = PartKeyRanges(self.fs)
        self.retired_grace_s = RETIRED_GRACE_S
        if not create:
            if self.fs.get_file_info(f"{self.base}/tables").type != pafs.FileType.Directory:
                raise WorkspaceError(f"no workspace at {root} (run `booruset ingest -w {shlex.quote(root)} ...` first)")
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

    def uri(self, rel: str) -> str:
        """The path or URI by which any worker opens `rel` in this workspace (options of a URI kept)."""
        if self.local:
            return f"{self.base}/{rel}"
        root, sep, query = self.root.partition("?")
        return f"{root.rstrip('/')}/{rel}{sep}{query}"

    # ---- tables -------------------------------------------------------------------------
    def table_dir(self, name: str) -> str:
        return f"{self.base}/tables/{name}"

    def write_part(self, name: str, part: str, table: pa.Table | list[dict], row_group_size: int | None = None) -> None:
        """Write one part of a table atomically: a temporary file, then a rename. row_group_size:
        rows per row group (default pyarrow's, a million rows: one group, which a filter cannot skip)."""
        self.write_parquet(f"{self.table_dir(name)}/{part}.parquet", schemas.conform(table, name), row_group_size)

    def write_parquet(self, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
        """Write a Parquet file at `path` (a path in this workspace's filesystem) atomically."""
        folder, name = path.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{name}-{uuid.uuid4().hex}.parquet.tmp"
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd", row_group_size=row_group_size)
        if self.local:
            fsync(tmp)  # the bytes are on disk before the name says the part is complete
        self.fs.move(tmp, path)
        self.part_key_ranges.forget(path)

    def write_part_batches(self, name: str, part: str, batches: Iterable[pa.RecordBatch]) -> int:
        """Write one part from a stream of record batches (bounded memory), atomically; its rows."""
        schema = schemas.TABLES[name]
        folder = self.table_dir(name)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{part}-{uuid.uuid4().hex}.parquet.tmp"
        rows = 0
        with pq.ParquetWriter(tmp, schema, filesystem=self.fs, compression="zstd") as writer:
            for batch in batches:
                writer.write_table(schemas.conform(pa.Table.from_batches([batch]), name))
                rows += batch.num_rows
        if self.local:
            fsync(tmp)
        self.fs.move(tmp, f"{folder}/{part}.parquet")
        self.part_key_ranges.forget(f"{folder}/{part}.parquet")
        return rows

    def add_part(self, name: str, part: str, table: pa.Table | list[dict]) -> None:
        """Write a part and publish it at once, outside any job's units: rows made elsewhere
        (benchmarks, tests, tables a user loads). Writing the same part again replaces it."""
        from store.lock import WorkspaceLock  # store.lock imports this module

        with WorkspaceLock(self, f"add_part {name}/{part}"):  # a publish is a read-modify-write
            self.write_part(name, part, table)
            self.publish({f"added:{name}/{part}": {name: [part]}})

    def read_part(self, name: str, part: str, columns: list[str]) -> list[dict]:
        """Some columns of one part (a unit's rows), [] when the part is not there."""
        path = f"{self.table_dir(name)}/{part}.parquet"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        with self.fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            present = [c for c in columns if c in parquet.schema_arrow.names]  # parts of older versions
            return parquet.read(columns=present).to_pylist()

    def read_json(self, rel: str) -> dict | None:
        """The JSON file `rel` (None when there is none). On object storage a read is a HEAD (the
        size) then a ranged GET, so one that meets another process's write_json of the file gets
        the new version cut at the old one's size: it is read again (one write takes milliseconds)."""
        path = f"{self.base}/{rel}"
        for attempt in range(JSON_READ_TRIES):
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            try:
                with self.fs.open_input_stream(path) as f:
                    return json.loads(f.read())
            except (ValueError, OSError):
                if attempt == JSON_READ_TRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        return None

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
        """The files of table `name` in the published generation."""
        parts = self.published()["tables"].get(name, [])
        return [f"{self.table_dir(name)}/{part}.parquet" for part in parts]

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

    def commit_unit(self, job: str, unit: str, info: dict, parts: dict[str, list[str]]) -> None:
        """Mark a unit done, after all its parts ({table: [part]}) are written; the next publish
        makes them visible."""
        self._write_marker(self.state_dir(job), unit, {**info, "parts": parts})
        fault_point("BOORUSET_KILL_AFTER_COMMITS")

    def _write_marker(self, folder: str, name: str, marker: dict) -> None:
        """`folder`/`name`.json, atomically: a temporary name, then a rename."""
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{name}-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(json.dumps(marker, sort_keys=True).encode())
        self.fs.move(tmp, f"{folder}/{name}.json")

    def forget_unit(self, job: str, unit: str, hold: bool = True) -> None:
        """Retire a committed unit: the publish after the job's end drops its parts (with `hold`,
        see hold_publishing; without, the next publish)."""
        if hold:
            self.hold_publishing(job)
        path = f"{self.state_dir(job)}/{unit}.json"
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    def done_units(self, job: str) -> dict[str, dict]:
        """The units `job` has committed, with the info each was committed with."""
        return self._markers(self.state_dir(job))

    # ---- units set aside ------------------------------------------------------------------
    def park_unit(self, job: str, unit: str, marker: dict) -> None:
        """Set a committed unit (`marker`: its marker) aside: no generation names its parts any
        more (the next publish drops them), but begin_job keeps their files, and unpark_unit
        commits it again as it was. Export's units of a folder it exports to no more: their files
        stay in that folder, and an export back to it takes them back instead of writing them again."""
        self._write_marker(self.parked_dir(job), unit, marker)
        self.forget_unit(job, unit, hold=False)

    def parked_dir(self, job: str) -> str:
        return f"{self.state_dir(job)}/parked"

    def parked_units(self, job: str) -> dict[str, dict]:
        """{unit: marker} of the units of `job` set aside (park_unit)."""
        return self._markers(self.parked_dir(job))

    def unpark_unit(self, job: str, unit: str, marker: dict) -> None:
        """Commit a unit set aside again (`marker`: parked_units'), with the parts it had."""
        self._write_marker(self.state_dir(job), unit, marker)
        self.drop_parked(job, unit)

    def drop_parked(self, job: str, unit: str) -> None:
        """Forget a unit set aside: the next job's start deletes its parts' files."""
        path = f"{self.parked_dir(job)}/{unit}.json"
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    def parts_present(self, parts: dict[str, list[str]]) -> bool:
        """Whether every part of {table: [part]} has its file."""
        paths = [f"{self.table_dir(t)}/{p}.parquet" for t, names in parts.items() for p in names]
        return all(info.type == pafs.FileType.File for info in self.fs.get_file_info(paths))

    def _markers(self, folder: str, cache: bool = True) -> dict[str, dict]:
        """{name: marker} of the marker files (<name>.json) in `folder` (with `cache`, kept as below).

        A marker file this process read before, unchanged since (same mtime and size in the
        listing) and older than MARKER_SETTLED_S then, is not read again: a job publishes every
        minute, each publish lists every job's markers, and on object storage each read is a
        request (10,000 markers: minutes a publish). A rewrite after that has a later mtime. The
        cache keeps only the markers of the folder's last listing: those deleted since go."""
        done = {}
        settled = time.time() - MARKER_SETTLED_S
        cached_before, kept = self._marker_cache.pop(folder, {}), {}
        for info in self._marker_files(folder):
            stamp = (info.mtime_ns, info.size)
            cached = cached_before.get(info.path)
            if cached is not None and cached[0] == stamp:
                data = cached[1]  # parsed anew: each caller gets a marker of its own to change
            else:
                with self.fs.open_input_stream(info.path) as f:
                    data = f.read()
            if cache and info.mtime_ns is not None and info.mtime_ns / 1e9 < settled:
                kept[info.path] = (stamp, data)
            done[info.base_name[: -len(".json")]] = json.loads(data)
        if kept:
            self._marker_cache[folder] = kept
        return done

    def _marker_files(self, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(folder, recursive=recursive, allow_not_found=True)
        return [info for info in self.fs.get_file_info(selector)
                if info.is_file and info.base_name.endswith(".json") and not info.base_name.startswith(".")]

    # ---- batches of a unit not yet committed ------------------------------------------------
    def batch_dir(self, job: str, unit: str) -> str:
        return f"{self.state_dir(job)}/batches/{unit}"

    def commit_batch(self, job: str, unit: str, batch: str, marker: dict) -> None:
        """Mark one batch of a unit done, after its parts (marker["parts"]) are written: a unit
        killed half-way keeps the batches it finished (begin_job leaves their parts), and its
        unit marker, once the unit is whole, names them with the rest."""
        self._write_marker(self.batch_dir(job, unit), batch, marker)
        fault_point("BOORUSET_KILL_AFTER_BATCHES")

    def done_batches(self, job: str, unit: str) -> dict[str, dict]:
        """The batch markers of a unit not yet committed: {batch: marker}. Not cached: each names
        the keys of its images (annotate's: a thousand), and a job's start reads every unit's (a
        run killed late at a million images: the driver kept a million keys until each unit committed)."""
        return self._markers(self.batch_dir(job, unit), cache=False)

    def batch_units(self, job: str) -> list[str]:
        """The units that have batch markers."""
        selector = pafs.FileSelector(f"{self.state_dir(job)}/batches", allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory)

    def batch_marker_files(self, job: str) -> list[pafs.FileInfo]:
        """The batch marker files of every unit of `job` (path, mtime), not read."""
        return self._marker_files(f"{self.state_dir(job)}/batches", recursive=True)

    def pending_batches(self, job: str, pending: set[str], elsewhere: Callable[[dict], bool] | None = None
                        ) -> dict[str, dict[str, dict]]:
        """The batch markers of the `pending` units ({unit: {batch: marker}}). Those of any other
        unit (committed since, or no longer planned) are dropped with their unpublished parts,
        but for units with a marker that `elsewhere` says is of work this run does not plan
        (another input of ingest): left for the run that plans it."""
        return dict(self.each_pending_batches(job, pending, elsewhere))

    def each_pending_batches(self, job: str, pending: set[str], elsewhere: Callable[[dict], bool] | None = None
                             ) -> Iterator[tuple[str, dict[str, dict]]]:
        """pending_batches one unit at a time, read as it is asked for: a caller that keeps little
        of each (annotate keeps no key) never holds every unit's markers."""
        for unit in self.batch_units(job):
            markers = self.done_batches(job, unit)
            if unit in pending:
                yield unit, markers
            elif elsewhere is None or not any(elsewhere(m) for m in markers.values()):
                self.drop_batches(job, unit, markers)
                self.forget_batches(job, unit)  # its folder too

    def forget_batches(self, job: str, unit: str, batches: Iterable[str] | None = None) -> None:
        """Drop a unit's batch markers (`batches`, or all of them) and leave their parts: once its
        unit marker names them. (drop_batches: markers that no longer count, with their parts.)"""
        folder = self.batch_dir(job, unit)
        if batches is None:
            self._marker_cache.pop(folder, None)  # never listed again: its cache would stay
            if self.fs.get_file_info(folder).type != pafs.FileType.NotFound:
                self.fs.delete_dir(folder)
            return
        for batch in batches:
            self.fs.delete_file(f"{folder}/{batch}.json")

    def drop_batches(self, job: str, unit: str, markers: dict[str, dict]) -> None:
        """Forget batch markers that no longer count ({batch: marker}, as done_batches gave them)
        and delete their parts that were never published; a part a generation names or named, or
        a committed unit's marker names (a unit committed before its batch markers were forgotten,
        not yet published while a run holds: hold_publishing), is left to publishing."""
        if not markers:
            return
        published = self.published()
        shown = {t: set(p) for t, p in published["tables"].items()}
        committed = (self.read_json(f"state/{job}/{unit}.json") or {}).get("parts", {})
        for table, parts in [*published.get("retired", {}).items(), *committed.items()]:
            shown.setdefault(table, set()).update(parts)
        for marker in markers.values():
            for table, parts in marker.get("parts", {}).items():
                for part in set(parts) - shown.get(table, set()):
                    self.delete_part(table, part)
        self.forget_batches(job, unit, markers)

    def _batch_parts(self) -> dict[str, set[str]]:
        """Parts named by the batch markers of every unit job."""
        named: dict[str, set[str]] = defaultdict(set)
        for job in UNIT_JOBS:
            for unit in self.batch_units(job):
                for marker in self.done_batches(job, unit).values():
                    for table, parts in marker.get("parts", {}).items():
                        named[table].update(parts)
        return named

    # ---- publication ----------------------------------------------------------------------
    def published(self) -> dict:
        """The published generation: {"generation", "owned": {owner: {table: [part]}}, "tables"}."""
        return self.read_json(PUBLISHED) or {"generation": 0, "owned": {}, "tables": {}}

    def publish(self, owned: dict[str, dict[str, list[str]]] | None = None, empty_catalog: bool = True) -> int:
        """Make a new generation visible: the parts of every committed unit, plus the parts of
        global outputs by owner (`owned` replaces those owners' parts; {} for an owner drops it).
        One atomic write: a reader sees all of it or none of it. Returns the generation.
        empty_catalog=False: no catalog.duckdb is made for a generation without a part (begin_job)."""
        first = self.read_json(PUBLISHED) is None
        previous = self.published()
        owners = {**previous["owned"], **(owned or {})}
        tables: dict[str, set[str]] = defaultdict(set)
        holds = self.holds()
        for job in UNIT_JOBS:
            # a run of `job` that retired units and stopped before it replaced them all: readers
            # keep the parts of its last complete generation until a run of it ends
            parts_of_job = holds[job] if job in holds else self._unit_parts(job)
            for table, names in parts_of_job.items():
                tables[table].update(names)
        if first:  # a workspace from before generations: keep what its readers saw
            claimed = {t: set(p) for t, p in tables.items()}
            for parts_by_table in (owned or {}).values():
                for table, names in parts_by_table.items():
                    claimed.setdefault(table, set()).update(names)
            for owner, parts in self._legacy_owners(claimed).items():
                owners.setdefault(owner, parts)
        owners = {owner: parts for owner, parts in owners.items() if parts}
        for parts_by_table in owners.values():
            for table, parts in parts_by_table.items():
                tables[table].update(parts)
        self._published_at = time.monotonic()
        generation = previous["generation"] + 1
        self.write_json(PUBLISHED, {"generation": generation, "owned": owners, "time": time.time(),
                                    "tables": {t: sorted(p) for t, p in sorted(tables.items())},
                                    "retired": self._retired(previous, tables),
                                    "schemas": {t: schema_fingerprint(t) for t in sorted(schemas.TABLES)},
                                    "short_parts": self._short_parts(previous, tables)})
        fault_point("BOORUSET_KILL_AFTER_PUBLISHES")
        if empty_catalog or any(tables.values()) or os.path.exists(f"{self.base}/catalog.duckdb"):
            self.refresh_catalog(only_if_changed=True)
        return generation

    def _unit_parts(self, job: str) -> dict[str, set[str]]:
        """{table: parts} of the units `job` has committed (their markers name them)."""
        return merged_parts(self._unit_parts_by_input(job).values())

    def _unit_parts_by_input(self, job: str, markers: dict[str, dict] | None = None) -> dict[str, dict[str, set[str]]]:
        """{input id: {table: parts}} of the units `job` has committed (`markers`: its done_units,
        read here when not given), by the input their markers name (ingest's; "" for a marker
        that names none)."""
        inputs: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        visible: dict[str, set[str]] | None = None  # listed only for markers from before "parts"
        for unit, info in (self.done_units(job) if markers is None else markers).items():
            if "parts" not in info and visible is None:
                visible = self._visible_parts()
            parts = info["parts"] if "parts" in info else legacy_unit_parts(job, unit, visible)
            for table, names in parts.items():
                inputs[info.get("input") or ""][table].update(names)
        return inputs

    def holds(self) -> dict[str, dict[str, list[str]]]:
        """{job: {table: parts}} of the jobs whose run is replacing units (hold_publishing)."""
        return {job: hold["tables"] for job, hold in self._markers(f"{self.base}/{HOLDS}").items()}

    def _retired(self, previous: dict, tables: dict[str, set[str]]) -> dict[str, dict[str, float]]:
        """Parts the previous generations named and this one does not, with when they left: the
        next job's start keeps their files for readers until they are retired_grace_s old."""
        now = time.time()
        retired = {t: dict(parts) for t, parts in previous.get("retired", {}).items()}
        for table, parts in previous["tables"].items():
            for part in set(parts) - tables.get(table, set()):
                retired.setdefault(table, {})[part] = now
        kept = {t: {p: at for p, at in sorted(parts.items()) if p not in tables.get(t, set())
                    and now - at < self.retired_grace_s}
                for t, parts in sorted(retired.items())}
        return {t: parts for t, parts in kept.items() if parts}

    def _short_parts(self, previous: dict, tables: dict[str, set[str]]) -> dict[str, list[str]]:
        """Per table, the published parts that lack a column of its schema: written before the
        column was added (the views read them by name, with nulls). Every part this code writes
        has the whole schema, so a part's footer is read only when its table's schema changed
        since the last publish (a new version of booruset), once per part. Object storage needs
        none: its pyarrow datasets fill a missing column with nulls themselves."""
        if not self.local:
            return {}
        short = {}
        for table, parts in tables.items():
            if table not in schemas.TABLES:
                continue
            if previous.get("schemas", {}).get(table) == schema_fingerprint(table):
                found = set(previous.get("short_parts", {}).get(table, [])) & parts
            else:
                found = {p for p in parts if not self._has_every_column(table, p)}
            if found:
                short[table] = sorted(found)
        return short

    def _has_every_column(self, table: str, part: str) -> bool:
        try:
            names = pq.read_schema(f"{self.table_dir(table)}/{part}.parquet", filesystem=self.fs).names
        except (OSError, pa.ArrowInvalid):
            return True  # missing or unreadable: the read fails either way, and says which file
        return set(schemas.TABLES[table].names) <= set(names)

    def _in_grace(self, retired: dict[str, dict[str, float]], table: str, part: str) -> bool:
        return time.time() - retired.get(table, {}).get(part, float("-inf")) < self.retired_grace_s

    def _visible_parts(self) -> dict[str, set[str]]:
        """Part names per table of every non-hidden Parquet file under tables/."""
        found: dict[str, set[str]] = defaultdict(set)
        selector = pafs.FileSelector(f"{self.base}/tables", recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
                table = info.path[len(f"{self.base}/tables/"):].split("/", 1)[0]
                found[table].add(info.base_name[: -len(".parquet")])
        return found

    def _legacy_owners(self, claimed: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
        """Visible parts no marker names, by the owner that writes such names now."""
        owners: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        prefixes = {"curate-": "curate", "caption-text-tags": "caption:tags_from_text", "pmi": "caption:related_tags"}
        for table, parts in self._visible_parts().items():
            for part in sorted(parts - claimed.get(table, set())):
                owner = next((o for prefix, o in prefixes.items() if part.startswith(prefix)), "legacy")
                owners[owner][table].append(part)
        return {owner: dict(parts) for owner, parts in owners.items()}

    def publish_now_and_then(self, interval: float = 60.0) -> None:
        """Publish when the last publish from this process is `interval` seconds old: a long job's
        committed units become visible while it runs, without a publish per unit (each one
        reads every marker)."""
        if not self._hold and time.monotonic() - self._published_at >= interval:
            self.publish()

    def hold_publishing(self, job: str, inputs: Iterable[str] = ()) -> None:
        """No new generation of `job`'s tables until its run ends (release_hold): this run
        retires units whose replacements it is writing, and a generation in between would show
        the old rows gone and the new ones not all there. The hold is a file (state/holds/), so
        that a run killed in between holds too: the next job to publish, whichever it is, keeps
        the parts `job`'s units had before (a run that holds already keeps the first ones).
        `inputs` (ingest): the inputs whose units this run replaces; the hold keeps each input's
        parts apart, so that a later run of the job that does not plan one of them keeps that
        input's parts held when it ends (release_hold). An ingest hold also keeps each unit's
        `images` parts and count (held_units): the units annotate reads while it holds."""
        self._hold = True
        path = f"{HOLDS}/{job}.json"
        hold = self.read_json(path)
        if hold is None:
            self.fs.create_dir(f"{self.base}/{HOLDS}", recursive=True)
            markers = self.done_units(job)  # read once, for each record
            by_input = self._unit_parts_by_input(job, markers)
            hold = {"tables": sorted_parts(merged_parts(by_input.values())),
                    "inputs": {i: sorted_parts(parts) for i, parts in sorted(by_input.items())},
                    "replacing": [], "time": time.time()}
            if job == "ingest":
                hold["units"] = ingest_units_by_input(markers)
        elif set(inputs) <= set(hold.get("replacing", [])):
            return
        hold["replacing"] = sorted({*hold.get("replacing", []), *inputs})
        self.write_json(path, hold)

    def holds_by_input(self, job: str) -> bool:
        """Whether `job`'s hold keeps each input's parts apart (hold_publishing; not one written by
        an earlier version)."""
        return "inputs" in (self.read_json(f"{HOLDS}/{job}.json") or {})

    def held_inputs(self, job: str) -> list[str]:
        """The inputs `job`'s hold says its runs were replacing (hold_publishing; [] for none)."""
        return (self.read_json(f"{HOLDS}/{job}.json") or {}).get("replacing", [])

    def held_units(self, job: str) -> dict[str, dict]:
        """{unit: {"parts": its `images` parts, "images": its images}} of the committed units whose
        parts `job`'s hold keeps, as their markers said when it was written (hold_publishing:
        ingest's). A run that stops while it replaces an input's units has retired their markers:
        this is what still says which unit each held part is of (annotate's units_of). {} without
        a hold, and for a hold written by an earlier version (it kept no units)."""
        hold = self.read_json(f"{HOLDS}/{job}.json") or {}
        return {unit: held for units in hold.get("units", {}).values() for unit, held in units.items()}

    def release_hold(self, job: str, planned: Iterable[str] | None = None) -> None:
        """The run of `job` has written every unit it planned: publishes show its units again.
        `planned` (ingest): the inputs this run planned. An input a killed run was replacing
        that this run did not plan is still half replaced: its parts stay held (the others are
        published), until a run that plans it ends."""
        path = f"{HOLDS}/{job}.json"
        hold = self.read_json(path)
        left = set()
        if hold is not None and planned is not None and "inputs" in hold:
            left = set(hold.get("replacing", [])) - set(planned)
        if left:
            markers = self.done_units(job)
            now = self._unit_parts_by_input(job, markers)
            inputs = {i: hold["inputs"].get(i, {}) if i in left else sorted_parts(now[i])
                      for i in sorted({*now, *left})}
            rewritten = {"tables": sorted_parts(merged_parts(inputs.values())), "inputs": inputs,
                         "replacing": sorted(left), "time": hold["time"]}
            if "units" in hold:  # as "inputs": the held inputs' units as they were, the others' as they are
                units = ingest_units_by_input(markers)
                rewritten["units"] = {i: hold["units"].get(i, {}) if i in left else units.get(i, {}) for i in inputs}
            self.write_json(path, rewritten)
        elif hold is not None:
            self.fs.delete_file(f"{self.base}/{path}")
        self._hold = False

    def begin_job(self) -> int:
        """At a writing job's start (under the workspace lock): publish what a killed run had
        committed, then delete the part files no generation names (parts of units that never
        committed, but for the batches they marked done and the units set aside; outputs replaced
        by later generations, once retired_grace_s after that). Returns the files deleted."""
        # a new workspace's first job writes no catalog.duckdb of empty views (~40 ms) here: its
        # publish of rows does
        self.publish(empty_catalog=False)
        published = self.published()
        named = {t: set(p) for t, p in published["tables"].items()}
        for table, parts in self._batch_parts().items():
            named.setdefault(table, set()).update(parts)
        for job in self.holds():  # the units a held run committed: not published yet, still its output
            inputs = self.held_inputs(job) if job == "ingest" else []  # [] for a hold of an earlier version
            if inputs:  # kept per input (release_hold): an ingest of other inputs does not end it
                names = ", ".join(inputs)
                print(f"{job}: a run stopped while it replaced units of {names}; readers see them as they were "
                      f"until an ingest that reads {names} ends (or `booruset inputs --forget` of it)", flush=True)
            else:
                print(f"{job}: a run stopped while it replaced units; readers see its tables as they were "
                      f"until a run of `booruset {job}` ends", flush=True)
            for table, parts in self._unit_parts(job).items():
                named.setdefault(table, set()).update(parts)
        for job in UNIT_JOBS:  # units set aside (park_unit): their parts wait for a run that takes them back
            for marker in self.parked_units(job).values():
                for table, parts in marker.get("parts", {}).items():
                    named.setdefault(table, set()).update(parts)
        retired = published.get("retired", {})
        selector = pafs.FileSelector(f"{self.base}/tables", recursive=True, allow_not_found=True)
        deleted = 0
        for info in self.fs.get_file_info(selector):
            if not info.is_file or not info.base_name.endswith(".parquet") or info.base_name.startswith(".tmp-"):
                continue
            table = info.path[len(f"{self.base}/tables/"):].split("/", 1)[0]
            part = info.base_name[: -len(".parquet")]
            if part not in named.get(table, set()) and not self._in_grace(retired, table, part):
                self.fs.delete_file(info.path)
                deleted += 1
        return deleted + self._delete_unnamed_frames(named.get("images", set()), retired)

    def _delete_unnamed_frames(self, images_parts: set[str], retired: dict[str, dict[str, float]]) -> int:
        """Frame stores (frames/<part>.tar, udfs/ingest/frame_store.py) of ingest batches whose
        images part no generation or batch marker names: a clip that changed or left the inputs,
        a batch killed before its marker."""
        selector = pafs.FileSelector(f"{self.base}/frames", allow_not_found=True)
        deleted = 0
        for info in self.fs.get_file_info(selector):
            part = info.base_name[:-4]
            if info.is_file and info.base_name.endswith(".tar") and part not in images_parts \
                    and not self._in_grace(retired, "images", part):
                self.fs.delete_file(info.path)
                deleted += 1
        return deleted

    # ---- SQL ----------------------------------------------------------------------------
    def view_sql(self, name: str, parts: list[str], union_by_name: bool = False, temporary: bool = False) -> str:
        """DDL of the view over one table's published `parts`: the schema's columns, matched by
        name in every file.

        Every part is written with the table's schema (schemas.conform, or curate's COPY of the
        schema's columns), so DuckDB binds the view from the first file alone. union_by_name (only
        for tables with parts written before a column was added) reads the footer of every file at
        every bind: at 200,000 images (1,400 tag_scores parts) each connect and each publish's
        catalog took ~30 MiB and 0.3 s more, growing with the parts.

        DuckDB cannot bind parameters in DDL, so the file paths (the workspace path is the user's)
        go in as escaped SQL string literals.
        """
        nulls = null_columns(name)
        if parts:
            # DuckDB expands globs even in a list of files, hence the glob escape
            folder = glob_escape(self.table_dir(name))
            files = ", ".join(sql_string(f"{folder}/{glob_escape(part)}.parquet") for part in parts)
            cols = ", ".join(f'"{f.name}"' for f in schemas.TABLES[name])
            source = f"read_parquet([{files}], union_by_name = {str(union_by_name).lower()})"
            if union_by_name:  # a column no part has yet (all written before it was added): nulls
                source = f"(select * from {source} union all by name select {nulls} where false)"
            body = f"select {cols} from {source}"
        else:
            body = f"select {nulls} where false"
        return f'create or replace {"temp " if temporary else ""}view "{name}" as {body}'

    def connect(self, read_only: bool = False, views: bool = True,
                published: dict | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with one view per table (no lock on the catalog file) over the
        `published` generation (default: the one published now); views=False: none, for a caller
        that attaches the parts it reads (attach_parts).

        read_only (for `booruset sql`): a local workspace's files are the only ones DuckDB may
        touch, and the setting is locked, so no query can read or write anything else.
        """
        import duckdb  # 80 ms of an ingest worker's start, which never opens one

        spill = process_folder("booruset-duckdb-")  # one per process, not per unpickled Workspace
        con = duckdb.connect(config={"memory_limit": self.memory_limit, "temp_directory": spill})
        if views:
            self._create_views(con, published)
        if read_only:
            if self.local:
                tables = f"{self.base}/tables/"
                # the views' patterns spell the workspace path glob-escaped: allow both spellings
                con.execute("set allowed_directories = $dirs", {"dirs": [tables, glob_escape(tables)]})
            # object storage: the registered datasets are read by pyarrow, DuckDB itself reads nothing
            con.execute("set enable_external_access = false")
            con.execute("set lock_configuration = true")
        return con

    def attach_tables(self, con: duckdb.DuckDBPyConnection, names: list[str] | None = None,
                      published: dict | None = None) -> None:
        """Each table (`names`, default all) on `con` over its published files, all of one
        generation: `published` (a `published()` read earlier, to attach the same files on a
        second connection), else the one published now.

        Local files are DuckDB views over read_parquet. Object storage is read through the same
        pyarrow filesystem the jobs write with (endpoint, region and credentials from the
        workspace URI and the standard AWS variables): each table is a registered pyarrow
        dataset, which DuckDB scans with projection and filter pushdown. No DuckDB extension is
        needed, so nothing is downloaded at run time.
        """
        published = published or self.published()
        short = short_tables(published)
        for name in names or list(schemas.TABLES):
            self.attach_parts(con, name, published["tables"].get(name, []), union_by_name=name in short)

    def key_range_cursor(self, con: duckdb.DuckDBPyConnection, names: Iterable[str], first: str,
                         last: str | None, published: dict, others: Iterable[str] = ()) -> duckdb.DuckDBPyConnection:
        """A cursor of `con` for a query of the keys in [first, last] (last None: no upper end) in
        which tables `names` hold only those of their `published` parts that can have such keys
        (store/part_ranges.py says why: each part's footer is then read once, not once a range).
        `others`: the tables the query reads whole, which a local workspace's cursor already sees
        (the views of `con`), but an object store's does not (a registered dataset is seen only by
        the connection that registered it)."""
        cursor = con.cursor()
        short = short_tables(published)
        for name in [*names, *([] if self.local else others)]:
            parts = published["tables"].get(name, [])
            if name in names:
                paths = {f"{self.table_dir(name)}/{part}.parquet": part for part in parts}
                parts = [paths[path] for path in self.part_key_ranges.meeting(list(paths), first, last)]
            self.attach_parts(cursor, name, parts, union_by_name=name in short, temporary=True)
        return cursor

    def attach_parts(self, con: duckdb.DuckDBPyConnection, name: str, parts: list[str],
                     union_by_name: bool = False, temporary: bool = False) -> None:
        """Table `name` on `con` over the given parts of its folder (published or not yet);
        union_by_name when some part lacks a column (Workspace._short_parts); temporary: a view of
        this connection alone (a registered dataset always is)."""
        if self.local or not parts:
            con.execute(self.view_sql(name, parts, union_by_name, temporary))
        else:
            import pyarrow.dataset as pads  # it imports pandas: 0.25 s of every worker's start

            files = [f"{self.table_dir(name)}/{part}.parquet" for part in parts]
            con.register(name, pads.dataset(files, schema=schemas.TABLES[name], format="parquet", filesystem=self.fs))

    def _create_views(self, con: duckdb.DuckDBPyConnection, published: dict | None = None) -> None:
        self.attach_tables(con, published=published)
        for name in DERIVED_VIEWS:
            create_derived_view(con, name)

    def refresh_catalog(self, only_if_changed: bool = False) -> str | None:
        """Rewrite catalog.duckdb so that `duckdb <ws>/catalog.duckdb` sees every table.

        only_if_changed: not when the views would be the same as the file's (a publish at a job's
        start with nothing new): writing the file costs ~50 ms, mostly DuckDB's open and close.
        state/catalog.json holds the fingerprint of the views the file has, written after it."""
        if not self.local:
            return None  # DuckDB cannot write a database file to object storage
        path = f"{self.base}/catalog.duckdb"
        published = self.published()  # read once: the fingerprint and the views are of one generation
        fingerprint = self._catalog_fingerprint(published)
        if only_if_changed and os.path.exists(path) and \
                (self.read_json(CATALOG_STATE) or {}).get("fingerprint") == fingerprint:
            return path
        tmp = f"{self.base}/.catalog-{uuid.uuid4().hex}.duckdb"
        # Written in a folder of its own, then copied: DuckDB opens a database file at `ws?x/...` as
        # `ws.wal?x/...` and at `ws\x/...` as `ws/x/...`, which failed every publish of such a workspace.
        import duckdb  # not at the top: see connect

        with temporary_folder("booruset-catalog-") as folder:
            # The DuckDB CLI (duckdb-cli) may be older than the Python library: write the file in a
            # storage format both read.
            con = duckdb.connect(f"{folder}/catalog.duckdb",
                                 config={"storage_compatibility_version": CATALOG_STORAGE_VERSION})
            try:
                con.execute("begin")  # one commit for every view: ~10 ms instead of ~25 (one each)
                self._create_views(con, published)
                con.execute("commit")
            finally:
                con.close()
            shutil.copyfile(f"{folder}/catalog.duckdb", tmp)
        Path(tmp).replace(path)
        self.write_json(CATALOG_STATE, {"fingerprint": fingerprint})
        return path

    def _catalog_fingerprint(self, published: dict) -> str:
        """A hash of every statement that makes the catalog's views over the `published` generation."""
        short = short_tables(published)
        statements = [self.view_sql(name, published["tables"].get(name, []), name in short)
                      for name in schemas.TABLES]
        statements += [(SQL / f"{name}.sql").read_text(encoding="utf-8") for name in DERIVED_VIEWS]
        return hashlib.sha1("\n;\n".join([CATALOG_STORAGE_VERSION, *statements]).encode()).hexdigest()


def merged_parts(groups: Iterable[dict[str, Iterable[str]]]) -> dict[str, set[str]]:
    """{table: parts} of several {table: parts} (a job's units, by input) together."""
    tables: dict[str, set[str]] = defaultdict(set)
    for parts in groups:
        for table, names in parts.items():
            tables[table].update(names)
    return tables


def sorted_parts(parts: dict[str, Iterable[str]]) -> dict[str, list[str]]:
    """{table: parts} as JSON keeps it: tables and parts sorted."""
    return {table: sorted(names) for table, names in sorted(parts.items())}


def short_tables(published: dict) -> set[str]:
    """The tables whose views read their parts by name (union_by_name): those with parts that lack
    a column (Workspace._short_parts), and, until the next publish finds those parts, every table
    whose schema changed since `published` was written (an older version published it: a reader
    such as `booruset sql` or the review page runs before any job of this version has)."""
    fingerprints = published.get("schemas", {})
    changed = {t for t in schemas.TABLES if fingerprints.get(t) != schema_fingerprint(t)}
    return set(published.get("short_parts", {})) | changed


_events_in_this_process: dict[str, int] = defaultdict(int)


@functools.cache  # the schemas are fixed in a process; readers ask at every connect
def schema_fingerprint(table: str) -> str:
    """The column names and types of a table's schema, hashed: published.json records them."""
    return hashlib.sha1(str(schemas.TABLES[table]).encode()).hexdigest()[:16]


def null_columns(name: str) -> str:
    """Table `name`'s columns as typed nulls: the select list of an empty view of it."""
    return ", ".join(f"cast(null as {duck_type(f.type)}) as \"{f.name}\"" for f in schemas.TABLES[name])


def create_empty_views(con: duckdb.DuckDBPyConnection) -> None:
    """Every table on `con` as an empty view with its schema's columns, and the derived views over
    them: what a query binds against before any workspace exists (export.where, checked before
    the first job of a run)."""
    for name in schemas.TABLES:
        con.execute(f'create or replace view "{name}" as select {null_columns(name)} where false')
    for name in DERIVED_VIEWS:
        create_derived_view(con, name)


def create_derived_view(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """One of DERIVED_VIEWS (sql/<name>.sql) on `con`, over the tables it reads there."""
    body = (SQL / f"{name}.sql").read_text(encoding="utf-8")
    con.execute(f'create or replace view "{name}" as {body}')


def fault_point(variable: str) -> None:
    """Fault injection for the resume tests: with BOORUSET_KILL_AFTER_COMMITS=N (or
    BOORUSET_KILL_AFTER_PUBLISHES=N, BOORUSET_KILL_AFTER_BATCHES=N), the process that writes the
    N-th unit marker (or published.json, batch marker) SIGKILLs its process group right after
    it, as a preempted node would, at a point that no outside poll can miss on a loaded machine."""
    limit = os.environ.get(variable)
    if not limit:
        return
    _events_in_this_process[variable] += 1
    if _events_in_this_process[variable] >= int(limit):
        os.killpg(int(os.environ.get("BOORUSET_FAULT_PGID") or os.getpgrp()), signal.SIGKILL)
        os.killpg(os.getpgrp(), signal.SIGKILL)  # a Ray worker: its own group is not the job's


if any(name.startswith("BOORUSET_KILL_AFTER_") for name in os.environ):
    # Ray starts each worker in a process group of its own. The job's group (the driver and the
    # Ray it started) reaches them in the environment, which they inherit from the driver.
    os.environ.setdefault("BOORUSET_FAULT_PGID", str(os.getpgrp()))


TEMP_PREFIXES = (".tmp-", ".catalog-")


def images_parts(unit: str, marker: dict) -> list[str]:
    """The `images` parts of a committed ingest unit: one per batch, or the unit's own name for a
    unit committed before markers named their parts."""
    return unit_parts(unit, marker, "images")


def ingest_units_by_input(markers: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{input id: {unit: {"parts": its `images` parts, "images": its images}}} of the committed,
    not retired ingest units that name `images` parts (`markers`: ingest's done_units): one entry a unit,
    what annotate plans a unit from (Workspace.held_units)."""
    units: dict[str, dict[str, dict]] = defaultdict(dict)
    for unit, marker in sorted(markers.items()):
        parts = images_parts(unit, marker)
        if parts and not marker.get("retired"):
            units[marker.get("input") or ""][unit] = {"parts": sorted(parts), "images": int(marker.get("images", 0))}
    return dict(units)


def unit_parts(unit: str, marker: dict, table: str) -> list[str]:
    """The parts of `table` a committed ingest unit wrote (see images_parts)."""
    return marker["parts"].get(table, []) if "parts" in marker else [unit]


def legacy_unit_parts(job: str, unit: str, visible: dict[str, set[str]]) -> dict[str, list[str]]:
    """The parts of a unit committed before markers named them: the names each job used then,
    where such a file is there."""
    if job == "ingest":
        names = {t: [unit] for t in ("images", "source_tags", "source_text", "errors")}
    elif job == "caption":
        names = {"captions": [unit], "errors": [f"caption-{unit}"]}
    elif job == "export":
        names = {"export_manifest": [unit], "errors": [f"export-{unit}"]}
    else:
        names = {t: [p for p in parts if p.startswith(f"{job}-{unit}-")] for t, parts in visible.items()}
    return {t: [p for p in parts if p in visible.get(t, set())] for t, parts in names.items()}


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


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


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
        pa.timestamp("us", tz="UTC"): "timestamptz",
    }
    return simple[arrow_type]
