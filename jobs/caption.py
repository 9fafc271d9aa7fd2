"""`booruset caption`: tags, image_meta, images (+ source captions) -> captions, tag_suggestions.

Steps:
1. captions back to tags: images with a caption / SD prompt but no tags get candidate tags
   in source_tags (origin "caption"), so the captioners below have something to work from;
2. one input row per image (sql/caption_inputs.sql), cut into units of `unit_size` images
   (sql/caption_units.sql) and streamed into one file per unit, which the unit's task reads;
3. Ray Data map_batches with one callable class per backend over whole units: caption,
   score, loop back, rewrite, write the unit's parts, commit it (resume skips committed units);
   the vllm backend streams the units through ray.data.llm instead (udfs/caption/caption_stream.py);
4. related-tag suggestions from co-occurrence PMI: the pairs in SQL over the whole dataset
   (sql/caption_related_pairs.sql), the suggestions per unit of images in tasks (sql/caption_related_tags.sql).
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import json
import time
import urllib.parse
import uuid
from collections import Counter
from importlib.metadata import version

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from jobs import caption_cuts
from jobs.config import REPO, Config, ConfigError, default_config
from jobs.ray_env import Progress, collect_units, init_ray, local_ray, run_in_worker, unit_tasks
from jobs.summary import JobSummary
from schemas import TABLES
from store.staging import clear, stage_units
from store.stamps import code_digest, file_stamps, fingerprint
from store.workspace import Workspace
from udfs.caption.caption_unit import PICTURES_IN_DIGEST, REPLY_CHECKS, REPLY_CHECKS_KEY
from udfs.caption.related_tags import suggest_units_task
from udfs.caption.reply_cache import move_replies, remove_replies, reply_range, units_with_replies
from udfs.caption.reply_recheck import recheck_units
from udfs.curate import tag_rules
from udfs.ingest.sidecars import RATINGS

SQL = REPO / "sql"
BACKENDS = ("template", "openai", "vllm")
INPUTS = "state/caption-inputs"  # the running job's input rows, one file per unit
ROWS = "state/caption-rows"  # every image's input rows, in key order, while the units are cut
TEXTS = "state/caption-texts"  # the untagged images' texts, while tags are found in them
TEXT_UNIT_IMAGES = 5000
# What the published tags from text were made of (text_tags_fingerprint), and their rows
TEXT_TAGS_STATE = "state/caption-text-tags-built.json"
# What tags_from_text reads: sql/caption_text_images.sql and the vocabulary (sql/caption_tag_vocabulary.sql)
TEXT_TAGS_TABLES = ("source_text", "source_tags", "tags", "tag_scores")
TEXT_TAGS_OPTIONS = ("text_tags_top_k", "text_tags_min_similarity", "embedding_model")
TEXT_TAGS_CODE = [REPO / "sql" / name for name in ("caption_text_images.sql", "caption_text_units.sql",
                                                   "caption_tag_vocabulary.sql")
                  ] + [REPO / "udfs" / "caption" / name for name in ("caption_tags.py", "caption_scoring.py")]
RELATED = "state/caption-related"  # the related pairs and each unit's image tags, while they are used
# What the published tag_suggestions were computed from (related_fingerprint), and their count
RELATED_STATE = "state/caption-related-built.json"
# The tables the related tags read (image_tag_lists: tags, source tags, image_meta, a person's edits)
RELATED_TABLES = ("images", "tags", "source_tags", "image_meta", "edits")
RELATED_CODE = [REPO / "sql" / name for name in ("caption_related_pairs.sql", "caption_related_units.sql",
                                                 "caption_visual_tags.sql", "image_tag_lists.sql", "edit_state.sql")
                ] + [REPO / "udfs" / "caption" / "related_tags.py", REPO / "udfs" / "curate" / "tag_rules.py"]
RELATED_OWNER = "caption:related_tags"
RELATED_UNIT_IMAGES = 2000  # images per related-tags task: a few million candidate rows at most
NO_TEXT_TAGS = "0-0"  # sql/text_tags_digest.sql of no rows
# Options that change what a unit's rows are: a change makes new units (old parts are removed).
# Not among them: how the work is done (actors, CPUs, retries, timeouts, batch sizes, engine
# settings, key variables), which leaves the answers as they were.
UNIT_OPTIONS = ("backend", "template_style", "seed", "max_attempts", "target", "drop_per_attempt", "review_floor",
                "quality_bands", "accuracy_step", "score_categories", "embedding_model", "asp_probabilities",
                "asp_max_tags", "asp_shuffle", "asp_underscores", "model", "base_url", "prompt", "send_images",
                "max_tokens", "temperature", "route_base_url", "route_model", "route_ratings", "vllm_model",
                "vllm_url", "rewrite", "rewrite_model", "rewrite_base_url", "rewrite_max_tokens", "rewrite_tolerance",
                "rewrite_keep_categories", "max_caption_chars", "image_max_side", "lint_strip_traits", "regions")
# caption.own_captions is not among them: it reaches the digest of the rows that have own captions
# alone (sql/caption_units.sql), so that turning it on or off redoes only their units.
# Options that shape the region captions only: no new units for them while caption.regions is off.
REGION_OPTIONS = ("region_prompt", "region_overlap")
# Unit options read only by one backend, by routing or by the rewriter (unread_options)
OPENAI_OPTIONS = ("model", "base_url", "route_base_url", "route_model", "route_ratings")
VLLM_OPTIONS = ("vllm_model", "vllm_url")
VLM_OPTIONS = ("send_images", "max_tokens", "temperature", "image_max_side")
ROUTE_OPTIONS = ("route_model", "route_ratings")
REWRITE_OPTIONS = ("rewrite_model", "rewrite_base_url", "rewrite_max_tokens", "rewrite_tolerance",
                   "rewrite_keep_categories")
REWRITERS = ("", "openai", "vllm")
OWN_CAPTIONS = ("score", "ignore")
# The last staging's fingerprint and units (planned_units)
PLAN_STATE = caption_cuts.PLAN_STATE
# What a unit's rows may be made of: every table but what caption and export write themselves
PLAN_TABLES = tuple(name for name in TABLES
                    if name not in ("captions", "caption_regions", "tag_suggestions", "errors", "export_manifest"))
PLAN_CODE = [REPO / "sql" / name for name in ("caption_inputs.sql", "caption_units.sql", "image_tag_lists.sql",
                                              "edit_state.sql")] + [REPO / "jobs" / "caption.py",
                                                                    REPO / "jobs" / "caption_cuts.py",
                                                                    REPO / "store" / "staging.py"]
# curate's options that decide the tagger evidence captions are scored against (sql/caption_inputs.sql)
EVIDENCE_OPTIONS = ("general_threshold", "character_threshold", "person_label", "person_threshold")


def sql_text(name: str) -> str:
    return (SQL / name).read_text(encoding="utf-8")


def caption_options(cfg: Config) -> dict:
    """caption's options, with annotate's region overlap: a VLM captions the very region crops the
    tagger tagged."""
    return {**cfg["caption"], "region_overlap": float(cfg["annotate"]["tagger"]["region_overlap"])}


def check_options(opts: dict) -> None:
    """ConfigError for a [caption] option out of its domain, with what it must be."""
    if opts["backend"] not in BACKENDS:
        raise ConfigError(f"caption.backend must be one of {BACKENDS}, not {opts['backend']!r}")
    if opts["own_captions"] not in OWN_CAPTIONS:
        raise ConfigError(f"caption.own_captions must be one of {OWN_CAPTIONS}, not {opts['own_captions']!r}")
    if opts["rewrite"] not in REWRITERS:
        raise ConfigError(f"caption.rewrite must be one of {REWRITERS}, not {opts['rewrite']!r}")
    if opts["rewrite"] == "vllm" and opts["backend"] != "vllm":
        raise ConfigError('caption.rewrite = "vllm" is a pass of the vllm backend\'s stream: use backend "vllm", '
                          'or rewrite "openai" (any OpenAI-compatible server, vllm serve included)')
    check_quality_bands(opts["quality_bands"])
    check_names(opts)
    check_urls(opts)
    check_prompts(opts)


def check_names(opts: dict) -> None:
    """The tag categories and ratings the options name are ones the tables hold: a misspelt one
    matched nothing, without a word (score_categories "characters" scored every caption without
    its characters; route_ratings "nsfw" sent every explicit image to the main endpoint)."""
    categories = sorted(set(tag_rules.CATEGORY_NAMES.values()))
    ratings = list(dict.fromkeys(RATINGS.values()))
    for option, known in (("score_categories", categories), ("rewrite_keep_categories", categories),
                          ("route_ratings", ratings)):
        unknown = [name for name in opts[option] if name not in known]
        if unknown:
            raise ConfigError(f"caption.{option}: no {'rating' if option == 'route_ratings' else 'tag category'} "
                              f"{', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def check_prompts(opts: dict) -> None:
    """The VLM prompts are filled with str.format: a brace it cannot fill (JSON in the prompt, a
    field of another name) raised KeyError or ValueError in every captioner actor, after the job
    had started, in a traceback that did not name the option."""
    if opts["backend"] == "template":
        return  # no prompt is sent
    fields = {"tag_block": "", "draft": "", "region": ""}
    for name in ("prompt", "region_prompt") if opts["regions"] else ("prompt",):
        try:
            str(opts[name]).format(**fields)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ConfigError(f"caption.{name} can use {{tag_block}}, {{draft}} and {{region}} and no other field; "
                              f"write a literal brace twice ({{{{, }}}}): {type(exc).__name__} {exc}") from exc


def check_urls(opts: dict) -> None:
    """The endpoints the options will ask are http(s) URLs with a host: httpx refuses any other
    ("localhost:8000/v1"), and every request then failed as unreachable after its retries."""
    asked = {"base_url": opts["backend"] == "openai",
             "route_base_url": opts["backend"] == "openai" and bool(opts["route_base_url"]),
             "vllm_url": opts["backend"] == "vllm" and bool(opts["vllm_url"]),
             "rewrite_base_url": opts["rewrite"] == "openai" or (opts["rewrite"] == "vllm" and bool(opts["vllm_url"]))}
    for name in (name for name, used in asked.items() if used):
        url = urllib.parse.urlsplit(opts[name])
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"caption.{name} must be an http:// or https:// URL with a host, not {opts[name]!r}")


def check_quality_bands(bands: list) -> None:
    """The quality tags' bands ([lowest accuracy, tag], highest first): the bands are read from
    the top, so bands in another order gave every caption the lowest one."""
    lows = []
    for band in bands:
        if len(band) != 2 or isinstance(band[0], str) or not 0 <= band[0] <= 1 \
                or not isinstance(band[1], str) or not band[1].strip():
            raise ConfigError(f"caption.quality_bands: each band is [lowest accuracy 0..1, tag], not {band!r}")
        lows.append(float(band[0]))
    if any(higher <= lower for higher, lower in zip(lows, lows[1:], strict=False)):
        raise ConfigError(f"caption.quality_bands must be given highest first, each lower than the one before: {lows}")


def check_vllm_here(cfg: Config) -> None:
    """The vllm backend's engine (no caption.vllm_url) on a local Ray runs vLLM in this machine's
    workers: without it installed, each of them failed at length. On a cluster only its GPU nodes
    need it, so the check is left to them. `booruset run` checks before its first job."""
    opts = cfg["caption"]
    if opts["backend"] == "vllm" and not opts["vllm_url"] and local_ray(cfg) \
            and importlib.util.find_spec("vllm") is None:
        raise ConfigError('caption.backend = "vllm" runs vLLM here, and it is not installed: pip install -e ".[gpu]" '
                          "on a CUDA machine, or point caption.vllm_url at a running `vllm serve`")


def run(cfg: Config, ws: Workspace) -> JobSummary:
    started = time.perf_counter()
    opts = caption_options(cfg)
    check_options(opts)  # a bad option is a ConfigError before any request is paid for
    check_vllm_here(cfg)
    summary = JobSummary("caption")
    ws.begin_job()
    if opts["tags_from_text"]:
        added = tags_from_text(cfg, ws)
        summary.notes.append(f"tags from captions/prompts: {added} source_tags rows (origin caption)")
        if curated_other_text_tags(cfg, ws):
            curate_again(cfg, ws, summary)
    elif drop_text_tags(ws) and curated_other_text_tags(cfg, ws):
        summary.notes.append("caption.tags_from_text is off: the tags an earlier run took from texts are gone")
        curate_again(cfg, ws, summary)
    done = finished_units(ws)  # one read of the markers (a stale one among them is never looked up)
    flagged = recheck_captions(cfg, ws, done)  # before the plan: a unit to run again is staged
    units = planned_units(cfg, ws, opts, done)
    adopt_units(ws, units, done)
    remove_stale(ws, {u["unit"] for u in units})
    pending = [u for u in units if u["unit"] not in done]
    if pending:  # the names a caption may make up are looked for among the dataset's characters (a scan)
        opts["characters"] = run_in_worker(cfg, ws, dataset_characters)
    sources = reply_sources(ws, units, pending)
    for unit in pending:
        # a unit run again for the reply checks is answered by its own kept replies
        own = [unit["unit"]] if flagged.get(unit["unit"], {}).get("again") else []
        unit["previous"] = sources.get(unit["unit"], []) + own
    say_rechecked(flagged, {u["unit"] for u in pending}, summary)
    print(f"caption: {sum(u['rows'] for u in units)} images in {len(units)} units, "
          f"{len(units) - len(pending)} done before, {len(pending)} to run (backend {opts['backend']})", flush=True)
    infos = [done[u["unit"]] for u in units if u["unit"] in done]
    run_now = run_units(cfg, ws, pending, opts) if pending else []
    infos += run_now
    # the replies of units no longer planned, once the units that replaced them have borrowed them
    remove_replies(ws, sorted(set(units_with_replies(ws)) - {u["unit"] for u in units}))
    clear(ws, INPUTS)
    summary.units_done, summary.units_skipped = len(pending), len(units) - len(pending)
    add_infos(summary, infos)
    summary.rows_run = sum(info["images"] for info in run_now)
    add_requests(summary, run_now, retries=opts["backend"] != "vllm")
    ws.release_hold("caption")  # every planned unit is committed: the replaced rows may go
    ws.publish()  # the captions, before the related tags are computed over them
    if opts["related_tags"]:
        summary.rows_out["tag_suggestions"] = related_tags(cfg, ws)
    summary.seconds = time.perf_counter() - started
    return summary


def tags_from_text(cfg: Config, ws: Workspace) -> int:
    """source_tags (origin caption) for untagged images with a caption or prompt of their own
    (udfs/caption/caption_tags.py): the texts are staged one file per unit, an actor pool ranks
    the tags of a unit and writes them; the driver gets part names and counts. A unit built before
    (the same texts: its digest) with the same vocabulary, options and code keeps its part: one
    text added runs its unit alone, not every text of the dataset through the embedding model
    again (hours at a million texts on a CPU); a tag added to the dataset, the units whose texts
    name it (unit_candidates_digests). Returns the rows written."""
    from udfs.caption.caption_tags import (
        OWNER,
        PART,
        TextTagger,
        csv_vocabulary,
        dataset_vocabulary,
        unit_candidates_digests,
    )

    opts = cfg["caption"]
    last, inputs = ws.read_json(TEXT_TAGS_STATE) or {}, text_tags_inputs(ws, opts)
    # a build that found no text publishes no part (a publish drops an owner without parts)
    if last.get("inputs") == inputs and (OWNER in ws.published()["owned"] or not last.get("rows")):
        print("caption: tags from text: nothing they are made of changed since the last run: texts not staged again",
              flush=True)
        return int(last.get("rows", 0))
    units = run_in_worker(cfg, ws, stage_texts, TEXT_UNIT_IMAGES)
    if not units:
        ws.publish({OWNER: {}})
        ws.write_json(TEXT_TAGS_STATE, {"rows": 0, "inputs": text_tags_inputs(ws, opts)})
        return 0
    # the CSV is the driver's file; the dataset's tags come from a scan, in a worker
    vocabulary = run_in_worker(cfg, ws, dataset_vocabulary) + csv_vocabulary(opts["tag_vocabulary"])
    stamp = text_tags_fingerprint(opts)
    found = run_in_worker(cfg, ws, unit_candidates_digests, [u["path"] for u in units], vocabulary)
    for unit, candidates_digest in zip(units, found, strict=True):  # what the unit's tags are made of
        unit["built_from"] = hashlib.sha1(f"{stamp}-{unit['digest']}-{candidates_digest}".encode()).hexdigest()
    built = built_text_units(last, ws.published()["owned"].get(OWNER, {}).get("source_tags", []))
    kept = {u["built_from"]: built[u["built_from"]] for u in units if u["built_from"] in built}
    todo = [u for u in units if u["built_from"] not in kept]
    if not todo and len(kept) == len(built):
        clear(ws, TEXTS)
        ws.write_json(TEXT_TAGS_STATE, {**last, "inputs": inputs})  # nothing published since it was taken
        print("caption: tags from text: the same texts and vocabulary as the last run; its tags kept", flush=True)
        return sum(b["rows"] for b in kept.values())
    if todo:  # one unit per call: the actor reads its unit's texts and writes the tags it finds
        prefix = f"{PART}-{uuid.uuid4().hex[:12]}-"
        pool = ray.data.ActorPoolStrategy(size=max(1, min(int(opts["concurrency"]), len(todo))))
        ds = staged_units_dataset(todo).map_batches(
            TextTagger, batch_size=1, compute=pool, num_cpus=float(opts["num_cpus"]),
            fn_constructor_kwargs={"workspace": ws.root, "part_prefix": prefix,
                                   "vocabulary": vocabulary,
                                   "top_k": int(opts["text_tags_top_k"]),
                                   "min_similarity": float(opts["text_tags_min_similarity"]),
                                   "model": opts["embedding_model"]})
        progress = Progress("caption (tags from text)", sum(u["rows"] for u in todo), what="texts", units=len(todo))
        rows = collect_parts(ds, progress, "texts")
        kept.update({u["built_from"]: {"part": f"{prefix}{u['index']}", "rows": rows[f"{prefix}{u['index']}"]}
                     for u in todo})
    # the whole result replaces the last run's at once
    ws.publish({OWNER: {"source_tags": sorted(b["part"] for b in kept.values())}})
    written = sum(b["rows"] for b in kept.values())
    ws.write_json(TEXT_TAGS_STATE, {"units": kept, "rows": written, "inputs": text_tags_inputs(ws, opts)})
    clear(ws, TEXTS)
    return written


def built_text_units(last: dict, published: list[str]) -> dict[str, dict]:
    """The units the last tags_from_text built (`last`: its state; {what a unit was built from:
    {"part", "rows"}}), when their parts are all still published; {} otherwise (a state of an
    earlier version, which kept no units, builds them all once)."""
    units = last.get("units") or {}
    return units if {b["part"] for b in units.values()} == set(published) else {}


def drop_text_tags(ws: Workspace) -> bool:
    """Unpublish the tags an earlier run took from texts, caption.tags_from_text now off: kept,
    they stayed the images' tags, captions and KEY.txt, unlike a workspace that never had the
    option on. Whether there were any."""
    from udfs.caption.caption_tags import OWNER

    if not ws.published()["owned"].get(OWNER):
        return False
    ws.publish({OWNER: {}})
    return True


def text_tags_fingerprint(opts: dict) -> str:
    """A digest of what every unit's tags from text are made of besides its texts and their
    candidate tags (tags_from_text): the options and the code. Of the content, not of the parts
    (store/stamps.py): each build writes new parts, which curate and the caption units read, so a
    digest of parts would have every run build again, and curate after it."""
    digest = hashlib.sha256(code_digest(TEXT_TAGS_CODE).encode())
    digest.update(json.dumps({k: opts[k] for k in TEXT_TAGS_OPTIONS}, default=str).encode())
    return digest.hexdigest()


def text_tags_inputs(ws: Workspace, opts: dict) -> str:
    """A digest of the published parts tags_from_text reads (store/stamps.py; its own source_tags
    part among them, as it stands after its publish), its vocabulary file, options and code: the
    same as after the last build, nothing is staged (three scans of the tag tables and texts)."""
    csv = file_stamps(opts["tag_vocabulary"]) if opts["tag_vocabulary"] else []
    return fingerprint(ws, TEXT_TAGS_TABLES, csv=csv, options={k: opts[k] for k in TEXT_TAGS_OPTIONS},
                       code=code_digest(TEXT_TAGS_CODE))


def curated_other_text_tags(cfg: Config, ws: Workspace) -> bool:
    """Whether curate has run here and its last build read other tags from texts than
    tags_from_text has just published (or none: curate ran before this run's tags_from_text)."""
    from jobs import curate

    if not ws.published()["owned"].get(curate.OWNER):
        return False  # no curated tables: the captioners read the source tags as they are
    # a curate of an older version recorded nothing: as if it read none (the digest of no rows)
    read = (ws.read_json(curate.TEXT_TAGS_STATE) or {}).get("digest", NO_TEXT_TAGS)
    return read != published_text_tags_digest(cfg, ws)


def published_text_tags_digest(cfg: Config, ws: Workspace) -> str:
    """text_tags_digest, scanned in a worker (a scan of source_tags: not in the driver) only when
    the parts tags_from_text reads changed since it was last taken (text_tags_inputs): a caption
    run with nothing new started a Ray worker to scan the same tags every time."""
    state = ws.read_json(TEXT_TAGS_STATE) or {}
    inputs = text_tags_inputs(ws, cfg["caption"])
    if state.get("digest_of") == inputs:
        return state["digest"]
    digest = run_in_worker(cfg, ws, text_tags_digest)
    ws.write_json(TEXT_TAGS_STATE, {**state, "digest_of": inputs, "digest": digest})
    return digest


def text_tags_digest(ws: Workspace) -> str:
    """sql/text_tags_digest.sql over the published source_tags (in a worker: run_in_worker)."""
    con = ws.connect()
    try:
        return con.execute(sql_text("text_tags_digest.sql")).fetchone()[0]
    finally:
        con.close()


def curate_again(cfg: Config, ws: Workspace, summary: JobSummary) -> None:
    """Curate once more, now that the tags from texts changed: curate makes them curated tags
    (ranked, implied, grouped), which the next run's curate would do, and the captions written
    from the tags before that would all be written again then."""
    from jobs import curate

    print("caption: the tags taken from texts changed since curate ran: curating again", flush=True)
    curated = curate.run(cfg, ws)
    curated.print()
    summary.notes.append(f"curated again ({curated.seconds:.1f} s): the tags taken from texts had changed")


def stage_texts(ws: Workspace, unit_images: int) -> list[dict]:
    """The own texts of untagged images, one file per unit (sql/caption_text_units.sql). Runs in
    a Ray task (run_in_worker): sizes come as arguments, not from this module's constants."""
    con = ws.connect()
    try:
        con.execute("create temp view text_images as " + sql_text("caption_text_images.sql"))
        reader = con.sql(sql_text("caption_text_units.sql"),  # content-defined cuts: see the SQL
                         params={"unit_size": unit_images, "cut_every": 2 * unit_images}).to_arrow_reader(50_000)
        return stage_units(ws, reader, TEXTS)
    finally:
        con.close()


def staged_units_dataset(units: list[dict]) -> ray.data.Dataset:
    """One block per staged unit (store/staging.py), so that each call of a UDF gets one unit."""
    return ray.data.from_items([{"index": u["index"], "path": u["path"]} for u in units],
                               override_num_blocks=len(units))


def collect_parts(ds: ray.data.Dataset, progress: Progress, counted: str) -> dict[str, int]:
    """{part: rows} of the parts the unit calls of `ds` wrote; each call's `counted` goes to the
    progress line."""
    parts = {}
    with progress:
        for row in ds.iter_rows():
            parts[row["part"]] = int(row["rows"])
            progress.add(int(row[counted]), units=1)
    return parts


def stage_inputs(ws: Workspace, opts: dict, curate: dict) -> list[dict]:
    """The units (jobs/caption_cuts.py), their input rows streamed from DuckDB into one file per
    unit (store/staging.py): {"unit", "path", "rows"}. The tagger evidence in the rows uses
    curate's thresholds (`curate`: its options).

    A unit's id hashes its rows' values and the options that shape its output, so new tags or
    other options make a new unit instead of reusing stale captions; a unit done before whose
    rows are unchanged keeps its range and id, whatever was added or removed around it.
    """
    shaping = unit_shaping(opts)
    con = ws.connect()
    try:
        total = caption_rows(ws, con, opts, curate)
        ranges, adopted = caption_cuts.unit_ranges(ws, con, shaping, total, max(1, int(opts["unit_size"])))
        con.register("unit_ranges", pa.table({"start": pa.array([r[0] for r in ranges], pa.int64()),
                                              "unit_index": pa.array(range(len(ranges)), pa.int64())}))
        reader = con.sql("select r.* exclude (position, legacy_digest), u.unit_index from caption_rows r "
                         "asof join unit_ranges u on r.position >= u.start order by r.position").to_arrow_reader(50_000)
        staged = stage_units(ws, reader, INPUTS)
    finally:
        con.close()
    clear(ws, ROWS)
    units = [{"unit": caption_cuts.caption_unit_id(shaping, unit["first"]["key"], unit["digest"]), "path": unit["path"],
              "rows": unit["rows"], "first": unit["first"]["key"]} for unit in staged]
    for unit, staged_unit in zip(units, staged, strict=True):
        if old := adopted.get(ranges[staged_unit["index"]]):
            unit["adopted_from"] = old  # adopt_units
    return units


def caption_rows(ws: Workspace, con: duckdb.DuckDBPyConnection, opts: dict, curate: dict) -> int:
    """`caption_rows` on `con`: every image's caption inputs with its digests and position
    (stage_rows), with this run's options and curate's thresholds; returns how many."""
    for name in EVIDENCE_OPTIONS:
        con.execute(f"set variable {name} = ?", [curate[name]])
    con.execute("set variable caption_regions = ?", [bool(opts["regions"])])
    con.execute("set variable own_captions = ?", [opts["own_captions"] == "score"])
    con.execute("set variable caption_images = ?", [shows_images(opts)])
    con.execute("create temp view caption_inputs as " + sql_text("caption_inputs.sql"))
    return stage_rows(ws, con)


def shows_images(opts: dict) -> bool:
    """Whether the captioner is shown the pictures (a VLM backend with send_images; the regions too):
    then a picture's sha256 is in its row's digest (sql/caption_inputs.sql), and a picture replaced
    under the same tags is captioned again."""
    return opts["backend"] != "template" and bool(opts["send_images"])


def stage_rows(ws: Workspace, con: duckdb.DuckDBPyConnection) -> int:
    """Every image's caption inputs with its row_digest and position in key order
    (sql/caption_units.sql), computed once into a file under ROWS, then `caption_rows` on `con`:
    the units are cut over them, then streamed from them. Returns the rows."""
    clear(ws, ROWS)
    ws.fs.create_dir(f"{ws.base}/{ROWS}", recursive=True)
    path, writer, total = f"{ws.base}/{ROWS}/rows.parquet", None, 0
    try:
        for batch in con.sql(sql_text("caption_units.sql")).to_arrow_reader(50_000):
            if writer is None:
                writer = pq.ParquetWriter(path, batch.schema, filesystem=ws.fs)
            writer.write_batch(batch)
            total += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # no image to caption: a query with no rows still streams its columns
        con.execute("create temp view caption_rows as " + sql_text("caption_units.sql"))
    else:
        con.register("caption_rows", pads.dataset(path, format="parquet", filesystem=ws.fs))
    return total


def unit_shaping(opts: dict) -> str:
    """The options a unit's id hashes: UNIT_OPTIONS (and REGION_OPTIONS with caption.regions), those
    this run does not read (unread_options) at their defaults, so that the ids stay those of a run
    with the defaults: an openai run asked every image again (and paid for it) after caption.vllm_model
    changed, a vllm run recaptioned every image on the GPUs after caption.model did."""
    defaults = caption_options(default_config())
    unread = unread_options(opts)
    names = UNIT_OPTIONS + (REGION_OPTIONS if opts["regions"] else ())
    return json.dumps({k: defaults.get(k) if k in unread else opts.get(k) for k in names}, sort_keys=True, default=str)


def unread_options(opts: dict) -> set[str]:
    """The unit options that the backend, the routing and the rewriter of `opts` do not read."""
    unread: set[str] = set()
    if opts["backend"] != "openai":
        unread.update(OPENAI_OPTIONS)
    if opts["backend"] != "vllm":
        unread.update(VLLM_OPTIONS)
    if opts["backend"] == "template":  # no model asked (the prompt still tells a rewrite's echo)
        unread.update(VLM_OPTIONS + (() if opts["rewrite"] else ("prompt",)))
    if not opts["route_base_url"]:
        unread.update(ROUTE_OPTIONS)
    if not opts["rewrite"]:
        unread.update(REWRITE_OPTIONS)
    elif opts["rewrite"] == "vllm" and not opts["vllm_url"]:  # an engine of rewrite_model, no server
        unread.add("rewrite_base_url")
    return unread


def planned_units(cfg: Config, ws: Workspace, opts: dict, done: dict[str, dict]) -> list[dict]:
    """This run's units: stage_inputs' in a worker, or the last run's when nothing they are made of
    changed (plan_fingerprint) and every one of them is `done`. Staging reads every image's inputs
    to find that out (41 s at 8,000 images): a rerun with nothing to do need not."""
    stamp = plan_fingerprint(cfg, ws, opts)
    last = ws.read_json(PLAN_STATE) or {}
    if last.get("fingerprint") == stamp and all(u["unit"] in done for u in last["units"]):
        print("caption: nothing the captions are made of changed since the last run: inputs not staged again",
              flush=True)
        return last["units"]
    units = run_in_worker(cfg, ws, stage_inputs, opts, cfg["curate"])
    ws.write_json(PLAN_STATE, {"fingerprint": stamp,
                               "units": [{k: u[k] for k in ("unit", "rows", "first")} for u in units]})
    return units


def plan_fingerprint(cfg: Config, ws: Workspace, opts: dict) -> str:
    """A digest of what stage_inputs' units are made of (store/stamps.py): the published parts of
    the tables, caption's and curate's options, and the code."""
    return fingerprint(ws, PLAN_TABLES, options=opts, curate={k: cfg["curate"][k] for k in EVIDENCE_OPTIONS},
                       code=code_digest(PLAN_CODE))


def finished_units(ws: Workspace) -> dict[str, dict]:
    """The caption units done, by id. A unit whose images a passing failure left uncaptioned (a
    server down) is not: it is done again."""
    return {unit: info for unit, info in ws.done_units("caption").items() if not info.get("transient")}


RECHECK_UNITS_PER_TASK = 64


def recheck_captions(cfg: Config, ws: Workspace, done: dict[str, dict]) -> dict[str, dict]:
    """The units committed under earlier reply checks (REPLY_CHECKS), their captions read once in
    tasks (udfs/caption/reply_recheck.py). Those holding a caption the checks refuse now leave
    `done`: they run again, their kept replies answering what was asked before, so only the refused
    captions are asked for again (within caption.max_attempts). A unit without kept replies (a
    version before c9fac4d) would be asked for every image: it stays, and the summary says so.
    The others are marked as checked. Returns the units found holding such captions, each
    {"refused", "example", "again": whether it runs again}."""
    old = {unit: m for unit, m in done.items() if m.get(REPLY_CHECKS_KEY, 0) < REPLY_CHECKS and "parts" in m}
    if not old:
        return {}
    init_ray(cfg)
    items = [{"unit": unit, "captions": old[unit]["parts"].get("captions", []),
              "regions": old[unit]["parts"].get("caption_regions", [])} for unit in sorted(old)]
    chunks = [items[i:i + RECHECK_UNITS_PER_TASK] for i in range(0, len(items), RECHECK_UNITS_PER_TASK)]
    flagged = {f["unit"]: f for found in unit_tasks(recheck_units, chunks, 1.0, workspace=ws.root) for f in found}
    replied = set(units_with_replies(ws))
    for unit, found in flagged.items():
        found["again"] = unit in replied
    again = {unit for unit, found in flagged.items() if found["again"]}
    for unit in sorted(set(old) - again):
        info = {k: v for k, v in old[unit].items() if k != "parts"} | {REPLY_CHECKS_KEY: REPLY_CHECKS}
        ws.commit_unit("caption", unit, info, parts=old[unit]["parts"])
        done[unit] = {**info, "parts": old[unit]["parts"]}
    for unit in again:
        done.pop(unit)
    return flagged


def say_rechecked(flagged: dict[str, dict], pending: set[str], summary: JobSummary) -> None:
    """What recheck_captions found: the units run again (those still planned), and those left as
    they are."""
    again = {unit for unit, found in flagged.items() if found["again"] and unit in pending}
    if again:
        refused, example = sum(flagged[unit]["refused"] for unit in again), flagged[min(again)]["example"]
        print(f"caption: {refused} captions in {len(again)} units committed by an earlier version are replies the "
              f"checks refuse now (e.g. {example}): those units run again, from their kept replies", flush=True)
        summary.notes.append(f"reply checks: {refused} captions committed by an earlier version are refused now "
                             f"({len(again)} units run again from their kept replies; the refused are asked again)")
    if left := {unit for unit, found in flagged.items() if not found["again"]}:
        summary.notes.append(f"reply checks: {sum(flagged[u]['refused'] for u in left)} captions in {len(left)} units "
                             "committed by an early version are replies the checks refuse now, but those units kept "
                             f"no replies: running them again would ask for every image. E.g. "
                             f"{flagged[min(left)]['example']}")


def reply_sources(ws: Workspace, units: list[dict], pending: list[dict]) -> dict[str, list[str]]:
    """{pending unit id: the units no longer planned whose kept replies are of images in its key
    range} (udfs/caption/reply_cache.py). `units` are in key order, each from its first key to the
    next one's; a kept folder's range is its first and last key."""
    if not pending:
        return {}
    planned = {u["unit"] for u in units}
    firsts = [u["first"] for u in units]
    waiting = {u["unit"] for u in pending}
    sources: dict[str, list[str]] = {}
    for folder in units_with_replies(ws):
        found = None if folder in planned else reply_range(ws, folder)
        if found is None:
            continue
        # the units from the one holding its first key to the one holding its last
        for unit in units[max(0, bisect.bisect_right(firsts, found[0]) - 1):bisect.bisect_right(firsts, found[1])]:
            if unit["unit"] in waiting:
                sources.setdefault(unit["unit"], []).append(folder)
    return sources


def dataset_characters(ws: Workspace) -> list[str]:
    """The character tags the dataset knows (sql/caption_characters.sql)."""
    con = ws.connect()
    try:
        return [tag for (tag,) in con.sql(sql_text("caption_characters.sql")).fetchall()]
    finally:
        con.close()


def adopt_units(ws: Workspace, units: list[dict], done: dict[str, dict]) -> None:
    """Give each unit committed before row digests held the picture, its rows unchanged
    (caption_cuts.kept_ranges), the id it has now: a marker of that id naming the same parts, and
    its kept replies. Its captions are kept; a picture replaced after this run makes it a new
    unit. The old marker is forgotten with the units no longer planned (remove_stale)."""
    for unit in units:
        old = done.get(unit.get("adopted_from", ""))
        if old is None or "parts" not in old or unit["unit"] in done:
            continue
        info = {k: v for k, v in old.items() if k != "parts"} | {PICTURES_IN_DIGEST: True}
        move_replies(ws, unit["adopted_from"], unit["unit"])
        ws.commit_unit("caption", unit["unit"], info, parts=old["parts"])
        done[unit["unit"]] = {**info, "parts": old["parts"]}


def remove_stale(ws: Workspace, current: set[str]) -> None:
    """Forget the markers of units that are no longer planned (inputs or options changed): the
    next publish drops their rows, the next job's start deletes their files."""
    for unit in ws.done_units("caption"):
        if unit not in current:
            ws.forget_unit("caption", unit)


def run_units(cfg: Config, ws: Workspace, units: list[dict], opts: dict) -> list[dict]:
    init_ray(cfg)
    progress = Progress("caption", sum(u["rows"] for u in units), units=len(units))
    if opts["backend"] == "vllm":
        from udfs.caption.caption_stream import caption_units_stream

        with progress:
            return caption_units_stream(ws, units, opts, lambda images: progress.add(images, units=1))
    captioner = captioner_class(opts["backend"])
    # one unit per block and per call: each call reads its unit's rows, captions and commits them
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(captioner, batch_size=1, batch_format="pyarrow",
                        fn_constructor_kwargs={"workspace": ws.root, "options": opts},
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(int(opts["concurrency"]), len(units)))),
                        num_cpus=float(opts["num_cpus"]))
    return collect_units(ds.iter_rows(), progress, lambda row: json.loads(row["info"]), ws.publish_now_and_then)


