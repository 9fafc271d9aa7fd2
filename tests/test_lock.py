"""One writer per workspace: a second writing job refuses with who holds it; readers need no lock;
a holder killed with SIGKILL leaves no stale lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import cli
from store.lock import SHORT_WAIT_S, WorkspaceBusy, WorkspaceLock
from store.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from store.lock import WorkspaceLock
from store.workspace import Workspace
with WorkspaceLock(Workspace(sys.argv[1]), "curate"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the workspace as `curate` (killed with SIGKILL at the end)."""
    Workspace(str(tmp_path / "ws"))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "ws")], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_writer_refuses_with_the_holder(holder, tmp_path, capsys):
    ws_path = str(tmp_path / "ws")
    for command in ("ingest", "annotate", "curate", "caption", "export", "run"):
        code = cli.main([command, "-w", ws_path])
        err = capsys.readouterr().err.strip()
        assert code == 2, command
        assert err == (f"booruset: workspace busy: curate pid {holder.pid} on host {socket.gethostname()} "
                       f"since {err.rsplit('since ', 1)[1]}"), err
        time.strptime(err.rsplit("since ", 1)[1], "%Y-%m-%dT%H:%M:%S%z")


def test_a_writer_waits_out_a_holder_that_lets_go_at_once(tmp_path):
    """A review edit holds the workspace for about 50 ms: a job started then (or an edit from a
    second review server) was refused with "workspace busy: review", though it was free at once."""
    ws = Workspace(str(tmp_path / "ws"))
    held, results = threading.Event(), []

    def edit() -> None:
        with WorkspaceLock(ws, "review"):
            held.set()
            time.sleep(0.3)

    thread = threading.Thread(target=edit)
    thread.start()
    held.wait()
    with pytest.raises(WorkspaceBusy, match="workspace busy: review"):
        WorkspaceLock(Workspace(str(tmp_path / "ws")), "curate").__enter__()  # no wait: refused
    started = time.monotonic()
    with WorkspaceLock(Workspace(str(tmp_path / "ws")), "curate", SHORT_WAIT_S):
        results.append(time.monotonic() - started)
    thread.join()
    assert 0.1 < results[0] < SHORT_WAIT_S


def test_readers_need_no_lock(holder, tmp_path, capsys):
    assert cli.main(["sql", "-w", str(tmp_path / "ws"), "select count(*) from images"]) == 0
    assert "0" in capsys.readouterr().out


def test_killed_holder_leaves_no_stale_lock(holder, tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    with pytest.raises(WorkspaceBusy):
        WorkspaceLock(ws, "export").__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with WorkspaceLock(ws, "export"):  # the kernel dropped the dead holder's flock
        with pytest.raises(WorkspaceBusy, match="workspace busy: export pid"):
            WorkspaceLock(ws, "ingest").__enter__()
    with WorkspaceLock(ws, "ingest"):  # released on exit
        pass


def test_lease_on_a_uri_workspace(tmp_path):
    """A URI workspace (here file://) has no flock: a lease object with an expiry."""
    ws = Workspace((tmp_path / "ws").as_uri())
    assert not ws.local
    with WorkspaceLock(ws, "curate"):
        with pytest.raises(WorkspaceBusy, match="workspace busy: curate pid"):
            WorkspaceLock(Workspace((tmp_path / "ws").as_uri()), "ingest").__enter__()
    assert not (tmp_path / "ws" / "lock.json").exists()
    with WorkspaceLock(ws, "ingest"):
        pass


def test_a_lease_read_while_its_holder_renews_it_on_object_storage_is_held(s3_endpoint, monkeypatch):
    """On object storage a read is a HEAD and then a ranged GET: one that met the holder's renewal
    got the new lease cut at the old one's size, read it as no lease, and a second job took the
    workspace beside the first."""
    from s3_server import AWS

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    uri = f"s3://ws-bucket/lease-race?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    holder, other = WorkspaceLock(Workspace(uri), "curate"), WorkspaceLock(Workspace(uri), "ingest")
    leases = [{"job": "curate", "pid": 1, "token": "t" * n} for n in range(1, 40, 6)]  # of other sizes
    holder._write_lease(leases[0])
    stop = threading.Event()

    def renew() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            holder._write_lease(leases[n % len(leases)])

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        reads = [other._read_lease() for _ in range(150)]
    finally:
        stop.set()
        thread.join()
    assert all(read.get("token", "").startswith("t") for read in reads)


def test_the_lease_of_a_killed_job_on_this_host_is_free_at_once(tmp_path):
    """kill -9 leaves a URI workspace's lease until it expires (120 s): a job of this kernel and pid
    namespace whose process is gone holds it no more; a live holder's, or one of processes this
    one cannot see, still does, and the message says when it ends."""
    import json

    ws = Workspace((tmp_path / "ws").as_uri())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from store.lock import process_space

    lease = {"job": "ingest", "host": socket.gethostname(), "processes": process_space(), "since": "then",
             "token": "t", "expires": time.time() + 100}
    lock_json = tmp_path / "ws" / "lock.json"
    for holder, busy in ((dead.pid, False), (os.getpid(), True), ("not a pid", True)):
        lock_json.write_text(json.dumps({**lease, "pid": holder}))
        if busy:
            with pytest.raises(WorkspaceBusy, match=r"its lease ends at \d\d:\d\d:\d\d unless it is renewed"):
                WorkspaceLock(ws, "curate").__enter__()
        else:
            with WorkspaceLock(ws, "curate"):
                assert json.loads(lock_json.read_text())["job"] == "curate"
    # another kernel or pid namespace (a container with the host's name), or a lease without it
    for other in ({"processes": "another-boot/4026531836"}, {"processes": None}):
        lock_json.write_text(json.dumps({**lease, "pid": dead.pid, **other}))
        with pytest.raises(WorkspaceBusy):
            WorkspaceLock(ws, "curate").__enter__()


def test_add_part_publishes_only_while_no_job_holds_the_workspace(tmp_path):
    """add_part (rows loaded by hand, benchmarks) publishes: a read-modify-write of the published
    generation that a running job's own publish would overwrite, so it takes the lock too."""
    ws = Workspace(str(tmp_path / "ws"))
    row = {"key": "a", "tag": "x", "category": "general", "origin": "txt", "position": 0}
    with WorkspaceLock(ws, "curate"):
        with pytest.raises(WorkspaceBusy, match="workspace busy: curate"):
            ws.add_part("source_tags", "by-hand", [row])
    ws.add_part("source_tags", "by-hand", [row])
    assert ws.read_table("source_tags").num_rows == 1
