"""What a person sees when a job fails for a reason that is not a configuration mistake:
one line saying what went wrong, and the full traceback in a log file whose path is printed."""

from __future__ import annotations

import errno
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

FRIENDLY_ERRNO = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
}

# the signals that stopped this process (stop_on_sigterm): the CLI names it and exits 128 + signal
STOPPED_BY: list[int] = []


def stop_on_sigterm() -> None:
    """SIGTERM (docker stop, Slurm's preemption, `ray job stop`, `timeout`) stops a job as Ctrl-C
    does: a KeyboardInterrupt that the job's code unwinds. Called after ray.init: its driver
    handler (sys.exit) ran behind the Ray core worker's crash handler, which printed a native
    stack dump, and the process often aborted (exit -6) on its way out."""
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, _frame: object) -> None:
    stopped_by_sigterm()


def stopped_by_sigterm() -> None:
    STOPPED_BY.append(signal.SIGTERM)
    raise KeyboardInterrupt


def root_cause(exc: BaseException) -> BaseException:
    """The exception under Ray's wrappers (RayTaskError.cause, UserCodeException.__cause__):
    the deepest OSError in the chain when there is one, else the deepest exception."""
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
        current = current if isinstance(current, BaseException) else None
    oserrors = [e for e in chain if isinstance(e, OSError) and e.errno]
    if oserrors:
        return oserrors[-1]
    worker = [w for w in (worker_exception(e) for e in chain) if w is not None]
    return worker[0] if worker else chain[-1]


def worker_exception(exc: BaseException) -> BaseException | None:
    """The exception a Ray task raised, rebuilt from its traceback text: Ray Data sends the driver a
    RayTaskError(UserCodeException) whose message is the worker's traceback, as a string."""
    if not type(exc).__module__.startswith("ray."):
        return None
    text = str(exc)
    # a chained traceback prints the root cause first
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$", line)
        if match and not match.group(1).startswith("ray."):
            name, message = match.groups()
            errno_match = re.match(r"\[Errno (\d+)\] (.*)", message)
            if errno_match:
                return OSError(int(errno_match.group(1)), errno_match.group(2))
            return RuntimeError(f"{name}: {message}")
    return None


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in FRIENDLY_ERRNO:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{FRIENDLY_ERRNO[exc.errno]}{where}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def one_line(message: str) -> str:
    """A message on one line; DuckDB's without its LINE/caret excerpt of the query."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    kept = [ln for ln in lines if not ln.startswith("LINE ") and set(ln) != {"^"}]
    return " ".join(kept)


def report_failure(command: str, exc: BaseException, ws) -> int:
    """Print one line for `exc` and where its traceback was written; the exit code (1)."""
    log = write_log(command, exc, ws)
    print(f"booruset {command} failed: {describe(root_cause(exc))}\n"
          f"booruset: full traceback in {log}", file=sys.stderr)
    return 1


def write_log(command: str, exc: BaseException, ws) -> str:
    """<workspace>/logs/<time>-<command>.log, or the temp folder when the workspace cannot take it."""
    text = "".join(traceback.format_exception(exc))
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{command}.log"
    for folder in ([Path(ws.base) / "logs"] if ws is not None and ws.local else []) + [
            Path(tempfile.gettempdir()) / "booruset-logs"]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return str(folder / name)
        except OSError:
            continue
    return "(no log: nowhere writable)"