def captioner_class(backend: str) -> type:
    if backend == "openai":
        from udfs.caption.openai_captioner import OpenAICaptioner

        return OpenAICaptioner
    from udfs.caption.caption_unit import TemplateCaptioner

    return TemplateCaptioner


def add_infos(summary: JobSummary, infos: list[dict]) -> None:
    accuracy, captioned, scored, scored_rows, flagged, transient, own, own_accepted = 0.0, 0, 0, 0, 0, 0, 0, 0
    not_scored: Counter[str] = Counter()
    against: Counter[str] = Counter()
    for info in infos:
        summary.rows_in += info["images"]
        summary.dropped += info["dropped"]
        summary.errors_by_kind.update(info["error_kinds"])
        summary.rows_out["captions"] = summary.rows_out.get("captions", 0) + info["rows"]
        if info.get("regions"):  # a marker before the count has none
            summary.rows_out["caption_regions"] = summary.rows_out.get("caption_regions", 0) + info["regions"]
        captioned += info["captioned"]
        scored += info.get("scored", 0)
        scored_rows += info.get("scored_rows", info.get("scored", 0))  # a marker before the count: its accepted
        not_scored.update(info.get("not_scored", {}))
        against.update(info.get("scored_against", {}))
        flagged += info["flagged"]
        accuracy += info["accuracy_sum"]
        transient += info.get("transient", 0)
        own += info.get("own_captions", 0)
        own_accepted += info.get("own_accepted", 0)
    if summary.rows_in:
        # an image whose own caption stood in for the backend's (no_model_caption) was captioned by
        # no model either: a server down for every image exited 0 where the images had captions
        summary.failed_share = (summary.dropped + summary.errors_by_kind["no_model_caption"]) / summary.rows_in
    summary.notes.append(f"captioned {captioned} of {summary.rows_in} images; {flagged} flagged for review")
    if transient:
        summary.notes.append(f"{transient} images failed for a passing reason (server unreachable, overloaded, "
                             "timed out, answering what is no chat completion, or refusing the key or model: "
                             "fix it): the next run asks for them again")
    if own:
        summary.notes.append(f"own captions (sidecars, JSON): {own} read, {own_accepted} accepted "
                             "(at caption.target, or the backend gave none)")
    if scored:
        by = ", ".join(f"{n} against {what}" for what, n in sorted(against.items()))
        # of the accepted captions: the table has a scored row for every attempt (an own caption
        # below target, loop-back attempts), which "scored 4 captions" left out (5 on the sample)
        summary.notes.append(f"accepted captions scored: {scored} ({by}), mean accuracy {accuracy / scored:.3f}"
                             + (f"; caption rows scored: {scored_rows} (attempts not accepted too)"
                                if scored_rows != scored else ""))
    if not_scored:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(not_scored.items()))
        summary.notes.append(f"not scored: {why} (no independent evidence: README, Honest caption scores)")


