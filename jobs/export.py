"""`booruset export`: the curated dataset -> WebDataset shards, kohya / EveryDream folders, Parquet.

Steps:
1. selection (sql/export_selection.sql): one row per image, minus near duplicates and images
   whose accepted caption is flagged; then the user's `where` as a filter over that selection;
2. plan (driver): per export unit (one input shard, or a chunk of an input folder) the safe
   name, exported size, txt and json of every sample, and its shard: shards are cut by count
   and by planned bytes (exact for original bytes, area-scaled for re-encoded images), a shard
   never mixes units, and shard numbers are global and contiguous, so names are deterministic;
3. Ray Data: one CPU task per unit reads the unit's source once and writes its files
   atomically (udfs/export_shard.py), then commits the unit; a rerun skips committed units;
4. the manifest (`<out>/manifest.parquet`, also the workspace table export_manifest) and the
   wids index (`<out>/webdataset/index.wids.json`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from jobs.config import REPO, Config, ConfigError
from jobs.ray_env import Progress, collect_units, init_ray
from jobs.summary import JobSummary
from jobs.workspace import Workspace, sweep_temp_files, unit_id
from udfs.export_shard import JOB, atomic_write, export_units, shard_name
from udfs.resize import estimated_bytes, needs_reencode, output_extension, target_size
from udfs.safe_names import key_digest, safe_folder, safe_name

LAYOUTS = ("webdataset", "kohya", "everydream", "parquet")
TAR_OVERHEAD = 3 * 1024  # three tar headers and their padding per sample (planning estimate)
# Options that change what a unit writes: a change makes new unit ids (old outputs are removed).
SHAPING = ("formats", "max_size", "buckets", "bucket_min_side", "bucket_max_side", "bucket_step", "jpeg_quality",
           "max_count", "max_bytes", "text", "tag_underscores", "materialize_repeats", "concept")


def sql_text(name: str) -> str:
    return (REPO / "sql" / name).read_text(encoding="utf-8")


def out_dir(cfg: Config, ws: Workspace) -> str:
    """[export] out, or <workspace>/export for a local workspace."""
    out = cfg["export"]["out"]
    if not out:
        if not ws.local:
            raise ConfigError("export.out must be set to a local folder when the workspace is not local")
        out = f"{ws.base}/export"
    return str(Path(out).resolve())


def check_options(opts: dict) -> None:
    unknown = [f for f in opts["formats"] if f not in LAYOUTS]
    if unknown or not opts["formats"]:
        raise ConfigError(f"export.formats: unknown or empty {unknown} (known: {', '.join(LAYOUTS)})")
    if opts["text"] not in ("caption", "tags"):
        raise ConfigError("export.text must be 'caption' or 'tags'")
    if int(opts["max_count"]) < 1 or int(opts["max_bytes"]) < 1:
        raise ConfigError("export.max_count and export.max_bytes must be positive")
    if opts["buckets"] and int(opts["max_size"]) <= 0:
        raise ConfigError("export.buckets needs export.max_size (the bucket resolution)")


def run(cfg: Config, ws: Workspace) -> JobSummary:
    started = time.perf_counter()
    opts = cfg[JOB]
    check_options(opts)
    out = out_dir(cfg, ws)
    # shards and files half-written by an export that died (disk full, SIGKILL) before this one
    sweep_temp_files(pafs.LocalFileSystem(), out, before=time.time())
    ws.begin_job()
    total, selection = load_selection(ws, opts)
    units = plan_units(selection, opts, out, int(cfg["ingest"]["folder_unit_size"]))
    remove_stale(ws, out, {u["unit"] for u in units})
    ws.publish()  # the manifest rows of the files just removed go at once
    done = ws.done_units(JOB)
    pending = [u for u in units if u["unit"] not in done]
    print(f"export: {selection.num_rows} of {total} images selected; {len(units)} units, "
          f"{len(units) - len(pending)} done before, {len(pending)} to run -> {out}", flush=True)
    infos = [done[u["unit"]] for u in units if u["unit"] in done]
    if pending:
        infos += run_units(cfg, ws, out, pending)
    ws.publish()
    manifest = write_manifest(ws, out, {u["unit"] for u in units})
    shards = write_wids_index(out, units, manifest) if "webdataset" in opts["formats"] else 0
    summary = JobSummary(JOB, rows_in=selection.num_rows, units_done=len(pending),
                         units_skipped=len(units) - len(pending))
    add_infos(summary, infos, manifest, opts["formats"])
    summary.seconds = time.perf_counter() - started
    summary.notes.append(f"left out before export: {total - selection.num_rows} of {total} images "
                         f"(duplicates, flagged captions, export.where)")
    summary.notes.extend(where_notes(out, opts["formats"], shards))
    return summary


# ---- selection ------------------------------------------------------------------------------
def load_selection(ws: Workspace, opts: dict) -> tuple[int, pa.Table]:
    """(images in the workspace, the selected rows).

    The user's `where` is SQL text by nature (that is its point), so it is the one piece of
    SQL that is not a file: it runs as `select * from export_selection where (<where>)` over a
    table of the selection, and must parse as exactly one SELECT. Values from data and config
    are bound as parameters, never formatted into SQL.
    """
    con = ws.connect()
    try:
        total = con.execute("select count(*) from images").fetchone()[0]
        con.execute("create temp table export_selection as " + sql_text("export_selection.sql"),
                    {"drop_duplicates": bool(opts["drop_duplicates"]), "drop_flagged": bool(opts["drop_flagged"])})
        query = "select * from export_selection"
        where = str(opts["where"]).strip()
        if where:
            query = f"{query} where (\n{where}\n) order by source, key"
            check_where(con, query, where)
        try:
            selection = con.sql(query).to_arrow_table()
        except duckdb.Error as exc:
            raise ConfigError(f"export.where {where!r}: {exc}") from exc
        if pc.count_distinct(selection["key"]).as_py() != selection.num_rows:
            raise ConfigError(f"export.where {where!r} repeats images: it must be a condition on one row")
        return total, selection
    finally:
        con.close()


def check_where(con: duckdb.DuckDBPyConnection, query: str, where: str) -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ConfigError(f"export.where {where!r} is not a SQL condition: {exc}") from exc
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ConfigError(f"export.where {where!r} must be one condition (it ran as more than one statement)")


# ---- plan -----------------------------------------------------------------------------------
def tag_text(tags: list[str], underscores: bool) -> str:
    """kohya-style tag caption: comma-separated, underscores as spaces (kaomoji such as ^_^ kept)."""
    def one(tag: str) -> str:
        return tag if underscores or not any(c.isalpha() for c in tag) else tag.replace("_", " ")
    return ", ".join(one(t) for t in tags)


def repeats_of(multiply: float) -> int:
    """multiply rounded half up, at least 1 (kohya's <repeats>_ folders and materialised copies)."""
    return max(1, math.floor(float(multiply) + 0.5))


def sample_plan(row: dict, opts: dict) -> dict:
    width, height = int(row["width"] or 0), int(row["height"] or 0)
    size = target_size(width, height, opts) if width and height else (width, height)
    orientation = int(row.get("orientation") or 1)
    reencode = needs_reencode(row["format"], width, height, size, turned=orientation != 1 and opts["upright"])
    ext = output_extension(row["format"])
    caption = row["caption"] if opts["text"] == "caption" and row["caption"] else None
    txt = caption or tag_text(row["tags"], bool(opts["tag_underscores"]))
    repeats = repeats_of(row["multiply"])
    concept = opts["concept"] or row["group"] or "all"
    meta = {
        "key": row["key"], "source": {"source": row["source"], "member": row["member"]},
        "caption": row["caption"], "text_from": "caption" if caption else "tags",
        "tags": row["tags"], "tag_categories": row["categories"],
        "tag_scores": dict(zip(row["tags"], [round(float(s), 4) for s in row["tag_scores"]], strict=True)),
        "characters": row["characters"], "rating": row["rating"], "n_people": row["n_people"],
        "scores": {k: row[k] for k in ("accuracy", "tag_inclusion", "english_similarity", "subject_consistency")},
        "quality_tags": row["quality_tags"], "group": row["group"],
        "multiply": float(row["multiply"]), "repeats": repeats,
        "width": size[0], "height": size[1], "original_width": width, "original_height": height,
        # the EXIF orientation the exported bytes carry: 1 = upright; else a reader must turn them
        "orientation": 1 if reencode else orientation,
    }
    meta_text = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    image_bytes = estimated_bytes(int(row["bytes"] or 0), width, height, size, reencode)
    return {
        "key": row["key"], "member": row["member"], "name": safe_name(row["key"]), "size": list(size),
        "reencode": reencode, "orientation": meta["orientation"], "crop": bool(opts["buckets"]), "ext": ext,
        "txt": txt, "json": meta_text,
        "multiply": float(row["multiply"]), "repeats": repeats,
        "kohya": f"{repeats}_{safe_folder(concept)}",
        "everydream": f"{safe_folder(concept)}_x{round(float(row['multiply']), 2):g}",
        "planned_bytes": image_bytes + len(txt.encode()) + len(meta_text.encode()) + TAR_OVERHEAD,
    }


def unit_groups(selection: pa.Table, folder_unit_size: int) -> list[tuple[str, str, list[dict]]]:
    """(source, kind, rows): one per input shard; folders in chunks (their files are read one by one)."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in selection.to_pylist():
        by_source[row["source"]].append(row)
    groups = []
    for source in sorted(by_source):
        rows = by_source[source]
        if source.endswith(".tar"):
            groups.append((source, "tar", rows))
        else:
            step = max(1, folder_unit_size)
            groups += [(source, "folder", rows[i:i + step]) for i in range(0, len(rows), step)]
    return groups


def plan_units(selection: pa.Table, opts: dict, out: str, folder_unit_size: int) -> list[dict]:
    """Every unit with its samples, copies and shard numbers (see the module docstring)."""
    max_count, max_bytes = int(opts["max_count"]), int(opts["max_bytes"])
    materialize = bool(opts["materialize_repeats"])
    shaping = json.dumps({k: opts[k] for k in SHAPING} | {"out": out}, sort_keys=True, default=str)
    names: set[str] = set()
    units, next_shard = [], 0
    for source, kind, rows in unit_groups(selection, folder_unit_size):
        samples, shard, count, size = [], next_shard, 0, 0
        for row in rows:
            sample = sample_plan(row, opts)
            sample["name"] = unique_name(sample["name"], row["key"], names)
            sample["copies"] = []
            for n in range(sample["repeats"] if materialize else 1):
                if count and (count + 1 > max_count or size + sample["planned_bytes"] > max_bytes):
                    shard, count, size = shard + 1, 0, 0
                name = sample["name"] if n == 0 else unique_name(f"{sample['name']}-r{n}", f"{row['key']}\0{n}", names)
                sample["copies"].append({"name": name, "shard": shard})
                count, size = count + 1, size + sample["planned_bytes"]
            samples.append(sample)
        shards = list(range(next_shard, shard + 1)) if samples else []
        next_shard = shard + 1 if samples else next_shard
        digest = hashlib.sha1(shaping.encode())
        digest.update(json.dumps(samples, sort_keys=True).encode())
        uid = unit_id(f"export-{Path(source).stem}-{rows[0]['key']}", digest.hexdigest())
        units.append({"unit": uid, "source": source, "kind": kind, "shards": shards, "samples": samples})
    return units


def unique_name(name: str, key: str, names: set[str]) -> str:
    """Safe names are unique by construction; this guards the rare hash collision and repeat suffixes."""
    while name in names:
        name = f"{name}-{key_digest(key + name)}"
    names.add(name)
    return name


# ---- running and resuming -------------------------------------------------------------------
def run_units(cfg: Config, ws: Workspace, out: str, units: list[dict]) -> list[dict]:
    init_ray(cfg)
    opts = cfg[JOB]
    options = {"layouts": list(opts["formats"]), "jpeg_quality": int(opts["jpeg_quality"]),
               "max_member_bytes": int(cfg["ingest"]["max_member_bytes"])}
    items = [{"unit": u["unit"], "plan": json.dumps(u)} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(export_units, batch_size=1, num_cpus=float(opts["task_num_cpus"]),
                        fn_kwargs={"workspace": ws.root, "out": out, "options": options})
    progress = Progress(JOB, sum(len(u["samples"]) for u in units), units=len(units))
    return collect_units(ds.iter_rows(), progress, lambda row: json.loads(row["info"]), ws.publish_now_and_then)


def remove_stale(ws: Workspace, out: str, current: set[str]) -> None:
    """Outputs of units no longer planned (selection or options changed): files, parts, markers.

    A file is kept when a current, committed unit wrote it too (same name in the new plan)."""
    done = ws.done_units(JOB)
    stale = {u: info for u, info in done.items() if u not in current}
    keep = {f for u, info in done.items() if u in current for f in info.get("files", [])}
    for unit, info in stale.items():
        if info.get("out") == out:
            for relative in set(info.get("files", [])) - keep:
                path = os.path.join(out, relative)
                if os.path.isfile(path):
                    os.remove(path)
        ws.forget_unit(JOB, unit)  # its parts leave at the next publish, its files at the next job's start


def write_manifest(ws: Workspace, out: str, current: set[str]) -> pa.Table:
    manifest = ws.read_table("export_manifest")
    manifest = manifest.filter(pc.is_in(manifest["unit"], pa.array(sorted(current), pa.string())))
    manifest = manifest.sort_by([("layout", "ascending"), ("path", "ascending"), ("sample_key", "ascending")])
    sink = pa.BufferOutputStream()
    pq.write_table(manifest, sink, compression="zstd")
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "manifest.parquet"), sink.getvalue().to_pybytes())
    return manifest


def write_wids_index(out: str, units: list[dict], manifest: pa.Table) -> int:
    """index.wids.json (wids' shard index: relative URLs, samples per shard) for random access."""
    counts: dict[str, int] = defaultdict(int)
    for layout, path in zip(manifest["layout"].to_pylist(), manifest["path"].to_pylist(), strict=True):
        if layout == "webdataset":
            counts[os.path.basename(path)] += 1
    shardlist = []
    for index in sorted(i for u in units for i in u["shards"]):
        name = shard_name(index)
        path = os.path.join(out, "webdataset", name)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        shardlist.append({"url": name, "nsamples": counts.get(name, 0), "filesize": size})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "booruset-export", "shardlist": shardlist}
    atomic_write(os.path.join(out, "webdataset", "index.wids.json"), json.dumps(index, indent=1).encode())
    return len(shardlist)


# ---- summary --------------------------------------------------------------------------------
def add_infos(summary: JobSummary, infos: list[dict], manifest: pa.Table, layouts: list[str]) -> None:
    seconds, written = 0.0, 0
    for info in infos:
        summary.dropped += info["dropped"]
        summary.errors_by_kind.update(info["error_kinds"])
        seconds += info["seconds"]
        written += info["bytes"]
    per_layout: dict[str, int] = defaultdict(int)
    for layout in manifest["layout"].to_pylist():
        per_layout[layout] += 1
    summary.rows_out = {f"{layout} samples": per_layout.get(layout, 0) for layout in layouts}
    if seconds:
        summary.notes.append(f"image bytes written: {written / 1e6:.1f} MB, {written / 1e6 / seconds:.1f} MB/s "
                             f"of task time")


def where_notes(out: str, layouts: list[str], shards: int) -> list[str]:
    notes = []
    if "webdataset" in layouts and shards:
        notes.append(f"webdataset: {out}/webdataset/shard-{{000000..{shards - 1:06d}}}.tar "
                     f"(wids index: {out}/webdataset/index.wids.json)")
    for layout in layouts:
        if layout != "webdataset":
            notes.append(f"{layout}: {out}/{layout}/")
    notes.append(f"manifest: {out}/manifest.parquet")
    return notes
