"""Start or join Ray the same way for every job, quietly, and print each job's progress.

By default a job prints what a person needs: its own lines, one progress line per stage every
PROGRESS_INTERVAL_S seconds and at the end (`Progress`), and its summary. Ray's INFO logs
(execution plans, the non-interactive progress blocks) still go to the session's log files
(`/tmp/ray/session_*/logs/ray-data/`) but not to the terminal, and Ray Data's own progress bars
are off. `-v` (the CLI sets BOORUSET_VERBOSE=1) shows Ray's logs and progress bars as they come.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

import ray

from jobs.config import REPO, Config, ConfigError
from jobs.errors import stop_on_sigterm, stopped_by_sigterm

T = TypeVar("T")

if TYPE_CHECKING:
    from store.workspace import Workspace

VERBOSE_ENV = "BOORUSET_VERBOSE"
PROGRESS_INTERVAL_S = 10.0
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def local_ray(cfg: Config) -> bool:
    """Whether the jobs start a Ray of their own on this machine: no ray.address, and not inside
    `ray job submit` (which sets RAY_ADDRESS for the command it runs)."""
    return not cfg["ray"]["address"] and "RAY_ADDRESS" not in os.environ


def check_task_cpus(cfg: Config, option: str) -> None:
    """ConfigError when one task or actor of a job asks for more CPUs (`option`, e.g.
    export.task_num_cpus) than the local Ray has (ray.num_cpus, else this machine's CPUs, which Ray's
    count never exceeds): Ray never schedules it and the job waited for good. A cluster may have or
    add larger nodes, so only a local Ray is checked."""
    if not local_ray(cfg):
        return
    section, name = option.split(".")
    cpus, have = float(cfg[section][name]), float(cfg["ray"]["num_cpus"] or os.cpu_count() or 1)
    if cpus > have:
        raise ConfigError(f"{option} {cpus:g} is more than the {have:g} CPUs of the local Ray (ray.num_cpus, else "
                          "this machine's): Ray would never start such a task and the job would wait for good; "
                          f"lower {option} or raise ray.num_cpus")


def init_ray(cfg: Config) -> None:
    """Join the cluster named in the config, the one `ray job submit` runs in, or start a local Ray."""
    if not ray.is_initialized():
        address = cfg["ray"]["address"] or None
        kwargs: dict = {"ignore_reinit_error": True, "logging_level": logging.WARNING,
                        "include_dashboard": False, "log_to_driver": True}
        if local_ray(cfg):
            # a Ray of our own: with no address, ray.init joins the cluster that the last `ray start`
            # on this machine named in /tmp/ray/ray_current_cluster (another project's, or one long
            # dead: ray.num_cpus then failed with a ValueError, and without it the job hung)
            address = "local"
            if cfg["ray"]["num_cpus"]:
                kwargs["num_cpus"] = int(cfg["ray"]["num_cpus"])
            # tasks import jobs/, store/, udfs/, schemas/ from the repository root
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": _pythonpath()}}
            if not verbose():
                _hide_token_auth_notice()
        elif address is not None:
            # a driver joining a cluster from outside: the code travels with the job, so worker
            # nodes need only the dependencies (inside `ray job submit` the job's own runtime_env holds)
            kwargs["runtime_env"] = cluster_runtime_env()
        if not sys.stdout.isatty():
            # what workers print (curate's progress) comes with a coloured "(pid=...)" prefix:
            # escape codes in a log file or a pipe
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        if not local_ray(cfg):
            check_reachable(address or os.environ["RAY_ADDRESS"])
        # joining a cluster (ray.address, RAY_ADDRESS): its auth is left as the cluster has it
        try:
            ray.init(address=address, **kwargs)
        except SystemExit as exc:  # a SIGTERM while Ray started: its own handler's sys.exit(15)
            if exc.code != signal.SIGTERM:
                raise
            stopped_by_sigterm()
        stop_on_sigterm()  # after ray.init, which sets its own handler
    quiet_ray_data()


REACH_TIMEOUT_S = 10.0


def check_reachable(address: str) -> None:
    """ConfigError unless something answers at the cluster's host:port: ray.init retries an
    address nothing listens on (a typo, a head that is down) for minutes before it fails."""
    if address in ("auto", "local") or ":" not in address:
        return  # Ray finds these itself (auto: the cluster `ray start` left on this machine)
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not port.isdigit():
        return  # not host:port: Ray says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"ray.address {address!r}: nothing answers there ({exc.strerror or exc}); is the "
                          "cluster up? (`ray status` on its head node)") from None


def run_in_worker(cfg: Config, ws: Workspace, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(workspace, *args) in a Ray task, for a job's SQL over the whole dataset: DuckDB's
    working memory for it grows with the data (export's selection: 500 MiB at 20,000 images),
    and the driver should hold only the plan it gets back. `fn` closes its DuckDB connections
    before it returns, and DuckDB gives their memory back on close (1 GiB -> 0.2 GiB measured), so
    the task runs in a pooled worker: a fresh worker per call (max_calls=1) cost 1.7 s of start-up
    every time. `fn` must be a module-level function and its result small; an exception it raises
    is raised here as itself."""
    return worker_result(start_in_worker(cfg, ws, fn, *args))


