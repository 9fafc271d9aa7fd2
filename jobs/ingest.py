"""`booruset ingest`: WebDataset shards and image folders -> images, source_tags, source_text, errors."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import re
import time
from collections.abc import Iterator

import schemas
from jobs.config import SAMPLE_SHARDS, Config, ConfigError, default_config
from jobs.ray_env import Progress, RunningBatches, collect_units, init_ray, largest_first, unit_tasks
from jobs.summary import JobSummary
from store.workspace import INPUT_REGISTRY, Workspace, images_parts, unit_id, unit_parts
from udfs.ingest.clips import PILLOW_FORMAT
from udfs.ingest.ingest_unit import (
    JOB,
    READER_VERSION,
    ingest_units,
    kept_batches,
    limits_digest,
    options_fingerprint,
)
from udfs.ingest.sources import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Unit,
    assign_input_ids,
    discover_units,
    folder_member,
    input_location,
    resolve_inputs,
    split_folder_name,
)

MEDIA_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)


def input_specs(cfg: Config) -> list[str]:
    """The configured inputs; "" stands for the sample bundled with booruset."""
    specs = [s or str(SAMPLE_SHARDS) for s in cfg["ingest"]["inputs"]]
    if not specs:
        raise ConfigError("ingest.inputs is empty")
    return specs


REGISTRY = INPUT_REGISTRY  # input path -> input id, assigned once per workspace


def unit_key(unit: Unit) -> str:
    """A unit's id: where it is and what it held (a changed shard or folder chunk is a new unit)."""
    return unit_id(unit.prefix, unit.kind, unit.uri, unit.stamp, *unit.files[:1], *unit.files[-1:])


def check_inputs(cfg: Config) -> None:
    """ConfigError for an input that is not there, before a workspace is made for it."""
    try:
        resolve_inputs(input_specs(cfg))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:  # object storage refused or unreachable: said before a workspace is made
        raise ConfigError(f"cannot read the inputs: {exc}") from exc


def check_sample_alone(cfg: Config, ws: Workspace) -> None:
    """ConfigError when no input is given (ingest.inputs is "", the bundled sample) for a workspace
    that holds other inputs: `booruset run -w ws` after `booruset run -w ws -i ~/art` added the
    sample's 24 images to the user's dataset, its balance and its export."""
    if any(cfg["ingest"]["inputs"]):
        return
    sample = input_location(str(SAMPLE_SHARDS))
    others = sorted({i for location, i in (ws.read_json(REGISTRY) or {}).items() if location != sample})
    if others:
        raise ConfigError(f"no input given (-i): the bundled sample would join this workspace's inputs "
                          f"({', '.join(others)}; `booruset inputs` lists them): name what to ingest with -i, "
                          f"the sample too if it is wanted ({sample})")