def add_requests(summary: JobSummary, run_now: list[dict], retries: bool = True) -> None:
    """What this run asked the model endpoints (the openai backend and rewriter; the vllm stream,
    whose transports count no retries): the cost of a hosted model, or of the GPUs. The units done
    before were paid for by the runs that did them."""
    requests: Counter[str] = Counter()
    for info in run_now:
        requests.update(info.get("requests") or {})
    if requests:
        # the vllm stream counts none, but an openai rewriter beside it does
        retried = f" ({requests['retries']} of them retries)" if retries or requests["retries"] else ""
        summary.notes.append(f"requests: {requests['sent']} sent{retried}, "
                             f"{requests['reused']} answered by replies kept from an earlier run")


def related_tags(cfg: Config, ws: Workspace) -> int:
    """tag_suggestions from co-occurrence PMI over the whole dataset: the related pairs here (an
    aggregate per pair of tags), the suggestions per unit of images in CPU tasks
    (udfs/caption/related_tags.py); returns the suggestions written. The tags are the images' tags
    with a person's edits (image_tag_lists), and a suggestion never breaks curate's impossible
    combinations nor brings back a tag a person removed. Rebuilt only when what they are made of
    changed (related_fingerprint): a rerun with nothing new took a minute at 8,000 images."""
    stamp = related_fingerprint(cfg, ws)
    last = ws.read_json(RELATED_STATE) or {}
    if last.get("fingerprint") == stamp and RELATED_OWNER in ws.published()["owned"]:
        print("caption: related tags: nothing they are made of changed since the last run; kept", flush=True)
        return int(last.get("rows", 0))
    rows = build_related_tags(cfg, ws)
    ws.write_json(RELATED_STATE, {"fingerprint": stamp, "rows": rows})
    return rows


