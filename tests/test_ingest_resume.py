"""A real `booruset ingest` process killed with SIGKILL mid-run, then run again, ends with the
exact rows of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from hostile_data import encode, picture, write_tar
from kill_mid_run import kill_after_commits

from store.workspace import Workspace
from udfs.ingest.ingest_unit import kept_batches, options_fingerprint

REPO = Path(__file__).resolve().parent.parent
N_SHARDS = 12


def make_shards(folder: Path, n_shards: int = N_SHARDS) -> None:
    folder.mkdir()
    for s in range(n_shards):
        members = []
        for i in range(8):
            members.append((f"img{s}_{i}.png", encode(picture(448, 448, seed=s * 100 + i), "PNG")))
            members.append((f"img{s}_{i}.txt", f"1girl, tag_{s}_{i}".encode()))
        members.append((f"bad{s}.jpg", b"not an image"))
        write_tar(folder / f"shard-{s:03d}.tar", members)


def ingest_process(shards: Path, ws: Path, *options: str, **extra_env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.cli", "ingest", "-w", str(ws), "-i", str(shards), "--set", "ray.num_cpus=1",
           *options]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **extra_env}
    # its own session, so that SIGKILL reaches the Ray processes it started as well
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sorted_table(ws: Workspace, name: str) -> pa.Table:
    table = ws.read_table(name)
    return table.sort_by([(c, "ascending") for c in table.column_names if not pa.types.is_list(table[c].type)])


def test_killed_ingest_resumes_to_identical_tables(tmp_path):
    shards = tmp_path / "shards"
    make_shards(shards)

    reference = ingest_process(shards, tmp_path / "ref")
    assert reference.wait(timeout=900) == 0, reference.stdout.read()

    victim = ingest_process(shards, tmp_path / "ws")
    state = tmp_path / "ws" / "state" / "ingest"
    killed_at = kill_after_commits(victim, state, at_least=2, poll_s=0.02)
    assert 2 <= killed_at < N_SHARDS

    again = ingest_process(shards, tmp_path / "ws")
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    # a worker may commit one more unit in the instant the kill takes to reach it (loaded machine)
    done_before = int(re.search(r"(\d+) done before", out).group(1))
    assert killed_at <= done_before < N_SHARDS, out

    ref, ws = Workspace(str(tmp_path / "ref")), Workspace(str(tmp_path / "ws"))
    for name in ("images", "source_tags", "source_text", "errors"):
        assert sorted_table(ws, name).equals(sorted_table(ref, name)), name
    assert ws.read_table("images").num_rows == N_SHARDS * 8
    assert ws.read_table("errors").num_rows == N_SHARDS


def table_files(root: Path) -> dict[Path, int]:
    """Every Parquet part of the ingest tables on disk, with its modification time."""
    return {p: p.stat().st_mtime_ns for p in (root / "tables").glob("*/*.parquet")}


def test_ingest_killed_inside_a_shard_keeps_its_finished_batches(tmp_path):
    """A shard is one unit of any size, read in batches of ingest.batch_samples: a run killed
    half-way through one keeps the batches it marked done, and the next run probes only the
    rest of the shard, ending with the rows of an uninterrupted run made of one batch a shard
    (the batch size changes no row), no batch marker and no part file that no generation names."""
    shards = tmp_path / "shards"
    make_shards(shards, n_shards=3)  # 9 samples a shard: batches of 4, 4 and 1
    reference = ingest_process(shards, tmp_path / "ref")
    assert reference.wait(timeout=900) == 0, reference.stdout.read()

    small = ("--set", "ingest.batch_samples=4")
    victim = ingest_process(shards, tmp_path / "ws", *small, BOORUSET_KILL_AFTER_BATCHES="2")
    out, _ = victim.communicate(timeout=900)
    assert victim.returncode == -signal.SIGKILL, out
    state = tmp_path / "ws" / "state" / "ingest"
    committed = {p.stem for p in state.glob("*.json")}
    markers = {p: json.loads(p.read_text()) for p in state.glob("batches/*/*.json") if p.parent.name not in committed}
    kept_samples = sum(m["info"]["samples"] for m in markers.values())
    assert kept_samples >= 4, "the killed run left no batch of an unfinished shard"
    kept_files = {f: t for f, t in table_files(tmp_path / "ws").items()
                  if any(f.stem in parts for m in markers.values() for parts in m["parts"].values())}
    assert kept_files

    again = ingest_process(shards, tmp_path / "ws", *small)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    assert f"({kept_samples} of their samples finished by a killed run)" in out, out
    after = table_files(tmp_path / "ws")
    assert all(after.get(f) == t for f, t in kept_files.items()), "a kept batch was written again"

    ref, ws = Workspace(str(tmp_path / "ref")), Workspace(str(tmp_path / "ws"))
    for name in ("images", "source_tags", "source_text", "errors"):
        assert sorted_table(ws, name).equals(sorted_table(ref, name)), name
    assert ws.read_table("images").num_rows == 3 * 8
    assert not list(state.glob("batches/*/*.json"))
    published = ws.published()["tables"]
    assert {f.stem for f in after} == {p for parts in published.values() for p in parts}
    units = ws.done_units("ingest")
    assert sorted(len(info["parts"]["images"]) for info in units.values()) == [2, 2, 2]  # 4 + 4 images, 1 bad


def test_a_rerun_keeps_only_batches_in_a_row_written_with_its_options():
    def marker(start: int, end: int, options: str = "a") -> dict:
        return {"items": [start, end], "options": options}

    row = {"b00000": marker(0, 4), "b00001": marker(4, 8), "b00002": marker(8, 9)}
    assert kept_batches(row, "a") == list(row.values())
    assert kept_batches(row, "b") == []  # other limits: every batch is redone
    assert kept_batches({**row, "b00001": marker(4, 8, "b")}, "a") == [row["b00000"]]
    assert kept_batches({"b00000": row["b00000"], "b00002": row["b00002"]}, "a") == [row["b00000"]]  # a gap
    # batches of another size: kept as long as each starts where the one before ended
    assert kept_batches({"b00000": marker(0, 4), "b00001": marker(4, 6), "b00002": marker(7, 9)}, "a") == [
        marker(0, 4), marker(4, 6)]
    assert options_fingerprint({"max_tags": 5, "batch_samples": 4}) == options_fingerprint(
        {"max_tags": 5, "batch_samples": 1000})
    assert options_fingerprint({"max_tags": 5}) != options_fingerprint({"max_tags": 6})
