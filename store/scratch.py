"""Scratch folders in the node's temp folder that a killed process does not leave behind.

Ray ends its worker processes without running atexit handlers, and a job killed with SIGKILL runs
nothing at all: a scratch folder removed only at exit stays forever (one per worker process, and a
killed curate leaves its work database and spill files, gigabytes at millions of images). So each
folder is named for the process that made it, and a process making one removes the folders of its
kind whose process is gone. A pid means a process only to those that see the same pids (one host,
one pid namespace): a folder name also says whose they are (`pid_space`), and a process leaves
the folders of another space alone, live or not (a container with the host's /tmp mounted, nodes
sharing one network TMPDIR: one's running pid 12345 is no process of the other's).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

_MADE: dict[str, tuple[int, str]] = {}  # kind -> (pid, folder) of this process's shared folder


def process_folder(kind: str) -> str:
    """One folder of `kind` (a name prefix such as "booruset-duckdb-") for this process, made on
    first use and removed when the process exits (or by a later process once it is gone)."""
    made = _MADE.get(kind)
    if made is None or made[0] != os.getpid():  # a forked child makes its own
        remove_orphans(kind)
        folder = tempfile.mkdtemp(prefix=prefix(kind))
        atexit.register(shutil.rmtree, folder, True)
        _MADE[kind] = (os.getpid(), folder)
    return _MADE[kind][1]


def temporary_folder(kind: str) -> tempfile.TemporaryDirectory:
    """A TemporaryDirectory of `kind` for one piece of work, named for this process."""
    remove_orphans(kind)
    return tempfile.TemporaryDirectory(prefix=prefix(kind))


def prefix(kind: str) -> str:
    """The start of a folder name of `kind` for this process: its pid, then whose pids they are."""
    return f"{kind}{os.getpid()}-{pid_space()}-"


def process_space() -> str:
    """Which pids this process can see and signal: the kernel's boot and its pid namespace. Hosts
    of one name do not tell (containers with the host's network, machines all named localhost);
    "" where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


@functools.cache
def pid_space() -> str:
    """Eight hex digits naming the pids this process sees (process_space; the host where /proc
    does not say)."""
    return hashlib.sha256((process_space() or socket.gethostname()).encode()).hexdigest()[:8]


def remove_orphans(kind: str) -> int:
    """Remove the folders of `kind` in the temp folder whose process is gone; returns how many.
    Only folders of this pid space: another's pid says nothing here."""
    named = re.compile(re.escape(kind) + r"(\d+)-" + pid_space() + "-")
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{glob_safe(kind)}*"):
        match = named.match(folder.name)
        if match and folder.is_dir() and not folder.is_symlink() and not process_alive(int(match[1])):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this node (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def glob_safe(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)
