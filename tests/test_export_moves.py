"""Export units that moved to other shard numbers are renamed, not exported again (jobs/export_moves.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from jobs.export_moves import renumbered
from tests.export_data import base_config, prepared_workspace
from tests.kill_mid_run import booruset

# every layout; a shard holds one sample (max_bytes 1), so a unit of up to 4 images has as many shards
OPTIONS = ('export.formats=["webdataset", "kohya", "parquet"]', "export.max_count=4", "export.max_bytes=1")


def test_renumbered_names_only_shards_and_parquet_files():
    assert renumbered("webdataset/shard-000007.tar", -2) == "webdataset/shard-000005.tar"
    assert renumbered("parquet/train-000001.parquet", 10) == "parquet/train-000011.parquet"
    assert renumbered("kohya/1_x/shard-000001.tar", 1) == "kohya/1_x/shard-000001.tar"
    assert renumbered("webdataset/index.wids.json", 1) == "webdataset/index.wids.json"


def folder_files(out: Path) -> dict[str, bytes]:
    """Every image, text, shard and Parquet file, by path in the export folder (not the manifest,
    the wids index or kohya's config, which name the folder)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.parquet" and p.suffix not in (".json", ".toml")}


def manifest_rows(out: Path) -> list[dict]:
    rows = pq.read_table(out / "manifest.parquet").drop_columns(["unit"]).to_pylist()  # unit ids name `out`
    return sorted(rows, key=lambda r: (r["layout"], r["path"], r["sample_key"]))


def first_key(out: Path) -> str:
    """The key of the export's first shard's sample."""
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    return next(r["key"] for r in rows if r["path"] == "webdataset/shard-000000.tar")


def fresh_export(cfg: dict, ws, out: Path):
    """The same selection exported into an empty folder: what the moved export must equal."""
    from jobs import export

    export.run({**cfg, "export": {**cfg["export"], "out": str(out)}}, ws)
    return out


def test_a_unit_that_loses_a_shard_moves_the_later_units_without_writing_them(tmp_path_factory, ray_local):
    """One image left out of the first unit took a shard from it: every later unit's shards were
    numbered one less, and each was exported again (read, re-encoded, written). They are renamed:
    the folder then holds what an export into an empty folder writes, byte for byte."""
    from jobs import export
    from store.workspace import Workspace, sql_string

    path = prepared_workspace(tmp_path_factory)
    ws, out = Workspace(str(path)), path / "export"
    first = export.run(base_config(path, *OPTIONS), ws)
    assert first.units_done >= 3
    cfg = base_config(path, *OPTIONS, f"export.where={json.dumps('key <> ' + sql_string(first_key(out)))}")
    moved = export.run(cfg, ws)
    assert any("units done before moved to other shard numbers" in n for n in moved.notes), moved.notes
    assert moved.units_done <= 3 and moved.units_skipped >= first.units_done - 3
    assert not list(out.rglob(".tmp-*"))
    files, rows = folder_files(out), manifest_rows(out)
    fresh = fresh_export(cfg, ws, path / "fresh")
    assert files == folder_files(fresh)
    assert rows == manifest_rows(fresh)
    index = json.loads((out / "webdataset" / "index.wids.json").read_text())
    shards = sorted(f for f in files if f.startswith("webdataset/"))
    assert ["webdataset/" + s["url"] for s in index["shardlist"]] == shards


def test_a_move_killed_between_its_passes_ends_as_an_export_into_an_empty_folder(tmp_path_factory, ray_local):
    """Killed with the first pass of renames done (the files under temporary names, the markers
    forgotten): the next run exports those units again and leaves no temporary file."""
    from jobs import export
    from store.workspace import Workspace, sql_string

    path = prepared_workspace(tmp_path_factory)
    ws, out = Workspace(str(path)), path / "export"
    export.run(base_config(path, *OPTIONS), ws)
    where = f"export.where={json.dumps('key <> ' + sql_string(first_key(out)))}"
    killed = booruset("export", "-w", str(path), *[a for o in (*OPTIONS, where) for a in ("--set", o)],
                      "--set", "caption.tags_from_text=false", BOORUSET_KILL_AFTER_EXPORT_MOVES="1")
    output = killed.communicate(timeout=600)[0]
    assert killed.returncode == -9, output
    assert list(out.rglob(".tmp-move-*")), "the kill came before the first pass ended"
    cfg = base_config(path, *OPTIONS, where)
    export.run(cfg, ws)
    assert not list(out.rglob(".tmp-*"))
    fresh = fresh_export(cfg, ws, path / "fresh")
    assert folder_files(out) == folder_files(fresh)
    assert manifest_rows(out) == manifest_rows(fresh)



def test_the_check_file_a_killed_export_left_goes_at_the_next_export(tmp_path_factory, ray_local):
    """The driver writes .booruset-export-check in the export folder while its units run and
    removes it as they end: a SIGKILL then left it there (found after a run killed mid-export),
    and every later export with nothing to run kept it beside the shards, unlike a fresh export."""
    from jobs import export
    from store.workspace import Workspace
    from udfs.export.export_shard import OUT_CHECK

    path = prepared_workspace(tmp_path_factory)
    ws, out = Workspace(str(path)), path / "export"
    export.run(base_config(path), ws)
    (out / OUT_CHECK).write_text("a token of the killed run")  # what the kill leaves
    again = export.run(base_config(path), ws)
    assert again.units_done == 0
    assert not (out / OUT_CHECK).exists()


def test_a_moved_unit_whose_files_were_deleted_counts_as_written_again_not_moved(tmp_path_factory, ray_local):
    """A unit that moved and had files deleted by hand is written again (forget_lost_units): the
    summary said "6 units done before moved ...: renamed, not written again" and "2 units done
    before were written again" of the same run, with 4 units skipped."""
    from jobs import export
    from store.workspace import Workspace, sql_string

    path = prepared_workspace(tmp_path_factory)
    ws, out = Workspace(str(path)), path / "export"
    export.run(base_config(path, *OPTIONS), ws)
    (out / "webdataset" / "shard-000005.tar").unlink()
    (out / "parquet" / "train-000002.parquet").unlink()
    cfg = base_config(path, *OPTIONS, f"export.where={json.dumps('key <> ' + sql_string(first_key(out)))}")
    summary = export.run(cfg, ws)
    notes = " | ".join(summary.notes)
    renamed = re.search(r"(\d+) units done before moved", notes)
    assert renamed and "were written again" in notes, notes
    assert 0 < int(renamed.group(1)) <= summary.units_skipped, notes  # renamed units are among those kept
    assert folder_files(out) == folder_files(fresh_export(cfg, ws, path / "fresh"))
