"""`booruset export`: the curated dataset -> WebDataset shards, kohya / EveryDream folders, Parquet.

Steps:
1. selection (sql/export_selection.sql), in a worker: one row per image, minus near duplicates
   and images whose accepted caption is flagged; then the user's `where` as a filter over that
   selection; run one key range at a time and streamed from DuckDB into Parquet files under
   state/export-plan/selection/; then cut into units from the staged keys (up to max_count images
   of one source, about one shard, cut where the keys say: sql/export_units.sql);
2. plan: one CPU task per unit (udfs/export/export_plan.py) reads its key range of the staged
   selection and makes the safe name, exported size, txt and json of every sample and cuts the
   unit's shards by count and planned bytes, counting from 0; the driver, from the shard counts
   alone, gives each unit its first global shard number, so shard numbers are contiguous and
   names deterministic, and a shard never mixes units;
3. one Ray task per unit, started largest first by the work its plan estimates (plain tasks, as
   in step 2: a unit is one coarse task, and Ray Data's executor would add its start to every
   run), reads the unit's plan and source once and writes its files atomically
   (udfs/export/export_shard.py), then commits the unit; a rerun skips committed units;
4. the manifest (`<out>/manifest.parquet`, also the workspace table export_manifest), written in
   a worker from the units' manifest parts (the driver gets counts per file), and the wids index
   (`<out>/webdataset/index.wids.json`).
"""

from __future__ import annotations

import contextlib
import filecmp
import glob
import hashlib
import json
import os
import re
import shlex
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import ImageColor

import schemas
from jobs.config import REPO, Config, ConfigError, out_folder
from jobs.errors import one_line
from jobs.export_moves import move_units
from jobs.ray_env import (
    Progress,
    collect_units,
    init_ray,
    largest_first,
    run_in_worker,
    start_in_worker,
    unit_tasks,
    worker_result,
)
from jobs.summary import JobSummary
from store.staging import clear
from store.stamps import code_digest, file_stamps, fingerprint, part_stamps
from store.workspace import (
    INPUT_REGISTRY,
    Workspace,
    create_empty_views,
    short_tables,
    sweep_temp_files,
    unit_id,
)
from udfs.export.export_plan import plan_unit
from udfs.export.export_shard import (
    FOLDER_LAYOUTS,
    JOB,
    OUT_CHECK,
    STARTED,
    atomic_write,
    export_unit,
    file_stamp,
    shard_name,
)
from udfs.export.resize import bucket_sides
from udfs.export.safe_names import inside
from udfs.export.tag_text import CATEGORIES, SORTS

LAYOUTS = ("webdataset", "kohya", "everydream", "parquet")
KOHYA_CONFIG = "kohya/dataset.toml"  # kohya sd-scripts' --dataset_config for the kohya folders (write_kohya_config)
EXPORT_DUPLICATES = "export_duplicates"  # the selection's duplicates table (export_duplicates)
PLAN = "state/export-plan"  # the staged selection and plans of the running export
PLAN_STATE = "state/export-planned.json"  # the last plan: what it was made of (plan_stamp), its units
# the last manifest written: its folder, what it was made of (manifest_stamp), its file's stamp
# and the counts write_manifest gave (a rerun with the same keeps the file: kept_manifest)
MANIFEST_STATE = "state/export-manifest.json"
PLAN_CODE = [REPO / "jobs" / "export.py", REPO / "udfs" / "export", REPO / "sql"]
# state/export/open/<digest of out>.json ({"out"}): an export to that folder began and has not
# ended (written before its units, removed once its manifest is): the only folders whose units
# the folder's manifest does not name were left by a stopped export (remove_unfinished_files)
OPEN = f"{JOB}/open"
# images per key range of the selection: measured at 200,000 images with 37 curated tags each,
# ~0.6 GB of DuckDB memory (1.0 GB at 50,000), well inside the default 2 GB duckdb_memory_limit
SELECTION_CHUNK = 25_000
# Tables of one part per ingest batch or annotate / caption unit (thousands at a million images),
# which a key range of the selection reads only the parts of that can hold its keys
# (Workspace.key_range_cursor). Not `tags`: sql/image_tag_lists.sql reads it across keys.
RANGED_TABLES = ("images", "source_tags", "source_text", "captions", "caption_regions", "errors")
WHOLE_TABLES = tuple(name for name in schemas.TABLES if name not in RANGED_TABLES)
MANIFEST_BATCH = 50_000  # rows per batch from DuckDB to the manifest file, and of stale file names
SELECTION_ROW_GROUP = 1024  # rows per row group of a staged chunk: a unit's task reads about its own
# Options that change what a unit writes: a change makes new unit ids (old outputs are removed).
SHAPING = ("formats", "max_size", "buckets", "bucket_min_side", "bucket_max_side", "bucket_step", "jpeg_quality",
           "png_compress_level", "max_count", "max_bytes", "text", "tag_underscores", "materialize_repeats", "concept",
           "tag_category_order", "tag_sort", "exclude_tag_categories", "exclude_tags", "escape_parentheses",
           "keep_tokens", "keep_tokens_separator", "clip_token_budget", "alpha_background")


def sql_text(name: str) -> str:
    return (REPO / "sql" / name).read_text(encoding="utf-8")


def out_dir(cfg: Config, ws: Workspace) -> str:
    """[export] out, or <workspace>/export for a local workspace."""
    return str(out_folder(JOB, cfg, ws.local, ws.base))


