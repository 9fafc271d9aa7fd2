"""A real `booruset ingest` process killed with SIGKILL mid-run, then run again, ends with the
exact rows of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
from hostile_data import encode, picture, write_tar
from kill_mid_run import booruset, kill_after_commits

from jobs.config import load_config
from jobs.ingest import unit_options
from store.workspace import Workspace
from udfs.ingest.ingest_unit import UnitIngest, kept_batches, options_fingerprint
from udfs.ingest.sources import Unit

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


# ---- a unit's batches, in one process, on real shards ------------------------------------------
def small_shard(path: Path) -> Path:
    """9 samples: a PNG and its tags each."""
    members = []
    for i in range(9):
        members += [(f"img{i}.png", encode(picture(96, 64, seed=i), "PNG")), (f"img{i}.txt", f"tag_{i}".encode())]
    return write_tar(path, members)


def cut_short(full: Path, path: Path) -> Path:
    """The shard cut inside the 6th sample's image, as a read that failed there sees it."""
    data = full.read_bytes()
    with tarfile.open(full) as tar:
        sixth = next(m for m in tar.getmembers() if m.name == "img5.png")
    path.write_bytes(data[: sixth.offset_data + sixth.size // 2])
    return path


def tables_of(ws: Workspace) -> dict[str, list]:
    ws.publish()
    return {name: sorted_table(ws, name).to_pylist() for name in ("images", "source_tags", "errors")}


def ingest_in_process(root: Path, shard: Path, options: dict, commit: bool = True) -> Workspace:
    """Unit "u" of the shard (its key prefix "in/s") ingested by the job's own task code; without
    `commit`, only its batches are written, as by a run killed before the unit's marker."""
    ws = Workspace(str(root))
    task = UnitIngest(ws, "u", Unit("tar", str(shard), "in/s", input="in"), options)
    if commit:
        task.run()
    else:
        assert task.write_batches()
    return ws


def test_batches_of_a_read_that_ended_early_are_not_kept_by_a_whole_read(tmp_path):
    """A shard read cut short (a passing read error) ends its last batch with the cut sample
    and a `corrupt_shard` row; a rerun that reads the whole shard must not keep that batch
    (it would lose a sample and keep a false error), and a rerun whose read ends before the
    kept batches must not keep them either (it would commit samples it cannot vouch for)."""
    options = unit_options(load_config(overrides=["ingest.batch_samples=4"]))
    full, short = small_shard(tmp_path / "full.tar"), cut_short(tmp_path / "full.tar", tmp_path / "short.tar")
    for written, read in ((short, full), (full, short)):
        shard = tmp_path / "shard.tar"
        shard.write_bytes(written.read_bytes())
        ws = ingest_in_process(tmp_path / f"ws-{written.stem}", shard, options, commit=False)
        assert ws.done_batches("ingest", "u")
        shard.write_bytes(read.read_bytes())
        ingest_in_process(tmp_path / f"ws-{written.stem}", shard, options)
        reference = ingest_in_process(tmp_path / f"ref-{read.stem}", shard, options)  # same path: same rows
        assert tables_of(ws) == tables_of(reference), f"written from {written.name}, read from {read.name}"
        assert not ws.done_batches("ingest", "u")
    errors = tables_of(Workspace(str(tmp_path / "ref-short")))["errors"]
    assert {e["kind"] for e in errors} == {"truncated_shard", "corrupt_shard"}


def test_a_rerun_with_other_options_drops_every_batch_marker_before_writing(tmp_path):
    """Markers past those a rerun keeps name part files it rewrites: they go at its start, so
    that a run killed after it never keeps a marker over another run's rows."""
    options = unit_options(load_config(overrides=["ingest.batch_samples=4"]))
    shard = small_shard(tmp_path / "shard.tar")
    ws = ingest_in_process(tmp_path / "ws", shard, options, commit=False)
    assert sorted(ws.done_batches("ingest", "u")) == ["b00000", "b00001", "b00002"]
    UnitIngest(ws, "u", Unit("tar", str(shard), "in/s", input="in"), {**options, "max_tags": 1})
    assert ws.done_batches("ingest", "u") == {}


def test_batches_of_inputs_a_run_does_not_plan_are_left_for_their_run(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    for unit, input_id in (("u1", "a"), ("u2", "b")):
        ws.write_part("images", f"{unit}-b00000", [{"key": f"{input_id}/x"}])
        ws.commit_batch("ingest", unit, "b00000", {"input": input_id, "parts": {"images": [f"{unit}-b00000"]}})
    assert ws.pending_batches("ingest", set(), lambda marker: marker["input"] not in {"a"}) == {}
    assert ws.batch_units("ingest") == ["u2"]  # u1's input was planned, u1 was not: its batch went
    assert (tmp_path / "ws" / "tables" / "images" / "u2-b00000.parquet").exists()
    assert not (tmp_path / "ws" / "tables" / "images" / "u1-b00000.parquet").exists()


def test_an_ingest_of_another_input_keeps_what_a_killed_run_was_replacing(tmp_path):
    """A run that replaces every unit of input `y` (its shards written again) is killed; an ingest
    of another input `x` then ends. It did not replace `y`'s units, so readers (and the jobs
    after it: export would delete `y`'s files) must still see `y` as it was, not gone with a
    false `removed_from_input` row per image (they saw no image of `y` at all), while `x`'s new
    rows are published. The next ingest of `y` ends the replacement."""
    y, x = tmp_path / "y", tmp_path / "x"

    def write_y(seed: int) -> None:
        y.mkdir(exist_ok=True)
        for s in range(2):
            write_tar(y / f"y{s}.tar", [(f"i{s}_{i}.png", encode(picture(64, 48, seed=seed + s * 10 + i), "PNG"))
                                        for i in range(4)])

    def images(ws_path: Path) -> list[tuple]:
        return Workspace(str(ws_path)).connect().execute(
            "select key, sha256 from images order by key").fetchall()

    write_y(0)
    x.mkdir()
    (x / "a.png").write_bytes(encode(picture(64, 48, seed=99), "PNG"))
    small = ("--set", "ingest.batch_samples=2")
    first = ingest_process(y, tmp_path / "ws", *small)
    assert first.wait(timeout=900) == 0, first.stdout.read()
    before = images(tmp_path / "ws")
    assert len(before) == 8

    write_y(1000)  # every shard written again: every unit of y is replaced
    victim = ingest_process(y, tmp_path / "ws", *small, BOORUSET_KILL_AFTER_BATCHES="2")
    out, _ = victim.communicate(timeout=900)
    assert victim.returncode == -signal.SIGKILL, out

    other = ingest_process(x, tmp_path / "ws", *small)
    out, _ = other.communicate(timeout=900)
    assert other.returncode == 0, out
    ws = Workspace(str(tmp_path / "ws"))
    now = images(tmp_path / "ws")
    assert [r for r in now if r[0].startswith("y/")] == before
    assert [r[0] for r in now if r[0].startswith("x/")] == ["x/a"]
    assert ws.connect().execute("select count(*) from errors where kind = 'removed_from_input'").fetchone() == (0,)

    # y given up instead (its folder moved away, say): forgetting it ends its hold, x stays
    shutil.copytree(tmp_path / "ws", tmp_path / "forgets")
    forget = booruset("inputs", "-w", str(tmp_path / "forgets"), "--forget", "y")
    out, _ = forget.communicate(timeout=900)
    assert forget.returncode == 0, out
    assert [r[0] for r in images(tmp_path / "forgets")] == ["x/a"]
    assert Workspace(str(tmp_path / "forgets")).holds() == {}

    again = ingest_process(y, tmp_path / "ws", *small)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    after = images(tmp_path / "ws")
    assert len(after) == 9 and not set(before) & set(after)  # y's new bytes, and x
    assert Workspace(str(tmp_path / "ws")).holds() == {}