def start_in_worker(cfg: Config, ws: Workspace, fn: Callable[..., Any], *args: Any) -> ray.ObjectRefGenerator:
    """run_in_worker without the wait: the driver goes on while the task runs; worker_result(run)
    then prints what it printed and gives its result (or raises its exception)."""
    init_ray(cfg)
    # named for what it runs (Ray's name for the task in its logs and dashboard), which was
    # "_with_workspace" for every job's step. No CPU of a local Ray: fn runs in a thread of the
    # task, and Ray gives a task's CPU back while it waits (ray.get) only in its main thread, so
    # tasks fn submits and waits for (curate's SetRunner) never started on a 1-CPU Ray. A cluster
    # keeps the CPU, which places the step on a node with CPUs (not a head node without any).
    cpus = 0 if local_ray(cfg) else 1
    task = ray.remote(num_cpus=cpus)(_with_workspace).options(name=task_name(fn))
    return task.remote(fn, ws.root, ws.memory_limit, args)


def task_name(fn: Callable[..., Any]) -> str:
    """`curate.build`, `export.stage_selection`: the job's module and the function."""
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def worker_result(run: ray.ObjectRefGenerator) -> Any:
    """Print the lines the task printed, as they come, then give its result. Through the task's
    own stream, not Ray's forwarding of its output (asynchronous, from its log file): the lines
    of curate's steps came after the summary the driver printed once the task had returned, or
    not at all when the driver ended first."""
    ended: tuple[bool, Any] | None = None
    for ref in run:
        item = ray.get(ref)
        if isinstance(item, str):
            print(item, flush=True)
        else:
            ended = item
    if ended is None:  # the task's stream ended without its result (_with_workspace always yields one)
        raise RuntimeError("a worker's task ended without a result")
    failed, result = ended
    if failed:
        raise result
    return result


def largest_first(units: list[T], size: Callable[[T], int]) -> list[T]:
    """The units by their estimated size, largest first, in their own order among equals: a job
    starts its tasks in this order, so the last to start are the small ones and no large unit
    runs alone at the end while the other workers idle (the longest-processing-time-first rule)."""
    return sorted(units, key=lambda unit: -size(unit))


TASKS_IN_FLIGHT = 256


def unit_tasks(fn: Callable[..., Any], items: Iterable[Any], num_cpus: float, **kwargs: Any) -> Iterator[Any]:
    """fn(item, **kwargs) in one Ray task per item; the results as the tasks end, in any order.

    For a job whose unit is one coarse task with a small result (export's planning and writing):
    such tasks need no dataset around them, and Ray Data's executor costs 0.2 s (warm) to 1 s
    (cold) per run, a quarter of a copy-only export of 600 images. At most TASKS_IN_FLIGHT are
    submitted at a time: enough for an autoscaler to see the demand, few for ray.wait."""
    remote = ray.remote(num_cpus=num_cpus)(fn)
    queue = iter(items)
    running = [remote.remote(item, **kwargs) for item in itertools.islice(queue, TASKS_IN_FLIGHT)]
    try:
        while running:
            done, running = ray.wait(running, num_returns=1)
            running.extend(remote.remote(item, **kwargs) for item in itertools.islice(queue, 1))
            yield ray.get(done[0])
    finally:
        if running:  # a task failed (its error is raised) or the caller stopped early
            _settle(running)


SETTLE_TIMEOUT_S = 30.0


def _settle(refs: list[ray.ObjectRef]) -> None:
    """Cancel the tasks still queued or running and take what they ended with: a task that failed
    too (a full disk fails every writer) would otherwise have Ray print its whole traceback as an
    "Unhandled error" after the job's own one-line failure."""
    for ref in refs:
        ray.cancel(ref)
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=SETTLE_TIMEOUT_S)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001, S110 - cancelled, or failed like the task whose error is raised
            pass