def check_options(opts: dict) -> None:
    unknown = [f for f in opts["formats"] if f not in LAYOUTS]
    if unknown or not opts["formats"]:
        raise ConfigError(f"export.formats: unknown or empty {unknown} (known: {', '.join(LAYOUTS)})")
    if opts["text"] not in ("caption", "tags", "regions"):
        raise ConfigError("export.text must be 'caption', 'tags' or 'regions'")
    where = str(opts["where"]).strip()
    if where:  # before the first job of a run: a misspelt column failed at export, after hours of the jobs before
        check_where(f"select * from (select 1) as export_selection where (\n{where}\n)", where)
        bind_where(opts, where)
    separator = str(opts["keep_tokens_separator"])
    # a line break in it would make KEY.txt two lines, and kohya trains on the first alone
    if separator and (not separator.strip() or "".join(separator.splitlines()) != separator):
        raise ConfigError("export.keep_tokens_separator must be \"\" (none) or visible text on one line, "
                          "such as \"|||\"")
    if "," in separator:  # KEY.txt joins tags with ", ": kohya would cut the text at the first tag's comma
        raise ConfigError(f"export.keep_tokens_separator {separator!r} must not hold a comma: KEY.txt separates "
                          "tags with commas, and kohya keeps what is before the separator's first occurrence")
    if opts["tag_sort"] not in SORTS:
        raise ConfigError(f"export.tag_sort must be one of {', '.join(SORTS)}")
    for option in ("tag_category_order", "exclude_tag_categories"):  # "ratings" left every rating tag in KEY.txt
        unknown = [c for c in opts[option] if c not in CATEGORIES]
        if unknown:
            raise ConfigError(f"export.{option}: no tag category {', '.join(map(repr, unknown))} (the categories: "
                              f"{', '.join(CATEGORIES)})")
    budget, keep = int(opts["clip_token_budget"]), int(opts["keep_tokens"])
    if budget and 2 * keep - 1 > budget:  # each tag a token at least, a comma after each but the last
        raise ConfigError(f"export.keep_tokens {keep} cannot fit export.clip_token_budget {budget}: {keep} tags take "
                          f"{2 * keep - 1} CLIP tokens at least, and the budget never leaves kept tags out")
    if opts["alpha_background"]:
        try:
            ImageColor.getrgb(str(opts["alpha_background"]))
        except ValueError as exc:
            raise ConfigError(f"export.alpha_background {opts['alpha_background']!r}: {exc}") from exc
    if opts["buckets"] and int(opts["max_size"]) <= 0:
        raise ConfigError("export.buckets needs export.max_size (the bucket resolution)")
    sides = [int(opts[k]) for k in ("bucket_step", "bucket_min_side", "bucket_max_side")]
    if opts["buckets"] and not (1 <= sides[0] <= sides[1] <= sides[2] and sides[0] <= int(opts["max_size"])):
        raise ConfigError("export.buckets needs 1 <= bucket_step <= bucket_min_side <= bucket_max_side, "
                          "and bucket_step <= max_size")
    low, high = bucket_sides(sides[1], sides[2], sides[0]) if opts["buckets"] else (0, 0)
    if opts["buckets"] and not low <= int(opts["max_size"]) <= high:  # kohya asserts it of its bucket options
        raise ConfigError(f"export.buckets needs bucket_min_side <= max_size <= bucket_max_side (rounded to "
                          f"bucket_step: {low} <= {opts['max_size']} <= {high}), as kohya does: a trainer "
                          "could not bucket the images with the export's options")


def run(cfg: Config, ws: Workspace) -> JobSummary:
    started = time.perf_counter()
    opts = cfg[JOB]
    check_options(opts)
    out = out_dir(cfg, ws)
    # shards and files half-written by an export that died (disk full, SIGKILL) before this one
    sweep_temp_files(pafs.LocalFileSystem(), out, before=time.time())
    remove_out_check(out)
    ws.begin_job()
    unfinished = remove_unfinished(ws)
    code = code_digest(PLAN_CODE)  # once: the plan's stamp and the manifest's both name it
    stamp = plan_stamp(cfg, ws, out, code)
    last = last_plan(cfg, ws, out, stamp)
    if last is not None:
        total, chunks, selected, left_out, units = (last[k] for k in ("total", "chunks", "selected", "left_out",
                                                                       "units"))
        print("export: nothing the selection is made of changed since the last run, and every unit is in "
              f"{out}: not staged nor planned again", flush=True)
    else:
        total, chunks, groups, left_out = run_in_worker(cfg, ws, stage_selection, opts,
                                                        unit_images(opts, int(cfg["ingest"]["folder_unit_size"])),
                                                        SELECTION_CHUNK)
        selected = sum(g["rows"] for g in groups)
        units = plan_units(cfg, ws, groups, out) if groups else []
        ws.write_json(PLAN_STATE, {"stamp": stamp, "total": total, "chunks": chunks, "selected": selected,
                                   "left_out": left_out, "units": units})
    if remove_stale(cfg, ws, out, {u["unit"] for u in units}):
        ws.publish()  # the manifest rows of the files just removed go at once
        remove_wids_index(out)  # and the index naming them: written again at the run's end
        remove_kohya_config(out)  # and kohya's dataset config naming their folders: likewise
    taken = take_back(ws, out, {u["unit"] for u in units})
    ws.fs.create_dir(ws.state_dir(OPEN), recursive=True)
    ws.write_json(f"state/{OPEN}/{open_name(out)}.json", {"out": out})  # before any file of this run in `out`
    done = ws.done_units(JOB)
    moved = move_units(cfg, ws, out, units, done)
    lost = forget_lost_units(cfg, ws, out, units, done) if last is None else 0  # last_plan checked them
    moved = [unit for unit in moved if unit in done]  # one found lost is written again, not renamed
    pending = [u for u in units if u["unit"] not in done]
    print(f"export: {selected} of {total} images selected; {len(units)} units, "
          f"{len(units) - len(pending)} done before, {len(pending)} to run -> {out}", flush=True)
    infos = [done[u["unit"]] for u in units if u["unit"] in done]
    run_now = run_units(cfg, ws, out, pending) if pending else []
    infos += run_now
    counts = manifest_counts(cfg, ws, out, sorted(u["unit"] for u in units), code)
    ws.forget_unit(OPEN, open_name(out), hold=False)  # its manifest names every unit it wrote
    clear(ws, PLAN)
    shards = 0
    if "webdataset" in opts["formats"] and any(u["shards"] for u in units):
        shards = write_wids_index(out, units, counts["files"])
    else:  # no index left naming the shards this run removed; none for no shard (wids refuses it)
        remove_wids_index(out)
    write_kohya_config(out, opts, counts["files"])
    summary = JobSummary(JOB, rows_in=selected, units_done=len(pending), units_skipped=len(units) - len(pending),
                         rows_run=sum(info["images"] for info in run_now))
    add_infos(summary, infos, counts, opts["formats"], int(opts["clip_token_budget"]), run_now)
    summary.seconds = time.perf_counter() - started
    summary.notes.append(left_out_note(total, selected, left_out))
    if not selected:
        summary.notes.append(nothing_selected(out))
    summary.notes.append(f"selection staged in {chunks} key ranges of up to {SELECTION_CHUNK} images")
    summary.notes.extend(where_notes(out, opts["formats"], shards, counts["files"]))
    if unfinished:
        summary.notes.append(f"removed the files of {unfinished} units a killed export had started")
    if taken:
        summary.notes.append(f"{taken} units written to {out} before an export to another folder taken back: "
                             "their files kept, not written again")
    if moved:
        summary.notes.append(f"{len(moved)} units done before moved to other shard numbers: their files renamed, "
                             "not written again")
    if lost:
        summary.notes.append(f"{lost} units done before were written again: files they wrote were gone from {out}")
    if counts.get("left_files"):
        summary.notes.append(f"removed {counts['left_files']} files an earlier export left in {out} "
                             "(named by its manifest.parquet, not by this export)")
    return summary