def plan_units(cfg: Config, ws: Workspace) -> list[Unit]:
    """The units of the configured inputs, with input ids from the workspace's registry (new
    inputs get one, stored before any of their rows are written)."""
    opts = cfg["ingest"]
    try:
        paths = resolve_inputs(input_specs(cfg))
        registered = ws.read_json(REGISTRY) or {}
        ids = assign_input_ids(paths, registered)
        if ids != registered:
            ws.write_json(REGISTRY, ids)
        # a folder of a million files is minutes of listing before the first line: lines while it
        # runs, none at its end (most listings take a moment)
        with Progress("ingest: listing the inputs", what="files", end_line=False) as listing:
            return discover_units(paths, int(opts["folder_unit_size"]), ids, listing.add)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def run(cfg: Config, ws: Workspace) -> JobSummary:
    started = time.perf_counter()
    options = unit_options(cfg)
    units = read_with(plan_units(cfg, ws), options)
    ws.begin_job()
    markers = ws.done_units("ingest")
    done = {uid: info for uid, info in markers.items() if not info.get("retired")}
    units, reread, superseded = read_damaged_again(ws, units, markers)
    killed = "ingest" in ws.holds()  # a run that replaced units and did not end
    replaced, removed, provisional = retire_stale_units(ws, done, units, superseded)
    pending = [u for u in units if unit_key(u) not in done]
    # only units read again (a file put back, a shard written again), by this run or a killed
    # one, bring an image back: a run with nothing to do reads no removed rows
    back = forget_returned(ws, units) if pending or killed else {}
    resumed = finished_samples(ws, units, pending, options)
    print(f"ingest: {len(units)} units, {len(units) - len(pending)} done before, {len(pending)} to run"
          + (f" ({resumed} of their samples finished by a killed run)" if resumed else "")
          + (f"; {replaced} changed units replaced, {removed} images gone from the inputs" if replaced else "")
          # a rewritten shard's members still there are known only once it is read: said, not counted as gone
          + (f" (and up to {sum(provisional.values())} of {len(provisional)} rewritten shards, known once read)"
             if provisional else "")
          + (f"; {reread} units read again by a better reader" if reread else ""),
          flush=True)
    results = _run_units(cfg, ws, pending, options) if pending else []
    if pending:  # a rewritten shard's members read again are not removed
        back.update(forget_returned(ws, units))
    removed += sum(max(0, n - back.get(uid, 0)) for uid, n in provisional.items())
    summary = JobSummary("ingest", units_done=len(pending), units_skipped=len(units) - len(pending),
                         rows_run=sum(info["samples"] for info in results) - resumed)
    if still_removed := removed_rows(ws, units):  # the rows in the table, as every other kind's count
        summary.errors_by_kind["removed_from_input"] = still_removed
    for info in [done[unit_key(u)] for u in units if unit_key(u) in done] + results:
        summary.rows_in += info["samples"]
        summary.dropped += info["dropped"]
        summary.errors_by_kind.update(info["error_kinds"])
        for table in ("images", "clips", "frames"):
            summary.rows_out[table] = summary.rows_out.get(table, 0) + info.get(table, 0)
    summary.seconds = time.perf_counter() - started
    if resumed:
        summary.notes.append(f"resumed: {resumed} samples of unfinished units were finished by a killed run "
                             "(their rows kept, not read again)")
    if replaced:
        summary.notes.append(f"replaced: {replaced} units whose files changed; {removed} images are no longer in "
                             "the inputs (errors rows of kind removed_from_input)")
    if reread:
        summary.notes.append(f"read again: {reread} units whose damaged shards or images an earlier version "
                             "read with less recovered (their rows replaced)")
    out = summary.rows_out
    clips = f" + {out['clips']} clips ({out['frames']} frames)" if out.get("clips") else ""
    summary.notes.append(f"accounting: {out.get('images', 0) - out.get('frames', 0)} images{clips} + "
                         f"{summary.dropped} dropped samples = {summary.rows_in} samples seen")
    if not out.get("frames"):  # inputs without clips: the summary as before
        for table in ("clips", "frames"):
            out.pop(table, None)
    # every planned unit is committed: the replaced rows of the inputs it planned may go
    ws.release_hold("ingest", {u.input for u in units})
    ws.publish()
    return summary


def read_with(units: list[Unit], options: dict) -> list[Unit]:
    """The units, each stamped with the ingest limits it is read with when they are not the
    defaults: a unit read under other limits (max_tags, max_pixels, the frame rules...) is another
    unit, so that changing them reads every unit again (replacing its rows, as a changed shard's)
    and a run killed part way and done again with other limits ends as one run with them would.
    Units read with the defaults keep the keys they had before limits were part of them."""
    mark = limits_digest(options)
    if mark == limits_digest(unit_options(default_config())):
        return units
    return [dataclasses.replace(u, stamp=f"{u.stamp}|limits{mark}") for u in units]


SHARD_DAMAGE = frozenset({"corrupt_shard", "truncated_shard"})
# What each READER_VERSION reads better than the one before: error kind -> what its message says
# (None: any). A unit an older reader committed with such an error is read again
# (read_damaged_again), and only such a unit: a re-read unit is a new unit, annotated again.
READ_BETTER = {3: dict.fromkeys(SHARD_DAMAGE), 4: dict.fromkeys(SHARD_DAMAGE),
               5: {"corrupt_image": "image has wrong mode"},  # palette and 1-bit images, 512 px and up
               # a name with a literal \xNN and one with that byte had one key: now two. (A second
               # picture or a link named as one now counts as dropped: accounting only, and a
               # unit read again is annotated again, so those are not read again for it.)
               6: {"duplicate_member": None},
               # sidecars read better (gallery-dl's categories, cut UTF-8, code pages, hydrus's namespaces):
               # no unit is read again for them
               7: {}, 8: {}, 9: {}, 10: {},
               11: {},  # OS files (._NAME, .DS_Store) no samples: accounting only, as for 6
               12: {},  # a zero-byte video's row says empty_file: its kind only
               13: {},  # JSON sidecars read better (a lone tag_string, a row for none read): as for 7-10
               14: {}}  # escaped backslashes in tag lists read better: as for 7-10


