"""Where caption's units are cut (jobs/caption.stage_inputs), in its staging worker.

A unit's id hashes its rows: a unit whose rows changed is captioned again. Units were cut every
caption.unit_size images in key order, so one image added or removed moved every later cut: every
later unit had other rows, a new id, and its images were captioned again (a VLM asked, and paid,
for nearly the whole dataset after one file was added to a folder).

Now a unit committed before (a marker) whose rows are all still there, in a row and unchanged,
keeps its range, and so its id: it is not run again. The images between such ranges (new ones,
changed ones, those of units whose rows changed) are cut into units of unit_size images, the
last of each stretch what is left (joined to the one before when under half unit_size). A
unit's range is found from its first key (its marker's, the last plan's, or for a marker written
before markers had one, the smallest key its parts hold: every image of a unit has a captions or
an errors row) and its row count; it is kept when the rows there hash to its id again.
"""

from __future__ import annotations

import hashlib

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from store.workspace import Workspace, unit_id
from udfs.caption.caption_unit import PICTURES_IN_DIGEST

PLAN_STATE = "state/caption-planned.json"  # the last staging's fingerprint and units (jobs/caption.py)

# the candidates' rows in the staged inputs (caption_rows: key, row_digest, position), with their
# row digests in key order; a candidate whose first key is gone finds no rows
CANDIDATE_ROWS = """
with starts as (
    select c.unit, c.first_key, c.rows, c.legacy, r.position as start
    from unit_candidates c
    join caption_rows r on r.key = c.first_key
)
select s.unit, s.first_key, s.start, s.rows, s.legacy, count(*) as found,
       string_agg(r.row_digest, '' order by r.position) as digests,
       string_agg(r.legacy_digest, '' order by r.position) as legacy_digests
from starts s
join caption_rows r on r.position >= s.start and r.position < s.start + s.rows
group by all
"""


def caption_unit_id(shaping: str, first_key: str, rows_digest: str) -> str:
    """A unit's id: its first key, the options that shape its captions and its rows' digest."""
    digest = hashlib.sha1(shaping.encode())
    digest.update(rows_digest.encode())
    return unit_id(f"caption-{first_key}", digest.hexdigest())


def unit_ranges(ws: Workspace, con: duckdb.DuckDBPyConnection, shaping: str, total: int,
                unit_size: int) -> tuple[list[tuple[int, int]], dict[tuple[int, int], str]]:
    """[start, end) positions, in key order, of this run's units over `con`'s caption_rows: the
    ranges of committed units whose rows are unchanged, and the rows between cut anew; and, by
    its [start, end), each kept unit committed before row digests held the picture whose id
    is another now (jobs/caption.py adopt_units gives its marker the id it has now)."""
    planned = {u["unit"]: u["first"] for u in (ws.read_json(PLAN_STATE) or {}).get("units", []) if u.get("first")}
    candidates = unit_candidates(ws, ws.done_units("caption"), planned)
    kept = kept_ranges(con, candidates, shaping)
    ranges = cut_ranges([(start, end) for start, end, _, _ in kept], total, unit_size)
    return ranges, {(start, end): unit for start, end, unit, now in kept if unit != now}


def unit_candidates(ws: Workspace, markers: dict[str, dict], planned: dict[str, str]) -> pa.Table:
    """(unit, first_key, rows) of each committed unit whose first key is known: from its marker,
    the last plan (`planned`: unit -> first key) or its parts (read once, then planned has it)."""
    rows = []
    for unit, info in markers.items():
        first = info.get("first_key") or planned.get(unit) or first_key_of_parts(ws, info.get("parts") or {})
        if first is not None and info.get("images"):
            rows.append({"unit": unit, "first_key": first, "rows": int(info["images"]),
                         "legacy": not info.get(PICTURES_IN_DIGEST)})
    schema = pa.schema([("unit", pa.string()), ("first_key", pa.string()), ("rows", pa.int64()),
                        ("legacy", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


def first_key_of_parts(ws: Workspace, parts: dict[str, list[str]]) -> str | None:
    """The smallest key in a unit's captions and errors parts (a marker written before markers
    named their first key). From the footers' statistics; a part not there (an empty one is not
    written) or without them adds nothing: a key found too large only fails the range's check."""
    keys = []
    for table in ("captions", "errors"):
        for part in parts.get(table, []):
            try:
                with ws.fs.open_input_file(f"{ws.table_dir(table)}/{part}.parquet") as f:
                    meta = pq.ParquetFile(f).metadata
            except OSError:
                continue
            column = meta.schema.to_arrow_schema().get_field_index("key")
            for group in range(meta.num_row_groups):
                stats = meta.row_group(group).column(column).statistics
                if stats is not None and stats.has_min_max:
                    keys.append(stats.min)
    return min(keys) if keys else None


def kept_ranges(con: duckdb.DuckDBPyConnection, candidates: pa.Table, shaping: str
                ) -> list[tuple[int, int, str, str]]:
    """The [start, end), id and id now of each candidate whose rows are all there and hash to its
    id. A unit committed before row digests held the picture (`legacy`) is also known by the
    digests it was made with (sql/caption_units.sql legacy_digest), and its id now is another
    where a VLM is shown the pictures: the upgrade captions no picture again (one replaced before
    it keeps its caption, as it did then; one replaced after it makes a new unit)."""
    if not candidates.num_rows:
        return []
    con.register("unit_candidates", candidates)
    kept = []
    cursor = con.execute(CANDIDATE_ROWS)
    while batch := cursor.fetchmany(256):  # a unit's digests are 32 bytes an image: a few units at a time
        for unit, first, start, rows, legacy, found, digests, legacy_digests in batch:
            if found != rows:
                continue
            now = caption_unit_id(shaping, first, hashlib.sha1(digests.encode()).hexdigest())
            if now == unit or (legacy and caption_unit_id(
                    shaping, first, hashlib.sha1(legacy_digests.encode()).hexdigest()) == unit):
                kept.append((int(start), int(start) + int(rows), unit, now))
    con.unregister("unit_candidates")
    return kept


def cut_ranges(kept: list[tuple[int, int]], total: int, unit_size: int) -> list[tuple[int, int]]:
    """Every position 0..total-1 in one range: the kept ones (an overlapping one is dropped), and
    the gaps between cut into ranges of unit_size (gap_ranges)."""
    ranges, at = [], 0
    for start, end in [*sorted(kept), (total, total)]:
        if start < at:
            continue
        ranges += gap_ranges(at, start, unit_size)
        if end > start:
            ranges.append((start, end))
        at = end
    return ranges


def gap_ranges(start: int, end: int, unit_size: int) -> list[tuple[int, int]]:
    """[start, end) in ranges of unit_size, the last one what is left; a rest of fewer than half
    unit_size joins the range before it. Cut every unit_size alone, each image added inside a
    unit left a unit of 1 image behind it (the unit's range and its new image: unit_size and 1):
    after 500 changes to 100,000 images in units of 500, 460 units, the median of 1 image, each
    with its marker and parts. A range cut here starts where a gap or a range before it ends, so
    a run killed and resumed cuts the units it had not finished as it had."""
    size = max(1, unit_size)
    bounds = [*range(start, end, size), end]
    if len(bounds) > 2 and 2 * (end - bounds[-2]) < size:
        del bounds[-2]
    return list(zip(bounds, bounds[1:], strict=False)) if end > start else []
