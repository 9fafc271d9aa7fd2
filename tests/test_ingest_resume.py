"""A real `booruset ingest` process killed with SIGKILL mid-run, then run again, ends with the
exact rows of an uninterrupted run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from hostile_data import encode, picture, write_tar
from kill_mid_run import kill_after_commits

from store.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
N_SHARDS = 12


def make_shards(folder: Path) -> None:
    folder.mkdir()
    for s in range(N_SHARDS):
        members = []
        for i in range(8):
            members.append((f"img{s}_{i}.png", encode(picture(448, 448, seed=s * 100 + i), "PNG")))
            members.append((f"img{s}_{i}.txt", f"1girl, tag_{s}_{i}".encode()))
        members.append((f"bad{s}.jpg", b"not an image"))
        write_tar(folder / f"shard-{s:03d}.tar", members)


def ingest_process(shards: Path, ws: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.cli", "ingest", "-w", str(ws), "-i", str(shards), "--set", "ray.num_cpus=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
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
