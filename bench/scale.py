"""Scaling benchmark: does every job keep its throughput, and its memory, at 10x the images?

Generates synthetic Danbooru-like WebDataset shards at two sizes 10x apart (images of 64..256 px,
flat / gradient / noise content with coloured blocks so that sha256 and pHash differ, JPEG and
PNG with some RGBA and palette images; a kohya `.txt` sidecar per image with general tags drawn
by post count from the WD v3 label file and sometimes a character tag, some with a Danbooru
`.json` or a `.caption` too), cached under $TMPDIR/booruset-bench-scale/ by size. For each size
it runs the real jobs, each one its own `python -m jobs.cli <job>` process on a fresh workspace
and its own local Ray: ingest -> annotate (cascade_face and the tiny ONNX fakes with the
production contracts from tests/onnx_fakes.py, in annotate.models_dir) -> curate -> caption
(template backend) -> export.

Per stage it measures the wall time and images/s, and every 0.5 s it samples (psutil) the
resident memory of the job's whole process tree: the driver (the job process itself) and the
largest single other process (a Ray worker, the raylet, the GCS ...), found as descendants of
the job process or as processes in its session. RSS counts the object-store pages a process has
mapped, so a worker's figure includes shared memory; `sumRSS` adds them up and overstates.
It prints a table per size, a comparison, and one line per figure:

    RESULT scale_<stage>_throughput ratio=<large images/s / small images/s> goal=0.9 met=yes|no
    RESULT scale_driver_rss ratio=<large peak / small peak> goal=1.2 met=yes|no   (met: ratio <= 1.2)
    RESULT scale_worker_rss ratio=... goal=1.2 met=...  (informational)

Images/s is images over the job process's wall time (Python and Ray start-up included, ~10-30 s,
which flatters the larger size); the comparison also gives the ratio from the jobs' own times.
The jobs run from a copy of the working tree taken at the start ($ROOT/src) with ray.num_cpus at
least 4 (see MIN_RAY_CPUS). Ctrl-C or SIGTERM stops the running job and prints what was measured,
with the stopped stage's last progress line. Logs of every job: $ROOT/logs/<size>-<stage>.log.

Run from the repository root (times on 2 cores, idle to busy):

    .venv/bin/python bench/scale.py --quick     # 2,000 and 20,000 images, annotate with cascade_face + tagger:
                                                # ~25 min (+3 min the first time, making the images)
    .venv/bin/python bench/scale.py             # 20,000 and 200,000 images, all six models: many hours
                                                # (annotate ~7 images/s); `--generate-only` first makes
                                                # the images (~5 min for 200,000), else the run does
    .venv/bin/python bench/scale.py --sizes 5000,50000 --models cascade_face,tagger --keep
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LABELS_CSV = REPO.parent / "shared" / "tagdata" / "wd_v3_selected_tags.csv"
OVERLAP_JSON = REPO.parent / "shared" / "tagdata" / "overlap_tags.json"
STAGES = ("ingest", "annotate", "curate", "caption", "export")
MODELS = ["cascade_face", "face", "head", "person", "ccip", "tagger"]
# --quick: the two cheapest (the OpenCV cascade and the tagger fake); the three YOLO fakes at
# 640 px and CCIP with its person crops cost ~0.3 s of CPU per image together on a 2-core machine.
QUICK_MODELS = ["cascade_face", "tagger"]
# Logical CPUs of each job's local Ray, at least: annotate's six model actors hold 6 x 0.25 CPU and
# its select_columns step is a 1-CPU task, so with 2 logical CPUs that task never gets scheduled and
# annotate stalls for good once the object store budget is used (seen with 2,000 images).
MIN_RAY_CPUS = 4
DATA_VERSION = "v2"  # bump when the generator changes: the cache key
THROUGHPUT_GOAL, RSS_GOAL = 0.9, 1.2
MIB = 2**20


# ---- synthetic data ----------------------------------------------------------------------------
_TAGS: dict[str, np.ndarray] = {}


def load_tag_pool(labels: Path) -> dict[str, np.ndarray]:
    """General tags with their sampling probabilities (post counts) and character tags, from the label CSV."""
    general, counts, characters = [], [], []
    with labels.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] == "0":
                general.append(row["name"])
                counts.append(float(row["count"]))
            elif row["category"] == "4":
                characters.append(row["name"])
    weights = np.array(counts)
    return {"general": np.array(general), "p": weights / weights.sum(), "characters": np.array(characters)}


def _init_worker(labels: str) -> None:
    _TAGS.update(load_tag_pool(Path(labels)))


def picture(rng: np.random.Generator) -> np.ndarray:
    """An RGB array of 64..256 px: a mid-grey flat, gradient or noise ground with 1-3 coloured blocks.

    The ground varies by a few grey levels only, on purpose: the fake YOLO detectors score colour
    against mid-grey, so on this they find a few to a few dozen boxes around the blocks (as the
    tests' drawings), where a colourful page gives them hundreds per image whose NMS would dominate.
    """
    w, h = (int(v) for v in rng.integers(64, 257, 2))
    pixels = np.full((h, w, 3), 128.0, np.float32)
    kind = rng.integers(0, 3)
    if kind == 1:  # gradient along a random direction
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.cos(angle) * np.arange(w)[None, :] / w + np.sin(angle) * np.arange(h)[:, None] / h
        pixels += ramp[:, :, None] * rng.uniform(-2, 2, 3)
    elif kind == 2:  # blobby noise plus a little fine grain
        coarse = rng.normal(0, 1.5, (h // 16 + 1, w // 16 + 1, 3))
        pixels += np.kron(coarse, np.ones((16, 16, 1)))[:h, :w] + rng.normal(0, 1, (h, w, 3))
    for _ in range(rng.integers(1, 4)):
        bw, bh = (int(max(4, rng.uniform(0.05, 0.15) * side)) for side in (w, h))
        x, y = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
        pixels[y : y + bh, x : x + bw] = rng.integers(0, 256, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode(rng: np.random.Generator, pixels: np.ndarray) -> tuple[str, bytes]:
    """(extension, bytes): JPEG 60%, RGB PNG 33%, RGBA PNG 4%, palette PNG 3%."""
    image, buf, r = Image.fromarray(pixels), io.BytesIO(), rng.random()
    if r < 0.60:
        image.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
        return "jpg", buf.getvalue()
    if r < 0.93:
        image.save(buf, format="PNG", compress_level=1)
    elif r < 0.97:
        alpha = np.full(pixels.shape[:2], 255, np.uint8)
        alpha[: pixels.shape[0] // 4, : pixels.shape[1] // 4] = 128  # a half-transparent corner
        Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(buf, format="PNG", compress_level=1)
    else:
        image.quantize(64).save(buf, format="PNG")
    return "png", buf.getvalue()


def sidecars(rng: np.random.Generator) -> dict[str, bytes]:
    """A kohya .txt always (general tags, sometimes a character first); sometimes a Danbooru .json or a .caption."""
    pool = _TAGS
    general = list(dict.fromkeys(pool["general"][rng.choice(len(pool["general"]), rng.integers(5, 31), p=pool["p"])]))
    characters = list(pool["characters"][rng.integers(0, len(pool["characters"]), rng.integers(1, 3))])
    characters = characters if rng.random() < 0.3 else []
    out = {"txt": ", ".join(characters + general).encode()}
    r = rng.random()
    if r < 0.15:
        post = {"tag_string_general": " ".join(general), "tag_string_character": " ".join(characters),
                "tag_string_copyright": "", "rating": "gsqe"[rng.integers(0, 4)]}
        out["json"] = json.dumps(post).encode()
    elif r < 0.30:
        words = ", ".join(t.replace("_", " ") for t in general[:6])
        out["caption"] = f"An anime illustration showing {words}.".encode()
    return out


def write_shard(job: tuple[str, int, int, int, int]) -> int:
    """Write shard `index` (images start .. start+count) atomically; deterministic in (seed, index)."""
    folder, index, start, count, seed = job
    rng = np.random.default_rng([seed, index])
    path = Path(folder) / f"scale-{index:06d}.tar"
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(start, start + count):
            ext, data = encode(rng, picture(rng))
            for suffix, payload in ((ext, data), *sidecars(rng).items()):
                info = tarfile.TarInfo(f"{i:08d}.{suffix}")
                info.size, info.mtime = len(payload), 1_700_000_000
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)
    return count


def dataset(root: Path, n_images: int, per_shard: int, seed: int) -> Path:
    """The shards of `n_images` images, generated once (in parallel) and reused from the cache."""
    folder = root / f"data-{DATA_VERSION}-n{n_images}-ps{per_shard}-s{seed}"
    if (folder / "DONE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    starts = range(0, n_images, per_shard)
    jobs = [(str(folder), k, s, min(per_shard, n_images - s), seed) for k, s in enumerate(starts)]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(os.cpu_count(), _init_worker, (str(LABELS_CSV),)) as pool:
        done = sum(pool.imap_unordered(write_shard, jobs))
    megabytes = sum(p.stat().st_size for p in folder.glob("*.tar")) / 1e6
    print(f"generated {done:,} images in {len(jobs)} shards, {megabytes:,.0f} MB, "
          f"{time.perf_counter() - started:.0f} s: {folder}", flush=True)
    (folder / "DONE").write_text(str(done))
    return folder


def models_dir(root: Path) -> Path:
    """The fake production-contract models in the hub layout (built once)."""
    from tests.onnx_fakes import build_models_dir

    folder = root / "models"
    if not (folder / "DONE").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        build_models_dir(folder, LABELS_CSV)
        (folder / "DONE").write_text("")
    return folder


# ---- memory sampling ---------------------------------------------------------------------------
@dataclass
class Peaks:
    driver: int = 0
    driver_at: float = 0.0  # seconds into the stage of the driver's peak
    worker: int = 0
    worker_name: str = ""
    tree: int = 0
    processes: int = 0


def job_processes(root: psutil.Process) -> list[psutil.Process]:
    """The job process, its descendants (Ray's GCS, raylet and the workers it forks), and any other
    process still in the job's session (a Ray process reparented to init)."""
    procs = [root, *root.children(recursive=True)]
    seen = {p.pid for p in procs}
    for proc in psutil.process_iter():
        if proc.pid not in seen and _session(proc.pid) == root.pid:
            procs.append(proc)
    return procs


def _session(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def _zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _label(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:60].strip() or proc.name()
    except psutil.Error:
        return "?"


class Sampler(threading.Thread):
    """Samples the RSS of a job's process tree every `interval` seconds until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.started = time.perf_counter()
        self.peaks, self.stop = Peaks(), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def sample(self) -> None:
        try:
            procs = job_processes(self.root)
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self._record(proc, rss)
        self.peaks.tree = max(self.peaks.tree, total)
        self.peaks.processes = max(self.peaks.processes, len(procs))

    def _record(self, proc: psutil.Process, rss: int) -> None:
        if proc.pid == self.root.pid:
            if rss > self.peaks.driver:
                self.peaks.driver, self.peaks.driver_at = rss, time.perf_counter() - self.started
        elif rss > self.peaks.worker:
            self.peaks.worker, self.peaks.worker_name = rss, _label(proc)


# ---- running the jobs --------------------------------------------------------------------------
@dataclass
class StageResult:
    stage: str
    images: int
    wall: float
    rc: int
    peaks: Peaks
    job_seconds: float | None = None
    log: str = ""
    progress: str = ""  # a stage that did not finish: its last progress line

    @property
    def rate(self) -> float:
        return self.images / self.wall if self.wall > 0 else 0.0


@dataclass
class SizeRun:
    images: int
    stages: dict[str, StageResult] = field(default_factory=dict)


def snapshot(root: Path) -> Path:
    """A copy of the working tree (git's tracked and untracked, not ignored, files) for the jobs to
    run from, so that edits made while a long benchmark runs never mix two versions of the code."""
    dest = root / "src"
    shutil.rmtree(dest, ignore_errors=True)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def job_env(src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always its own local Ray
    env.update(PYTHONPATH=str(src), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    return env


def overrides(models: Path, names: list[str], num_cpus: int) -> list[str]:
    """The --set options every stage gets (the same config for the whole run)."""
    sets = [f"annotate.models_dir={json.dumps(str(models))}", f"annotate.models={json.dumps(names)}",
            'caption.backend="template"']
    if num_cpus:
        sets.append(f"ray.num_cpus={num_cpus}")
    if OVERLAP_JSON.is_file():
        sets.append(f"curate.overlap_tags={json.dumps(str(OVERLAP_JSON))}")
    return [arg for s in sets for arg in ("--set", s)]


def run_stage(stage: str, ws: Path, extra: list[str], log: Path, images: int, opts: argparse.Namespace) -> StageResult:
    """One `python -m jobs.cli STAGE` process, timed and sampled; its output goes to `log`."""
    cmd = [sys.executable, "-m", "jobs.cli", stage, "-w", str(ws), *extra]
    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=opts.src, env=job_env(opts.src), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = Sampler(proc.pid, opts.interval)
        sampler.start()
        try:
            rc = wait(proc, opts.stage_timeout)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the job, keep what was measured
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            opts.interrupted = True
        wall = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
    reap_session(proc.pid)
    text = log.read_text(errors="replace")
    result = StageResult(stage, images, wall, rc, sampler.peaks, job_seconds(text), str(log))
    if rc != 0:
        result.progress = last_progress(stage, text)
    return result


def last_progress(stage: str, text: str) -> str:
    """The job's last progress line (`ingest: 1200/20000 images, ..., 41.0 images/s, 30 s`), if any."""
    found = re.findall(rf"^{stage}: \d+/\d+ .*/s, \d+ s$", text, re.M)
    return found[-1] if found else ""


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124


def reap_session(pid: int, grace: float = 30.0) -> None:
    """Wait for the Ray processes the job started to exit; kill its process group if they linger."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not [p for p in psutil.process_iter() if _session(p.pid) == pid and not _zombie(p)]:
            return
        time.sleep(0.5)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def job_seconds(text: str) -> float | None:
    """The `time: X s` of the job's own summary."""
    found = re.findall(r"^time: ([\d.]+) s", text, re.M)
    return float(found[-1]) if found else None


def run_size(n_images: int, root: Path, extra: list[str], opts: argparse.Namespace) -> SizeRun:
    """Every stage in order on a fresh workspace; stops at the first stage that fails."""
    shards = dataset(root / "data", n_images, opts.per_shard, opts.seed)
    ws, logs = root / "runs" / f"ws-{n_images}", root / "logs"
    shutil.rmtree(ws, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    result = SizeRun(n_images)
    for stage in STAGES:
        args = ["-i", str(shards / "scale-*.tar")] if stage == "ingest" else []
        print(f"[{time.strftime('%H:%M:%S')}] {n_images:,} images: {stage} ...", flush=True)
        res = run_stage(stage, ws, args + extra, logs / f"{n_images}-{stage}.log", n_images, opts)
        result.stages[stage] = res
        print("  " + stage_line(res), flush=True)
        if res.rc != 0:
            print(f"  {stage} stopped (exit {res.rc}) at: {res.progress or '?'}; last lines of {res.log}:\n"
                  f"{tail(res.log)}", flush=True)
            break
    if not opts.keep:
        shutil.rmtree(ws, ignore_errors=True)
    return result


def tail(path: str, lines: int = 25) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


# ---- reporting ---------------------------------------------------------------------------------
def stage_line(r: StageResult) -> str:
    job = f"{r.job_seconds:8.1f}" if r.job_seconds is not None else "       -"
    rate = f"{r.rate:9.1f}" if r.rc == 0 else f"{'-':>9}"
    return (f"{r.stage:<9} {r.wall:8.1f} {job} {rate} {r.peaks.driver / MIB:9.0f} {r.peaks.driver_at:6.0f} "
            f"{r.peaks.worker / MIB:9.0f} {r.peaks.tree / MIB:9.0f} {r.peaks.processes:5d}  {r.peaks.worker_name}")


def print_size_table(run: SizeRun) -> None:
    print(f"\n== {run.images:,} images")
    print(f"{'stage':<9} {'wall s':>8} {'job s':>8} {'images/s':>9} {'driverMiB':>9} {'at s':>6} {'workerMiB':>9} "
          f"{'sumRSSMiB':>9} {'procs':>5}  largest other process")
    for res in run.stages.values():
        print(stage_line(res) + (f"\n{'':9} did not finish (exit {res.rc}); last progress: {res.progress or '?'}"
                                 if res.rc else ""))


def ratio(large: float, small: float) -> float:
    return large / small if small > 0 else float("nan")


def peak(run: SizeRun, what: str) -> int:
    return max((getattr(r.peaks, what) for r in run.stages.values()), default=0)


def comparison_line(stage: str, s: StageResult, lg: StageResult) -> str:
    job = ratio(s.job_seconds * lg.images, lg.job_seconds * s.images) if s.job_seconds and lg.job_seconds else math.nan
    return (f"{stage:<9} {s.rate:9.1f} {lg.rate:9.1f} {ratio(lg.rate, s.rate):6.2f} {job:6.2f} "
            f"{s.peaks.driver / MIB:7.0f} {lg.peaks.driver / MIB:7.0f} {ratio(lg.peaks.driver, s.peaks.driver):6.2f} "
            f"{s.peaks.worker / MIB:7.0f} {lg.peaks.worker / MIB:7.0f} {ratio(lg.peaks.worker, s.peaks.worker):6.2f}")


def result_lines(small: SizeRun, large: SizeRun) -> list[str]:
    """The RESULT lines: a stage that did not finish at both sizes has ratio nan (not met)."""
    lines = []
    for stage in STAGES:
        s, lg = small.stages.get(stage), large.stages.get(stage)
        r = ratio(lg.rate, s.rate) if s and lg and s.rc == 0 and lg.rc == 0 else math.nan
        lines.append(f"RESULT scale_{stage}_throughput ratio={r:.2f} goal={THROUGHPUT_GOAL} "
                     f"met={'yes' if r >= THROUGHPUT_GOAL else 'no'}")
    for what in ("driver", "worker"):
        r = ratio(peak(large, what), peak(small, what))
        lines.append(f"RESULT scale_{what}_rss ratio={r:.2f} goal={RSS_GOAL} met={'yes' if r <= RSS_GOAL else 'no'}"
                     + (" (informational)" if what == "worker" else ""))
    return lines


def print_results(small: SizeRun, large: SizeRun) -> None:
    print(f"\n== scaling {small.images:,} -> {large.images:,} images (ratios: large / small; "
          "'job' = the same from the jobs' own summary times, without process and Ray start-up)")
    print(f"{'stage':<9} {'small/s':>9} {'large/s':>9} {'ratio':>6} {'job':>6} {'drv S':>7} {'drv L':>7} "
          f"{'ratio':>6} {'wrk S':>7} {'wrk L':>7} {'ratio':>6}   (MiB)")
    for stage in STAGES:
        s, lg = small.stages.get(stage), large.stages.get(stage)
        if s and lg and s.rc == 0 and lg.rc == 0:
            print(comparison_line(stage, s, lg))
    print("\n" + "\n".join(result_lines(small, large)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 images, annotate with the cheap models")
    parser.add_argument("--sizes", help="comma-separated sizes (overrides --small/--large/--quick)")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per WebDataset shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=max(MIN_RAY_CPUS, os.cpu_count() or 1),
                        help="ray.num_cpus of each job (default: the cores, at least 4; 0: Ray's default, the cores)")
    parser.add_argument("--models", help=f"annotate.models, comma-separated (default: {','.join(MODELS)}; "
                                         f"with --quick: {','.join(QUICK_MODELS)})")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--stage-timeout", type=float, default=0, help="kill a stage after this many s (0: never)")
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "booruset-bench-scale"),
                        help="cache of data and models, workspaces and logs")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    parser.add_argument("--generate-only", action="store_true", help="only make (cache) the images of the sizes")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="run the jobs from the repository itself, not from a copy taken at the start")
    return parser.parse_args()


def sizes_of(opts: argparse.Namespace) -> list[int]:
    if opts.sizes:
        return sorted(int(s) for s in opts.sizes.split(","))
    return [2_000, 20_000] if opts.quick else [opts.small, opts.large]


def main() -> int:
    opts = parse_args()
    if not LABELS_CSV.is_file():
        print(f"{LABELS_CSV} not found (needs ../shared/tagdata); nothing measured")
        return 1
    root = Path(opts.root)
    sizes = sizes_of(opts)
    if opts.generate_only:
        for n in sizes:
            dataset(root / "data", n, opts.per_shard, opts.seed)
        return 0
    opts.src = REPO if opts.no_snapshot else snapshot(root)
    opts.models = opts.models or ",".join(QUICK_MODELS if opts.quick else MODELS)
    extra = overrides(models_dir(root), opts.models.split(","), opts.num_cpus)
    print(f"sizes {sizes}; {os.cpu_count()} cores, ray.num_cpus={opts.num_cpus or 'default'}; "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; models {opts.models}; code {opts.src}",
          flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    opts.interrupted, runs = False, []
    for n in sizes:
        runs.append(run_size(n, root, extra, opts))
        print_size_table(runs[-1])
        if opts.interrupted:
            print(f"interrupted during {runs[-1].images:,} images; the sizes after it were not run")
            break
    print_results(runs[0], runs[-1] if len(runs) > 1 else SizeRun(sizes[-1]))
    return 0 if not opts.interrupted and all(r.rc == 0 for run in runs for r in run.stages.values()) else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
