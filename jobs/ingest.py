"""`booruset ingest`: WebDataset shards and image folders -> images, source_tags, source_text, errors."""

from __future__ import annotations

import json
import time

import ray

from jobs.config import SAMPLE_SHARDS, Config, ConfigError
from jobs.ray_env import Progress, collect_units, init_ray
from jobs.summary import JobSummary
from jobs.workspace import Workspace, unit_id
from udfs.ingest_unit import ingest_units
from udfs.sources import Unit, discover_units


def input_specs(cfg: Config) -> list[str]:
    """The configured inputs; "" stands for the sample bundled with booruset."""
    specs = [s or str(SAMPLE_SHARDS) for s in cfg["ingest"]["inputs"]]
    if not specs:
        raise ConfigError("ingest.inputs is empty")
    return specs


def unit_key(unit: Unit) -> str:
    return unit_id(unit.prefix, unit.kind, unit.uri, *unit.files[:1], *unit.files[-1:])


def run(cfg: Config, ws: Workspace) -> JobSummary:
    started = time.perf_counter()
    opts = cfg["ingest"]
    try:
        units = discover_units(input_specs(cfg), int(opts["folder_unit_size"]))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    done = ws.done_units("ingest")
    pending = [u for u in units if unit_key(u) not in done]
    print(f"ingest: {len(units)} units, {len(units) - len(pending)} done before, {len(pending)} to run", flush=True)
    results = _run_units(cfg, ws, pending) if pending else []
    summary = JobSummary("ingest", units_done=len(pending), units_skipped=len(units) - len(pending))
    for info in [done[unit_key(u)] for u in units if unit_key(u) in done] + results:
        summary.rows_in += info["samples"]
        summary.dropped += info["dropped"]
        summary.errors_by_kind.update(info["error_kinds"])
        summary.rows_out["images"] = summary.rows_out.get("images", 0) + info["images"]
    summary.seconds = time.perf_counter() - started
    summary.notes.append(
        f"accounting: {summary.rows_out.get('images', 0)} images + {summary.dropped} dropped samples"
        f" = {summary.rows_in} samples seen"
    )
    ws.refresh_catalog()
    return summary


def _run_units(cfg: Config, ws: Workspace, units: list[Unit]) -> list[dict]:
    init_ray(cfg)
    opts = cfg["ingest"]
    items = [{"unit": unit_key(u), "kind": u.kind, "uri": u.uri, "prefix": u.prefix, "files": u.files}
             for u in units]
    options = {k: int(opts[k]) for k in ("max_pixels", "max_member_bytes", "max_sidecar_bytes")}
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ingest_units,
        batch_size=int(opts["shards_per_task"]),
        fn_kwargs={"workspace": ws.root, "options": options},
    )
    return collect_units(ds.iter_rows(), Progress("ingest", units=len(items)), _info_of)


def _info_of(row: dict) -> dict:
    done = {k: row[k] for k in ("samples", "images", "errors", "bytes", "seconds")}
    done["error_kinds"] = json.loads(row["error_kinds"])
    done["dropped"] = done["samples"] - done["images"]
    return done