def plan_stamp(cfg: Config, ws: Workspace, out: str, code: str | None = None) -> str:
    """A digest of what the selection and the plan are made of (store/stamps.py), taken before
    they are: the published parts of every table, the inputs gone, the export options, the output
    folder and the code. Not the export's own rows (its export_manifest, its units' errors parts),
    which give the selection nothing but what a user's `where` may read (n_errors, a subquery):
    published at the end of each run that wrote units, they made every second run stage and plan
    again. And the files the `where` reads (where_files). `code`: code_digest(PLAN_CODE), when
    the caller has it."""
    where = str(cfg[JOB]["where"]).lower()  # SQL names are not case-sensitive: N_ERRORS reads them too
    reads_own = "errors" in where or "export_manifest" in where

    def own_rows(table: str, part: str) -> bool:
        return not reads_own and (table == "export_manifest" or (table == "errors" and part.startswith(f"{JOB}-")))

    return fingerprint(ws, schemas.TABLES, skip=own_rows, gone=workspace_gone_inputs(ws), out=out,
                       code=code or code_digest(PLAN_CODE), where_files=where_files(str(cfg[JOB]["where"])),
                       options={JOB: cfg[JOB], "folder_unit_size": cfg["ingest"]["folder_unit_size"]})


# a quoted literal of the where, from its first quote: 'it''s', "keep.csv"
QUOTED = {"'": re.compile(r"'((?:[^']|'')*)'"), '"': re.compile(r'"((?:[^"]|"")*)"')}


def where_files(where: str) -> list[list]:
    """[path, size, mtime in ns] of each local file export.where names in a quoted literal (not
    in a comment): read_csv('keep.csv'), `from 'picked-*.csv'` (a glob: the files it matches).
    The selection changes with them: a keep list edited after an export was not read again, its
    plan kept. Relative paths are the driver's (the selection's worker runs in its folder); a
    literal that names no file (a tag, '%smile%') adds nothing; URIs (s3://...) are not stamped."""
    try:
        tokens = duckdb.tokenize(where)
    except (duckdb.Error, RuntimeError):
        return []
    stamps: dict[str, list[int]] = {}
    for pos, _ in tokens:
        quoted = QUOTED.get(where[pos]) and QUOTED[where[pos]].match(where, pos)
        if not quoted:
            continue
        literal = os.path.expanduser(quoted.group(1).replace(where[pos] * 2, where[pos]))
        try:
            for path in glob.glob(literal) if glob.has_magic(literal) else [literal]:
                if os.path.isfile(path):
                    st = os.stat(path)
                    stamps[os.path.abspath(path)] = [st.st_size, st.st_mtime_ns]
        except (OSError, ValueError):  # gone since, or a literal no path can be (a NUL in it)
            continue
    return [[path, *stamp] for path, stamp in sorted(stamps.items())]


def manifest_counts(cfg: Config, ws: Workspace, out: str, units: list[str], code: str) -> dict:
    """Publish the units, and write <out>/manifest.parquet (write_manifest, in a worker, while the
    driver publishes: it reads the units' own parts) unless the one there was written from the
    same (kept_manifest). Its counts."""
    stamp = manifest_stamp(ws, out, units, code)
    if (counts := kept_manifest(ws, out, stamp)) is not None:
        ws.publish()
        return counts
    manifest = start_in_worker(cfg, ws, write_manifest, out, units)
    ws.publish()
    counts = worker_result(manifest)
    ws.write_json(MANIFEST_STATE, {"out": out, "stamp": stamp, "file": manifest_file_stamp(out),
                                   "files": [[*path, n] for path, n in counts["files"].items()],
                                   "text_cut": counts["text_cut"]})
    return counts


def manifest_stamp(ws: Workspace, out: str, units: list[str], code: str) -> str:
    """A digest of what write_manifest reads: the units' export_manifest parts (by name, size and
    time), the folder and the code (`code`: code_digest(PLAN_CODE))."""
    return hashlib.sha256(json.dumps([out, part_stamps(ws, "export_manifest", units), code]
                                     ).encode()).hexdigest()


def manifest_file_stamp(out: str) -> list:
    return file_stamps(os.path.join(out, "manifest.parquet"))


def kept_manifest(ws: Workspace, out: str, stamp: str) -> dict | None:
    """The counts of the manifest in `out` when the last one written there was made of the same
    (`stamp`) and is still the file there: writing it again gave the same rows, and a new file's
    time made the report's inputs change (it keeps a page of the same inputs) on every
    `booruset run`. None otherwise."""
    last = ws.read_json(MANIFEST_STATE) or {}
    if last.get("out") != out or last.get("stamp") != stamp or last.get("file") != json_list(manifest_file_stamp(out)):
        return None
    return {"files": {(layout, path): n for layout, path, n in last["files"]}, "text_cut": last["text_cut"],
            "left_files": 0}


def json_list(value: list) -> list:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def last_plan(cfg: Config, ws: Workspace, out: str, stamp: str) -> dict | None:
    """The last run's plan (PLAN_STATE) when it was made of the same (plan_stamp) and every unit
    of it is done with its files in `out`: staging the selection and planning it again (~80 s at
    a million images) would give the same units. None otherwise: a unit to write again needs the
    plan files, which a run deletes at its end."""
    last = ws.read_json(PLAN_STATE) or {}
    if last.get("stamp") != stamp:
        return None
    done = ws.done_units(JOB)
    if not all(u["unit"] in done and outputs_present(out, done[u["unit"]]) for u in last["units"]):
        return None
    if set(cfg[JOB]["formats"]) & set(FOLDER_LAYOUTS) and last["units"] and \
            run_in_worker(cfg, ws, units_missing_files, out, [u["unit"] for u in last["units"]]):
        return None
    return last


def remove_unfinished(ws: Workspace) -> int:
    """Delete the files of the units a killed export started and never committed (their records
    in state/export/started/): no marker or manifest names them, and a plan without those units
    (another selection, other options) would leave them where trainers read them. A done unit
    that shared one of these files is written again (forget_lost_units). Makes the records'
    folder for this run's units. Returns how many were removed."""
    ws.fs.create_dir(ws.state_dir(STARTED), recursive=True)
    done = ws.done_units(JOB)
    removed = 0
    for unit, record in ws.done_units(STARTED).items():
        if unit not in done:
            delete_files(record["out"], record["files"])
            delete_files(record["out"], lone_multiply_files(record["out"], record["files"]))
            removed += 1
        ws.forget_unit(STARTED, unit, hold=False)
    return removed


def lone_multiply_files(out: str, relatives: Iterable[str]) -> list[str]:
    """The multiply.txt of the EveryDream folders of `relatives` that hold nothing else."""
    folders = {os.path.dirname(r) for r in relatives if r.startswith("everydream/")}
    return [f"{folder}/multiply.txt" for folder in sorted(folders)
            if os.path.isdir(os.path.join(out, folder)) and os.listdir(os.path.join(out, folder)) == ["multiply.txt"]]


