"""Scratch folders (DuckDB spill, curate's work database) do not pile up in the temp folder.

Ray ends its workers without atexit handlers and a killed job runs none: before, every Ray task
that unpickled a Workspace made a spill folder of its own that stayed (1,617 in /tmp after a
day of test runs here).
"""

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from store import scratch
from store.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    monkeypatch.setattr(scratch, "_MADE", {})
    return root


def folder_of_exited_process(root: Path, kind: str) -> Path:
    """The folder a process made before it ended the way Ray ends a worker: no atexit handlers."""
    code = ("import os, sys; from store.scratch import process_folder; "
            f"print(process_folder({kind!r}), flush=True); os._exit(0)")
    env = {**os.environ, "TMPDIR": str(root), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_the_folder_of_a_process_that_is_gone_is_removed_by_the_next_one(temp_root):
    left = folder_of_exited_process(temp_root, "booruset-duckdb-")
    (left / "spill.tmp").write_bytes(b"x" * 1000)
    assert left.is_dir() and left.parent == temp_root

    mine = Path(scratch.process_folder("booruset-duckdb-"))
    assert not left.exists()
    assert mine.is_dir() and mine.name.startswith(f"booruset-duckdb-{os.getpid()}-")


def test_a_running_process_keeps_its_folder_and_other_kinds_are_left(temp_root):
    running = temp_root / f"booruset-duckdb-{os.getppid()}-abc"  # the parent runs while we do
    other_kind = folder_of_exited_process(temp_root, "booruset-curate-")
    unnamed = temp_root / "booruset-duckdb-x1y2z3"  # a name this module never makes
    for folder in (running, unnamed):
        folder.mkdir()

    assert scratch.remove_orphans("booruset-duckdb-") == 0
    assert running.is_dir() and other_kind.is_dir() and unnamed.is_dir()
    with scratch.temporary_folder("booruset-curate-") as work:
        assert Path(work).is_dir()
    assert not other_kind.exists()


def test_every_workspace_of_a_process_spills_into_one_folder(temp_root, tmp_path):
    first = Workspace(str(tmp_path / "ws"))
    copy = pickle.loads(pickle.dumps(first))  # what each Ray task gets
    spills = {ws.connect(views=False).execute("select current_setting('temp_directory')").fetchone()[0]
              for ws in (first, copy, Workspace(str(tmp_path / "ws")))}
    assert len(spills) == 1
    assert [p.name for p in temp_root.iterdir()] == [Path(spills.pop()).name]


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not unshare_works(), reason="needs unshare (a process in a pid namespace of its own)")
def test_a_process_that_cannot_see_the_owner_leaves_its_folder(temp_root):
    """A temp folder shared with processes that see other pids (a container with the host's /tmp
    mounted, nodes with one network TMPDIR): pid 12345 of one is no process of the other, whose
    cleanup removed the live folder of a running curate or DuckDB spill."""
    mine = Path(scratch.process_folder("booruset-duckdb-"))
    (mine / "spill.tmp").write_bytes(b"x")
    code = "from store.scratch import process_folder; process_folder('booruset-duckdb-')"
    env = {**os.environ, "TMPDIR": str(temp_root), "PYTHONPATH": str(REPO)}
    subprocess.run(["unshare", "-Urpf", "--mount-proc", sys.executable, "-c", code], env=env, check=True)
    assert (mine / "spill.tmp").is_file()