def _with_workspace(fn: Callable[..., Any], root: str, memory_limit: str, args: tuple
                    ) -> Iterator[str | tuple[bool, Any]]:
    """Ray task (a generator): the lines fn prints, each as it ends, with the prefix Ray gives
    a task's lines, then (failed, its result or its exception). fn runs in a thread whose
    prints (sys.stdout) come here instead of the worker's log."""
    lines: queue.Queue[str | None] = queue.Queue()
    ended: list[tuple[bool, Any]] = []

    def work() -> None:
        try:
            with contextlib.redirect_stdout(LineQueue(lines)) as out:
                ended.append(_call_with_workspace(fn, root, memory_limit, args))
                out.end()  # a last line without its line break
        finally:
            lines.put(None)

    threading.Thread(target=work, name=task_name(fn), daemon=True).start()
    prefix = f"({task_name(fn)} pid={os.getpid()}) "
    while (line := lines.get()) is not None:
        yield prefix + line
    if ended:  # else fn ended the thread with no Exception (SystemExit): worker_result says so
        yield ended[0]


def _call_with_workspace(fn: Callable[..., Any], root: str, memory_limit: str, args: tuple) -> tuple[bool, Any]:
    from store.workspace import Workspace

    try:
        return False, fn(Workspace(root, create=False, memory_limit=memory_limit), *args)
    except Exception as exc:  # noqa: BLE001 - handed to the driver, which raises it (a ConfigError stays one)
        return True, exc


class LineQueue(io.TextIOBase):
    """A text stream that puts each whole line written to it on a queue (without its line break)."""

    def __init__(self, lines: queue.Queue) -> None:
        super().__init__()
        # the pieces of a line not ended yet, joined when it ends: adding each write to one
        # string copied the whole line every time (quadratic for a long line printed in pieces)
        self.lines, self.partial = lines, []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if "\n" not in text:
            self.partial.append(text)
            return len(text)
        first, *whole, rest = text.split("\n")
        self.lines.put("".join([*self.partial, first]))
        for line in whole:
            self.lines.put(line)
        self.partial = [rest] if rest else []
        return len(text)

    def end(self) -> None:
        if self.partial:
            self.lines.put("".join(self.partial))
            self.partial = []


def quiet_ray_data() -> None:
    """Ray Data without its progress bars and INFO lines on the terminal (unless verbose)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose()  # our one line per stage (Progress) instead, see below
    if verbose() or os.environ.get("RAY_DATA_LOGGING_CONFIG"):  # -v, or the user's own logging config
        return
    # Ray Data's "console" handler prints INFO (Starting execution, Execution plan, the
    # logging_progress blocks every 10 s when stdout is not a terminal); its "file" handler keeps
    # everything in the session's ray-data.log. Warnings and errors still reach the terminal.
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropMessages) for f in handler.filters):
                # the warning that we turned the bars off (we did, and print progress ourselves), and
                # the two lines announcing a failed task: the CLI prints the failure in one line and
                # writes the whole traceback to the workspace's log file (jobs/errors.py)
                handler.addFilter(_DropMessages("Progress bars disabled", "An exception was raised from a task",
                                                "Exception occurred in user code"))


def _hide_token_auth_notice() -> None:
    """Keep Ray's token authentication for the local Ray a job starts; drop only its notice.

    Ray (2.60 here) turns token auth on for a new local Ray unless RAY_AUTH_MODE says otherwise,
    and logs a WARNING that it did ("... Set RAY_AUTH_MODE=disabled to opt out"). We keep it on: the
    GCS, raylet, object manager and worker ports of a local Ray listen on every interface (not
    only 127.0.0.1), and whoever can connect to them can run code as this user. With auth, Ray
    makes one token (~/.ray/auth_token) that our own driver and workers use, at no cost to the
    job, so disabling it would buy nothing and leave the machine open. The notice, though, tells
    a person nothing to act on, so it is filtered out; an explicit RAY_AUTH_MODE (token or
    disabled) is the user's choice and Ray honours it without a notice.
    """
    auth = logging.getLogger(AUTH_LOGGER)
    if not any(isinstance(f, _DropMessages) for f in auth.filters):
        auth.addFilter(_DropMessages("Token authentication is enabled"))


class _DropMessages(logging.Filter):
    """Drops the log records whose message starts with one of the given texts."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# Not shipped to the cluster: environments, VCS data, local workspaces and caches.
WORKING_DIR_EXCLUDES = [".venv", ".git", "workspace", ".pytest_cache", "__pycache__", "*.egg-info", "bench", "tests"]
# Forwarded to every worker, when set in the driver's environment: object-storage credentials and
# endpoint (the standard AWS variables) and the Hugging Face offline switch. (Ray shows a job's
# runtime_env in its dashboard: use instance roles on a shared cluster.)
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE", "HF_ENDPOINT")