def forget_lost_units(cfg: Config, ws: Workspace, out: str, units: list[dict], done: dict[str, dict]) -> int:
    """Forget (and take out of `done`) the done units of this plan whose files are not all in
    `out` any more, or not as written: the shards (and their sizes) and files their markers
    name, checked here, and their per-image files (kohya, EveryDream), named by their manifest
    rows and checked in a worker. Returns how many."""
    checked = [u["unit"] for u in units if u["unit"] in done]
    lost = {unit for unit in checked if not outputs_present(out, done[unit])}
    whole = sorted(set(checked) - lost)
    if set(cfg[JOB]["formats"]) & set(FOLDER_LAYOUTS) and whole:
        lost.update(run_in_worker(cfg, ws, units_missing_files, out, whole))
    for unit in lost:
        ws.forget_unit(JOB, unit, hold=False)  # rewritten under the same names
        del done[unit]
    return len(lost)


def outputs_present(out: str, info: dict) -> bool:
    """Whether the files a unit's marker names are in `out`, its shards the very files it wrote
    (size and modification time; a marker from before they were kept: present is enough)."""
    present = all(os.path.isfile(os.path.join(out, relative)) for relative in info.get("files", []))
    return present and all(file_stamp(os.path.join(out, relative)) == stamp
                           for relative, stamp in info.get("stamps", {}).items())


# ---- selection ------------------------------------------------------------------------------
def unit_images(opts: dict, folder_unit_size: int) -> int:
    """Images per export unit: one shard's worth (max_count), so that the tasks of an export have
    about a shard each to write, whatever the size of the input shards; at most a folder unit."""
    return max(1, min(int(opts["max_count"]), folder_unit_size))


def stage_selection(ws: Workspace, opts: dict, unit_size: int, chunk: int
                    ) -> tuple[int, int, list[dict], dict[str, int]]:
    """(images in the workspace, key ranges staged, the export units in export order, the images
    left out by each reason but export.where: sql/export_left_out.sql), in a worker: the
    selection is run one key range of `chunk` images at a time (DuckDB's memory is bounded by a
    chunk, not the workspace) and streamed into one Parquet file per range under
    state/export-plan/selection/; the units are then cut from the staged keys alone
    (sql/export_units.sql). A unit names its source, its key range and the files that hold it,
    for its tasks to read; no row of the selection comes back from here.

    The user's `where` is SQL text by nature (that is its point), so it is the one piece of
    SQL that is not a file: it runs as `select * from (<selection>) as export_selection where
    (<where>)` and must parse as exactly one SELECT. Values from data and config are bound as
    parameters, never formatted into SQL.
    """
    clear(ws, PLAN)  # what a killed export staged
    for folder in ("selection", "units"):
        ws.fs.create_dir(f"{ws.base}/{PLAN}/{folder}", recursive=True)
    published = ws.published()
    con = ws.connect(published=published)
    try:
        total = con.execute("select count(*) from images").fetchall()[0][0]
        ranges = key_ranges(con, chunk)
        where = str(opts["where"]).strip()
        query, params = selection_query(con, opts, where)
        params["gone_inputs"] = workspace_gone_inputs(ws)
        export_duplicates(con, params)
        chunks, left_out = [], Counter()
        for index, (first, last) in enumerate(ranges):
            path = f"{ws.base}/{PLAN}/selection/{index:05d}.parquet"
            with ws.key_range_cursor(con, RANGED_TABLES, first, last, published, WHOLE_TABLES) as cursor:
                # in place of curate's, for this cursor alone
                cursor.execute(f"create or replace temp view duplicates as select * from {EXPORT_DUPLICATES}")
                rows = stage_chunk(ws, cursor, query, {**params, "first": first, "last": last}, path, where)
                left_out.update(dict(cursor.execute(sql_text("export_left_out.sql"),
                                                    {**params, "first": first, "last": last}).fetchall()))
            if rows:
                chunks.append({"first": first, "last": last, "path": path})
            print(f"export selection: key range {index + 1}/{len(ranges)}, {rows} images selected", flush=True)
        units = cut_units(ws, con, chunks, unit_size, where)
    finally:
        con.close()
    return total, len(chunks), units, dict(left_out)


def workspace_gone_inputs(ws: Workspace) -> list[str]:
    """gone_inputs of the workspace's input registry."""
    return gone_inputs(ws.read_json(INPUT_REGISTRY) or {})


def gone_inputs(registry: dict[str, str]) -> list[str]:
    """The ids of the inputs in the workspace's registry (location -> id) whose every location is a
    local path that is no longer there: a collection moved to a new path is a new input to ingest,
    and the old one's rows stay, unreadable (their copies chosen as representatives took the
    pictures out of the export). Checked in the worker that stages the selection, as the export's
    tasks read the inputs in workers. A location on object storage counts as there."""
    there: dict[str, bool] = {}
    for location, input_id in registry.items():
        there[input_id] = there.get(input_id, False) or "://" in location or os.path.exists(location)
    return sorted(input_id for input_id, present in there.items() if not present)


def export_duplicates(con: duckdb.DuckDBPyConnection, params: dict) -> None:
    """Table EXPORT_DUPLICATES of `con`: the duplicates table with the representative the export
    keeps (sql/export_duplicates.sql): curate's, unless the export leaves it out for another reason
    now. Over the whole workspace, once: a chunk's cursor sees only its key range of images and
    captions, a group any of them. A DuckDB table (spilled past its memory limit), not an Arrow one:
    it has a row per image of a group, which in a worker's Python memory grew with the collection."""
    wanted = {k: params[k] for k in ("drop_flagged", "drop_excluded", "gone_inputs")}
    con.execute(f"create or replace table {EXPORT_DUPLICATES} as {sql_text('export_duplicates.sql')}", wanted)


def left_out_note(total: int, selected: int, left_out: dict[str, int]) -> str:
    """The summary's line on the images the selection left out, by reason."""
    by_where = total - selected - sum(left_out.values())
    reasons = [f"{n} {reason}" for reason, n in sorted(left_out.items())]
    reasons += [f"{by_where} by export.where"] if by_where else []
    return f"left out before export: {total - selected} of {total} images" + (f": {', '.join(reasons)}"
                                                                              if reasons else "")


def key_ranges(con: duckdb.DuckDBPyConnection, chunk: int) -> list[tuple[str, str | None]]:
    """[first, last) key ranges of `chunk` images in key order (last None: to the end), from
    sql/key_chunks.sql; export's staging and the review table run the selection one at a time."""
    firsts = [r[0] for r in con.execute(sql_text("key_chunks.sql"), {"chunk": chunk}).fetchall()]
    return list(zip(firsts, [*firsts[1:], None], strict=False))  # no images: no ranges


