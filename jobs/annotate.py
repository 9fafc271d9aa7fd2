"""`booruset annotate`: images (+ their bytes from the inputs) -> detections, embeddings, tag_scores.

Ray Data pipeline: units (one per ingest unit: a shard or a folder chunk, with its published
`images` parts) -> rows with image bytes, streamed (CPU tasks) -> decode and per-model
preprocessing (CPU tasks, draft mode) -> one actor pool per model (GPU when the cluster has
one) -> Parquet parts written by CPU tasks (udfs/annotate/annotate_parts.py). The driver adds up the
small per-batch summaries and writes a unit's marker, naming its parts, once all its rows are
written; a unit counts as done once its marker lists every model of the run. Each writer marks
its batch done (state/annotate/batches/<unit>/): a unit killed before its marker keeps the
batches it finished, and the next run reads only the rest of its images (a shard is thousands
of images: minutes of GPU time, hours on a CPU). Parts that no marker names (a batch killed
while it wrote) are deleted at the next start. A unit that replaces one ingest replaced (a
sidecar edited, an image added: the ingest unit's id changes) keeps the rows of the images the
old one annotated from the same bytes (state/annotate/images/: each unit's keys and sha256),
copied in a batch of its own: the models run only on its new or changed images.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import posixpath
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from jobs.config import Config, ConfigError, default_config
from jobs.ray_env import Progress, init_ray, local_ray, unit_tasks
from jobs.summary import JobSummary
from store.part_ranges import KeyBounds
from store.workspace import Workspace, images_parts
from udfs.annotate.annotate_parts import copy_kept_rows, merge_infos, record_dir, write_record, write_unit_parts
from udfs.annotate.annotate_rows import crop_persons, decode_images, read_unit_images
from udfs.annotate.cascade_face import CascadeFaceDetector, cascade_path, load_cascade
from udfs.annotate.ccip import CcipFeatures
from udfs.annotate.model_check import kind_of, staged_problem
from udfs.annotate.model_files import ModelUnavailable, model_file, optional_file, staged_record
from udfs.annotate.onnx_session import file_input_shape, file_output_shape
from udfs.annotate.wd_tagger import WdTagger, load_labels
from udfs.annotate.yolo_detector import YoloDetector, detector_meta

JOB = "annotate"
TABLES = ("detections", "embeddings", "tag_scores", "errors")
DETECTORS = ("cascade_face", "face", "head", "person")
KNOWN = (*DETECTORS, "ccip", "tagger")
# the model files' digests by path (with the stat they were read at) and each model's stamp as
# the last complete run had it (what units marked before stamps were kept were annotated with)
FILES_STATE = "state/annotate-model-files.json"


# ---- models --------------------------------------------------------------------------------
def model_name(name: str, spec: dict) -> str:
    """The `model` column: the file's folder in its repository (imgutils' model name)."""
    if name == "cascade_face":
        return spec["model"]
    file = Path(spec["file"])
    return file.parent.name or file.stem


def check_options(opts: dict) -> None:
    """ConfigError for a model name annotate does not know."""
    unknown = [n for n in opts["models"] if n not in KNOWN]
    if unknown:
        raise ConfigError(f"annotate.models: unknown models {unknown} (known: {', '.join(KNOWN)})")


def available_models(cfg: Config) -> tuple[dict[str, dict], list[str]]:
    """Specs of the configured models that can be loaded here, and a message per skipped one."""
    opts = cfg[JOB]
    check_options(opts)
    specs, skipped = {}, []
    for name in [n for n in KNOWN if n in opts["models"]]:  # pipeline order
        spec = {**opts[name], "models_dir": opts["models_dir"], "name": name}
        try:
            spec["input"], spec["files"] = model_input(name, spec)
        except ModelUnavailable as exc:
            skipped.append(f"{name}: skipped: {exc}")
            continue
        spec["model"] = model_name(name, spec)
        spec["identity"] = model_identity(name, spec, opts)
        specs[name] = spec
    check_model_names(specs)
    return specs, skipped


def check_model_names(specs: dict[str, dict]) -> None:
    """ConfigError for two models that would write the same `model` column (annotate.head set to
    the face model's file): their rows could not be told apart, each box counted twice."""
    seen: dict[str, str] = {}
    for name, spec in specs.items():
        if spec["model"] in seen:
            raise ConfigError(f"annotate.{seen[spec['model']]} and annotate.{name} both write model "
                              f"'{spec['model']}': give each its own model file")
        seen[spec["model"]] = name


# The options of each model that change its rows (the rest say how it runs: batch sizes, CPUs).
ROW_OPTIONS = {"cascade_face": ("path", "scale_factor", "min_neighbors", "min_size", "max_side"),
               "face": ("revision", "conf_threshold", "iou_threshold"),
               "head": ("revision", "conf_threshold", "iou_threshold"),
               "person": ("revision", "conf_threshold", "iou_threshold"),
               "ccip": ("revision", "size", "crop_padding", "max_crops"),
               "tagger": ("revision", "labels_revision", "score_floor")}
CROP_OPTIONS = ("crop_padding", "max_crops")  # CCIP's: they count only with the person detector


def model_identity(name: str, spec: dict, opts: dict) -> str:
    """What a unit's marker records as run: the model, and for the tagger what it tagged (person
    crops, 2x2 regions), so that turning those on or changing them reruns the units; then the
    options that change its rows where they are not the defaults (`@min_size=32`, and the decode's
    draft_size), so that changing them reruns it too. Models run with the defaults keep the
    identity they had before options were part of it, and the tagger with its own label file the
    identity it had before the label file was part of it. CCIP's crop options count only where
    the person detector is configured (as the tagger's crops): without it they cut nothing."""
    identity = spec["model"]
    if name == "tagger":
        crops = "person" in opts["models"] and bool(spec["person_crops"])
        cut = f"crops{opts['ccip']['max_crops']}x{opts['ccip']['crop_padding']}" if crops else "nocrops"
        regions = f"regions{spec['region_overlap']}" if spec["regions"] else "noregions"
        identity = f"{identity}+{cut}+{regions}"
    defaults = default_config()[JOB]
    options = ROW_OPTIONS[name]
    if name == "ccip" and "person" not in opts["models"]:  # no person boxes: no crops to cut
        options = tuple(key for key in options if key not in CROP_OPTIONS)
    changed = [f"{key}={spec[key]}" for key in options if spec[key] != defaults[name][key]]
    if name == "tagger" and not own_labels(spec):  # they name its scores: another file renames them
        changed.append(f"labels={spec['labels_repo']}/{spec['labels_file']}")
    if opts["draft_size"] != defaults["draft_size"]:
        changed.append(f"draft_size={opts['draft_size']}")
    return f"{identity}@{','.join(changed)}" if changed else identity


def own_labels(spec: dict) -> bool:
    """Whether the tagger reads its model's own label file: selected_tags.csv of the repository its
    model's folder names (deepghs' exports of SmilingWolf's taggers), or of the model's repository.
    Only another one is part of its identity: units tagged with the own file keep theirs."""
    return spec["labels_file"] == "selected_tags.csv" and spec["labels_repo"] in (posixpath.dirname(spec["file"]),
                                                                                   spec["repo"])


def model_input(name: str, spec: dict) -> tuple[list, list[str]]:
    """(kind, size) of the preprocessed input the model needs, and the local paths of the files
    it reads; resolves (downloads) them and checks that each reads as what it must be
    (ConfigError naming the file when not)."""
    if name == "cascade_face":
        path = cascade_path(spec)
        try:  # a file that is no cascade failed every actor in OpenCV, after Ray started
            load_cascade(path)
        except ValueError as exc:
            raise ConfigError(f"annotate.cascade_face: {exc}: set annotate.cascade_face.path to a cascade XML, "
                              'or "" for the bundled one') from None
        return ["gray", int(spec["max_side"])], [path]
    path = usable_file(name, spec, spec["repo"], spec["file"], spec["revision"])
    if name == "tagger":
        labels = usable_file(name, spec, spec["labels_repo"], spec["labels_file"], spec["labels_revision"])
        check_label_count(path, labels)
        return ["tagger", int(file_input_shape(path)[1])], [path, labels]
    if name == "ccip":
        check_ccip_size(path, int(spec["size"]))
        return ["ccip", int(spec["size"])], [path]
    side = optional_file(spec["repo"], posixpath.join(posixpath.dirname(spec["file"]), "model_type.json"),
                         spec["models_dir"], spec["revision"])
    if side:
        check_usable(name, spec, spec["repo"], side, "model_type")
    size, _ = detector_meta(path)
    return ["yolo", list(size)], [path, *([side] if side else [])]


def usable_file(name: str, spec: dict, repo: str, file: str, revision: str) -> str:
    """The local path of a model's file (model_file), checked usable."""
    path = model_file(repo, file, spec["models_dir"], revision)
    check_usable(name, spec, repo, path, kind_of(file, name))
    return path


def check_usable(name: str, spec: dict, repo: str, path: str, kind: str) -> None:
    """A 0-byte, cut or foreign model file (a failed copy or download) fails the job here, in one
    line naming it and the fix, not in Ray actors or the driver with a traceback naming none."""
    models_dir = spec["models_dir"]
    root = Path(models_dir) / repo if models_dir else None
    staged = root is not None and Path(path).is_relative_to(root)
    record = staged_record(models_dir, repo, Path(path).relative_to(root).as_posix()) if staged else None
    why = staged_problem(path, kind, record)
    if not why:
        return
    fix = (f"fetch it again with `booruset models fetch --set annotate.models_dir={models_dir}` "
           "(it replaces unusable files)" if staged
           else f"delete it and download it again (`hf download {repo} ... --force-download`), or stage the "
                "models with `booruset models fetch --set annotate.models_dir=DIR`")
    raise ConfigError(f"annotate.{name}: the model file {path} {why}: {fix}")


def check_label_count(model: str, labels: str) -> None:
    """The tagger's scores are read by position in its label file: a file of another length
    (another tagger's labels) would name every score wrongly, or fail every image."""
    outputs = file_output_shape(model)
    n_labels = len(load_labels(labels)[0])
    if len(outputs) == 2 and isinstance(outputs[1], int) and outputs[1] != n_labels:
        raise ConfigError(f"annotate.tagger: the model {model} scores {outputs[1]} labels but its label file "
                          f"{labels} has {n_labels}: set annotate.tagger.labels_repo / labels_file to the "
                          "model's own selected_tags.csv")


def check_ccip_size(model: str, size: int) -> None:
    """CCIP's inputs are cut to annotate.ccip.size: a file that fixes another side refused every
    image at run time (a model_failed errors row each)."""
    sides = file_input_shape(model)[2:]
    if any(isinstance(side, int) and side != size for side in sides):
        raise ConfigError(f"annotate.ccip: annotate.ccip.size is {size} but the model takes {sides[0]} x {sides[1]} "
                          f"pixels ({model}): set annotate.ccip.size to its side")


def model_stamps(ws: Workspace, specs: dict[str, dict]) -> dict[str, str]:
    """Set each model's `stamp`: a digest of the content of the files it reads, which a unit's
    marker records, so that a file replaced at its path (a newer main fetched over it, other
    weights) runs its model again, and the same file found elsewhere (a models_dir staged anew,
    the Hugging Face cache) does not. A file is read again only when its size, mtime or inode
    changed. Returns the stamps of the last complete run (changed_files)."""
    state = ws.read_json(FILES_STATE) or {}
    known = state.get("digests", {})
    digests = {path: file_digest(path, known.get(path)) for spec in specs.values() for path in spec["files"]}
    for spec in specs.values():
        joined = "\n".join(digests[path][-1] for path in spec["files"])
        spec["stamp"] = hashlib.sha256(joined.encode()).hexdigest()[:16]
    if any(known.get(path) != digest for path, digest in digests.items()):
        # the files of other folders are kept while they are there (models_dir switched back and
        # forth); a gone one goes (a `ray job submit` working dir holding the bundled cascade)
        kept = {path: digest for path, digest in known.items() if os.path.exists(path)}
        ws.write_json(FILES_STATE, {**state, "digests": {**kept, **digests}})
    return state.get("stamps", {})


def file_digest(path: str, known: list | None) -> list:
    """[size, mtime_ns, inode, sha256] of a file; `known` (the same list read before) when its
    stat has not changed: the tagger is hundreds of MB, on shared storage."""
    st = os.stat(path)
    seen = [st.st_size, st.st_mtime_ns, st.st_ino]
    if known and known[:3] == seen:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return [*seen, digest.hexdigest()]


def keep_stamps(ws: Workspace, specs: dict[str, dict], last: dict[str, str]) -> None:
    """After a complete run, every unit holds rows of each model's files as they are now: they
    become the stamps that units marked before stamps were kept count as annotated with."""
    stamps = {**last, **{name: spec["stamp"] for name, spec in specs.items()}}
    if stamps != last:
        ws.write_json(FILES_STATE, {**(ws.read_json(FILES_STATE) or {}), "stamps": stamps})


def changed_files(info: dict, specs: dict[str, dict], last: dict[str, str]) -> set[str]:
    """The models whose files are not those a unit (its marker `info`) was annotated with: by
    the stamps its marker records, else (marked before stamps were kept) the last complete
    run's. Neither known: unchanged, so that a workspace annotated before is not annotated again."""
    recorded = info.get("stamps", {})
    return {name for name, spec in specs.items() if recorded.get(name, last.get(name, spec["stamp"])) != spec["stamp"]}


def crops_changed(info: dict, specs: dict[str, dict]) -> set[str]:
    """{"ccip"} when CCIP would embed person crops on a unit (its marker `info`) and did not, or
    the other way round: the person detector put in or taken out of annotate.models since. CCIP's
    identity with the default crop options is the same either way (it predates them), so it does
    not say; the marker's `ccip_person_crops` does (one from before: crops where the person detector ran)."""
    if "ccip" not in specs or "ccip" not in info.get("pipeline", {}):
        return set()
    cut = info.get("ccip_person_crops", "person" in info["pipeline"])
    return {"ccip"} if cut != ("person" in specs) else set()


def input_column(spec: dict) -> str:
    kind, size = spec["input"]
    return f"in_{kind}_{size[0]}x{size[1]}" if kind == "yolo" else f"in_{kind}"


# ---- units ---------------------------------------------------------------------------------
def units_of(ws: Workspace) -> list[dict]:
    """One unit per ingest unit (a shard, or a folder chunk of about ingest.folder_unit_size),
    with its published `images` parts (one per ingest batch): its id says what it holds, so a
    changed folder chunk is a new unit (and the old one is retired). Its rows are the `images`
    its ingest marker counted: the driver reads the markers, no Parquet file (an ingest unit has
    a part per batch). An ingest stopped while it replaced an input's units left their markers
    retired and their parts published (its hold): they are the units they were, as the hold
    recorded them (held_units), so that their annotate units stay done and nothing moves until
    that input's ingest ends; a unit with a marker that is not retired is the marker's. Published
    parts that no marker claims (written before markers named their parts) are units of their
    own, counted from their footers."""
    published = set(ws.published()["tables"].get("images", []))
    markers = ws.done_units("ingest")
    units, claimed = [], set()
    for unit, info in sorted(markers.items()):
        parts = sorted(set(images_parts(unit, info)) & published)
        claimed.update(parts)
        if parts and info.get("images"):
            units.append({"unit": unit, "parts": parts, "rows": int(info["images"])})
    for unit, held in sorted(ws.held_units("ingest").items()):
        if unit in markers and not markers[unit].get("retired"):
            continue
        parts = sorted((set(held["parts"]) & published) - claimed)
        claimed.update(parts)
        if parts and held["images"]:
            units.append({"unit": unit, "parts": parts, "rows": int(held["images"])})
    for part in sorted(published - claimed):
        with ws.fs.open_input_file(f"{ws.table_dir('images')}/{part}.parquet") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        if rows:
            units.append({"unit": part, "parts": [part], "rows": rows})
    return units


# ---- the job -------------------------------------------------------------------------------
def run(cfg: Config, ws: Workspace) -> JobSummary:
    started = time.perf_counter()
    specs, skipped = available_models(cfg)
    if skipped:  # named now; each one's reason and fix is printed once, in the summary at the end
        names = ", ".join(line.split(":", 1)[0] for line in skipped)
        print(f"annotate: skipping {names}: model files not here (how to get them: the summary below)", flush=True)
    models = sorted(spec["identity"] for spec in specs.values())
    ws.begin_job()
    last = model_stamps(ws, specs)
    units = units_of(ws)
    current = {u["unit"] for u in units}
    markers = ws.done_units(JOB)
    done = {unit: info for unit, info in markers.items() if unit in current}
    # no model to run (none configured, or none whose files are here): no unit is run, and none
    # is done by having every model of an empty set
    pending = [u for u in units if specs and (not set(models) <= set(done.get(u["unit"], {}).get("models", []))
                                              or changed_files(done.get(u["unit"], {}), specs, last)
                                              or crops_changed(done.get(u["unit"], {}), specs))]
    run_specs = models_to_run(specs, pending, done, last)
    batches = finished_batches(ws, pending, {name: spec["identity"] for name, spec in run_specs.items()},
                               {name: spec["stamp"] for name, spec in run_specs.items()})
    resumed = sum(m["info"]["images"] for found in batches.values() for m in found)
    kept = plan_kept_rows(ws, [u for u in pending if u["unit"] not in markers],
                          {u: m for u, m in markers.items() if u not in current}, run_specs, last)
    reused = copy_kept(cfg, ws, kept, run_specs, batches)
    pending_ids = {u["unit"] for u in pending}
    done_before = sum(1 for u in units if u["unit"] in done and u["unit"] not in pending_ids)
    print(f"annotate: {len(units)} units, {done_before} done before, {len(pending)} to run"
          + (f" ({resumed} of their images finished by a killed run)" if resumed else "")
          + (f" ({reused} of their images annotated from the same bytes in replaced units: rows kept)"
             if reused else "")
          + f"; models: {', '.join(models) or 'none (nothing to run)'}"
          + (f" (running {', '.join(sorted(s['identity'] for s in run_specs.values()))}; the others' rows are kept)"
             if pending and len(run_specs) < len(specs) else ""), flush=True)
    summary = JobSummary(JOB, units_done=len(pending), units_skipped=done_before,
                         rows_run=sum(u["rows"] for u in pending) - resumed - reused if specs else 0)
    summary.notes.extend(f"annotate: {line}" for line in skipped)
    replaced = sorted(set().union(*(changed_files(done.get(u["unit"], {}), specs, last) for u in pending)))
    if replaced:  # else nothing says why units counted as done run again
        summary.notes.append(f"model files replaced since units were annotated: {', '.join(replaced)} "
                             "(run again on them)")
    if resumed:
        summary.notes.append(f"resumed: {resumed} images of unfinished units were finished by a killed run "
                             "(their batches kept, not redone)")
    if reused:
        summary.notes.append(f"kept: {reused} images of replaced units (a sidecar changed, an image added) have "
                             "the bytes they were annotated from: their rows are kept, no model ran on them")
    # after the copies, which read the parts of the units retired here (readers keep them until the end)
    retire_stale_units(ws, current)
    keep_records(cfg, ws, units, done)
    infos = [done[u["unit"]] for u in units if u["unit"] not in pending_ids and u["unit"] in done]
    if specs and pending_ids & set(done):
        # units run again (a model changed, one added) replace rows readers have: they keep seeing
        # the old ones, also after a kill, until every unit is written (release_hold below)
        ws.hold_publishing(JOB)
    run_now = Pipeline(cfg, ws, run_specs, done).run(pending, batches) if pending and specs else []
    infos += run_now
    _fill_summary(summary, infos, specs)
    summary.seconds = time.perf_counter() - started
    ws.release_hold(JOB)  # every planned unit is committed: the replaced rows may go
    ws.publish()
    keep_stamps(ws, specs, last)
    return summary


def models_to_run(specs: dict[str, dict], pending: list[dict], done: dict[str, dict],
                  last: dict[str, str]) -> dict[str, dict]:
    """The models to run on the pending units: those a unit's marker does not record as run with
    their identity (every model for a unit never annotated, or marked before markers named each
    model) or with their files (changed_files; `last`: the last complete run's stamps), and those
    they feed or read from: CCIP's and the tagger's person crops are cut from this run's person
    boxes. The other models' rows stay (Pipeline.commit keeps their parts): a changed detector
    threshold re-ran the tagger over the whole collection."""
    names = {name for u in pending for name, spec in specs.items()
             if done.get(u["unit"], {}).get("pipeline", {}).get(name) != spec["identity"]}
    names |= {name for u in pending for name in changed_files(done.get(u["unit"], {}), specs, last)}
    names |= {name for u in pending for name in crops_changed(done.get(u["unit"], {}), specs)}
    crops = {name for name in ("ccip", "tagger")
             if "person" in specs and name in specs and (name == "ccip" or specs[name]["person_crops"])}
    if "person" in names:
        names |= crops
    if names & crops:
        names.add("person")
    return {name: spec for name, spec in specs.items() if name in names}


# ---- rows kept from replaced units ---------------------------------------------------------
# the records of the images each committed unit was annotated from: see annotate_parts.write_record
def record_files(ws: Workspace) -> dict[str, str]:
    """{unit: path} of the units that have a record (those committed by a version without them have none)."""
    selector = pafs.FileSelector(record_dir(ws), allow_not_found=True)
    return {info.base_name[: -len(".parquet")]: info.path for info in ws.fs.get_file_info(selector)
            if info.is_file and info.base_name.endswith(".parquet")}


def keep_records(cfg: Config, ws: Workspace, units: list[dict], done: dict[str, dict]) -> None:
    """A record for each committed unit (a run killed between a unit's marker and its record, and
    units committed before records were kept, get theirs now, from their `images` rows, still the
    ones they were annotated from), written in Ray tasks; and none for any other."""
    have = record_files(ws)
    for unit in set(have) - set(done):
        ws.fs.delete_file(have[unit])
    missing = [{"unit": u["unit"], "parts": u["parts"]} for u in units if u["unit"] in done and u["unit"] not in have]
    if missing:
        init_ray(cfg)
        for _ in unit_tasks(write_record, missing, float(cfg[JOB]["task_num_cpus"]), workspace=ws.root):
            pass


def plan_kept_rows(ws: Workspace, new: list[dict], replaced: dict[str, dict], specs: dict[str, dict],
                   last: dict[str, str]) -> list[dict]:
    """For each new unit (never annotated), the replaced units (their markers no longer planned)
    that may hold rows of its images: those annotated with every model of this run (its identity
    and its files: changed_files, `last` the last complete run's stamps) whose record's keys
    meet the range of the new unit's keys. copy_kept_rows matches the images in a task: the
    driver reads Parquet footers (a key range each), no row, so that a unit replaced by each
    ingest unit (a new READER_VERSION, a folder chunked anew) costs it no memory per image, and
    each task reads the replaced units its keys can be in, not all of them. {unit, parts (its
    `images`), replaced: [{unit, record, errors (its parts), sources: [table, pipeline name,
    part]}], tag (its batch's: a task that Ray runs again writes the same)}"""
    records = record_files(ws)
    replaced = {unit: marker for unit, marker in sorted(replaced.items()) if "parts" in marker and unit in records
                and all(marker.get("pipeline", {}).get(name) == spec["identity"] for name, spec in specs.items())
                and not changed_files(marker, specs, last) and not crops_changed(marker, specs)
                # each part says its model (part_pipeline_name): one that did not would lose its rows
                and all(part.startswith(f"{JOB}-{unit}-") for names in marker["parts"].values() for part in names)}
    if not new or not replaced or not specs:
        return []
    images = {u["unit"]: [f"{ws.table_dir('images')}/{part}.parquet" for part in u["parts"]] for u in new}
    # footers read side by side (PartKeyRanges), each once
    bounds = ws.part_key_ranges.bounds([*(records[unit] for unit in replaced),
                                        *(path for paths in images.values() for path in paths)])
    pairs = meeting_ranges({unit: key_span([bounds[p] for p in paths]) for unit, paths in images.items()},
                           {unit: bounds[records[unit]] for unit in replaced})
    return [{"unit": u["unit"], "parts": u["parts"],
             "replaced": [kept_source(unit, replaced[unit], records[unit], specs) for unit in sorted(pairs[u["unit"]])],
             "tag": uuid.uuid4().hex[:16]}
            for u in new if pairs.get(u["unit"])]


def kept_source(unit: str, marker: dict, record: str, specs: dict[str, dict]) -> dict:
    """What copy_kept_rows reads of a replaced unit: its record, its errors parts (an image with an
    errors row, a file missing then or a model failing, is run again) and the parts of this run's models."""
    parts = marker["parts"]
    return {"unit": unit, "record": record, "errors": parts.get("errors", []),
            "sources": [[table, part_pipeline_name(part, unit), part] for table, names in sorted(parts.items())
                        if table != "errors" for part in names if part_pipeline_name(part, unit) in specs]}


def key_span(bounds: list[KeyBounds]) -> KeyBounds:
    """The key range of several parts: (None, None) where one's is not known."""
    if not bounds or any(low is None or high is None for low, high in bounds):
        return None, None
    return min(low for low, _ in bounds), max(high for _, high in bounds)


def meeting_ranges(first: dict[str, KeyBounds], second: dict[str, KeyBounds]) -> dict[str, list[str]]:
    """For each name of `first`, the names of `second` whose key range meets its own (a range not
    known meets every one). One sweep over the ranges in key order: each pair that meets is found
    once, and no pair that does not is looked at (10,000 units on each side: not 10^8 pairs)."""
    known = [{n: b for n, b in side.items() if None not in b} for side in (first, second)]
    unknown = [other for other in second if other not in known[1]]
    met = {name: list(unknown if name in known[0] else second) for name in first}
    # an event per range in the order of its lowest key; the ranges of the other side still open
    # at it (a highest key not below that key) are the ones it meets
    events = sorted((low, side, name, high) for side in (0, 1) for name, (low, high) in known[side].items())
    open_ranges: tuple[list, list] = ([], [])  # per side: heaps of (highest key, name)
    for low, side, name, high in events:
        others = open_ranges[1 - side]
        while others and others[0][0] < low:
            heapq.heappop(others)
        for _, other in others:
            met[name if side == 0 else other].append(other if side == 0 else name)
        heapq.heappush(open_ranges[side], (high, name))
    return met


def copy_kept(cfg: Config, ws: Workspace, kept: list[dict], specs: dict[str, dict],
              batches: dict[str, list[dict]]) -> int:
    """Run copy_kept_rows on each planned unit (plan_kept_rows); add each batch it writes to
    `batches`. The images whose rows were kept."""
    if not kept:
        return 0
    print(f"annotate: {len(kept)} new units may keep rows of the units they replace: matching their images",
          flush=True)
    init_ray(cfg)
    pipeline = {name: spec["identity"] for name, spec in specs.items()}
    stamps = {name: spec["stamp"] for name, spec in specs.items()}
    reused = 0
    for marker in unit_tasks(copy_kept_rows, kept, float(cfg[JOB]["task_num_cpus"]), workspace=ws.root,
                             pipeline=pipeline, stamps=stamps):
        if marker:
            batches.setdefault(marker.pop("unit"), []).append(marker)
            reused += marker["info"]["reused"]
    return reused


# Rows per writer batch at the least, unless annotate.write_batch_size is smaller (write_batch_rows)
MIN_WRITE_BATCH = 64


def write_batch_rows(write_batch_size: int, rows: int) -> int:
    """Rows per batch of the writer tasks: annotate.write_batch_size, or for a run of fewer than
    8 such batches an eighth of its rows (MIN_WRITE_BATCH at the least). The progress line counts
    the rows written: a run of 600 images with the models on a CPU said "0/600 images" for minutes,
    then 600, its rows all in one batch of 1,024."""
    return min(write_batch_size, max(MIN_WRITE_BATCH, rows // 8))


def retire_stale_units(ws: Workspace, current: set[str]) -> None:
    """Forget the markers of units no longer planned (ingest replaced them); the publish at the
    job's end drops their rows."""
    for unit in set(ws.done_units(JOB)) - current:
        ws.forget_unit(JOB, unit)


def finished_batches(ws: Workspace, pending: list[dict], pipeline: dict[str, str],
                     stamps: dict[str, str]) -> dict[str, list[dict]]:
    """The batch markers a killed run left for the pending units with this run's pipeline (model
    name -> identity) and model files (name -> stamp; markers written before stamps were kept
    have none), by unit. Other markers are dropped with their parts: those of a unit that is
    done or gone, those of a different set of models or files, and a second marker of the same
    images (a writer task that Ray retried after its worker died had written the first). The
    markers come without their keys (info["images"] counts them; the tasks that read a unit's
    images read its markers' keys): the driver holds one unit's keys at a time, not the run's."""
    kept: dict[str, list[dict]] = {}
    for unit, markers in ws.each_pending_batches(JOB, {u["unit"] for u in pending}):
        seen: set[str] = set()
        stale = {}
        for batch, marker in sorted(markers.items()):
            keys = marker.pop("keys", [])
            if marker.get("pipeline") != pipeline or marker.get("stamps", stamps) != stamps or seen.intersection(keys):
                stale[batch] = marker
            else:
                seen.update(keys)
                kept.setdefault(unit, []).append(marker)
        ws.drop_batches(JOB, unit, stale)
    return kept


def _fill_summary(summary: JobSummary, infos: list[dict], specs: dict[str, dict]) -> None:
    seconds: Counter = Counter()
    images: Counter = Counter()  # per model, the images of the units it ran on (not every model runs on each)
    providers: dict[str, set] = defaultdict(set)
    nodes: dict[str, set] = defaultdict(set)
    failed: Counter = Counter()  # per pipeline name: its model_failed rows, and the images it ran on
    ran: Counter = Counter()
    for info in infos:
        for name, counts in info.get("by_model", {}).items():
            failed[name] += counts.get("error_kinds", {}).get("model_failed", 0)
            ran[name] += info["images"] - info["dropped"]
        summary.rows_in += info["images"]
        summary.dropped += info["dropped"]
        summary.errors_by_kind.update(info["error_kinds"])
        for table in TABLES[:3]:
            summary.rows_out[table] = summary.rows_out.get(table, 0) + info["rows"].get(table, 0)
        seconds.update(info.get("model_seconds", {}))
        # the images this model's time was spent on: not those whose rows were kept from replaced units
        images.update({model: info["images"] - info.get("reused", 0) for model in info.get("model_seconds", {})})
        for model, provider in info.get("providers", {}).items():
            providers[model].add(provider)
        for model, ids in info.get("nodes", {}).items():
            nodes[model].update(ids)
    for model in sorted(providers):
        rate = images[model] / seconds[model] if seconds[model] else 0.0
        where = ", ".join(sorted(n[:12] for n in nodes[model] if n)) or "?"
        summary.notes.append(f"{model}: provider {', '.join(sorted(providers[model]))} on Ray node {where}; "
                             f"{rate:.1f} images/s of model time")
    for name in sorted(n for n in failed if failed[n]):
        summary.notes.append(f"{name}: failed on {failed[name]} of the {ran[name]} images it ran on (model_failed)")
        summary.failed_share = max(summary.failed_share, failed[name] / ran[name])


def part_pipeline_name(part: str, unit: str) -> str:
    """`face` of `annotate-<unit>-face-<random>` (pipeline names have no dash)."""
    return part[len(f"{JOB}-{unit}-"):].rsplit("-", 1)[0]


def wants_gpus(device: str) -> bool:
    """Whether model actors ask Ray for their num_gpus: always for device "cuda" (so that an
    autoscaling cluster starts GPU workers from zero), for "auto" when the cluster has GPUs now."""
    if device == "cuda":
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def cpu_shortfall(specs: dict[str, dict], opts: dict, have: float) -> str | None:
    """What annotate lacks, when the model pools and one of the CPU tasks (read, decode, crop,
    write) do not fit in `have` CPUs at once: the pools' actors start first, and when they hold
    every CPU no task ever runs and the job waits for good (ray.num_cpus = 1 with the default
    four pools). None when they fit."""
    pools = {name: int(spec["concurrency"]) * float(spec["num_cpus"]) for name, spec in specs.items()}
    # Ray counts CPU shares in 1/10,000: 3 x 0.2 + 0.3 + 0.1 is 1 (1.0000000000000002 in floats)
    needed = round(sum(pools.values()) + float(opts["task_num_cpus"]), 4)
    if needed <= have:
        return None
    detail = ", ".join(f"{name} {cpus:g}" for name, cpus in pools.items())
    return (f"annotate needs {needed:g} CPUs at once (model pools: {detail}; a CPU task: "
            f"annotate.task_num_cpus {float(opts['task_num_cpus']):g}) but Ray has {have:g}: lower "
            "annotate.<model>.num_cpus, .concurrency or annotate.task_num_cpus, or give Ray more (ray.num_cpus)")


def gpu_shortfall(specs: dict[str, dict], have: float) -> str | None:
    """What annotate lacks, when the model pools that ask for GPUs (wants_gpus) need more than Ray has:
    their actors are never started and the job waits for good (annotate.device = "cuda" on a machine
    whose Ray sees no GPU). None when they fit."""
    pools = {name: int(spec["concurrency"]) * float(spec.get("num_gpus", 0)) for name, spec in specs.items()}
    pools = {name: gpus for name, gpus in pools.items() if gpus}
    needed = round(sum(pools.values()), 4)  # Ray counts GPU shares in 1/10,000: 0.1 + ... + 0.4 is 1
    if needed <= have:
        return None
    detail = ", ".join(f"{name} {gpus:g}" for name, gpus in pools.items())
    return (f"annotate's model pools ask for {needed:g} GPUs ({detail}) but Ray has {have:g}: set annotate.device "
            'to "auto" or "cpu", or lower annotate.<model>.num_gpus or .concurrency')


def check_local_cpus(cfg: Config, specs: dict[str, dict]) -> None:
    """ConfigError, before any job of a `run`, when annotate's pools cannot fit in the local Ray
    the run will start (ray.num_cpus, else this machine's CPUs, which Ray's count never exceeds):
    it stopped the run only once annotate began, after ingest."""
    if not local_ray(cfg):
        return
    have = float(cfg["ray"]["num_cpus"] or os.cpu_count() or 1)
    if message := cpu_shortfall(specs, cfg[JOB], have):
        raise ConfigError(message)


class Pipeline:
    """The Ray Data pipeline of one annotate run and the per-unit commits in the driver."""

    def __init__(self, cfg: Config, ws: Workspace, specs: dict[str, dict], done: dict[str, dict]) -> None:
        self.cfg, self.ws, self.specs, self.done = cfg, ws, specs, done
        self.opts = cfg[JOB]
        self.records: list[ray.ObjectRef] = []  # the record tasks of the units committed (finish)

    def run(self, units: list[dict], batches: dict[str, list[dict]]) -> list[dict]:
        """Run the pipeline over the images no finished batch (`batches`: a killed run's markers
        by unit) holds; commit each unit when its batches and the writers hold all its rows, and
        wait for the units' records."""
        init_ray(self.cfg)
        self.record_task = ray.remote(num_cpus=float(self.opts["task_num_cpus"]))(write_record)
        done = self.commit_all(units, batches)
        ray.get(self.records)
        return done

    def commit_all(self, units: list[dict], batches: dict[str, list[dict]]) -> list[dict]:
        self.check_cpus()
        expected = {u["unit"]: u["rows"] for u in units}
        written: dict[str, int] = defaultdict(int)
        parts: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        infos: dict[str, dict] = defaultdict(dict)
        for unit, markers in batches.items():
            for marker in markers:
                written[unit] += marker["info"]["images"]  # its keys (the driver is given none)
                for table, names in marker["parts"].items():
                    parts[unit][table].update(names)
                infos[unit] = merge_infos(infos[unit], marker["info"])
        # a unit whose batches were all done (killed before its marker, or rows all kept) only needs the marker
        done = [self.finish(u, parts.pop(u["unit"], defaultdict(set)), infos.pop(u["unit"]))
                for u in units if written[u["unit"]] >= u["rows"]]
        units = [u for u in units if written[u["unit"]] < u["rows"]]
        if not units:
            return done
        by_id = {u["unit"]: u for u in units}
        with Progress(JOB, sum(expected[u["unit"]] - written[u["unit"]] for u in units), units=len(units)) as progress:
            for row in self.dataset(units).iter_rows():
                unit = row["unit"]
                written[unit] += row["rows"]
                for table, names in json.loads(row["parts"]).items():
                    parts[unit][table].update(names)
                infos[unit] = merge_infos(infos[unit], json.loads(row["info"]))
                progress.add(row["rows"])
                if written[unit] == expected[unit]:
                    # a unit whose rows wrote nothing (no detections, no errors) has no parts
                    done.append(self.finish(by_id[unit], parts.pop(unit, defaultdict(set)), infos.pop(unit)))
                    progress.add(units=1)
        return done

    def check_cpus(self) -> None:
        """The model pools and one of the CPU tasks must fit in Ray's CPUs (cpu_shortfall), and the
        pools that ask for GPUs in its GPUs (gpu_shortfall). A local Ray fails the job with the
        numbers; a cluster (which may add nodes) gets a warning."""
        resources = ray.cluster_resources()
        message = cpu_shortfall(self.specs, self.opts, float(resources.get("CPU", 0)))
        if message is None and wants_gpus(self.opts["device"]):
            message = gpu_shortfall(self.specs, float(resources.get("GPU", 0)))
        if message is None:
            return
        if not local_ray(self.cfg):
            print(f"warning: {message}", flush=True)
            return
        raise ConfigError(message)

    def _output_columns(self, name: str) -> list[str]:
        base = f"out_{name}"
        return [base, f"{base}_error", f"{base}_provider", f"{base}_node", f"{base}_seconds"]

    # ---- the dataset --------------------------------------------------------------------
    def dataset(self, units: list[dict]) -> ray.data.Dataset:
        opts, specs = self.opts, self.specs
        task_cpus = float(opts["task_num_cpus"])
        crop_inputs = self.crop_inputs()
        crops = bool(crop_inputs)
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.flat_map(read_unit_images, num_cpus=task_cpus,
                         fn_kwargs={"workspace": self.ws.root,
                                    "max_member_bytes": int(self.cfg["ingest"]["max_member_bytes"])})
        inputs = {input_column(s): s["input"] for s in specs.values()}
        tagger = specs.get("tagger")
        if tagger and tagger["regions"]:  # the 2x2 regions, cut from the same decode
            inputs["tagger_regions"] = ["regions", [tagger["input"][1], float(tagger["region_overlap"])]]
        ds = ds.map_batches(decode_images, batch_size=int(opts["decode_batch_size"]), num_cpus=task_cpus,
                            batch_format="numpy",
                            fn_kwargs={"inputs": inputs, "draft_size": int(opts["draft_size"]), "keep_data": crops})
        gpus = wants_gpus(opts["device"])
        for name in [n for n in DETECTORS if n in specs]:
            ds = self._pool(ds, name, CascadeFaceDetector if name == "cascade_face" else YoloDetector, gpus)
        if crops:
            ccip = opts["ccip"]  # the crop settings, also when only the tagger reads the crops
            ds = ds.map_batches(crop_persons, batch_size=int(opts["decode_batch_size"]), num_cpus=task_cpus,
                                batch_format="numpy",
                                fn_kwargs={"person_column": "out_person", "draft_size": int(opts["draft_size"]),
                                           "padding": float(ccip["crop_padding"]),
                                           "max_crops": int(ccip["max_crops"]), "inputs": crop_inputs})
        if "ccip" in specs:
            ds = self._pool(ds, "ccip", CcipFeatures, gpus)
        if "tagger" in specs:
            ds = self._pool(ds, "tagger", WdTagger, gpus)
        keep = ["unit", "key", "source", "member", "ok", "decode_error", "width", "height"]
        outputs = [c for name in specs for c in self._output_columns(name)]
        ds = ds.select_columns(keep + ["crop_boxes", "crop_error"] * bool(crops) + outputs)
        models = {n: s["model"] for n, s in specs.items()}
        pipeline = {n: s["identity"] for n, s in specs.items()}
        stamps = {n: s["stamp"] for n, s in specs.items()}
        batch_rows = write_batch_rows(int(opts["write_batch_size"]), sum(u["rows"] for u in units))
        return ds.map_batches(write_unit_parts, batch_size=batch_rows, num_cpus=task_cpus,
                              batch_format="numpy",
                              fn_kwargs={"workspace": self.ws.root, "models": models, "pipeline": pipeline,
                                         "stamps": stamps})

    def crop_inputs(self) -> dict[str, list]:
        """The person crop columns to cut (column -> [kind, size]): CCIP's, and the tagger's when
        it tags each person (annotate.tagger.person_crops); none without the person detector."""
        if "person" not in self.specs:
            return {}
        inputs = {}
        if "ccip" in self.specs:
            inputs["ccip_crops"] = ["ccip", int(self.specs["ccip"]["size"])]
        if "tagger" in self.specs and self.specs["tagger"]["person_crops"]:
            inputs["tagger_crops"] = self.specs["tagger"]["input"]
        return inputs

    def _pool(self, ds: ray.data.Dataset, name: str, udf: type, gpus: bool) -> ray.data.Dataset:
        """One actor pool for one model: sizes, batch and GPU share from the config."""
        spec = self.specs[name]
        num_gpus = float(spec.get("num_gpus", 0)) if gpus else 0.0
        order = list(self.specs)
        # detectors with the same input size share one input column: the last one drops it
        last = not any(input_column(self.specs[n]) == input_column(spec) for n in order[order.index(name) + 1 :])
        return ds.map_batches(
            udf,
            fn_constructor_kwargs={"spec": spec, "input": input_column(spec), "output": f"out_{name}",
                                   "device": self.opts["device"] if num_gpus or not gpus else "cpu",
                                   "drop_input": last},
            batch_size=int(spec["batch_size"]),
            compute=ray.data.ActorPoolStrategy(size=int(spec["concurrency"])),
            num_cpus=float(spec["num_cpus"]),
            num_gpus=num_gpus,
            batch_format="numpy",
        )

    # ---- commits ------------------------------------------------------------------------
    def finish(self, unit: dict, parts: dict[str, set[str]], info: dict) -> dict:
        """commit, then start the task that writes the unit's record of the images it was
        annotated from (a run killed before it ends leaves it to the next start's keep_records,
        from the same `images` rows): the driver reads no `images` row."""
        info = self.commit(unit["unit"], parts, info)
        self.records.append(self.record_task.remote({"unit": unit["unit"], "parts": unit["parts"]},
                                                    workspace=self.ws.root))
        return info

    def commit(self, unit: str, parts: dict[str, set[str]], info: dict) -> dict:
        """The unit's marker: its parts and counts, keeping the parts of models run on it before
        that this run did not run again (this run's replace theirs: a changed model's rows go)."""
        previous = self.done.get(unit, {})
        rerun = set(self.specs) | {"decode"}
        pipeline = {n: m for n, m in previous.get("pipeline", {}).items() if n not in rerun}
        pipeline |= {n: s["identity"] for n, s in self.specs.items()}
        info["pipeline"], info["models"] = pipeline, sorted(set(pipeline.values()))
        if "ccip" in self.specs:  # whether it embedded person crops (crops_changed): the person boxes ran with it
            info["ccip_person_crops"] = "person" in self.specs
        elif "ccip_person_crops" in previous:
            info["ccip_person_crops"] = previous["ccip_person_crops"]
        # the files each model's rows come from (a model kept from before keeps its stamp, or none)
        stamps = {n: m for n, m in previous.get("stamps", {}).items() if n not in rerun and n in pipeline}
        info["stamps"] = stamps | {n: s["stamp"] for n, s in self.specs.items()}
        for table, names in previous.get("parts", {}).items():
            parts[table].update(p for p in names if part_pipeline_name(p, unit) not in rerun)
        # and their counts (markers written before counts per model were kept have none to add)
        info["by_model"] = dict(info.get("by_model", {}))
        for name, counts in previous.get("by_model", {}).items():
            if name not in rerun and name in pipeline:
                info["by_model"][name] = counts
                info["rows"] = dict(Counter(info["rows"]) + Counter(counts["rows"]))
                info["error_kinds"] = dict(Counter(info["error_kinds"]) + Counter(counts["error_kinds"]))
        self.ws.commit_unit(JOB, unit, info, parts={t: sorted(p) for t, p in parts.items()})
        self.ws.forget_batches(JOB, unit)  # the unit marker names their parts now
        self.ws.publish_now_and_then()
        return info