def cluster_runtime_env() -> dict:
    """The runtime_env of a job whose driver joins a cluster: the repository as working_dir."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env}


def _pythonpath() -> str:
    current = os.environ.get("PYTHONPATH", "")
    return f"{REPO}{os.pathsep}{current}" if current else str(REPO)


# ---- progress ------------------------------------------------------------------------------
class Progress:
    """One line per update of a job's stage, e.g. `annotate: 16/24 images, 1/3 units, 1.3 images/s, 12 s`.

    Printed every `interval` seconds while the stage runs (also when nothing finished since the
    last line: the job is alive) and once when it ends without an error. Ray Data's own progress
    does not fit here: on a terminal it draws bars per Ray operator, and off one (logs, CI,
    `ray job submit`, a pipe) it logs an 8-line block per Ray operator every 10 s with resource
    details but no rate; both count Ray rows, which are units (shards, caption and export units)
    rather than images in most jobs. Use as a context manager around the dataset's consumption.
    """

    def __init__(self, stage: str, total: int | None = None, *, what: str = "images",
                 units: int | None = None, interval: float | None = None, out: IO[str] | None = None,
                 running: Callable[[], int] | None = None, end_line: bool = True) -> None:
        self.stage, self.total, self.what, self.units_total = stage, total, what, units
        self.interval, self.out = interval or PROGRESS_INTERVAL_S, out
        self.end_line = end_line  # False: lines only while it runs (a step that is most often quick)
        self.running = running  # what the units not yet done have done so far (RunningBatches)
        self.done = self.units_done = 0
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name=f"progress-{stage}", daemon=True)

    def __enter__(self) -> Progress:
        self.started = time.perf_counter()
        self._ticker.start()
        return self

    def __exit__(self, exc_type: type | None, *_: Any) -> None:
        self._stop.set()
        self._ticker.join()
        if exc_type is None and self.end_line:
            self.print_line()

    def add(self, done: int = 0, units: int = 0) -> None:
        with self._lock:
            self.done += done
            self.units_done += units

    def line(self) -> str:
        with self._lock:
            done, units = self.done, self.units_done
        if self.running is not None:
            done += self.running()
        elapsed = time.perf_counter() - self.started
        parts = [f"{done}/{self.total} {self.what}" if self.total is not None else f"{done} {self.what}"]
        if self.units_total is not None:
            parts.append(f"{units}/{self.units_total} units")
        parts.append(f"{done / elapsed if elapsed > 0 else 0.0:.1f} {self.what}/s")
        parts.append(f"{elapsed:.0f} s")
        return f"{self.stage}: " + ", ".join(parts)

    def print_line(self) -> None:
        out = self.out or sys.stdout
        out.write(self.line() + "\n")  # one write: no interleaving with lines Ray forwards from workers
        out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.print_line()


class RunningBatches:
    """The images in the batch markers of `job`'s units that are still running, written since
    this was made: how far a unit has got while it runs (one shard can take an hour), for
    Progress(running=...). Each marker is read once; a unit's markers go when it commits, and its
    images then come in with its summary row."""

    def __init__(self, ws: Workspace, job: str) -> None:
        self.ws, self.job = ws, job
        # a killed run's markers are not this run's work (a marker rewritten since is: its mtime)
        self.images: dict[tuple[str, int | None], int] = dict.fromkeys(self._markers(), 0)
        self.last = 0

    def _markers(self) -> list[tuple[str, int | None]]:
        return [(info.path, info.mtime_ns) for info in self.ws.batch_marker_files(self.job)]

    def __call__(self) -> int:
        try:
            markers = self._markers()
        except OSError:  # a unit's folder went while it was listed (its unit committed): as before
            return self.last
        self.last = sum(self._images(marker) for marker in markers)
        return self.last

    def _images(self, marker: tuple[str, int | None]) -> int:
        if marker not in self.images:
            try:
                with self.ws.fs.open_input_stream(marker[0]) as f:
                    self.images[marker] = int(json.loads(f.read())["info"]["images"])
            except FileNotFoundError:  # its unit committed since the listing: its markers went
                self.images[marker] = 0
        return self.images[marker]


def collect_units(rows: Iterable[dict], progress: Progress, info_of: Callable[[dict], dict],
                  on_unit: Callable[[], None] | None = None) -> list[dict]:
    """The per-unit infos of `rows` (a dataset's iter_rows() with one row per unit, or the results
    of unit_tasks), counting each unit's `images` into `progress` as it arrives; `on_unit` runs
    after each (publishing)."""
    infos = []
    with progress:
        for row in rows:
            info = info_of(row)
            infos.append(info)
            progress.add(int(info.get("images", 0)), units=1)
            if on_unit is not None:
                on_unit()
    return infos
