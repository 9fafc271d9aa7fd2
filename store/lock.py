"""One writer per workspace.

Every job that writes takes the workspace's lock for its whole run; readers (`booruset sql`, the
report) never need it. On a local workspace the lock is an flock on `<ws>/lock`: the kernel
drops it when the holder exits, even on SIGKILL, so a crashed job never leaves a stale lock. On a
URI workspace (no flock on object storage) it is a lease object `<ws>/lock.json` with an expiry
that the holder renews; a lease whose holder died expires after LEASE_S. The lease is a
read-check-write without a conditional put (pyarrow's filesystems have none), so two writers
starting within the same second could both win: it guards against the common mistake (a second
job started by hand or by a scheduler), not a race by design.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from typing import IO

from store.scratch import process_alive, process_space
from store.workspace import Workspace, WorkspaceError

LEASE_S = 120.0
LEASE_FILE = "lock.json"  # in the workspace's root, on object storage (a local one has a flock)


class WorkspaceBusy(WorkspaceError):
    """Another job holds the workspace."""


def holder_info(job: str) -> dict:
    return {"job": job, "pid": os.getpid(), "host": socket.gethostname(), "processes": process_space(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def busy_message(info: dict) -> str:
    return (f"workspace busy: {info.get('job', '?')} pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"since {info.get('since', '?')}")


# How long a writer waits for a holder that may let go at once: a review edit holds the workspace
# for about 50 ms, and a job started in that moment, or an edit from a second review server, was
# refused ("workspace busy: review ...") though the workspace was free a moment later.
SHORT_WAIT_S = 2.0
RETRY_S = 0.05


class WorkspaceLock:
    """`with WorkspaceLock(ws, "curate"):` holds the workspace for one job (WorkspaceBusy if it is
    still taken after `wait_s` seconds)."""

    def __init__(self, ws: Workspace, job: str, wait_s: float = 0.0) -> None:
        self.ws, self.job, self.wait_s = ws, job, wait_s
        self._file: IO[str] | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> WorkspaceLock:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                if self.ws.local:
                    self._lock_file()
                else:
                    self._take_lease()
                return self
            except WorkspaceBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(RETRY_S)

    def __exit__(self, *_: object) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self.ws.fs.delete_file(self._lease_path())

    # ---- local: flock --------------------------------------------------------------------
    def _lock_file(self) -> None:
        f = open(f"{self.ws.base}/lock", "a+", encoding="utf-8")  # held open for the job's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            info = _parse(f.read())
            f.close()
            raise WorkspaceBusy(busy_message(info)) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder_info(self.job)))
        f.flush()
        self._file = f

    # ---- URI: a lease with an expiry -----------------------------------------------------
    def _lease_path(self) -> str:
        return f"{self.ws.base}/{LEASE_FILE}"

    def _take_lease(self) -> None:
        current = self._read_lease()
        if current and current.get("expires", 0) > time.time() and not died_here(current):
            ends = time.strftime("%H:%M:%S", time.localtime(current["expires"]))
            raise WorkspaceBusy(f"{busy_message(current)} (its lease ends at {ends} unless it is renewed)")
        mine = {**holder_info(self.job), "token": os.urandom(8).hex()}
        self._write_lease(mine)
        if self._read_lease().get("token") != mine["token"]:  # another writer wrote after us
            raise WorkspaceBusy(busy_message(self._read_lease()))
        self._renewer = threading.Thread(target=self._renew, args=(mine,), daemon=True, name="workspace-lease")
        self._renewer.start()

    def _renew(self, mine: dict) -> None:
        while not self._stop.wait(LEASE_S / 3):
            self._write_lease(mine)

    def _read_lease(self) -> dict:
        """The lease ({} when there is none). Workspace.read_json reads again a lease met in the
        middle of its holder's renewal (cut at the old one's size on object storage), which read
        as no lease let a second job take the workspace."""
        try:
            info = self.ws.read_json(LEASE_FILE)
        except ValueError:  # unreadable for good: a damaged lease holds nothing
            return {}
        return info if isinstance(info, dict) else {}

    def _write_lease(self, mine: dict) -> None:
        with self.ws.fs.open_output_stream(self._lease_path()) as out:
            out.write(json.dumps({**mine, "expires": time.time() + LEASE_S}).encode())


def died_here(holder: dict) -> bool:
    """Whether the lease's holder was a process of this kernel and pid namespace that is gone
    (killed): its lease is free at once, as a local workspace's flock is, not LEASE_S later."""
    here = process_space()
    if not here or holder.get("processes") != here or not isinstance(holder.get("pid"), int):
        return False
    return not process_alive(holder["pid"])


def _parse(text: str) -> dict:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}