def selection_query(con: duckdb.DuckDBPyConnection, opts: dict, where: str) -> tuple[str, dict]:
    """The selection of one key range [$first, $last) ($last null: to the end), with the user's
    `where` (checked to be one condition), in (source, key) order; and its parameters."""
    query = (f"select * from (\n{sql_text('export_selection.sql')}\n) as export_selection\n"
             f"where key >= $first and ($last is null or key < $last)")
    if where:
        query = f"{query} and (\n{where}\n)"
        check_where(query, where)
    params = {"drop_duplicates": bool(opts["drop_duplicates"]), "drop_flagged": bool(opts["drop_flagged"]),
              "drop_excluded": True, "gone_inputs": []}  # stage_selection names the inputs gone
    return f"{query}\norder by source, key", params


def stage_chunk(ws: Workspace, con: duckdb.DuckDBPyConnection, query: str, params: dict, path: str,
                where: str) -> int:
    """Stream one key range of the selection into `path` (nothing written when it selects no
    image); returns its rows. Row groups are small so that a unit's task reads only its own."""
    writer, rows = None, 0
    try:
        for batch in con.sql(query, params=params).to_arrow_reader(SELECTION_ROW_GROUP):
            if batch.num_rows:
                if writer is None:
                    writer = pq.ParquetWriter(path, batch.schema, filesystem=ws.fs, compression="zstd")
                writer.write_batch(batch, row_group_size=SELECTION_ROW_GROUP)
                rows += batch.num_rows
    except duckdb.Error as exc:
        raise ConfigError(f"export.where {where!r}: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
    return rows


def cut_units(ws: Workspace, con: duckdb.DuckDBPyConnection, chunks: list[dict], unit_size: int,
              where: str) -> list[dict]:
    """The export units (sql/export_units.sql over the staged keys), each with the chunk files
    its key range overlaps and the path its plan will have."""
    if not chunks:
        return []
    con.register("export_selected", pads.dataset([c["path"] for c in chunks], format="parquet", filesystem=ws.fs))
    rows, keys = con.execute("select count(*), count(distinct key) from export_selected").fetchall()[0]
    if rows != keys:
        raise ConfigError(repeated_keys(con, where))
    return [{"group": index, "source": source, "first_key": first, "last_key": last, "rows": n_images,
             "files": overlapping(chunks, first, last),
             "path": f"{ws.base}/{PLAN}/units/{index}.plan.json"}
            for index, source, first, last, n_images in unit_ranges(con, unit_size)]


def unit_ranges(con: duckdb.DuckDBPyConnection, unit_size: int) -> list[tuple]:
    """(unit_index, source, first_key, last_key, n_images) of the units of `con`'s export_selected."""
    # runs of 2 units on average: units of ~0.8 unit_size images (the shorter the runs, the
    # smaller the shards), an image left out or added rewriting ~1.5 units
    params = {"unit_images": unit_size, "cut_every": 2 * unit_size}
    return con.execute(sql_text("export_units.sql"), params).fetchall()


def repeated_keys(con: duckdb.DuckDBPyConnection, where: str) -> str:
    """Why a key is in the selection more than once: the images table holds it twice (two of
    ingest's inputs under one key), or export.where joins rows of its own."""
    key, times = con.execute("select key, count(*) from export_selected group by key having count(*) > 1 "
                             "order by key limit 1").fetchone()
    sources = [s for (s,) in con.execute("select source from images where key = ? order by source", [key]).fetchall()]
    if len(sources) > 1:
        return (f"the images table holds the key {key!r} {len(sources)} times (from {', '.join(sources)}): "
                "one key must be one image: rename or remove one of the files and ingest again")
    return f"export.where {where!r} repeats images ({key!r} {times} times): it must be a condition on one row"


def overlapping(chunks: list[dict], first_key: str, last_key: str) -> list[str]:
    """The chunk files whose key range [first, last) meets [first_key, last_key]."""
    return [c["path"] for c in chunks if c["first"] <= last_key and (c["last"] is None or c["last"] > first_key)]


def check_where(query: str, where: str) -> None:
    """ConfigError unless `query`, the selection with the user's `where`, parses as one SELECT,
    and `where` closes no parenthesis it did not open."""
    if not parentheses_balanced(where):
        # `true) or (true` parses, as `(key range and true) or true`: every key range's staging
        # (and review's paging) would select every image
        raise ConfigError(f"export.where {where!r} must be one condition: its parentheses do not pair up")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:  # its first line: the rest is an excerpt of the wrapped query, with a caret
        raise ConfigError(f"export.where {where!r} is not a SQL condition: {str(exc).splitlines()[0]}") from exc
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ConfigError(f"export.where {where!r} must be one condition (it ran as more than one statement)")


def parentheses_balanced(where: str) -> bool:
    """Whether `where`'s parentheses (not those in its strings and comments: DuckDB's own
    tokenizer tells them apart) each close one it opened, and all are closed."""
    tokens = duckdb.tokenize(where)
    ends = [start for start, _ in tokens[1:]] + [len(where)]
    depth = 0
    for (start, kind), end in zip(tokens, ends, strict=True):
        if kind == duckdb.token_type.operator:
            token = where[start:end].strip()
            depth += (token == "(") - (token == ")")
            if depth < 0:
                return False
    return depth == 0


def bind_where(opts: dict, where: str) -> None:
    """ConfigError unless the selection with the user's `where` binds: its columns and functions,
    checked over empty tables (the workspace may not exist yet). A value that fails on a row
    (a cast) still fails at export, where the rows are."""
    con = duckdb.connect(config={"memory_limit": "256MB"})
    try:
        create_empty_views(con)
        query, params = selection_query(con, opts, where)
        con.execute(f"select * from ({query}) limit 0", {**params, "first": "", "last": None}).fetchall()
    except duckdb.Error as exc:
        raise ConfigError(f"export.where {where!r}: {one_line(str(exc))}") from None
    finally:
        con.close()


# ---- plan -----------------------------------------------------------------------------------
def plan_units(cfg: Config, ws: Workspace, groups: list[dict], out: str) -> list[dict]:
    """Plan every unit in a CPU task (udfs/export/export_plan.py: samples, shard cuts from 0), then
    number the shards here from the counts the tasks return."""
    init_ray(cfg)
    opts = cfg[JOB]
    items = ({k: g[k] for k in ("group", "source", "first_key", "last_key", "files", "path")} for g in groups)
    progress = Progress("export plan", sum(g["rows"] for g in groups), units=len(groups))
    planned = {}
    with progress:
        for row in unit_tasks(plan_unit, items, float(opts["task_num_cpus"]), workspace=ws.root, options=dict(opts)):
            planned[row["group"]] = row
            progress.add(row["samples"], units=1)
    return place_units(groups, planned, shaping_of(opts, out))


def shaping_of(opts: dict, out: str) -> str:
    return json.dumps({k: opts[k] for k in SHAPING} | {"out": out}, sort_keys=True, default=str)


def place_units(groups: list[dict], planned: dict[int, dict], shaping: str) -> list[dict]:
    """Units in export order with their first global shard number and id. The id hashes the
    shaping options and the unit's plan, not its place: a unit done before at other shard
    numbers keeps its id and is renamed (jobs/export_moves.py), not exported again."""
    units, offset = [], 0
    for group in groups:
        plan = planned[group["group"]]
        digest = hashlib.sha1(shaping.encode())
        digest.update(str(plan["digest"]).encode())  # not its place: a moved unit is renamed
        uid = unit_id(f"export-{Path(group['source']).stem}-{group['first_key']}", digest.hexdigest())
        units.append({"unit": uid, "source": group["source"], "path": group["path"],
                      "offset": offset, "shards": int(plan["shards"]), "samples": int(plan["samples"]),
                      "work": int(plan.get("work", 0))})
        offset += int(plan["shards"])
    return units


def shard_indices(unit: dict) -> range:
    return range(unit["offset"], unit["offset"] + unit["shards"])


# ---- running and resuming -------------------------------------------------------------------
def run_units(cfg: Config, ws: Workspace, out: str, units: list[dict]) -> list[dict]:
    init_ray(cfg)
    opts = cfg[JOB]
    options = {"layouts": list(opts["formats"]), "jpeg_quality": int(opts["jpeg_quality"]),
               "png_compress_level": int(opts["png_compress_level"]),
               "max_member_bytes": int(cfg["ingest"]["max_member_bytes"]), "out_check": uuid.uuid4().hex}
    items = ({k: u[k] for k in ("unit", "source", "path", "offset", "shards")}
             for u in largest_first(units, lambda unit: unit["work"]))
    # the file each task looks for (check_out_is_shared): out is one folder for every node
    check = os.path.join(out, OUT_CHECK)
    atomic_write(check, options["out_check"].encode())
    try:
        infos = unit_tasks(export_unit, items, float(opts["task_num_cpus"]), workspace=ws.root, out=out,
                           options=options)
        progress = Progress(JOB, sum(u["samples"] for u in units), units=len(units))
        return collect_units(infos, progress, lambda info: info, ws.publish_now_and_then)
    finally:
        remove_out_check(out)


def remove_out_check(out: str) -> None:
    """The check file (run_units) of an export killed while its units ran: it is removed as they
    end, so a killed run left it beside the shards, and a later run with nothing to run kept it."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, OUT_CHECK))


def remove_stale(cfg: Config, ws: Workspace, out: str, current: set[str]) -> int:
    """Outputs of units no longer planned (selection or options changed): files, parts, markers.
    Returns the number of units whose files were removed (those of this `out`; an export to
    another folder keeps the files its manifest names, its units are only forgotten: what they
    left there goes when an export to that folder ends, from the folder's own manifest, see
    write_manifest; the files of units of an export to it that stopped before its manifest go
    now, see remove_unfinished_files, if its state/export/open record says so: a folder whose
    export ended keeps its files, also when its manifest was deleted by hand).

    A file is kept when a current, committed unit wrote it too (same name in the new plan). The
    per-image files are found from the stale units' manifest rows, in a worker (the driver
    reads only the markers, which name a unit's shards, Parquet files and multiply.txt)."""
    done = ws.done_units(JOB)
    stale = {u: info for u, info in done.items() if u not in current}
    keep = {f for u, info in done.items() if u in current for f in info.get("files", [])}
    here = sorted(unit for unit, info in stale.items() if info.get("out") == out)
    if here:
        run_in_worker(cfg, ws, remove_image_files, out, here, sorted(u for u in done if u in current))
    delete_files(out, sorted({f for unit in here for f in stale[unit].get("files", [])} - keep))
    # only a folder whose last export did not end: without that record its manifest names all its
    # units (or was deleted by hand: then its files are the user's to keep)
    open_folders = {record["out"]: name for name, record in ws.done_units(OPEN).items() if record["out"] != out}
    elsewhere: dict[str, dict[str, dict]] = defaultdict(dict)
    for unit, info in stale.items():
        if info.get("out") in open_folders:
            elsewhere[info["out"]][unit] = info
    for folder, units in sorted(elsewhere.items()):
        if unfinished := run_in_worker(cfg, ws, remove_unfinished_files, folder, units):
            print(f"export: removed from {folder} the files of {unfinished} units an export to it stopped before "
                  "its end had written", flush=True)
    for unit, info in stale.items():
        if info.get("out") not in (out, None) and info["out"] not in open_folders:
            # its files stay in a folder whose export ended: set aside, for an export back to it (take_back)
            ws.park_unit(JOB, unit, info)
        else:  # its files are gone: its parts leave at the next publish (no hold), their files at the next job's start
            ws.forget_unit(JOB, unit, hold=False)
    for folder in elsewhere:  # none of its units is left
        ws.forget_unit(OPEN, open_folders[folder], hold=False)
    return len(here)


def take_back(ws: Workspace, out: str, current: set[str]) -> int:
    """Commit again the units of this plan that an export to another folder set aside
    (remove_stale) after they were written to `out`: exporting to B then back to A wrote every
    file of A again, though A's manifest still named them. Their files are checked as any done
    unit's are (forget_lost_units). The other units set aside for `out` are forgotten (the files
    they left go with `out`'s manifest, remove_left_files), and so are those of a folder whose
    manifest is gone. Returns how many were taken back."""
    taken = 0
    done = ws.done_units(JOB)
    for unit, info in ws.parked_units(JOB).items():
        if info["out"] == out and unit in current and unit not in done and ws.parts_present(info["parts"]):
            ws.unpark_unit(JOB, unit, info)
            taken += 1
        elif info["out"] == out or not os.path.exists(os.path.join(info["out"], "manifest.parquet")):
            ws.drop_parked(JOB, unit)
    return taken


def open_name(out: str) -> str:
    """The name of the export folder `out`'s record in state/export/open/."""
    return hashlib.sha1(out.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def delete_files(out: str, relatives: Iterable[str]) -> int:
    """Delete the files of the export folder `out` named by `relatives` (paths in it; one that
    would leave it is passed over), then the folders they leave empty. Returns how many."""
    deleted, folders = 0, set()
    for relative in relatives:
        try:
            path = inside(out, relative)
        except ValueError:  # a manifest edited by hand: nothing outside the folder is touched
            continue
        if os.path.isfile(path):
            os.remove(path)
            deleted += 1
            folders.add(os.path.dirname(path))
    remove_empty_folders(out, folders)
    return deleted


def remove_empty_folders(out: str, folders: Iterable[str]) -> None:
    """Remove each of `folders` left empty, and its parents up to `out` left empty by that."""
    for folder in sorted(set(folders), key=len, reverse=True):  # deepest first
        while folder != out and folder.startswith(out + os.sep) and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
            folder = os.path.dirname(folder)


def remove_image_files(ws: Workspace, out: str, stale: list[str], current: list[str]) -> int:
    """Delete the per-image files of the `stale` units that no `current` unit wrote
    (sql/export_stale_files.sql); the number deleted. Runs in a worker (run_in_worker)."""
    con = ws.connect()
    try:
        con.register("stale_units", pa.table({"unit": pa.array(stale, pa.string())}))
        con.register("current_units", pa.table({"unit": pa.array(current, pa.string())}))
        # a concept folder left empty goes too (one with multiply.txt: in remove_stale)
        return delete_files(out, file_column(con.sql(sql_text("export_stale_files.sql"))))
    finally:
        con.close()


def remove_unfinished_files(ws: Workspace, out: str, units: dict[str, dict]) -> int:
    """Delete from the export folder `out` the files of those of `units` (stale units of an
    export to it, {unit: marker}) that its manifest.parquet does not name: units of an export
    to it that stopped before its manifest (killed, a full disk). Once forgotten, no marker or
    manifest names their files, and the next export to that folder left them where trainers
    read them. Files the manifest names stay (its last complete export wrote them). Returns how
    many units were such. Runs in a worker (run_in_worker)."""
    manifest = os.path.join(out, "manifest.parquet")
    con = ws.connect()
    try:
        if os.path.exists(manifest):
            con.register("folder_manifest", pads.dataset(manifest, format="parquet"))
        else:
            con.register("folder_manifest", schemas.TABLES["export_manifest"].empty_table())
        named = {row[0] for row in con.execute(sql_text("export_manifest_units.sql")).fetchall()}
        unfinished = sorted(set(units) - named)
        if not unfinished:
            return 0
        con.register("unfinished_units", pa.table({"unit": pa.array(unfinished, pa.string())}))
        markers = sorted({f for unit in unfinished for f in units[unit].get("files", [])})
        con.register("marker_files", pa.table({"file": pa.array(markers, pa.string())}))
        delete_files(out, file_column(con.sql(sql_text("export_unfinished_files.sql"))))
        return len(unfinished)
    finally:
        con.close()


def write_manifest(ws: Workspace, out: str, units: list[str]) -> dict:
    """<out>/manifest.parquet from the export_manifest rows of `units` (sql/export_manifest.sql),
    streamed from DuckDB (which sorts within its memory limit, spilling beyond) to the file, in a
    worker (start_in_worker): no manifest row reaches the driver, which gets the counts it prints
    and the wids index needs: {"files": {(layout, path): samples}, "text_cut": images}.
    It reads the committed units' own parts (a unit's export_manifest part is named by its id),
    published or not yet."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "manifest.parquet")
    tmp = os.path.join(out, f".tmp-{uuid.uuid4().hex}-manifest.parquet")
    con = ws.connect(views=False)
    try:
        attach_unit_manifests(ws, con, units)
        con.register("current_units", pa.table({"unit": pa.array(units, pa.string())}))
        con.execute("create temp view current_manifest as " + sql_text("export_manifest.sql"))
        with pq.ParquetWriter(tmp, schemas.TABLES["export_manifest"], compression="zstd") as writer:
            for batch in con.sql("select * from current_manifest").to_arrow_reader(MANIFEST_BATCH):
                writer.write_table(schemas.conform(pa.Table.from_batches([batch]), "export_manifest"))
        files = {(layout, file): n for layout, file, n in con.sql(sql_text("export_file_samples.sql")).fetchall()}
        text_cut = con.sql(sql_text("export_text_cut.sql")).fetchall()[0][0]
        left = remove_left_files(con, out, path) if os.path.exists(path) else 0
    finally:
        con.close()
    if os.path.exists(path) and filecmp.cmp(tmp, path, shallow=False):
        os.remove(tmp)  # the same rows (an export back to this folder): the file and its time as they were
    else:
        os.replace(tmp, path)
    return {"files": files, "text_cut": int(text_cut), "left_files": left}


def remove_left_files(con: duckdb.DuckDBPyConnection, out: str, previous: str) -> int:
    """Delete the files the folder's `previous` manifest names and this export's does not
    (sql/export_left_files.sql): those an earlier export to this folder wrote whose units a later
    export to another folder forgot. The markers cannot name them any more; the folder's own
    manifest still does. Returns the number deleted."""
    return delete_files(out, file_column(con.sql(sql_text("export_left_files.sql"), params={"previous": previous})))


def units_missing_files(ws: Workspace, out: str, units: list[str]) -> list[str]:
    """The `units` one of whose per-image files is not in `out` (sql/export_lost_units.sql), in a
    worker (run_in_worker). Each folder they wrote in is listed once (a few concept folders): a
    stat per file took ~26 us, 100 s for every export of a million images, and on the network
    file system a cluster's export folder is, each stat is a round trip."""
    con = ws.connect(views=False)
    try:
        attach_unit_manifests(ws, con, units)
        con.register("checked_units", pa.table({"unit": pa.array(units, pa.string())}))
        folders = [row[0] for row in con.execute(sql_text("export_unit_folders.sql")).fetchall()]
        con.register("present_files", pa.table({"file": pa.array(listed_files(out, folders), pa.string())}))
        return [row[0] for row in con.execute(sql_text("export_lost_units.sql")).fetchall()]
    finally:
        con.close()


def listed_files(out: str, folders: list[str]) -> list[str]:
    """The files of each folder of `out` (paths relative to it); a folder that is gone has none."""
    files = []
    for folder in folders:
        try:
            with os.scandir(os.path.join(out, folder)) as entries:
                files += [f"{folder}/{entry.name}" for entry in entries if entry.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return files


def attach_unit_manifests(ws: Workspace, con: duckdb.DuckDBPyConnection, units: list[str]) -> None:
    """Table export_manifest on `con` over the parts of `units` (a unit's part is named by its
    id), published or not yet: a run killed before its publish committed them."""
    short = "export_manifest" in short_tables(ws.published())  # parts of an older version
    ws.attach_parts(con, "export_manifest", units, union_by_name=short)


def file_column(relation: duckdb.DuckDBPyRelation) -> Iterator[str]:
    """The `file` column of a query, streamed in batches of MANIFEST_BATCH rows."""
    for batch in relation.to_arrow_reader(MANIFEST_BATCH):
        yield from batch.column("file").to_pylist()


def write_if_changed(path: str, data: bytes) -> None:
    """atomic_write, unless the file holds `data` already: an export with nothing new leaves the
    files trainers and sync tools watch as they were (their times too)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(data) + 1) == data:
                return
    except OSError:
        pass
    atomic_write(path, data)


def remove_wids_index(out: str) -> None:
    """Delete webdataset/index.wids.json, and the webdataset folder when that leaves it empty."""
    delete_files(out, ["webdataset/index.wids.json"])


def write_wids_index(out: str, units: list[dict], files: dict[tuple[str, str], int]) -> int:
    """index.wids.json (wids' shard index: relative URLs, samples per shard) for random access."""
    shardlist = []
    for index in sorted(i for u in units for i in shard_indices(u)):
        name = shard_name(index)
        path = os.path.join(out, "webdataset", name)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        shardlist.append({"url": name, "nsamples": files.get(("webdataset", f"webdataset/{name}"), 0),
                          "filesize": size})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "booruset-export", "shardlist": shardlist}
    write_if_changed(os.path.join(out, "webdataset", "index.wids.json"), json.dumps(index, indent=1).encode())
    return len(shardlist)


def remove_kohya_config(out: str) -> None:
    """Delete kohya/dataset.toml, and the kohya folder when that leaves it empty."""
    delete_files(out, [KOHYA_CONFIG])


def write_kohya_config(out: str, opts: dict, files: dict[tuple[str, str], int]) -> None:
    """kohya/dataset.toml, kohya sd-scripts' --dataset_config for the kohya folders of this export
    (`files`: the manifest's (layout, path) counts; none: no config). With a dataset config kohya
    takes a folder's repeats from num_repeats alone (1 unless given: the `<repeats>_` of a folder
    name counts only with --train_data_dir), captions from `.caption` files unless told, and
    buckets, keep_tokens and the separator from its options, which must be the export's: other
    buckets resize every image again, another keep_tokens shuffles the kept tags."""
    folders = sorted(path for layout, path in files if layout == "kohya")
    if "kohya" not in opts["formats"] or not folders:
        remove_kohya_config(out)
        return
    lines = ["# kohya sd-scripts dataset config of the folders beside it (--dataset_config), written by booruset",
             "# export: the folders' repeats, the KEY.txt captions, and the export's keep_tokens and buckets",
             "[general]", 'caption_extension = ".txt"']
    if int(opts["keep_tokens"]):
        lines.append(f"keep_tokens = {int(opts['keep_tokens'])}")
    if opts["keep_tokens_separator"]:
        lines.append(f"keep_tokens_separator = {toml_string(str(opts['keep_tokens_separator']))}")
    lines += ["", "[[datasets]]"]
    if opts["buckets"]:  # kohya's buckets from these are the export's: each image stays at its size
        lines += ["enable_bucket = true", f"resolution = {int(opts['max_size'])}",
                  f"min_bucket_reso = {int(opts['bucket_min_side'])}",
                  f"max_bucket_reso = {int(opts['bucket_max_side'])}",
                  f"bucket_reso_steps = {int(opts['bucket_step'])}"]
    for folder in folders:  # kohya/<repeats>_<concept>
        repeats = int(os.path.basename(folder).split("_", 1)[0])
        lines += ["", "  [[datasets.subsets]]", f"  image_dir = {toml_string(os.path.join(out, folder))}",
                  f"  num_repeats = {repeats}"]
    write_if_changed(os.path.join(out, KOHYA_CONFIG), ("\n".join(lines) + "\n").encode())


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's string escapes are TOML's, and TOML escapes DEL too."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


# ---- summary --------------------------------------------------------------------------------
def add_infos(summary: JobSummary, infos: list[dict], counts: dict, layouts: list[str], budget: int,
              run_now: list[dict]) -> None:
    """The summary from the units' infos and the manifest's counts (write_manifest); the bytes
    written are those of the units run now (`run_now`): a run with every unit done before said
    "image bytes written: 3.1 MB" and wrote none."""
    for info in infos:
        summary.dropped += info["dropped"]
        summary.errors_by_kind.update(info["error_kinds"])
    seconds = sum(info["seconds"] for info in run_now)
    written = sum(info["bytes"] for info in run_now)
    per_layout: dict[str, int] = defaultdict(int)
    for (layout, _), samples in counts["files"].items():
        per_layout[layout] += samples
    summary.rows_out = {f"{layout} samples": per_layout.get(layout, 0) for layout in layouts}
    if budget:
        summary.notes.append(f"clip_token_budget {budget}: KEY.txt of {counts['text_cut']} images cut to fit "
                             "(tags left out lowest-ranked first, captions at a sentence, else a comma; "
                             "manifest text_cut)")
    if seconds:
        summary.notes.append(f"image bytes written: {written / 1e6:.1f} MB, {written / 1e6 / seconds:.1f} MB/s "
                             f"of task time")


GLOB_MARKS = ("[", "]", "*", "?")  # what a glob pattern reads as other than itself
URL_MARKS = ("#", "?")  # where a URL's path ends (webdataset's and wids' readers parse local paths as URLs)


def nothing_selected(out: str) -> str:
    """The line an export that selected no image ends with (and a run's last lines)."""
    return (f"nothing selected: no image passed the export's selection (its summary's \"left out before export\" "
            f"says why), so no sample was written; {out}/manifest.parquet has no rows")


def where_notes(out: str, layouts: list[str], shards: int, files: dict[tuple[str, str], int]) -> list[str]:
    """Where each layout's files are: only the folders this export wrote files in (`files`: the
    manifest's (layout, path) counts); an export that selected nothing named folders it never made."""
    written = {layout for layout, _ in files}
    notes = []
    if "webdataset" in layouts and shards:
        notes.append(f"webdataset: {out}/webdataset/shard-{{000000..{shards - 1:06d}}}.tar "
                     f"(wids index: {out}/webdataset/index.wids.json)")
        if marks := [mark for mark in URL_MARKS if mark in out]:
            # both parse a local path as a URL: the rest is its fragment or query ("No such file: .../C")
            notes.append(f"webdataset and wids read a path as a URL, which {' and '.join(map(repr, marks))} in "
                         f"{out} ends: open the shards and index.wids.json by their names from inside the folder "
                         f"(cd {shlex.quote(out + '/webdataset')}), or export to a folder without them")
        if "{" in out or "}" in out:  # webdataset expands braces anywhere in a URL string, the folder's too
            notes.append(f"webdataset expands the braces in {out} as it does the shard numbers': pass the shards "
                         "to it as a list of paths, not as the pattern above")
    for layout in layouts:
        if layout == "webdataset" or layout not in written:
            continue
        if layout == "kohya" and os.path.exists(os.path.join(out, KOHYA_CONFIG)):
            notes.append(f"kohya: {out}/kohya/ (kohya's --dataset_config: {out}/{KOHYA_CONFIG})")
        else:
            notes.append(f"{layout}: {out}/{layout}/")
        if layout == "parquet" and (marks := [mark for mark in GLOB_MARKS if mark in out]):
            # datasets globs every data_files entry, a plain path's too: "[2023] art" matched no file
            notes.append(f"Hugging Face datasets reads data_files as glob patterns, and {out} holds "
                         f"{' '.join(map(repr, marks))}: pass each path through glob.escape "
                         "(load_dataset(\"parquet\", data_files=[glob.escape(p) for p in paths]))")
    notes.append(f"manifest: {out}/manifest.parquet")
    return notes
