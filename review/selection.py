"""The review grid's rows: the export selection of every image (nothing dropped), kept as one
DuckDB table in key order, and pages of it by keyset.

Why a table and not the selection query per page: the selection aggregates every caption and tag
of the workspace, seconds on a million images; built once (and again when a job publishes), a page
is a scan of one sorted table that DuckDB stops early (top-N on `key` with zonemap skipping), so
page 10,000 costs what page 1 costs. An edit rebuilds only its images' rows.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import duckdb

from jobs.config import REPO, ConfigError
from jobs.export import RANGED_TABLES, SELECTION_CHUNK, WHOLE_TABLES, check_where, key_ranges
from store.workspace import Workspace

# sql/review_rows.sql over sql/export_selection.sql, whose parameters it takes
REVIEW_QUERY = (REPO / "sql" / "review_rows.sql").read_text(encoding="utf-8").replace(
    "from $selection", "from (\n" + (REPO / "sql" / "export_selection.sql").read_text(encoding="utf-8") + "\n)")
# Every image, excluded or not: the page shows exclusions so that they can be taken back.
KEEP_ALL = {"drop_duplicates": False, "drop_flagged": False, "drop_excluded": False, "gone_inputs": []}
BUILD_CHUNK = SELECTION_CHUNK  # images per step of the review table's build (the same query as export's)
# Edits of up to this many images refresh their rows one by one (a key equality reaches the
# table scans); more refresh the key ranges of the build (BUILD_CHUNK images) that hold them.
REFRESH_EACH = 50
# the review query of one key range [$first, $last) ($last null: to the end), in key order
RANGE_QUERY = f"select * from ({REVIEW_QUERY}) where key >= $first and ($last is null or key < $last) order by key"
# A query with a person's filter is stopped past this: the review table has one connection, which
# every request waits for (a cross join in a subquery held every page and edit for minutes).
FILTER_SECONDS = 30.0
# A filter's text is parsed before any timer can stop it (DuckDB's tokenizer and parser, ~1.2 s a
# MB, the one connection held): 8 MB took 10 s. A typed condition is a few hundred characters, one a
# notebook writes (`key in (...)` of some hundred keys) a few KB; 32,000 parse in ~40 ms.
MAX_FILTER_CHARS = 32_000
# The checked filters kept (check) are dropped past this many characters of filter text or
# CHECKED_FILTERS filters: 257 filters of 8 MB were kept, ~4 GB.
CHECKED_CHARS = 2_000_000
CHECKED_FILTERS = 256
GRID_COLUMNS = ("key", "characters", "group", "accuracy", "flagged", "excluded", "dup_group", "n_errors",
                "caption_edited", "edited", "width", "height", "clip",
                "sha256")  # the thumbnail's URL names the picture: a replaced one is not the browser's old one


@dataclass(frozen=True)
class Filters:
    """What the grid shows: a SQL condition over the selection plus the quick filters."""

    where: str = ""
    character: str = ""
    group: str = ""
    tag: str = ""  # tag contains this text
    flagged: bool = False
    duplicates: bool = False
    errors: bool = False
    excluded: bool = False
    edited: bool = False

    def chars(self) -> int:
        """The length of its texts."""
        return len(self.where) + len(self.character) + len(self.group) + len(self.tag)

    def sql(self) -> tuple[str, dict]:
        """The condition (quick filters as parameters) and its parameters."""
        parts, params = [], {}
        if self.character:
            parts.append("list_contains(characters, $character)")
            params["character"] = self.character
        if self.group:
            parts.append('"group" = $group')
            params["group"] = self.group
        if self.tag:
            parts.append("contains(array_to_string(tags, chr(1)), $tag)")  # chr(1): in no tag
            params["tag"] = self.tag
        for flag, condition in (("flagged", "flagged"), ("duplicates", "dup_group is not null"),
                                ("errors", "n_errors > 0"), ("excluded", "excluded"), ("edited", "edited")):
            if getattr(self, flag):
                parts.append(condition)
        if self.where.strip():
            parts.append(f"(\n{self.where.strip()}\n)")
        return " and ".join(parts) or "true", params


class ReviewIndex:
    """The review table of one workspace, rebuilt when the published generation changes."""

    filter_seconds = FILTER_SECONDS

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.lock = threading.RLock()  # one DuckDB connection, used by one request at a time
        self.con: duckdb.DuckDBPyConnection | None = None
        self.generation = -1
        self.stamp: object = None
        self.build_seconds = 0.0
        self.checked: dict[Filters, tuple[str, dict]] = {}  # filters validated on the current table
        self.checked_chars = 0  # the filter text they hold

    # ---- building ---------------------------------------------------------------------
    def fresh(self) -> duckdb.DuckDBPyConnection:
        """The connection, its table rebuilt first if a job published since."""
        with self.lock:
            stamp = self.published_stamp()
            if self.con is None or stamp != self.stamp:
                generation = self.ws.published()["generation"]
                if self.con is None or generation != self.generation:
                    self.build(generation)
                self.stamp = stamp
            return self.con

    def published_stamp(self) -> object:
        """Changes when state/published.json does: its mtime for a local workspace (a stat per
        request, not a parse of a file that names every part), else always (re-read each time)."""
        if self.ws.local:
            try:
                found = os.stat(f"{self.ws.base}/state/published.json")
                return found.st_ino, found.st_mtime_ns, found.st_size  # each publish renames a new file in
            except FileNotFoundError:
                return None
        return object()

    def build(self, generation: int) -> None:
        started = time.perf_counter()
        # read-only as `booruset sql`: a filter can read the workspace's tables and nothing else
        published = self.ws.published()
        con = self.ws.connect(read_only=True, published=published)
        # in key ranges of BUILD_CHUNK images: DuckDB's memory is bounded by a chunk, not the
        # workspace (the key filter reaches the table scans, sql/image_tag_lists.sql)
        con.execute(f"create table review_rows as {RANGE_QUERY} limit 0", {**KEEP_ALL, "first": "", "last": None})
        for first, last in key_ranges(con, BUILD_CHUNK):
            with self.ws.key_range_cursor(con, RANGED_TABLES, first, last, published, WHOLE_TABLES) as cursor:
                cursor.execute(f"insert into review_rows {RANGE_QUERY}", {**KEEP_ALL, "first": first, "last": last})
        if self.con is not None:
            self.con.close()  # only now: a build that failed leaves the old table serving
        self.con, self.generation = con, generation
        self.checked.clear()
        self.checked_chars = 0
        self.build_seconds = time.perf_counter() - started

    def after_edit(self, keys: list[str], generation_before: int) -> None:
        """Bring the rows of `keys` (in key order) up to date after an edit that published one
        generation on top of `generation_before`: row by row for a few images, else the build's key
        ranges that hold them (a bulk action over one folder rebuilt the whole table: 10 s at
        300,000 images, every page waiting); the whole table if they are in most ranges (a new
        table is quicker than most of one made again), or if anything else was published meanwhile."""
        with self.lock:
            published = self.ws.published()
            if self.con is None or generation_before != self.generation \
                    or published["generation"] != generation_before + 1:
                self.build(published["generation"])
                return
            ranges = key_ranges(self.con, BUILD_CHUNK) if len(keys) > REFRESH_EACH else []
            holding = [(first, last) for first, last in ranges if holds_key(keys, first, last)]
            if 2 * len(holding) > len(ranges):
                self.build(published["generation"])
                return
            self.ws.attach_tables(self.con, ["edits"], published)
            self.generation = published["generation"]
            if ranges:
                self.refresh_ranges(holding, published)
                return
            for key in keys:
                self.con.execute("delete from review_rows where key = $key", {"key": key})
                self.con.execute(f"insert into review_rows select * from ({REVIEW_QUERY}) where key = $key",
                                 {**KEEP_ALL, "key": key})

    def refresh_ranges(self, ranges: list[tuple[str, str | None]], published: dict) -> None:
        """The rows of each key range [first, last) made again, a range at a time in one transaction
        (a range that fails to build keeps its rows)."""
        for first, last in ranges:
            params = {"first": first, "last": last}
            with self.ws.key_range_cursor(self.con, RANGED_TABLES, first, last, published, WHOLE_TABLES) as cursor:
                cursor.execute("begin transaction")
                try:
                    cursor.execute("delete from review_rows where key >= $first and ($last is null or key < $last)",
                                   params)
                    cursor.execute(f"insert into review_rows {RANGE_QUERY}", {**KEEP_ALL, **params})
                except BaseException:
                    cursor.execute("rollback")
                    raise
                cursor.execute("commit")

    # ---- reading ----------------------------------------------------------------------
    def check(self, filters: Filters) -> tuple[str, dict]:
        """The filter's SQL, validated as export.where is (one SELECT that runs); once per filter
        and table (a grid page asks for the page and for the previous page's cursor)."""
        chars = filters.chars()
        if chars > MAX_FILTER_CHARS:
            raise ConfigError(f"the filter is {chars} characters, over {MAX_FILTER_CHARS}: no condition is that long")
        with self.lock:
            con = self.fresh()
            if filters in self.checked:
                return self.checked[filters]
            condition, params = filters.sql()
            query = f"select key from review_rows where {condition}"
            if filters.where.strip():
                check_where(query, filters.where.strip())
            try:
                con.execute(f"{query} limit 0", params)
            except duckdb.Error as exc:
                raise ConfigError(f"filter {filters.where!r}: {exc}") from exc
            if len(self.checked) >= CHECKED_FILTERS or self.checked_chars + chars > CHECKED_CHARS:
                self.checked.clear()
                self.checked_chars = 0
            self.checked[filters] = condition, params
            self.checked_chars += chars
            return condition, params

    @contextlib.contextmanager
    def running(self, filters: Filters) -> Iterator[tuple[str, dict]]:
        """The filter's SQL (check) for a query that runs it. A condition that fails on a row (a
        cast, error()) fails only as it runs, past check's `limit 0`: the same ConfigError."""
        condition, params = self.check(filters)
        try:
            yield condition, params
        except duckdb.Error as exc:
            raise ConfigError(f"filter {filters.where!r}: {exc}") from exc

    def page(self, filters: Filters, after: str | None, limit: int) -> tuple[list[dict], str | None]:
        """Up to `limit` grid rows with key > after, in key order, and the `after` of the next page
        (None on the last)."""
        columns = ", ".join(f'"{c}"' for c in GRID_COLUMNS)
        # the lock until the rows are fetched: another request's query on the one connection ends this one's result
        with self.running(filters) as (condition, params), self.lock:
            cur = self.filtered(filters, f"select {columns} from review_rows where key > $after and ({condition}) "
                                f"order by key limit $limit", {**params, "after": after or "", "limit": int(limit) + 1})
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, rows[-1]["key"] if more else None

    def before(self, filters: Filters, key: str, limit: int) -> str | None:
        """The `after` cursor of the page that ends just before `key` (for "previous")."""
        with self.running(filters) as (condition, params), self.lock:
            query = (f"select min(key) from (select key from review_rows where key < $key and ({condition}) "
                     f"order by key desc limit $limit)")
            first = self.filtered(filters, query, {**params, "key": key, "limit": int(limit)}).fetchone()[0]
            if first is None:
                return None
            return self.con.execute("select max(key) from review_rows where key < $k", {"k": first}).fetchone()[0] or ""

    def neighbours(self, filters: Filters, key: str) -> tuple[str | None, str | None]:
        """The previous and next key under the filter (keyboard navigation on the image page)."""
        with self.running(filters) as (condition, params), self.lock:
            prev = self.filtered(filters, f"select max(key) from review_rows where key < $key and ({condition})",
                                 {**params, "key": key}).fetchone()[0]
            nxt = self.filtered(filters, f"select min(key) from review_rows where key > $key and ({condition})",
                                {**params, "key": key}).fetchone()[0]
        return prev, nxt

    def total(self) -> int:
        with self.lock:
            return self.fresh().execute("select count(*) from review_rows").fetchone()[0]

    def count(self, filters: Filters) -> int:
        with self.running(filters) as (condition, params), self.lock:
            return self.filtered(filters, f"select count(*) from review_rows where {condition}", params).fetchone()[0]

    def rows(self, filters: Filters, columns: tuple[str, ...]) -> Iterator[dict]:
        """Some columns of every row under the filter, in key order (bulk actions), fetched in
        batches: a bulk action over a million images never holds them all as Python objects."""
        names = ", ".join(f'"{c}"' for c in columns)
        with self.running(filters) as (condition, params), self.lock:
            cur = self.filtered(filters, f"select {names} from review_rows where {condition} order by key", params)
            while batch := cur.fetchmany(10_000):
                for row in batch:
                    yield dict(zip(columns, row, strict=True))

    def filtered(self, filters: Filters, sql: str, params: dict) -> duckdb.DuckDBPyConnection:
        """`sql`, a query with the filter's condition, run (its answer to fetch), stopped past
        filter_seconds with a ConfigError that says so."""
        with self.lock:
            con = self.fresh()
            guard, running = threading.Lock(), [True]

            def stop() -> None:
                with guard:  # not once the query is over: the fetch of its answer would fail
                    if running[0]:
                        con.interrupt()

            timer = threading.Timer(self.filter_seconds, stop)
            timer.start()
            try:
                return con.execute(sql, params)
            except duckdb.InterruptException:
                raise ConfigError(f"filter {filters.where!r} was stopped: it ran over {self.filter_seconds:g} s "
                                  "(every page and edit waits while it runs)") from None
            finally:
                with guard:
                    running[0] = False
                timer.cancel()

    def row(self, key: str) -> dict | None:
        found = self.query("select * from review_rows where key = $key", {"key": key})
        return found[0] if found else None

    def query(self, sql: str, params: dict) -> list[dict]:
        """Rows of a query on the review table and the workspace views, as dicts."""
        with self.lock:
            cur = self.fresh().execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def holds_key(keys: list[str], first: str, last: str | None) -> bool:
    """Whether sorted `keys` has one in [first, last) (last None: no upper end)."""
    at = bisect.bisect_left(keys, first)
    return at < len(keys) and (last is None or keys[at] < last)