def read_damaged_again(ws: Workspace, units: list[Unit], markers: dict[str, dict]
                       ) -> tuple[list[Unit], int, set[str]]:
    """The units to plan, with each unit in which an older reader (READER_VERSION) met errors a
    newer one reads better (READ_BETTER) planned again under a key of its own (its stamp +
    `|reader<version>`): the newer reader may recover members or images the older lost, and the
    unit replaces the old one as a changed shard does
    (retire_stale_units). The decision is read from the markers, retired ones included, so that
    a run killed after retiring the old unit plans the same key again. (units, shards read again,
    the keys of the units they replace)"""
    planned, reread, superseded = [], 0, set()
    for unit in units:
        keyed = [unit] + [_read_by(unit, version) for version in range(3, READER_VERSION + 1)]
        seen = [u for u in keyed if unit_key(u) in markers]
        if seen and _damaged_for_an_older_reader(ws, unit_key(seen[-1]), markers[unit_key(seen[-1])]):
            planned.append(keyed[-1])
            reread += 1
            superseded.add(unit_key(seen[-1]))
        else:
            planned.append(seen[-1] if seen else unit)
    return planned, reread, superseded


def _read_by(unit: Unit, version: int) -> Unit:
    return dataclasses.replace(unit, stamp=f"{unit.stamp}|reader{version}")


def _damaged_for_an_older_reader(ws: Workspace, uid: str, marker: dict) -> bool:
    """Whether a unit's marker says a reader older than READER_VERSION met errors that a newer
    one reads better (a marker without `reader`: before 3; a marker retired for a new read keeps
    `damaged_reader`). Where READ_BETTER names a message, the unit's errors rows are read to find
    it: a few rows, and only for units whose marker counts that kind."""
    if marker.get("retired"):
        return marker.get("damaged_reader", READER_VERSION) < READER_VERSION
    better: dict[str, str | None] = {}
    for version in range(marker.get("reader", 2) + 1, READER_VERSION + 1):
        better.update(READ_BETTER[version])
    kinds = set(better) & set(marker.get("error_kinds", {}))
    if not kinds or any(better[kind] is None for kind in kinds):
        return bool(kinds)
    return any(row["kind"] in kinds and better[row["kind"]] in (row["message"] or "")
               for part in unit_parts(uid, marker, "errors")
               for row in ws.read_part("errors", part, ["kind", "message"]))


def retire_stale_units(ws: Workspace, done: dict[str, dict], units: list[Unit], superseded: set[str] = frozenset()
                       ) -> tuple[int, int, dict[str, int]]:
    """Retire the committed units of the inputs being ingested that are no longer in the plan (a
    folder chunk that gained or lost a file, a rewritten or deleted shard): their rows go, and
    each image that is not planned again gets a `removed_from_input` errors row. So does every
    image of a shard still there but changed: which of its members it still holds is known only
    once it is read, and forget_returned then drops the rows of those it does (provisional).
    (units, images gone, {unit: its provisional rows})
    `superseded`: units whose shards a newer reader reads again (not counted; their retired
    markers say so, for read_damaged_again).

    A retired unit's marker is rewritten to name only its removed_from_input part, so dropping
    its rows and reporting them is one step for readers (at the next publish) and for a rerun."""
    current = {unit_key(u) for u in units}
    inputs = {u.input for u in units}
    stale = sorted(uid for uid, info in done.items() if info.get("input") in inputs and uid not in current)
    if not stale:
        return 0, 0, {}
    ws.hold_publishing("ingest", {done[uid].get("input") or "" for uid in stale})
    planned, shards = planned_keys(units)
    removed = rereads = 0
    provisional: dict[str, int] = {}
    for uid in stale:
        rows = [row for part in images_parts(uid, done[uid])
                for row in ws.read_part("images", part, ["key", "source", "member", "clip"])]
        # looked up in key order: the planned units' keys are built one unit after the other
        absent = {key for key in sorted({r.get("clip") or r["key"] for r in rows}) if key not in planned}
        gone = [{k: r[k] for k in ("key", "source", "member")} for r in rows if (r.get("clip") or r["key"]) in absent]
        ws.write_part("errors", f"removed-{uid}", [
            {**r, "stage": "ingest", "kind": "removed_from_input", "dropped": False,
             "message": "no longer in the input: its rows were removed"} for r in gone])
        maybe = sum(_under(r["key"], shards) for r in gone)
        removed += len(gone) - maybe
        if maybe:
            provisional[uid] = maybe
        retired = {"retired": True, "input": done[uid].get("input"), "removed": len(gone)}
        if uid in superseded:
            retired["damaged_reader"] = done[uid].get("reader", 2)
            rereads += 1
        ws.commit_unit("ingest", uid, retired, parts={"errors": [f"removed-{uid}"]})
        done.pop(uid)
    return len(stale) - rereads, removed, provisional


