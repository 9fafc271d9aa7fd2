"""Quiet by default: a job prints its own lines, one progress line per stage update and its
summary; Ray's INFO logs, its token-auth notice and deprecation warnings stay off the terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest

from jobs.ray_env import LineQueue, Progress, RunningBatches
from store.workspace import Workspace
from tests.conftest import REPO, SAMPLE_SHARDS
from tests.test_run import booruset_command

PROGRESS = re.compile(r"^ingest: 24 images, 3/3 units, \d+\.\d images/s, \d+ s$")
NOISE = ("WARNING", "Token authentication", "DeprecationWarning", "Traceback",
         "streaming_executor", "logging_progress", "Running Dataset", "Loading weights")


def test_progress_prints_a_line_per_interval_and_one_at_the_end():
    out = io.StringIO()
    with Progress("annotate", 24, units=3, interval=0.05, out=out) as progress:
        deadline = time.monotonic() + 10  # the first tick, however late a loaded machine runs its thread
        while not out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        progress.add(24, units=3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2  # ticks while it runs, then the final line
    assert re.fullmatch(r"annotate: 0/24 images, 0/3 units, 0\.0 images/s, \d+ s", lines[0])
    assert re.fullmatch(r"annotate: 24/24 images, 3/3 units, \d+\.\d images/s, \d+ s", lines[-1])

    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress("ingest", units=2, interval=60, out=out):
        raise RuntimeError("a failing stage prints no final progress line")
    assert out.getvalue() == ""


def test_progress_counts_the_finished_batches_of_units_still_running(tmp_path):
    """A shard can take an hour: ingest's progress counts the batches its running units marked
    done (batch markers), not those a killed run left, and a unit's images once, at its end."""
    ws = Workspace(str(tmp_path / "ws"))
    ws.commit_batch("ingest", "old", "b00000", {"info": {"images": 7}, "parts": {}})  # a killed run's
    running = RunningBatches(ws, "ingest")
    progress = Progress("ingest", units=2, out=io.StringIO(), running=running)
    assert progress.line().startswith("ingest: 0 images, 0/2 units")
    ws.commit_batch("ingest", "u", "b00000", {"info": {"images": 4}, "parts": {}})
    ws.commit_batch("ingest", "u", "b00001", {"info": {"images": 3}, "parts": {}})
    assert progress.line().startswith("ingest: 7 images, 0/2 units")
    time.sleep(0.05)  # a new modification time
    ws.commit_batch("ingest", "old", "b00000", {"info": {"images": 5}, "parts": {}})  # redone by this run
    assert progress.line().startswith("ingest: 12 images, 0/2 units")
    ws.forget_batches("ingest", "u")  # the unit committed: its images come with its summary row
    progress.add(7, units=1)
    assert progress.line().startswith("ingest: 12 images, 1/2 units")


def test_a_worker_s_prints_reach_the_queue_line_by_line_however_they_are_cut():
    import queue

    lines: queue.Queue = queue.Queue()
    out = LineQueue(lines)
    for piece in ["par", "t of ", "one", "\n", "two\nthree\n\nfo", "ur", "\n", "", "five"]:
        assert out.write(piece) == len(piece)
    for _ in range(20_000):  # a long line printed in pieces
        out.write("ab")
    out.end()
    got = [lines.get_nowait() for _ in range(lines.qsize())]
    assert got == ["part of one", "two", "three", "", "four", "five" + "ab" * 20_000]
    out.end()  # nothing left: no empty line
    assert lines.empty()


def test_listing_a_large_folder_prints_progress(tmp_path, monkeypatch, capsys):
    """Ingest lists (and stats) every file of its inputs before its first line: a folder of a
    million files was a minute and more of silence (40,000 files: 2.4 s), minutes on a network
    file system. Lines while the listing runs; a quick listing adds none."""
    from jobs import ingest, ray_env
    from jobs.config import load_config
    from udfs.ingest import sources

    folder = tmp_path / "art"
    folder.mkdir()
    for i in range(150):
        (folder / f"img{i:03d}.png").write_bytes(b"")
    cfg = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', f'ingest.inputs=["{folder}"]'])
    ws = Workspace(str(tmp_path / "ws"))
    assert len(ingest.plan_units(cfg, ws)) >= 1
    assert "listing" not in capsys.readouterr().out  # the usual case: no line at all

    stat = sources._file_stat
    monkeypatch.setattr(sources, "_file_stat", lambda *args: (time.sleep(0.002), stat(*args))[1])
    monkeypatch.setattr(ray_env, "PROGRESS_INTERVAL_S", 0.05)
    ingest.plan_units(cfg, ws)
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(re.fullmatch(r"ingest: listing the inputs: \d+ files, \d+\.\d files/s, \d+ s", line)
                         for line in lines), lines
    assert 0 < max(int(line.split(": ")[2].split()[0]) for line in lines) <= 150


