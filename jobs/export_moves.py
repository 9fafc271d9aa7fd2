"""Export units that moved: a unit done before (the same images, the same plan) now planned at
other shard numbers, because a unit before it gained or lost a shard. Shards are numbered in
export order from 0, so one image added to (or left out of) an early unit moved every later
unit, and each was exported again: its images read and re-encoded, hours for a large resized
export. A moved unit's shards and Parquet files are renamed instead, and its manifest rows
rewritten; the tar and Parquet bytes do not name their shard.

A kill at any point leaves a state the next run repairs by exporting the unit again, as it
would any unit a killed run started: its marker is forgotten before the first rename, and a
record in state/export/started/ names the files the move may have left (jobs/export.remove_unfinished
deletes them, sweep_temp_files the temporary names).
"""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import Config
from jobs.ray_env import run_in_worker
from store.workspace import Workspace, fault_point
from udfs.export.export_shard import JOB, STARTED, parquet_name, shard_name

NUMBERED = re.compile(r"^(webdataset/shard|parquet/train)-(\d{6})\.(tar|parquet)$")
NAMERS = {"webdataset/shard": shard_name, "parquet/train": parquet_name}


def move_units(cfg: Config, ws: Workspace, out: str, units: list[dict], done: dict[str, dict]) -> list[str]:
    """Rename the files of the done `units` planned at another offset than they were written at,
    rewrite their manifest rows, commit them again and update `done`. Returns the ids of those moved."""
    moves = planned_moves(units, done)
    if moves:
        begin_moves(ws, out, moves)
        rename_files(out, moves)
        run_in_worker(cfg, ws, rewrite_manifests, {m["unit"]: m["by"] for m in moves})
        commit_moves(ws, moves, done)
    return [m["unit"] for m in moves]


def planned_moves(units: list[dict], done: dict[str, dict]) -> list[dict]:
    """{"unit", "by" (shard numbers on), "files" ({old: new})} of each done unit planned elsewhere.
    A marker from before markers held the offset names no move: its unit's id is not planned."""
    moves = []
    for unit in units:
        info = done.get(unit["unit"])
        if info is not None and "offset" in info and int(info["offset"]) != unit["offset"]:
            by = unit["offset"] - int(info["offset"])
            moves.append({"unit": unit["unit"], "by": by, "files": renamed_files(info, by)})
    return moves


def begin_moves(ws: Workspace, out: str, moves: list[dict]) -> None:
    """From here a kill leaves each unit to be exported again (see the module's doc): a record of
    the files the move may leave, then the unit's marker forgotten."""
    for move in moves:
        temps = [temporary_name(move["unit"], new) for new in move["files"].values()]
        ws.write_json(f"state/{STARTED}/{move['unit']}.json", {"out": out, "files": [*move["files"].values(), *temps]})
        ws.forget_unit(JOB, move["unit"], hold=False)


def rename_files(out: str, moves: list[dict]) -> None:
    """Every file to its temporary name, then every one to its new name: a unit's new names may
    be the old names of another, not yet moved. A file deleted by hand is passed over: the unit
    is then found lost (jobs/export.forget_lost_units) and written again."""
    for move in moves:
        for old, new in move["files"].items():
            if os.path.isfile(os.path.join(out, old)):
                os.replace(os.path.join(out, old), os.path.join(out, temporary_name(move["unit"], new)))
    fault_point("BOORUSET_KILL_AFTER_EXPORT_MOVES")
    for move in moves:
        for new in move["files"].values():
            temp = os.path.join(out, temporary_name(move["unit"], new))
            if os.path.isfile(temp):
                os.replace(temp, os.path.join(out, new))


def commit_moves(ws: Workspace, moves: list[dict], done: dict[str, dict]) -> None:
    """Each moved unit's marker again, with its new offset, files and stamps; its record gone."""
    for move in moves:
        info = moved_info(done[move["unit"]], move["by"], move["files"])
        ws.commit_unit(JOB, move["unit"], {k: v for k, v in info.items() if k != "parts"}, parts=info["parts"])
        ws.forget_unit(STARTED, move["unit"], hold=False)
        done[move["unit"]] = info


def renamed_files(info: dict, by: int) -> dict[str, str]:
    """{old: new} for the numbered files (shards, Parquet files) a unit's marker names."""
    return {old: new for old in info.get("files", []) if (new := renumbered(old, by)) != old}


def renumbered(relative: str, by: int) -> str:
    """A shard's or Parquet file's name `by` numbers on; any other file's name as it is."""
    match = NUMBERED.match(relative)
    if not match:
        return relative
    folder = match.group(1).split("/")[0]
    return f"{folder}/{NAMERS[match.group(1)](int(match.group(2)) + by)}"


def temporary_name(unit: str, new: str) -> str:
    """Where a file waits between the two passes: a name sweep_temp_files removes if left."""
    folder, name = new.split("/", 1)
    return f"{folder}/.tmp-move-{unit}-{name}"


def moved_info(info: dict, by: int, files: dict[str, str]) -> dict:
    """A moved unit's marker: its offset, files and file stamps under the new names."""
    return {**info, "offset": int(info["offset"]) + by,
            "files": sorted(files.get(f, f) for f in info.get("files", [])),
            "stamps": {files.get(f, f): stamp for f, stamp in info.get("stamps", {}).items()}}


def rewrite_manifests(ws: Workspace, moves: dict[str, int]) -> None:
    """Each moved unit's export_manifest part (named by its id) with the new names of its shards
    and Parquet files, in a worker (run_in_worker): no manifest row reaches the driver."""
    for unit, by in moves.items():
        path = f"{ws.table_dir('export_manifest')}/{unit}.parquet"
        with ws.fs.open_input_file(path) as handle:
            table = pq.read_table(handle)
        paths = pa.array([p and renumbered(p, by) for p in table["path"].to_pylist()], pa.string())
        ws.write_part("export_manifest", unit, table.set_column(table.schema.get_field_index("path"), "path", paths))