def planned_keys(units: list[Unit]) -> tuple[PlannedKeys, set[str]]:
    """(the keys of every planned folder image or video, as ingest names them; the key prefixes
    of the planned shards, whose images only a read of the shard tells). Not a folder's
    sidecars: an image removed beside its kept `.txt` is gone from the input too."""
    return PlannedKeys(units), {u.prefix for u in units if u.kind == "tar"}


def folder_keys(unit: Unit) -> Iterator[str]:
    """The keys of a folder unit's images and videos."""
    for file in unit.files:
        key, ext = split_folder_name(folder_member(unit.uri, file))
        if ext in MEDIA_EXTENSIONS:
            yield f"{unit.prefix}/{key}"


class PlannedKeys:
    """`key in planned`: whether a key is of a planned folder image or video. Holds each folder
    unit's lowest and highest key, and the keys of the few units last looked in: a set of every
    planned key held ~120 bytes an image in the driver (a million images: 120 MB) on every rerun
    that retired a unit. The rows checked come one retired unit at a time, of one old chunk: a
    few planned units hold them all."""

    def __init__(self, units: list[Unit]) -> None:
        self.units = [u for u in units if u.kind == "folder"]
        ranges = []
        for index, unit in enumerate(self.units):
            keys = folder_keys(unit)
            low = high = next(keys, None)
            for key in keys:
                low, high = min(low, key), max(high, key)
            if low is not None:
                ranges.append((low, high, index))
        ranges.sort()
        self.lows = [low for low, _, _ in ranges]
        self.ranges = ranges
        # the highest last key of the units up to each one: the walk back from a key stops below it
        self.reach = list(itertools.accumulate((high for _, high, _ in ranges), max))
        # a few units' keys: a retired unit's rows are of one old chunk, which met one or two new ones
        self.keys_of = functools.lru_cache(maxsize=8)(self.unit_keys)

    def __contains__(self, key: str) -> bool:
        i = bisect.bisect_right(self.lows, key) - 1
        while i >= 0 and self.reach[i] >= key:
            _, high, index = self.ranges[i]
            if high >= key and key in self.keys_of(index):
                return True
            i -= 1
        return False

    def unit_keys(self, index: int) -> frozenset[str]:
        return frozenset(folder_keys(self.units[index]))


def forget_returned(ws: Workspace, units: list[Unit]) -> dict[str, int]:
    """Drop the removed_from_input rows of the images that are in the inputs again (a file put
    back, a shard restored, the members a rewritten shard still holds): they said "no longer in
    the input" beside the image's new rows. A folder's image is back when it is planned; a
    shard's, when the committed unit of its shard has it (until then its row stays). Each retired
    unit's marker is rewritten to name a part without those rows (none when no row is left),
    after that part is written. {retired unit: rows dropped}"""
    markers = ws.done_units("ingest")
    inputs = {u.input for u in units}
    # a retired unit that reported no image (a folder chunk that gained a file) has none to drop:
    # without it, a growing folder computed every planned key twice a run to look at no row
    retired = {uid: m for uid, m in markers.items() if m.get("retired") and m.get("input") in inputs
               and m.get("parts", {}).get("errors") and m.get("removed") != 0}
    if not retired:
        return {}
    planned, shards = planned_keys(units)
    shard_units = {u.prefix: unit_key(u) for u in units if u.kind == "tar"}
    held: dict[str, set[str]] = {}  # shard prefix -> the keys of its committed unit's images (one unit's shards)

    def in_shard(prefix: str) -> set[str]:
        if prefix not in held:
            uid = shard_units[prefix]
            marker = markers.get(uid) or {"retired": True}
            held[prefix] = set() if marker.get("retired") else {
                row["key"] for part in images_parts(uid, marker) for row in ws.read_part("images", part, ["key"])}
        return held[prefix]

    def back(key: str) -> bool:
        parts = key.split("/")
        shard = next((p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p in shards), None)
        if shard is not None:
            return key in in_shard(shard)
        clip, _, last = key.rpartition("/")  # a frame's key: `<clip key>/f<index>`
        return key in planned or bool(re.fullmatch(r"f\d{6}", last) and clip in planned)

    dropped: dict[str, int] = {}
    for uid, marker in retired.items():
        # a retired unit's rows are of one shard: the keys of the shards read for the units before
        # it go, else the driver held every key of an input whose shards were all written again
        held.clear()
        rows = [row for part in marker["parts"]["errors"] for row in ws.read_part("errors", part, schemas.errors.names)]
        returned = {key for key in sorted({row["key"] for row in rows}) if back(key)}  # in key order: PlannedKeys
        kept = [row for row in rows if row["key"] not in returned]
        if len(kept) == len(rows):
            continue
        ws.hold_publishing("ingest", [marker.get("input") or ""])
        part = f"removed-{uid}-{len(kept)}-{unit_id(*(row['key'] for row in kept))}"
        if kept:
            ws.write_part("errors", part, kept)
        info = {k: v for k, v in marker.items() if k != "parts"} | {"removed": len(kept)}
        ws.commit_unit("ingest", uid, info, parts={"errors": [part]} if kept else {})
        dropped[uid] = len(rows) - len(kept)
    return dropped


