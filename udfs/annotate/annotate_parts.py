"""The last step of annotate, in Ray tasks: model outputs -> Parquet parts of the unit's tables.

Each batch of pipeline rows is turned into detections, embeddings, tag_scores and errors rows
and written as parts named `annotate-<unit>-<pipeline name>-<random>`, then marked done by a
batch marker (Workspace.commit_batch); the task returns one small row per unit it saw (rows
done, parts written, counts). The driver only adds those up and writes a unit's marker once all
its rows are in: no image, vector or per-row result passes through it. copy_kept_rows writes the
same parts and batch marker for the images of a new unit whose rows a replaced unit has (the same
bytes, the same models), matched (the unit's images against the replaced units' records) and
copied from its parts in a task: no model runs on them, and the driver only pairs the units.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

import schemas
from store.workspace import Workspace

JOB = "annotate"
DETECTORS = ("cascade_face", "face", "head", "person")


def table_of(name: str) -> str:
    """The table a model (pipeline name) writes its rows to."""
    return {"ccip": "embeddings", "tagger": "tag_scores"}.get(name, "detections")


def write_unit_parts(batch: dict[str, Any], workspace: str, models: dict[str, str],
                     pipeline: dict[str, str], stamps: dict[str, str]) -> dict[str, list]:
    """map_batches UDF: write this batch's rows of each unit and mark the batch done (its
    parts, keys and counts: a killed run's next start skips those images); one summary row per
    unit. `models`: pipeline name -> `model` column value, in pipeline order; `pipeline`:
    pipeline name -> what the unit marker records as run, `stamps`: pipeline name -> its
    files' digest (a batch counts only for the same)."""
    ws = Workspace(workspace)
    out: dict[str, list] = {"unit": [], "rows": [], "parts": [], "info": []}
    by_unit: dict[str, list[dict]] = defaultdict(list)
    for i in range(len(batch["key"])):
        by_unit[str(batch["unit"][i])].append({c: batch[c][i] for c in batch})
    for unit, rows in by_unit.items():
        tables = UnitTables(models, rows)
        tag = uuid.uuid4().hex[:16]  # a new name per write: a published part is never overwritten
        parts: dict[str, list[str]] = defaultdict(list)
        for (table, name), part in tables.parts.items():
            if part:  # empty parts are not written: the marker lists what there is
                ws.write_part(table, f"{JOB}-{unit}-{name}-{tag}", part)
                parts[table].append(f"{JOB}-{unit}-{name}-{tag}")
        info = tables.info()
        ws.commit_batch(JOB, unit, tag, {"parts": parts, "info": info, "pipeline": pipeline, "stamps": stamps,
                                         "keys": [str(row["key"]) for row in rows]})
        out["unit"].append(unit)
        out["rows"].append(len(rows))
        out["parts"].append(json.dumps(parts))
        out["info"].append(json.dumps(info))
    return out


def copy_kept_rows(item: dict, workspace: str, pipeline: dict[str, str], stamps: dict[str, str]) -> dict | None:
    """Ray task: the rows of the images of a new unit (`parts`: its `images`) that a replaced unit
    (`replaced`, in the order a key of two is kept from the first) annotated from the same bytes
    (key and sha256 the same) with the same models and no errors row, and that no finished batch
    holds, written as the new unit's parts and marked done as one batch (so a killed run keeps
    them, and the models run on the unit's other images only). Reads one new unit and the
    replaced units its keys can be in: none of it passes through the driver. {unit, parts,
    info} of the batch marker; None where no image is kept (no batch)."""
    ws = Workspace(workspace)
    unit, tag = item["unit"], item["tag"]  # the driver's tag: a task Ray runs again writes the same batch
    keys = kept_keys(ws, item)
    if not keys:
        return None
    # each replaced unit's parts give the keys kept from it alone: a key two of them hold (each
    # with its rows) is copied once, from the one kept_keys chose
    sources: dict[tuple[str, str], list[tuple[str, list[str]]]] = defaultdict(list)
    for old in item["replaced"]:
        if old["unit"] in keys:
            for table, name, part in old["sources"]:
                sources[(table, name)].append((f"{ws.table_dir(table)}/{part}.parquet", keys[old["unit"]]))
    wanted = sorted(key for found in keys.values() for key in found)
    parts: dict[str, list[str]] = defaultdict(list)
    rows: Counter = Counter()
    by_model = {name: {"rows": {table_of(name): 0}, "error_kinds": {}} for name in pipeline}
    for (table, name), files in sorted(sources.items()):
        part = f"{JOB}-{unit}-{name}-{tag}"
        written = ws.write_part_batches(table, part, kept_batches(ws, table, files))
        if not written:  # as the writers: no empty part
            ws.delete_part(table, part)
            continue
        parts[table].append(part)
        rows[table] += written
        by_model[name]["rows"][table] = written
    info = {"images": len(wanted), "dropped": 0, "by_model": by_model, "error_kinds": {}, "rows": dict(rows),
            "providers": {}, "nodes": {}, "model_seconds": {}, "reused": len(wanted)}
    ws.commit_batch(JOB, unit, tag, {"parts": dict(parts), "info": info, "pipeline": pipeline, "stamps": stamps,
                                     "keys": wanted})
    return {"unit": unit, "parts": dict(parts), "info": info}


