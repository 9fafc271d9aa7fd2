"""Kill a job process (and the Ray it started) once it has committed some units."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def booruset(*args: str, **extra_env: str) -> subprocess.Popen:
    """A `booruset` command in a child process with its own session, output captured."""
    cmd = [sys.executable, "-m", "jobs.cli", *args, "--set", "ray.num_cpus=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the tests' own Ray
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", **extra_env)
    # its own session, so that SIGKILL reaches the Ray processes it started as well
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after_commits(process: subprocess.Popen, state: Path, at_least: int, poll_s: float,
                       timeout_s: float = 900) -> int:
    """SIGKILL `process`'s session once `state` holds `at_least` unit markers; the markers then.

    The process must run in its own session (start_new_session=True) so that the kill reaches
    the Ray processes it started too, as a preempted node or an OOM kill would.
    """
    kill_when(process, lambda: len(list(state.glob("*.json"))) >= at_least, poll_s, timeout_s)
    return len(list(state.glob("*.json")))


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], poll_s: float, timeout_s: float = 900) -> None:
    """SIGKILL `process`'s session (see kill_after_commits) as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            break
        time.sleep(poll_s)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