def removed_rows(ws: Workspace, units: list[Unit]) -> int:
    """The removed_from_input rows of the planned inputs: what their retired units' markers
    count (a marker from before they did: the rows of its part)."""
    inputs = {u.input for u in units}
    return sum(marker["removed"] if "removed" in marker else
               sum(len(ws.read_part("errors", part, ["key"])) for part in marker.get("parts", {}).get("errors", []))
               for marker in ws.done_units("ingest").values()
               if marker.get("retired") and marker.get("input") in inputs)


def _under(key: str, prefixes: set[str]) -> bool:
    parts = key.split("/")
    return any("/".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def unit_options(cfg: Config) -> dict:
    """The [ingest] options the unit tasks use."""
    opts = cfg["ingest"]
    options = {k: int(opts[k]) for k in ("max_pixels", "max_member_bytes", "max_sidecar_bytes",
                                             "max_tag_chars", "max_tags", "max_text_chars")}
    options["batch_samples"] = max(1, int(opts["batch_samples"]))
    options["follow_links_out"] = bool(opts["follow_links_out"])
    options["frames"] = frame_options(opts["frames"])
    return options


def finished_samples(ws: Workspace, units: list[Unit], pending: list[Unit], options: dict) -> int:
    """The samples of pending units whose batches a killed run finished with these options, which
    their tasks keep. Batch markers of other units of the planned inputs (committed since, no
    longer there) are dropped with their parts; those of other inputs are left for their run."""
    inputs = {u.input for u in units}
    markers = ws.pending_batches(JOB, {unit_key(u) for u in pending}, lambda m: m.get("input") not in inputs)
    fingerprint = options_fingerprint(options)
    return sum(m["info"]["samples"] for found in markers.values() for m in kept_batches(found, fingerprint))


def _run_units(cfg: Config, ws: Workspace, units: list[Unit], options: dict) -> list[dict]:
    """The pending units in plain Ray tasks of ingest.shards_per_task units each, largest first.
    Not a Ray Data dataset: each task reads and writes its own units and returns a few counts,
    so there is nothing to stream between operators, and Ray Data's executor cost the driver
    0.2 s (warm) of CPU beside 2 busy workers (bench/ingest.py) for no gain (as export's tasks)."""
    init_ray(cfg)
    items = [{"unit": unit_key(u), "kind": u.kind, "uri": u.uri, "prefix": u.prefix, "files": u.files,
              "input": u.input} for u in largest_first(units, lambda unit: unit.size)]
    per_task = int(cfg["ingest"]["shards_per_task"])
    batches = (items[i:i + per_task] for i in range(0, len(items), per_task))
    infos = itertools.chain.from_iterable(unit_tasks(ingest_units, batches, 1.0, workspace=ws.root, options=options))
    progress = Progress("ingest", units=len(items), running=RunningBatches(ws, JOB))
    return collect_units(infos, progress, lambda info: info, ws.publish_now_and_then)


def frame_options(opts: dict) -> dict:
    """[ingest.frames], checked where the meaning lives."""
    if opts["format"] not in PILLOW_FORMAT:
        raise ConfigError(f"ingest.frames.format must be one of {', '.join(PILLOW_FORMAT)}, not {opts['format']!r}")
    if opts["max_side"] < opts["min_side"]:
        raise ConfigError("ingest.frames.max_side must be >= min_side")
    return dict(opts)
