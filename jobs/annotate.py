"""`booruset annotate`: images (+ their bytes from the inputs) -> detections, embeddings, tag_scores.

Ray Data pipeline: units (one per source) -> rows with image bytes (CPU tasks) -> decode and
per-model preprocessing (CPU tasks, draft mode) -> one actor pool per model (GPU when the
cluster has one) -> the driver gathers each unit's rows and commits the unit. A unit's parts
are named after the unit and the model, so a killed and restarted run rewrites the same
files and ends with the same rows; a unit counts as done once its state marker lists every
model of the run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

import schemas
from jobs.config import Config, ConfigError
from jobs.ray_env import Progress, init_ray
from jobs.summary import JobSummary
from jobs.workspace import Workspace, unit_id
from udfs.annotate_rows import crop_persons, decode_images, read_unit_images
from udfs.cascade_face import CascadeFaceDetector, cascade_path
from udfs.ccip import CcipFeatures
from udfs.model_files import ModelUnavailable, model_file
from udfs.onnx_session import file_input_shape
from udfs.wd_tagger import WdTagger
from udfs.yolo_detector import YoloDetector, detector_meta

JOB = "annotate"
TABLES = ("detections", "embeddings", "tag_scores", "errors")
DETECTORS = ("cascade_face", "face", "head", "person")
KNOWN = (*DETECTORS, "ccip", "tagger")


# ---- models --------------------------------------------------------------------------------
def model_name(name: str, spec: dict) -> str:
    """The `model` column: the file's folder in its repository (imgutils' model name)."""
    if name == "cascade_face":
        return spec["model"]
    file = Path(spec["file"])
    return file.parent.name or file.stem


def available_models(cfg: Config) -> tuple[dict[str, dict], list[str]]:
    """Specs of the configured models that can be loaded here, and a message per skipped one."""
    opts = cfg[JOB]
    specs, skipped = {}, []
    unknown = [n for n in opts["models"] if n not in KNOWN]
    if unknown:
        raise ConfigError(f"annotate.models: unknown models {unknown} (known: {', '.join(KNOWN)})")
    for name in [n for n in KNOWN if n in opts["models"]]:  # pipeline order
        spec = {**opts[name], "models_dir": opts["models_dir"], "name": name}
        try:
            spec["input"] = model_input(name, spec)
        except ModelUnavailable as exc:
            skipped.append(f"{name}: skipped: {exc}")
            continue
        spec["model"] = model_name(name, spec)
        specs[name] = spec
    return specs, skipped


def model_input(name: str, spec: dict) -> list:
    """(kind, size) of the preprocessed input the model needs; resolves (downloads) its files."""
    if name == "cascade_face":
        cascade_path(spec)
        return ["gray", int(spec["max_side"])]
    path = model_file(spec["repo"], spec["file"], spec["models_dir"])
    if name == "tagger":
        model_file(spec["labels_repo"], spec["labels_file"], spec["models_dir"])
        return ["tagger", int(file_input_shape(path)[1])]
    if name == "ccip":
        return ["ccip", int(spec["size"])]
    size, _ = detector_meta(path)
    return ["yolo", list(size)]


def input_column(spec: dict) -> str:
    kind, size = spec["input"]
    return f"in_{kind}_{size[0]}x{size[1]}" if kind == "yolo" else f"in_{kind}"


# ---- units ---------------------------------------------------------------------------------
def units_of(ws: Workspace) -> list[dict]:
    """One unit per source of `images`, members sorted by key; its id says what it holds (a
    folder that grew is a new unit, and the old one is retired)."""
    by_source: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in ws.part_files("images"):
        part = pq.read_table(path, columns=["key", "source", "member"], filesystem=ws.fs)
        for key, source, member in zip(*(part[c].to_pylist() for c in ("key", "source", "member")), strict=True):
            by_source[source].append((key, member))
    units = []
    for source in sorted(by_source):
        rows = sorted(by_source[source])
        kind = "tar" if source.endswith(".tar") else "folder"
        stamp = hashlib.sha1("\x00".join(k + "\x00" + m for k, m in rows).encode("utf-8", "surrogateescape"))
        units.append({"unit": unit_id(source, stamp.hexdigest()), "source": source, "kind": kind,
                      "keys": [k for k, _ in rows], "members": [m for _, m in rows]})
    return units


# ---- the job -------------------------------------------------------------------------------
def run(cfg: Config, ws: Workspace) -> JobSummary:
    started = time.perf_counter()
    specs, skipped = available_models(cfg)
    if skipped:  # named now; each one's reason and fix is printed once, in the summary at the end
        names = ", ".join(line.split(":", 1)[0] for line in skipped)
        print(f"annotate: skipping {names}: model files not here (how to get them: the summary below)", flush=True)
    models = sorted(spec["model"] for spec in specs.values())
    ws.begin_job()
    units = units_of(ws)
    done = retire_stale_units(ws, {u["unit"] for u in units})
    pending = [u for u in units if not set(models) <= set(done.get(u["unit"], {}).get("models", []))]
    print(f"annotate: {len(units)} units, {len(units) - len(pending)} done before, {len(pending)} to run; "
          f"models: {', '.join(models) or 'none'}", flush=True)
    summary = JobSummary(JOB, units_done=len(pending), units_skipped=len(units) - len(pending))
    summary.notes.extend(f"annotate: {line}" for line in skipped)
    pending_ids = {u["unit"] for u in pending}
    infos = [done[u["unit"]] for u in units if u["unit"] not in pending_ids]
    if pending and specs:
        infos += Pipeline(cfg, ws, specs, done).run(pending)
    _fill_summary(summary, infos, specs)
    summary.seconds = time.perf_counter() - started
    ws.publish()
    return summary


def retire_stale_units(ws: Workspace, current: set[str]) -> dict[str, dict]:
    """Forget the markers of units no longer planned (their images changed); the next publish
    drops their rows. The markers of current units."""
    done = ws.done_units(JOB)
    for unit in set(done) - current:
        ws.forget_unit(JOB, unit)
    return {unit: info for unit, info in done.items() if unit in current}


def _fill_summary(summary: JobSummary, infos: list[dict], specs: dict[str, dict]) -> None:
    seconds: Counter = Counter()
    providers: dict[str, set] = defaultdict(set)
    for info in infos:
        summary.rows_in += info["images"]
        summary.dropped += info["dropped"]
        summary.errors_by_kind.update(info["error_kinds"])
        for table in TABLES[:3]:
            summary.rows_out[table] = summary.rows_out.get(table, 0) + info["rows"].get(table, 0)
        seconds.update(info.get("model_seconds", {}))
        for model, provider in info.get("providers", {}).items():
            providers[model].add(provider)
    for model in sorted(providers):
        rate = summary.rows_in / seconds[model] if seconds[model] else 0.0
        summary.notes.append(f"{model}: provider {', '.join(sorted(providers[model]))}; "
                             f"{rate:.1f} images/s of model time")


class Pipeline:
    """The Ray Data pipeline of one annotate run and the per-unit commits in the driver."""

    def __init__(self, cfg: Config, ws: Workspace, specs: dict[str, dict], done: dict[str, dict]) -> None:
        self.cfg, self.ws, self.specs, self.done = cfg, ws, specs, done
        self.opts = cfg[JOB]

    def run(self, units: list[dict]) -> list[dict]:
        init_ray(self.cfg)
        expected = {u["unit"]: len(u["keys"]) for u in units}
        gathered: dict[str, list[dict]] = defaultdict(list)
        infos = []
        keep = ["unit", "key", "source", "member", "ok", "decode_error", "width", "height"]
        outputs = [c for name in self.specs for c in self._output_columns(name)]
        with Progress(JOB, sum(expected.values()), units=len(units)) as progress:
            for batch in self.dataset(units).iter_batches(batch_format="numpy", batch_size=64):
                for i in range(len(batch["key"])):
                    row = {c: batch[c][i] for c in keep + outputs if c in batch}
                    unit = str(row["unit"])
                    gathered[unit].append(row)
                    if len(gathered[unit]) == expected[unit]:
                        infos.append(self.commit(unit, gathered.pop(unit)))
                        progress.add(units=1)
                progress.add(len(batch["key"]))
        return infos

    def _output_columns(self, name: str) -> list[str]:
        base = f"out_{name}"
        cols = [base, f"{base}_error", f"{base}_provider", f"{base}_seconds"]
        return cols + (["ccip_crop_boxes"] if name == "ccip" else [])

    # ---- the dataset --------------------------------------------------------------------
    def dataset(self, units: list[dict]) -> ray.data.Dataset:
        opts, specs = self.opts, self.specs
        task_cpus = float(opts["task_num_cpus"])
        crops = "ccip" in specs and "person" in specs
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.flat_map(read_unit_images, fn_kwargs={"max_member_bytes": int(self.cfg["ingest"]["max_member_bytes"])},
                         num_cpus=task_cpus)
        inputs = {input_column(s): s["input"] for s in specs.values()}
        ds = ds.map_batches(decode_images, batch_size=int(opts["decode_batch_size"]), num_cpus=task_cpus,
                            batch_format="numpy",
                            fn_kwargs={"inputs": inputs, "draft_size": int(opts["draft_size"]), "keep_data": crops})
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        for name in [n for n in DETECTORS if n in specs]:
            ds = self._pool(ds, name, CascadeFaceDetector if name == "cascade_face" else YoloDetector, gpus)
        if crops:
            ccip = specs["ccip"]
            ds = ds.map_batches(crop_persons, batch_size=int(opts["decode_batch_size"]), num_cpus=task_cpus,
                                batch_format="numpy",
                                fn_kwargs={"person_column": "out_person", "draft_size": int(opts["draft_size"]),
                                           "padding": float(ccip["crop_padding"]),
                                           "max_crops": int(ccip["max_crops"]), "size": int(ccip["size"])})
        if "ccip" in specs:
            ds = self._pool(ds, "ccip", CcipFeatures, gpus)
        if "tagger" in specs:
            ds = self._pool(ds, "tagger", WdTagger, gpus)
        return ds

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
    def commit(self, unit: str, rows: list[dict]) -> dict:
        """Write the unit's parts (one per model) and its state marker."""
        rows.sort(key=lambda r: str(r["key"]))
        tables = UnitTables(self.specs, rows)
        parts = defaultdict(set)
        for (table, name), part in tables.parts.items():
            self.ws.write_part(table, f"{JOB}-{unit}-{name}", part)
            parts[table].add(f"{JOB}-{unit}-{name}")
        info = tables.info()
        previous = self.done.get(unit, {})
        info["models"] = sorted(set(previous.get("models", [])) | {s["model"] for s in self.specs.values()})
        for table, names in previous.get("parts", {}).items():  # parts of models run before stay
            parts[table].update(names)
        self.ws.commit_unit(JOB, unit, info, parts={t: sorted(p) for t, p in parts.items()})
        self.ws.publish_now_and_then()
        return info