def kept_batches(ws: Workspace, table: str, files: list[tuple[str, list[str]]]) -> Iterator[pa.RecordBatch]:
    """The rows of each part (path, the keys kept from its unit) for those keys, a part at a time."""
    for path, keys in files:
        data = pds.dataset(path, schema=schemas.TABLES[table], filesystem=ws.fs, format="parquet")
        yield from data.to_batches(filter=pds.field("key").isin(keys))


# state/annotate/images/<unit>.parquet: the images (key, sha256) each committed unit was annotated
# from. ingest replaces a unit whose sidecars changed, or that gained an image, and drops its old
# `images` rows: this record is what tells which images of the new unit have bytes annotated before.
RECORD_SCHEMA = pa.schema([("key", pa.string()), ("sha256", pa.string())])


def record_dir(ws: Workspace) -> str:
    return f"{ws.state_dir(JOB)}/images"


def write_record(item: dict, workspace: str) -> None:
    """Ray task: the record of a committed unit (`parts`: its `images`), from its `images` rows.
    In a task, not the driver: a unit's rows are thousands, a run's a million (the driver
    only says which units are committed)."""
    ws = Workspace(workspace)
    rows = [row for part in item["parts"] for row in ws.read_part("images", part, ["key", "sha256"])]
    ws.write_parquet(f"{record_dir(ws)}/{item['unit']}.parquet", pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))


def kept_keys(ws: Workspace, item: dict) -> dict[str, list[str]]:
    """{replaced unit: the keys of the new unit's images whose rows it has}: see copy_kept_rows.
    In memory: the new unit's (key, sha256), and one replaced unit's record and errors keys at a time."""
    # the batches a killed run finished (finished_batches dropped those of other models or
    # files), but this task's own: a worker that died after writing it, this task run again
    finished = {key for batch, marker in ws.done_batches(JOB, item["unit"]).items() if batch != item["tag"]
                for key in marker["keys"]}
    images = {row["key"]: row["sha256"] for part in item["parts"]
              for row in ws.read_part("images", part, ["key", "sha256"]) if row["key"] not in finished}
    seen: set[str] = set()  # a key met in a replaced unit before: its bytes are those that count
    kept: dict[str, list[str]] = defaultdict(list)
    for old in item["replaced"]:
        failed = {row["key"] for part in old["errors"] for row in ws.read_part("errors", part, ["key"])}
        record = pq.read_table(old["record"], filesystem=ws.fs, columns=["key", "sha256"])
        for key, sha256 in zip(record["key"].to_pylist(), record["sha256"].to_pylist(), strict=True):
            if sha256 and key not in failed and key in images and key not in seen:
                seen.add(key)
                if images[key] == sha256:
                    kept[old["unit"]].append(key)
    return kept


def merge_infos(a: dict, b: dict) -> dict:
    """The info of two batches of one unit (counts add up; providers are the same)."""
    if not a:
        return b
    by_model = {name: {"rows": dict(Counter(a.get("by_model", {}).get(name, {}).get("rows", {}))
                                    + Counter(b.get("by_model", {}).get(name, {}).get("rows", {}))),
                       "error_kinds": dict(Counter(a.get("by_model", {}).get(name, {}).get("error_kinds", {}))
                                           + Counter(b.get("by_model", {}).get(name, {}).get("error_kinds", {})))}
                for name in {*a.get("by_model", {}), *b.get("by_model", {})}}
    return {"images": a["images"] + b["images"], "dropped": a["dropped"] + b["dropped"], "by_model": by_model,
            "error_kinds": dict(Counter(a["error_kinds"]) + Counter(b["error_kinds"])),
            "rows": dict(Counter(a["rows"]) + Counter(b["rows"])), "providers": {**a["providers"], **b["providers"]},
            "nodes": {m: sorted(set(a["nodes"].get(m, [])) | set(b["nodes"].get(m, [])))
                      for m in {*a["nodes"], *b["nodes"]}},
            "model_seconds": dict(Counter(a["model_seconds"]) + Counter(b["model_seconds"])),
            "reused": a.get("reused", 0) + b.get("reused", 0)}


