"""`booruset curate`: DuckDB over the workspace tables -> tags, image_meta, character_traits,
duplicates, clusters, person_tags, groups, balance.

The curation logic is the SQL in sql/ (one SELECT per file, run in file-name order; each file
creates the table its name ends with). Python does only what SQL cannot: loading lookup files,
LSH buckets and connected components for duplicates, OPTICS/DBSCAN clustering of CCIP crops.

Curate is a global job: each run rebuilds its eight tables, unless nothing it reads changed since
the last build (its input tables' parts, its options and lookup files, its code: `booruset run`
again after an export option changed took minutes at a million images for the same tables).
A Ray task builds them (the driver only publishes): intermediate tables live in a DuckDB
database in a temporary directory (DuckDB spills to disk past `memory_limit`), the results are
written as new Parquet parts, and one publish makes all eight visible at once (the workspace's
published generation): a killed run leaves the old tables as they were, never half of each.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

import schemas
from jobs.balance import balance_weights, group_format_table
from jobs.config import Config, ConfigError, check_memory_limit
from jobs.export import workspace_gone_inputs
from jobs.ray_env import run_in_worker
from jobs.summary import JobSummary, PeakMemory
from store.scratch import temporary_folder
from store.stamps import code_digest, file_stamps, fingerprint
from store.workspace import Workspace, create_derived_view, fault_point, sql_string
from udfs.annotate.model_files import ModelUnavailable, optional_file
from udfs.curate import ccip_cluster, near_duplicates, tag_rules
from udfs.curate.work_database import joins_as_written

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
INPUTS = ["images", "source_tags", "tag_scores", "detections", "embeddings", "edits"]
OUTPUTS = ["tags", "image_meta", "character_traits", "duplicates", "clusters", "person_tags", "groups", "balance"]
OWNER = "curate"  # the owner of curate's parts in the published generation
# The digest of the tags from texts (sql/text_tags_digest.sql) the last published build read
TEXT_TAGS_STATE = "state/curate-text-tags.json"
# What the last published build read (inputs_fingerprint) and its summary's counts
BUILT_STATE = "state/curate-built.json"
# Options that name lookup files or folders (and the CCIP metric model): their contents are part
# of what a build reads
FILE_OPTIONS = ("tag_list", "rules_dir", "blacklist", "overlap_tags", "character_tags", "references", "weights",
                "ccip_metric_model")
# Options that say how a build runs, not what it writes: changed, the tables are kept
RUN_OPTIONS = ("memory_limit", "threads")
# annotate.ccip's options that embed a folder of reference images (curate.references); its batch
# sizes, actors and threads say how annotate runs
CCIP_OPTIONS = ("repo", "file", "revision", "size", "models_dir")
# The code of a build: a new version of any of it builds again
CODE = [SQL_DIR, Path(__file__).resolve().parent.parent / "udfs" / "curate", Path(__file__).resolve(),
        Path(__file__).resolve().parent / "balance.py"]
# About 1M tag rows: the GROUP BY and WINDOW hash tables of a larger partition outgrow the CPU
# caches (1M images x 30 tags on 2 cores: 46-53 s in partitions of 250,000, 35-38 s of 62,500,
# 39 s of 31,250; a partition's fixed cost shows below that). With one DuckDB thread a partition
# (build_tags) 31,250 is the faster: the partitions alone, 1M images 21.99 -> 20.58 s (3 rounds),
# 250,000 images 6.30 -> 5.94 s (5 rounds), against 62,500, alternated in one process.
IMAGES_PER_PARTITION = 31_250
# Partitions written at once, each on its own cursor (DuckDB shares the database's threads among
# them): one partition's query leaves cores idle in its serial phases (a hash table's finalize,
# the window's sort per image, the file's close). 1M images x 30 tags on 2 cores: 32.7 s one at
# a time, 25.6-29.3 s two at a time.
CONCURRENT_PARTITIONS = 2
# The tables sql/040_tags.sql reads a partition's keys of.
PARTITIONED_INPUTS = ("source_tags", "tag_scores")
ROWS_PER_FILE = 4_000_000


def run(cfg: Config, ws: Workspace) -> JobSummary:
    """Build the eight tables in a Ray task (on a cluster, a worker node with the memory for
    DuckDB's joins over the whole dataset, not the head), then publish them from here."""
    started = time.perf_counter()
    opts = {**cfg["curate"], "tag_list": tag_list_path(cfg), "cascade_face_model": cascade_face_model(cfg)}
    check_options(opts)  # a bad option is a ConfigError before any worker starts
    ws.begin_job()
    # the inputs no longer there, as this process sees them: a change builds again (the build
    # checks in its worker, which reads the inputs as the export's do)
    fingerprint = inputs_fingerprint(ws, opts, ccip_spec(cfg), workspace_gone_inputs(ws))
    last = ws.read_json(BUILT_STATE) or {}
    if last.get("fingerprint") == fingerprint and ws.published()["owned"].get(OWNER):
        return unchanged_summary(last, started)
    built = run_in_worker(cfg, ws, build, opts, ccip_spec(cfg))
    ws.publish({OWNER: built["files"]})
    ws.write_json(TEXT_TAGS_STATE, {"digest": built["text_tags"]})  # after: a kill between curates once more
    ws.write_json(BUILT_STATE, {"fingerprint": fingerprint, "rows_in": built["rows_in"], "rows_out": built["rows_out"]})
    summary = JobSummary("curate", units_done=1, rows_in=built["rows_in"], rows_out=built["rows_out"])
    summary.seconds = time.perf_counter() - started
    summary.notes.append("steps: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in built["timings"].items()))
    summary.notes.append(f"peak memory of the worker that built the tables: {built['peak_mib']:.0f} MiB")
    summary.notes += built["notes"]
    return summary


def inputs_fingerprint(ws: Workspace, opts: dict, ccip: dict, gone: list[str]) -> str:
    """A digest of what a build reads (store/stamps.py): the published parts of its input tables,
    its options (but RUN_OPTIONS), the lookup files they name (data/rules/ where they name none), imgutils' version (its
    tag data), curate's code and the inputs that are `gone`."""
    files = {name: file_stamps(path) for name, path in tag_rules.lookup_paths(opts, FILE_OPTIONS).items()}
    options = {k: v for k, v in opts.items() if k not in RUN_OPTIONS}
    ccip = {k: ccip.get(k) for k in CCIP_OPTIONS} if opts.get("references") else {}  # else none is read
    return fingerprint(ws, INPUTS, options=options, ccip=ccip, imgutils=version("dghs-imgutils"),
                       code=code_digest(CODE), files=files, gone=gone)


def unchanged_summary(last: dict, started: float) -> JobSummary:
    """The summary of a run that found nothing changed since the last build."""
    summary = JobSummary("curate", units_skipped=1, rows_in=int(last.get("rows_in", 0)),
                         rows_out=dict(last.get("rows_out", {})))
    summary.seconds = time.perf_counter() - started
    summary.notes.append("nothing curate reads changed since its last build (input tables, options, lookup files, "
                         "code): its tables are kept")
    return summary


def build(ws: Workspace, opts: dict, ccip: dict) -> dict:
    """Every step in a work database of its own, the results written as new Parquet parts
    (unpublished); returns their names, the row counts and the seconds per step."""
    with temporary_folder("booruset-curate-") as tmp, PeakMemory() as peak:
        con = open_database(Path(tmp) / "curate.duckdb", opts)
        try:
            inputs = ws.published()
            # images of an input whose folder or shard is gone are never exported: no representative of
            # their near-duplicate group, no group of the balance (sql/063_duplicates, sql/080_groups)
            opts = {**opts, "gone_inputs": workspace_gone_inputs(ws)}
            attach_inputs(con, ws, inputs)
            load_lookups(con, opts, ccip)
            rows_in = con.execute("select count(*) from images").fetchone()[0]
            text_tags = con.execute((SQL_DIR / "text_tags_digest.sql").read_text(encoding="utf-8")).fetchone()[0]
            generation = uuid.uuid4().hex[:12]
            timings, tag_parts = build_tables(con, ws, opts, generation, inputs)
            files = {name: tag_parts if name == "tags" else export_table(con, ws, name, generation)
                     for name in OUTPUTS}
            rows_out = {name: con.execute(f'select count(*) from "{name}"').fetchone()[0] for name in OUTPUTS}
            notes = [note] if (note := cluster_model_note(con, str(opts["cluster_model"]))) else []
        finally:
            con.close()
    return {"files": files, "rows_in": rows_in, "rows_out": rows_out, "timings": timings, "peak_mib": peak.mib,
            "notes": notes, "text_tags": text_tags}


def cluster_model_note(con: duckdb.DuckDBPyConnection, model: str) -> str | None:
    """What the summary says when curate.cluster_model names no model of the embeddings table
    (a typo): every crop is then left out of the clusters, which is otherwise silent."""
    if not model or con.execute("select 1 from embeddings where model = $m limit 1", {"m": model}).fetchone():
        return None
    found = [row[0] for row in con.execute("select distinct model from embeddings order by 1 limit 10").fetchall()]
    if not found:
        return None
    return (f"curate.cluster_model {model!r} names no model of the embeddings ({', '.join(found)}): "
            "no crop was clustered")


# ---- the steps ------------------------------------------------------------------------------
def build_tables(con: duckdb.DuckDBPyConnection, ws: Workspace, opts: dict, generation: str,
                 inputs: dict) -> tuple[dict[str, float], list[str]]:
    """Run every step in order on the input tables of `inputs` (a published generation); returns
    seconds per step (for the summary and the benchmark) and the parts of `tags`, which the tag
    step writes itself."""
    params = sql_params(opts)
    timings: dict[str, float] = {}
    tag_parts: list[str] = []
    steps = [
        ("tags", lambda: tag_parts.extend(build_tags(con, ws, params, opts, generation, inputs))),
        ("image_meta", lambda: run_model(con, "050_image_meta", params)),
        ("character_traits", lambda: run_model(con, "055_character_traits", params)),
        ("duplicates", lambda: build_duplicates(con, params, opts)),
        ("clusters", lambda: build_clusters(con, params, opts)),
        ("person_tags", lambda: run_model(con, "075_person_tags", params)),
        ("groups", lambda: run_model(con, "080_groups", params)),
        ("balance", lambda: build_balance(con, params)),
    ]
    # Ray starts the worker of a num_cpus=1 task with OMP_NUM_THREADS=1, and BLAS follows it: the
    # matrix products of the LSH codes and of clustering would run on one core while DuckDB runs
    # on all of them (LSH codes of 100,000 vectors on 2 cores: 1.65 s -> 0.95 s)
    threads = con.execute("select current_setting('threads')").fetchone()[0]
    with threadpool_limits(limits=threads, user_api="blas"):
        for step, action in steps:
            began = time.perf_counter()
            action()
            timings[step] = time.perf_counter() - began
            print(f"curate: {step} done in {timings[step]:.1f} s", flush=True)
    return timings, tag_parts


def build_tags(con: duckdb.DuckDBPyConnection, ws: Workspace, params: dict, opts: dict, generation: str,
               inputs: dict) -> list[str]:
    """The curated tags, a partition of the images at a time (CONCURRENT_PARTITIONS at once),
    each written straight into a new part of `tags` (not into the work database and then
    copied: that doubled the writes and grew with the database); `tags` is then a view over
    those parts. Returns the parts."""
    for model in ("010_tag_vocabulary", "020_tag_implications", "030_character_trait_tags", "035_image_ids",
                  "037_category_ids"):
        run_model(con, model, params)
    params = {**params, **category_params(con)}
    n_images = con.execute("select count(*) from image_ids").fetchall()[0][0]
    partitions = int(opts["tag_partitions"]) or max(1, -(-n_images // IMAGES_PER_PARTITION))
    parts = [f"curate-{generation}-p{partition:05d}" for partition in range(partitions)]

    def write_partition(partition: int) -> None:
        with con.cursor() as cursor:
            bounds = partition_bounds(cursor, n_images, partitions, partition)
        # the partition's query opens only the source_tags and tag_scores parts its keys can be in
        with ws.key_range_cursor(con, PARTITIONED_INPUTS, bounds["first_key"], bounds["last_key"], inputs) as cursor:
            write_model(cursor, ws, "040_tags", {**params, **bounds}, parts[partition])

    # DuckDB runs a query's tasks on the thread that called it as well as on its threads - 1
    # workers: with a cursor a partition, each partition at once beyond the first is one thread
    # more than `threads` (250,000 bench images on 2 cores, 2 partitions at once, threads 2 -> 1:
    # tag step 7.04 -> 6.30 s, CPU 13.78 -> 12.21 s, medians of 5 alternated runs)
    with fewer_threads(con, min(CONCURRENT_PARTITIONS, partitions) - 1), \
            ThreadPoolExecutor(CONCURRENT_PARTITIONS) as pool:
        written = [pool.submit(write_partition, partition) for partition in range(partitions)]
        try:
            for done, partition in enumerate(written, start=1):
                partition.result()
                if partitions > 1:
                    print(f"curate: tags partition {done}/{partitions}", flush=True)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed partition fails the step: the rest are not started
            raise
    ws.attach_parts(con, "tags", parts)
    edits = con.execute("select count(*) from edit_state where field in ('tags', 'character')").fetchall()[0][0]
    if edits:  # a person's tag edits (booruset review) win over what the steps above decided
        run_model(con, "045_edited_tags", params)
        edited = export_table(con, ws, "tags", f"{generation}-e", source="edited_tags")
        ws.attach_parts(con, "tags", edited)
        for part in parts:  # not published: no reader has seen them
            ws.delete_part("tags", part)
        parts = edited
        print(f"curate: {edits} tag and character edits applied", flush=True)
    return parts


@contextlib.contextmanager
def fewer_threads(con: duckdb.DuckDBPyConnection, fewer: int) -> Iterator[None]:
    """DuckDB's `threads` setting lowered by `fewer` (at least 1) inside the block, restored after."""
    threads = con.execute("select current_setting('threads')").fetchone()[0]
    con.execute(f"set threads = {max(1, threads - fewer)}")
    try:
        yield
    finally:
        con.execute(f"set threads = {threads}")


def category_params(con: duckdb.DuckDBPyConnection) -> dict:
    """The ids of the categories sql/040_tags.sql tests rows for (sql/037_category_ids; None where
    the data has no such category)."""
    ids = dict(con.execute("select category, category_id from category_ids").fetchall())
    return {"general_category_id": ids.get("general"), "character_category_id": ids.get("character")}


def partition_bounds(con: duckdb.DuckDBPyConnection, n_images: int, partitions: int, partition: int) -> dict:
    """A partition's image ids (a range: ids follow keys) and its first and last key."""
    first_id, end_id = partition * n_images // partitions, (partition + 1) * n_images // partitions
    first_key, last_key = con.execute("select min(key), max(key) from image_ids where image_id >= $a and image_id < $b",
                                      {"a": first_id, "b": end_id}).fetchall()[0]
    return {"first_id": first_id, "end_id": end_id, "first_key": first_key or "", "last_key": last_key or ""}


def build_duplicates(con: duckdb.DuckDBPyConnection, params: dict, opts: dict) -> None:
    run_model(con, "060_phash_pairs", params)
    build_embedding_pairs(con, params, opts)
    run_model(con, "062_exact_pairs", params)
    components = near_duplicates.components(con, ["phash_pairs", "embedding_pairs", "exact_pairs"])
    con.register("duplicate_components_arrow", components)
    con.execute("create or replace table duplicate_components as select * from duplicate_components_arrow")
    con.unregister("duplicate_components_arrow")
    run_model(con, "063_duplicates", params)


def build_embedding_pairs(con: duckdb.DuckDBPyConnection, params: dict, opts: dict) -> None:
    """embedding_pairs: LSH candidates (near_duplicates.EmbeddingVectors) whose vectors are similar."""
    run_model(con, "061_embedding_ids", params)
    for table in ("embedding_candidates", "similar_embeddings"):
        con.execute(f"create or replace table {table} (id_a bigint, id_b bigint)")
    if float(opts["embedding_similarity"]) > 0:
        query, _, wanted = model_sql("061_embedding_vectors", params)
        with near_duplicates.EmbeddingVectors(con, query, wanted, int(opts["lsh_tables"]),
                                              int(opts["lsh_bits"])) as vectors:
            insert_parts(con, "embedding_candidates", vectors.candidates(int(opts["lsh_window"])))
            with con.cursor() as cursor:  # read there while the job's connection inserts
                pairs = cursor.sql("select distinct id_a, id_b from embedding_candidates").to_arrow_reader(500_000)
                insert_parts(con, "similar_embeddings", vectors.similar(pairs, float(opts["embedding_similarity"])))
    run_model(con, "061_embedding_pairs", params)


def insert_parts(con: duckdb.DuckDBPyConnection, table: str, parts: Iterable[pa.Table]) -> None:
    for part in parts:
        con.register("part_arrow", part)
        con.execute(f'insert into "{table}" select * from part_arrow')
        con.unregister("part_arrow")


def build_clusters(con: duckdb.DuckDBPyConnection, params: dict, opts: dict) -> None:
    build_cluster_crops(con, params)
    labels = crop_clusters(con, ccip_cluster.ClusterSettings.from_config(opts))
    con.register("crop_clusters_arrow", labels)
    con.execute("create or replace table crop_clusters as select * from crop_clusters_arrow")
    con.unregister("crop_clusters_arrow")
    run_model(con, "071_reference_matches", params)
    run_model(con, "072_clusters", params)


def build_cluster_crops(con: duckdb.DuckDBPyConnection, params: dict) -> None:
    """cluster_crops (sql/070): the vectors stream through joins whose hash tables hold keys."""
    with joins_as_written(con):
        run_model(con, "070_cluster_crops", params)


def crop_clusters(con: duckdb.DuckDBPyConnection, settings: ccip_cluster.ClusterSettings) -> pa.Table:
    """The cluster of each crop of `cluster_crops`, clustered block by block."""
    total = con.execute("select count(*) from cluster_crops").fetchall()[0][0]
    return ccip_cluster.cluster_blocks(
        con, "cluster_crops", settings, lambda done: print(f"curate: clusters {done:,}/{total:,} crops", flush=True))


def build_balance(con: duckdb.DuckDBPyConnection, params: dict) -> None:
    run_model(con, "084_group_members", params)
    run_model(con, "085_group_counts", params)
    run_model(con, "090_balance_folders", params)
    run_model(con, "091_balance", params)


def run_model(con: duckdb.DuckDBPyConnection, model: str, params: dict) -> None:
    """Run sql/<model>.sql (a SELECT) into the table named by the file (010_tags -> tags)."""
    query, table, wanted = model_sql(model, params)
    con.execute(f'create or replace table "{table}" as ' + query, wanted)


def write_model(con: duckdb.DuckDBPyConnection, ws: Workspace, model: str, params: dict, part: str) -> None:
    """Run sql/<model>.sql (a SELECT) into a new Parquet part of the table the file names.

    A local workspace gets DuckDB's own parallel Parquet writer (COPY); object storage the
    pyarrow filesystem the jobs write with (DuckDB would need its httpfs extension)."""
    query, table, wanted = model_sql(model, params)
    select = f"select {', '.join(_quoted(schemas.TABLES[table].names))} from ({query})"
    if not ws.local:
        ws.write_part_batches(table, part, con.sql(select, params=wanted).to_arrow_reader(500_000))
        return
    folder = ws.table_dir(table)
    ws.fs.create_dir(folder, recursive=True)
    path = sql_string(f"{folder}/{part}.parquet")
    # zstd level 1 (pyarrow's default, as the other parts are written), not DuckDB's 3: a tag
    # partition's COPY 15% of its CPU time at 3, about a quarter less at 1, files <1% larger
    con.execute(f"copy ({select}) to {path} (format parquet, compression zstd, compression_level 1)", wanted)


def model_sql(model: str, params: dict) -> tuple[str, str, dict]:
    """(query, the table it makes, its parameters) of sql/<model>.sql."""
    query = (SQL_DIR / f"{model}.sql").read_text(encoding="utf-8")
    wanted = {name: params[name] for name in set(re.findall(r"\$([a-z_]+)", query))}
    return query, model.split("_", 1)[1], wanted


def check_options(opts: dict) -> None:
    """ConfigError for an option the worker would stumble on, with what it must be."""
    sql_params(opts)
    try:
        ccip_cluster.ClusterSettings.from_config(opts)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # min_multiply, max_multiply > 0, lsh_bits and lsh_tables >= 1: jobs/config.DOMAINS
    if float(opts["min_multiply"]) > float(opts["max_multiply"]):  # every multiply would be max_multiply
        raise ConfigError(f"curate.min_multiply {opts['min_multiply']} is above curate.max_multiply "
                          f"{opts['max_multiply']}: every image would get max_multiply, nothing balanced")
    top = 62 - near_duplicates.SORT_BITS
    if int(opts["lsh_bits"]) > top:
        raise ConfigError(f"curate.lsh_bits must be between 1 and {top}")
    check_memory_limit("curate.memory_limit", str(opts["memory_limit"]))
    try:  # the lookups made from options alone (the files are read when curate runs)
        group_format_table(opts["group_format"], schemas.image_meta.names)
        fh_ratio_bins(opts["fh_ratio_bins"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cascade_face_model(cfg: Config) -> str:
    """The `model` of the cascade's face rows (jobs/annotate.model_name): the weakest detector,
    whose faces count only where no other detector found one."""
    return str(cfg.get("annotate", {}).get("cascade_face", {}).get("model", ""))


def sql_params(opts: dict) -> dict:
    """The SQL parameters from the [curate] options (values go in as bindings, never as text)."""
    distance = int(opts["phash_distance"])  # 0 to 63: jobs/config.DOMAINS
    return {
        "general_threshold": float(opts["general_threshold"]),
        "character_threshold": float(opts["character_threshold"]),
        "drop_character_traits": bool(opts["drop_character_traits"]),
        "trait_share": float(opts["trait_share"]),
        "trait_min_images": int(opts["trait_min_images"]),
        "face_label": str(opts["face_label"]),
        "cascade_face_model": str(opts.get("cascade_face_model", "")),  # added by run(), not an option
        "face_threshold": float(opts["face_threshold"]),
        "max_face_aspect": float(opts["max_face_aspect"]),
        "person_label": str(opts["person_label"]),
        "person_threshold": float(opts["person_threshold"]),
        "phash_distance": distance,
        "phash_min_detail": float(opts["phash_min_detail"]),
        **phash_bands(distance),
        "embedding_similarity": float(opts["embedding_similarity"]),
        "embedding_model": str(opts["embedding_model"]),
        "cluster_model": str(opts["cluster_model"]),
        "ccip_threshold": float(opts["ccip_threshold"]),
        "max_characters": int(opts["max_characters"]),
        "min_images_per_combination": int(opts["min_images_per_combination"]),
        "gone_inputs": list(opts.get("gone_inputs", [])),  # added by build(), not an option
        "min_multiply": float(opts["min_multiply"]),
        "max_multiply": float(opts["max_multiply"]),
    }


def phash_bands(distance: int) -> dict:
    """Bands for sql/060_phash_pairs.sql: at least 3 (21-22 bits: about one image per band value
    in a million), more when needed to keep the probe radius floor(distance / bands) at most 2."""
    bands = max(3, -(-(distance + 1) // 3))
    return {"bands": bands, "band_bits": -(-64 // bands), "radius": distance // bands}


# ---- database and lookups -----------------------------------------------------------------
def open_database(path: Path, opts: dict) -> duckdb.DuckDBPyConnection:
    config = {"memory_limit": str(opts["memory_limit"]), "temp_directory": str(path.parent / "spill"),
              "preserve_insertion_order": False}
    if int(opts["threads"]) > 0:
        config["threads"] = int(opts["threads"])
    return duckdb.connect(str(path), config=config)


def attach_inputs(con: duckdb.DuckDBPyConnection, ws: Workspace, inputs: dict | None = None) -> None:
    ws.attach_tables(con, INPUTS, inputs)
    create_derived_view(con, "edit_state")  # a person's corrections (booruset review)


def tag_list_path(cfg: Config) -> str:
    """curate.tag_list, else the tagger's label file when annotate runs the tagger and the file is
    here: its category column marks character tags, so `eileen` in a kohya .txt counts as one."""
    opts, annotate = cfg["curate"], cfg.get("annotate", {})
    if opts["tag_list"] or "tagger" not in annotate.get("models", []):
        return opts["tag_list"]
    tagger = annotate["tagger"]
    return optional_file(tagger["labels_repo"], tagger["labels_file"], annotate.get("models_dir", ""),
                         tagger.get("labels_revision", "main")) or ""


def ccip_spec(cfg: Config) -> dict:
    """annotate's CCIP feature model options (for a folder of reference images)."""
    annotate = cfg.get("annotate", {})
    return {**annotate.get("ccip", {}), "models_dir": annotate.get("models_dir", "")}


def load_lookups(con: duckdb.DuckDBPyConnection, opts: dict, ccip: dict | None = None) -> None:
    """Lookup files -> tables in the work database (the SQL reads them by these names)."""
    try:
        categories, list_aliases = tag_rules.tag_list(opts["tag_list"])
        aliases = tag_rules.alias_table(list_aliases, opts["rules_dir"])
        tables = {
            "tag_categories": categories,
            "tag_aliases": aliases,
            # the rules name tags as the images' tags are read, through the aliases
            "tag_blacklist": tag_rules.through_aliases(tag_rules.blacklist(opts["blacklist"]), aliases, ("tag",),
                                                       "blacklist"),
            "tag_overlap": tag_rules.overlap(opts["overlap_tags"]),
            "impossible_tags": tag_rules.impossible_through_aliases(opts["rules_dir"], aliases),
            "count_tags": tag_rules.through_aliases(tag_rules.count_tags(opts["rules_dir"]), aliases, ("tag",),
                                                    "count_tags.csv"),
            "character_trait_rules": tag_rules.character_trait_rules(
                opts["character_tags"], int(opts["character_trait_level"])),
            # a reference named with an alias (reimu_hakurei) is the images' tag (hakurei_reimu)
            "character_references": ccip_cluster.reference_means(tag_rules.through_aliases(
                ccip_cluster.references(opts["references"], ccip), aliases, ("character",), "curate.references")),
            "group_format": group_format_table(opts["group_format"], schemas.image_meta.names),
            "fh_ratio_bins": fh_ratio_bins(opts["fh_ratio_bins"]),
            "balance_weights": balance_weights(opts["weights"]),
        }
    except (OSError, ValueError, KeyError, ModelUnavailable) as exc:
        raise ConfigError(f"curate: cannot load a lookup file: {exc}") from exc
    for name, table in tables.items():
        con.register(f"{name}_arrow", table)
        con.execute(f'create or replace table "{name}" as select * from "{name}_arrow"')
        con.unregister(f"{name}_arrow")


def fh_ratio_bins(edges: list[float]) -> pa.Table:
    edges = [float(e) for e in edges]
    if len(edges) < 2 or edges != sorted(edges):
        raise ValueError("curate.fh_ratio_bins must be at least two increasing edges")
    if edges[0] > 0 or edges[-1] < 1:  # a face with no bin was grouped as no_face (sql/080_groups.sql)
        raise ValueError(f"curate.fh_ratio_bins {edges} must go from 0 to 1 (a face's height ratio): an image whose "
                         "face has no bin was grouped with the images without a face")
    pairs = list(zip(edges, edges[1:], strict=False))
    return pa.table({
        "lo": [lo for lo, _ in pairs], "hi": [hi for _, hi in pairs],
        "last": [i == len(pairs) - 1 for i in range(len(pairs))],
        "name": [f"fh_ratio_{lo:g}-{hi:g}" for lo, hi in pairs],
    })


# ---- outputs ---------------------------------------------------------------------------------
def export_table(con: duckdb.DuckDBPyConnection, ws: Workspace, name: str, generation: str,
                 source: str | None = None) -> list[str]:
    """Stream one result table (from the work table `source`, default `name`) into new Parquet
    parts of `name` (their names), invisible to readers until published."""
    schema = schemas.TABLES[name]
    folder = ws.table_dir(name)
    ws.fs.create_dir(folder, recursive=True)
    reader = con.sql(f'select {", ".join(_quoted(schema.names))} from "{source or name}"').to_arrow_reader(500_000)
    parts: list[str] = []
    writer, rows = None, 0
    for batch in reader:
        if writer is None or rows >= ROWS_PER_FILE:
            if writer is not None:
                writer.close()
            parts.append(f"curate-{generation}-{len(parts):05d}")
            writer = pq.ParquetWriter(f"{folder}/{parts[-1]}.parquet", schema, filesystem=ws.fs, compression="zstd")
            rows = 0
        writer.write_table(schemas.conform(pa.Table.from_batches([batch]), name))
        rows += batch.num_rows
    if writer is not None:
        writer.close()
    fault_point("BOORUSET_KILL_AFTER_CURATE_PARTS")
    return parts


def _quoted(names: list[str]) -> list[str]:
    return [f'"{n}"' for n in names]