class UnitTables:
    """The rows of one unit, per (table, model part), from the pipeline's output rows."""

    def __init__(self, specs: dict[str, dict], rows: list[dict]) -> None:
        self.specs, self.rows = specs, rows
        self.parts: dict[tuple[str, str], list[dict]] = {}
        for name in specs:
            table = {"ccip": "embeddings", "tagger": "tag_scores"}.get(name, "detections")
            self.parts[(table, name)] = []
            self.parts[("errors", name)] = []
        self.parts[("errors", "decode")] = []
        self.providers: dict[str, str] = {}
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
        for name, spec in self.specs.items():
            out = f"out_{name}"
            self.providers[spec["model"]] = str(row[f"{out}_provider"])
            self.seconds[spec["model"]] += float(row[f"{out}_seconds"])
            if row[f"{out}_error"]:
                self.error(row, name, f"{JOB}:{spec['model']}", "model_failed", str(row[f"{out}_error"]), False)
                continue
            getattr(self, f"add_{'detections' if name in DETECTORS else name}")(row, name, spec)

    def add_detections(self, row: dict, name: str, spec: dict) -> None:
        w, h = (1.0, 1.0) if name == "cascade_face" else (float(row["width"]), float(row["height"]))
        for x0, y0, x1, y1, label, score in json.loads(row[f"out_{name}"]):
            self.parts[("detections", name)].append(
                {"key": str(row["key"]), "model": spec["model"], "label": label, "score": score,
                 "x0": x0 / w, "y0": y0 / h, "x1": x1 / w, "y1": y1 / h})

    def add_ccip(self, row: dict, name: str, spec: dict) -> None:
        vectors = np.frombuffer(row["out_ccip"], np.float32).reshape(-1, schemas.CCIP_DIM)
        w, h = float(row["width"]), float(row["height"])
        boxes = [[schemas.WHOLE_IMAGE, 0, 0, w, h]] + json.loads(row.get("ccip_crop_boxes") or "[]")
        for (crop, x0, y0, x1, y1), vector in zip(boxes, vectors, strict=True):
            self.parts[("embeddings", name)].append(
                {"key": str(row["key"]), "crop": crop, "model": spec["model"], "x0": x0 / w, "y0": y0 / h,
                 "x1": x1 / w, "y1": y1 / h, "vector": vector.tolist()})

    def add_tagger(self, row: dict, name: str, spec: dict) -> None:
        for tag, category, score in json.loads(row["out_tagger"]):
            self.parts[("tag_scores", name)].append(
                {"key": str(row["key"]), "tag": tag, "category": category, "score": score, "model": spec["model"]})

    def info(self) -> dict:
        errors = [e for (table, _), rows in self.parts.items() if table == "errors" for e in rows]
        rows: Counter = Counter()
        for (table, _), part in self.parts.items():
            if table != "errors":
                rows[table] += len(part)
        return {"images": len(self.rows), "dropped": sum(e["dropped"] for e in errors),
                "error_kinds": dict(Counter(e["kind"] for e in errors)), "rows": dict(rows),
                "providers": self.providers, "model_seconds": dict(self.seconds)}