def related_fingerprint(cfg: Config, ws: Workspace) -> str:
    """A digest of what the related tags are made of (store/stamps.py): the published parts of the
    tables they read, the related options, curate's rule files, imgutils' version (its rule data)
    and the code."""
    opts, curate_opts = cfg["caption"], cfg["curate"]
    return fingerprint(ws, RELATED_TABLES, code=code_digest(RELATED_CODE), imgutils=version("dghs-imgutils"),
                       options={k: v for k, v in opts.items() if k.startswith("related_")},
                       files={k: file_stamps(path)
                              for k, path in tag_rules.lookup_paths(curate_opts, ("tag_list", "rules_dir")).items()})


def build_related_tags(cfg: Config, ws: Workspace) -> int:
    """related_tags' build: the suggestions written."""
    opts = cfg["caption"]
    try:  # the rules curate applied to the tags, read through the aliases as it does: no suggestion breaks them
        curate_opts = cfg["curate"]
        aliases = tag_rules.alias_table(tag_rules.tag_list(curate_opts["tag_list"])[1], curate_opts["rules_dir"])
        impossible = tag_rules.impossible_through_aliases(curate_opts["rules_dir"], aliases)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"caption: cannot load curate's impossible_tags.csv or its aliases: {exc}") from exc
    run = uuid.uuid4().hex[:12]  # new part names each run: readers of the last ones keep them
    pairs_path, units = run_in_worker(cfg, ws, stage_related, opts, RELATED_UNIT_IMAGES)
    if not units:
        ws.publish({RELATED_OWNER: {"tag_suggestions": []}})
        return 0
    init_ray(cfg)
    ds = staged_units_dataset(units).map_batches(
        suggest_units_task, batch_size=1, num_cpus=float(opts["num_cpus"]),
        fn_kwargs={"workspace": ws.root, "pairs_path": pairs_path, "part_prefix": f"pmi-{run}-",
                   "top_k": int(opts["related_top_k"]), "impossible": impossible})
    parts = collect_parts(ds, Progress("related tags", units=len(units)), "images")
    ws.publish({RELATED_OWNER: {"tag_suggestions": sorted(parts)}})
    clear(ws, RELATED)
    return sum(parts.values())


def stage_related(ws: Workspace, opts: dict, unit_images: int) -> tuple[str, list[dict]]:
    """The related pairs (sql/caption_related_pairs.sql) to one file, the image tags to one file per
    unit (sql/caption_related_units.sql): (pairs path, units with index, path, images). Runs in a
    Ray task (run_in_worker): sizes come as arguments, not from this module's constants."""
    con = ws.connect()
    try:
        con.execute("create temp view visual_tags as " + sql_text("caption_visual_tags.sql"))
        pairs = con.sql(sql_text("caption_related_pairs.sql"), params={
            "min_support": int(opts["related_min_support"]), "min_pmi": float(opts["related_min_pmi"])})
        pairs_path = f"{ws.base}/{RELATED}/pairs.parquet"
        ws.fs.create_dir(f"{ws.base}/{RELATED}", recursive=True)
        ws.write_parquet(pairs_path, pairs.to_arrow_table())
        reader = con.sql(sql_text("caption_related_units.sql"),
                         params={"unit_size": unit_images}).to_arrow_reader(100_000)
        units = stage_units(ws, reader, f"{RELATED}/units")
    finally:
        con.close()
    return pairs_path, units
