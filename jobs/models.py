"""`booruset models fetch [--list] [--source DIR]`: stage every configured model file in
`annotate.models_dir`, in the hub layout `<models_dir>/<repo>/<file>` that udfs/model_files reads.

Offline GPU clusters read their models from shared storage: fetch them once on a machine that
can reach the Hugging Face Hub (or copy them from another staged folder with --source), then
run with the same `annotate.models_dir`. Files are written under a temporary name and renamed,
so a killed fetch never leaves a partial file that counts as present; a file counts as present
only when it reads as what it is (udfs/annotate/model_check.py: an ONNX graph, the detector's
metadata, the label CSV), so a 0-byte or foreign file is fetched again. Each file is fetched at
its model's `revision` and recorded in `<models_dir>/booruset-models.json` (the revision, the
commit it resolved to, size and sha256): a run with a pinned revision reads only a file recorded
at that revision, and a fetch replaces one of another revision.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jobs.config import Config, ConfigError, check_writable_folder
from udfs.annotate.model_check import kind_of, problem, staged_problem
from udfs.annotate.model_files import RECORD, at_revision, hub_reachable, staged_records

DETECTORS = ("face", "head", "person")
HUB_MODELS = (*DETECTORS, "ccip", "tagger")  # cascade_face is bundled: nothing to fetch


@dataclass(frozen=True)
class ModelFile:
    repo: str
    file: str
    kind: str  # what it must read as (udfs/annotate/model_check.py)
    revision: str = "main"
    required: bool = True  # side files that loaders read only when present are optional

    @property
    def name(self) -> str:
        return f"{self.repo}/{self.file}"


def model_files(cfg: Config) -> list[ModelFile]:
    """Every hub file the configured annotate models read (the callers of model_file/optional_file)."""
    opts = cfg["annotate"]
    files: list[ModelFile] = []
    for name in opts["models"]:
        if name == "cascade_face":
            continue
        if name not in HUB_MODELS:
            raise ConfigError(f"annotate.models: unknown model {name!r} (known: cascade_face, {', '.join(HUB_MODELS)})")
        spec = opts[name]
        files.append(ModelFile(spec["repo"], spec["file"], kind_of(spec["file"], name), spec["revision"]))
        if name in DETECTORS:  # udfs/yolo_detector.model_type: "yolo" when the repository has none
            files.append(ModelFile(spec["repo"], posixpath.join(posixpath.dirname(spec["file"]), "model_type.json"),
                                   "model_type", spec["revision"], required=False))
        if name == "tagger":  # udfs/annotate/wd_tagger.py and curate's default tag list
            files.append(ModelFile(spec["labels_repo"], spec["labels_file"], "labels", spec["labels_revision"]))
    # curate.ccip_metric_model is a local ONNX path (opened as is), not a hub file: nothing to fetch
    return list(dict.fromkeys(files))  # two models may share a file: once each, in order


def main(cfg: Config, list_only: bool, source: str | None) -> int:
    models_dir = cfg["annotate"]["models_dir"]
    if not models_dir:
        raise ConfigError("models fetch needs a folder to stage the models in: "
                          "set --set annotate.models_dir=DIR (shared storage the cluster reads)")
    if source is not None and not Path(source).is_dir():
        raise ConfigError(f"models fetch --source: {source} is not a folder")
    files = model_files(cfg)
    # a file in the way (or a read-only folder) failed each model file on its own line, and
    # --list called every file missing as if the folder were empty. A read-only share that already
    # holds every file is fine: fetch then only says so (an idempotent step of a cluster's setup).
    check_writable_folder("annotate.models_dir", Path(models_dir),
                          write=not list_only and not all_staged(files, Path(models_dir)))
    if list_only:
        return list_files(files, Path(models_dir))
    return fetch_files(files, Path(models_dir), source)


def all_staged(files: list[ModelFile], root: Path) -> bool:
    """Whether every file is staged under `root` at its revision and usable (fetch has nothing to do)."""
    records = staged_records(root) if root.is_dir() else {}
    return all((root / f.repo / f.file).is_file() and staged_problem_of(f, root, records) == "" for f in files)


def staged_problem_of(f: ModelFile, root: Path, records: dict[str, dict]) -> str:
    """Why the staged copy of `f` cannot serve (another revision, damaged, unreadable); "" when it can."""
    record = records.get(f.name)
    if not at_revision(record, f.revision):
        return (f"staged at revision {record['revision']}, configured {f.revision}" if record
                else f"staged with no record of its revision, configured {f.revision}")
    return staged_problem(root / f.repo / f.file, f.kind, record)


def described(path: Path, record: dict | None) -> str:
    """`1.0 KB, revision main, commit 0123456789ab` (what the record says, when there is one)."""
    parts = [size(path.stat().st_size)]
    if record:
        parts.append(f"revision {record.get('revision')}")
        if record.get("commit") and record["commit"] != record.get("revision"):
            parts.append(f"commit {record['commit'][:12]}")
    return ", ".join(parts)


def list_files(files: list[ModelFile], root: Path) -> int:
    """One line per file, present (with its size and revision), unusable (why) or missing; 1
    when a required file is missing or any file is unusable (a loader would fail on it)."""
    missing = unusable = 0
    records = staged_records(root)
    for f in files:
        path = root / f.repo / f.file
        if path.is_file():
            why = staged_problem_of(f, root, records)
            unusable += bool(why)
            print(f"unusable  {f.name}: {why}" if why
                  else f"present  {f.name} ({described(path, records.get(f.name))})")
        else:
            missing += f.required
            print(f"missing  {f.name}" + ("" if f.required else " (optional)"))
    print(f"models: {len(files)} files in {root}, {missing} required missing, {unusable} unusable"
          + (" (`booruset models fetch` fetches them again)" if unusable else ""))
    return 1 if missing or unusable else 0


def fetch_files(files: list[ModelFile], root: Path, source: str | None) -> int:
    """Fetch each file not here, or here but unusable or of another revision (replaced); one
    line per file and a summary; 1 when a required file failed."""
    counts = {"fetched": 0, "already present": 0, "not at the source": 0, "failed": 0}
    for f in files:
        path = root / f.repo / f.file
        why = staged_problem_of(f, root, staged_records(root)) if path.is_file() else None
        if why == "":
            outcome, detail = "already present", ""
        else:
            outcome, detail = fetch_one(f, root, source)
            if why and outcome == "fetched":
                detail += f"; replaced a file that {why}" if not why.startswith("staged") else f"; replaced one {why}"
        if outcome == "not at the source" and (f.required or why):
            # an optional file may be absent, but one staged unusable would fail its loader
            outcome, detail = "failed", detail + (f"; the staged file {why}" if why else "")
        counts[outcome] += 1
        detail = f" ({detail})" if outcome == "fetched" else f": {detail}" if detail else ""
        print(f"{outcome}  {f.name}{detail}", flush=True)
    counts["not at the source (optional)"] = counts.pop("not at the source")
    print(f"models: {len(files)} files from {source or 'the Hugging Face Hub'} in {root}: "
          + ", ".join(f"{n} {outcome}" for outcome, n in counts.items()))
    return 1 if counts["failed"] else 0


class Unusable(Exception):
    """The file came, but does not read as what it must be: it is not staged."""


def fetch_one(f: ModelFile, root: Path, source: str | None) -> tuple[str, str]:
    """(outcome, detail) of fetching one file from `source` (a staged folder) or the hub."""
    dest = root / f.repo / f.file
    try:
        if source is None:
            missing, record = download(f, root)
        else:
            missing, record = copy_atomic(f, Path(source), dest)
    except Unusable as exc:
        return "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - one file's failure (disk, network, access) is its line
        return "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if missing:
        return "not at the source", missing
    write_record(root, f.name, {**record, "size": dest.stat().st_size, "sha256": sha256(dest)})
    return "fetched", described(dest, staged_records(root).get(f.name))


def copy_atomic(f: ModelFile, source: Path, dest: Path) -> tuple[str, dict]:
    """Copy `f` from the staged folder `source` to `dest` through a temporary name, checked
    before the rename; ("", its record) when done, else (why there is nothing to copy, {})."""
    src = source / f.repo / f.file
    if not src.is_file():
        return f"no {src}", {}
    record = staged_records(source).get(f.name)
    if not at_revision(record, f.revision):  # the source's copy must say it is that revision
        raise Unusable(f"{src} is revision {record['revision']}, configured {f.revision}" if record
                       else f"{src} has no record of being revision {f.revision} (no {source / RECORD} entry)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(src, tmp)
        why = problem(tmp, f.kind)
        if why:
            raise Unusable(f"{src} {why}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return "", {"revision": record["revision"] if record else f.revision,
                "commit": record.get("commit") if record else None, "source": str(source)}


def download(f: ModelFile, root: Path) -> tuple[str, dict]:
    """Download `f` at its revision from the hub into the layout; ("", its record) when done,
    else (why the hub has no such file, {})."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if not hub_reachable():  # fail at once rather than through the client's retries, per file
        raise ConnectionError("the Hugging Face Hub cannot be reached (offline, or HF_HUB_OFFLINE is set)")
    dest = root / f.repo / f.file
    # into a folder of its own beside the layout, then renamed over the file there once it checks
    # out: the file staged before (unusable, or of another revision) stays until then, and the
    # client's local_dir metadata cannot take a file already there for the one asked for
    root.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        # the commit the revision names now, downloaded as such: what the record says is what came
        commit = get_hf_file_metadata(hf_hub_url(f.repo, f.file, revision=f.revision)).commit_hash or f.revision
        got = Path(hf_hub_download(repo_id=f.repo, filename=f.file, revision=commit, local_dir=fresh))
        why = problem(got, f.kind)
        if why:
            raise Unusable(f"the downloaded file {why}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)
    except RemoteEntryNotFoundError:
        return f"the repository {f.repo} has no {f.file}" + (f" at {f.revision}" if f.revision != "main" else ""), {}
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return "", {"revision": f.revision, "commit": commit, "source": "hub"}


def write_record(root: Path, name: str, record: dict) -> None:
    """Record how `name` was staged in <root>/booruset-models.json (through a temporary name)."""
    records = staged_records(root)
    records[name] = record
    tmp = root / f".{RECORD}.{os.getpid()}.part"
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / RECORD)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