def test_ingest_prints_progress_and_summary_without_noise(tmp_path):
    if not list(SAMPLE_SHARDS.glob("*.tar")):
        pytest.skip("bundled sample shards missing")
    # as a user runs it: no RAY_AUTH_MODE (Ray turns token auth on by itself), its own local Ray
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "BOORUSET_VERBOSE")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([*booruset_command(), "ingest", "-i", str(SAMPLE_SHARDS)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    output = done.stdout
    assert done.returncode == 0, output[-3000:]
    lines = output.splitlines()
    noisy = [ln for ln in lines if any(word in ln for word in NOISE)]
    assert not noisy, output
    assert any(PROGRESS.match(ln) for ln in lines), output
    assert "== ingest summary" in lines and "rows out: images 24" in lines, output
    assert (tmp_path / "workspace" / "tables" / "images").is_dir()


def workspace_pid(ws, fail: bool) -> tuple[int, str]:
    """Run by run_in_worker: which process, and which workspace it opened."""
    import os

    from jobs.config import ConfigError

    if fail:
        raise ConfigError("export.where 'x' is not a SQL condition")
    return os.getpid(), ws.base


def test_run_in_worker_runs_the_planning_query_in_another_process(ray_local, workspace, config):
    """The driver gets the result back, not the work: the function runs in a Ray worker on the same
    workspace, and an error it raises reaches the driver as itself (the CLI prints ConfigErrors)."""
    import os
    import sys

    from ray import cloudpickle

    from jobs.config import ConfigError
    from jobs.ray_env import run_in_worker

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    pid, base = run_in_worker(config, workspace, workspace_pid, False)
    assert pid != os.getpid() and base == workspace.base
    with pytest.raises(ConfigError, match="not a SQL condition"):
        run_in_worker(config, workspace, workspace_pid, True)


def add_one(x: int) -> int:
    return x + 1


def all_cpus_task(ws, cpus: int) -> int:
    """Run by run_in_worker: a task of its own asking for every CPU of the local Ray, and its result
    (curate's CCIP clustering submits tasks from its step in the worker, SetRunner)."""
    import ray

    return ray.get(ray.remote(num_cpus=cpus)(add_one).remote(1), timeout=20)


def test_run_in_worker_tasks_its_function_submits_get_every_cpu(ray_local, workspace, config):
    """A step run by run_in_worker that submits tasks and waits for them (curate's SetRunner) leaves
    them every CPU: the step runs in a thread of the task, where Ray's wait does not give back the
    task's CPU as it does in its main thread, so on a 1-CPU Ray (ray.num_cpus=1) such tasks never
    started and curate waited for good."""
    import sys

    from ray import cloudpickle

    from jobs.ray_env import run_in_worker

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    assert run_in_worker(config, workspace, all_cpus_task, 2) == 2


def test_what_workers_print_reaches_a_pipe_without_escape_codes(tmp_path):
    """curate prints its progress in a Ray task (run_in_worker): its lines come with a prefix,
    once Ray's coloured one, which in a log file or a pipe is escape codes; the prefix names the
    step the task runs (it named run_in_worker's wrapper, `_with_workspace`, for every job)."""
    code = ("import time; from jobs.config import load_config; from jobs.ray_env import run_in_worker; "
            "from store.workspace import Workspace\n"
            "def build(ws): print('curate: tags partition 1/1', flush=True)\n"
            "cfg = load_config(None, ['workspace.path=\"ws\"', 'ray.num_cpus=1'])\n"
            "run_in_worker(cfg, Workspace('ws'), build); "
            "time.sleep(2)")  # the driver prints forwarded lines from a thread
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "curate: tags partition 1/1" in done.stdout and "\x1b[" not in done.stdout, done.stdout
    assert "(__main__.build pid=" in done.stdout, done.stdout


def test_what_a_worker_printed_comes_before_what_the_driver_prints_next(tmp_path):
    """run_in_worker's lines (curate's steps) come before the summary the driver prints once it
    returns, whatever the delay of Ray's forwarding of a worker's output (asynchronous, from its
    log file): they came after the summary, or not at all when the driver had ended before."""
    code = ("from jobs.config import load_config; from jobs.ray_env import run_in_worker; "
            "from store.workspace import Workspace\n"
            "def build(ws):\n"
            "    print('curate: tags done', flush=True)\n"
            "    print('curate: balance', end=' ')\n"
            "    print('done')\n"
            "    return 7\n"
            "cfg = load_config(None, ['workspace.path=\"ws\"', 'ray.num_cpus=1'])\n"
            "print('== curate summary', run_in_worker(cfg, Workspace('ws'), build), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    lines = [re.sub(r"^\(__main__\.build pid=\d+\) ", "", ln) for ln in done.stdout.splitlines()]
    assert lines[-3:] == ["curate: tags done", "curate: balance done", "== curate summary 7"], done.stdout