class UnitTables:
    """The rows of one unit, per (table, model part), from the pipeline's output rows."""

    def __init__(self, models: dict[str, str], rows: list[dict]) -> None:
        self.models, self.rows = models, rows
        self.parts: dict[tuple[str, str], list[dict]] = {}
        for name in models:
            self.parts[(table_of(name), name)] = []
            self.parts[("errors", name)] = []
        self.parts[("errors", "decode")] = []
        self.providers: dict[str, str] = {}
        self.nodes: dict[str, set[str]] = defaultdict(set)
        self.seconds: Counter = Counter()
        for row in rows:
            self.add(row)

    def error(self, row: dict, part: str, stage: str, kind: str, message: str, dropped: bool) -> None:
        self.parts[("errors", part)].append({"key": str(row["key"]), "source": str(row["source"]),
                                             "member": str(row["member"]), "stage": stage, "kind": kind,
                                             "message": message, "dropped": dropped})

    def add(self, row: dict) -> None:
        if not row["ok"]:
            kind, message = json.loads(row["decode_error"])
            self.error(row, "decode", JOB, kind, message, dropped=True)
            return
        if row.get("crop_error"):
            # in the person detector's part: crops are cut whenever it runs, and a unit run again
            # without it keeps its part with the crops' (missing) rows; the decode part is always replaced
            part = "person" if "person" in self.models else "decode"
            self.error(row, part, JOB, "crop_failed", str(row["crop_error"]), dropped=False)
        for name, model in self.models.items():
            out = f"out_{name}"
            self.providers[model] = str(row[f"{out}_provider"])
            self.nodes[model].add(str(row[f"{out}_node"]))
            self.seconds[model] += float(row[f"{out}_seconds"])
            if row[f"{out}_error"]:
                self.error(row, name, f"{JOB}:{model}", "model_failed", str(row[f"{out}_error"]), False)
                continue
            getattr(self, f"add_{'detections' if name in DETECTORS else name}")(row, name, model)

    def add_detections(self, row: dict, name: str, model: str) -> None:
        w, h = (1.0, 1.0) if name == "cascade_face" else (float(row["width"]), float(row["height"]))
        for index, (x0, y0, x1, y1, label, score) in enumerate(json.loads(row[f"out_{name}"])):
            self.parts[("detections", name)].append(
                {"key": str(row["key"]), "model": model, "index": index, "label": label, "score": score,
                 "x0": x0 / w, "y0": y0 / h, "x1": x1 / w, "y1": y1 / h})

    def add_ccip(self, row: dict, name: str, model: str) -> None:
        vectors = np.frombuffer(row["out_ccip"], np.float32).reshape(-1, schemas.CCIP_DIM)
        w, h = float(row["width"]), float(row["height"])
        boxes = [[schemas.WHOLE_IMAGE, 0, 0, w, h]] + json.loads(row.get("crop_boxes") or "[]")
        for (crop, x0, y0, x1, y1), vector in zip(boxes, vectors, strict=True):
            self.parts[("embeddings", name)].append(
                {"key": str(row["key"]), "crop": crop, "model": model, "x0": x0 / w, "y0": y0 / h,
                 "x1": x1 / w, "y1": y1 / h, "vector": vector})  # pyarrow takes the array as is

    def add_tagger(self, row: dict, name: str, model: str) -> None:
        for crop, tags in json.loads(row["out_tagger"]):
            for tag, category, score in tags:
                self.parts[("tag_scores", name)].append(
                    {"key": str(row["key"]), "crop": crop, "tag": tag, "category": category, "score": score,
                     "model": model})

    def info(self) -> dict:
        errors = [e for (table, _), rows in self.parts.items() if table == "errors" for e in rows]
        rows: Counter = Counter()
        # the same per model (pipeline name): a unit run again with some of its models keeps the
        # others' parts, and its marker's counts must keep theirs too (Pipeline.commit)
        by_model: dict[str, dict] = defaultdict(lambda: {"rows": {}, "error_kinds": {}})
        for (table, name), part in self.parts.items():
            if table != "errors":
                rows[table] += len(part)
                by_model[name]["rows"][table] = len(part)
            elif name != "decode":
                by_model[name]["error_kinds"] = dict(Counter(e["kind"] for e in part))
        return {"images": len(self.rows), "dropped": sum(e["dropped"] for e in errors), "by_model": dict(by_model),
                "error_kinds": dict(Counter(e["kind"] for e in errors)), "rows": dict(rows),
                "providers": self.providers, "nodes": {m: sorted(n) for m, n in self.nodes.items()},
                "model_seconds": dict(self.seconds)}
