"""`booruset models fetch [--list] [--source DIR]`: stage every configured model file in
`annotate.models_dir`, in the hub layout `<models_dir>/<repo>/<file>` that udfs/model_files reads.

Offline GPU clusters read their models from shared storage: fetch them once on a machine that
can reach the Hugging Face Hub (or copy them from another staged folder with --source), then
run with the same `annotate.models_dir`. Files are written under a temporary name and renamed,
so a killed fetch never leaves a partial file that counts as present.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path

from jobs.config import Config, ConfigError
from udfs.annotate.model_files import hub_reachable

DETECTORS = ("face", "head", "person")
HUB_MODELS = (*DETECTORS, "ccip", "tagger")  # cascade_face is bundled: nothing to fetch


@dataclass(frozen=True)
class ModelFile:
    repo: str
    file: str
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
        files.append(ModelFile(spec["repo"], spec["file"]))
        if name in DETECTORS:  # udfs/yolo_detector.model_type: "yolo" when the repository has none
            files.append(ModelFile(spec["repo"], posixpath.join(posixpath.dirname(spec["file"]), "model_type.json"),
                                   required=False))
        if name == "tagger":  # udfs/annotate/wd_tagger.py and curate's default tag list
            files.append(ModelFile(spec["labels_repo"], spec["labels_file"]))
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
    if list_only:
        return list_files(files, Path(models_dir))
    return fetch_files(files, Path(models_dir), source)


def list_files(files: list[ModelFile], root: Path) -> int:
    """One line per file, present (with its size) or missing; 1 when a required file is missing."""
    missing = 0
    for f in files:
        path = root / f.repo / f.file
        if path.is_file():
            print(f"present  {f.name} ({size(path.stat().st_size)})")
        else:
            missing += f.required
            print(f"missing  {f.name}" + ("" if f.required else " (optional)"))
    print(f"models: {len(files)} files in {root}, {missing} required missing")
    return 1 if missing else 0


def fetch_files(files: list[ModelFile], root: Path, source: str | None) -> int:
    """Fetch each missing file; one line per file and a summary; 1 when a required file failed."""
    counts = {"fetched": 0, "already present": 0, "not at the source": 0, "failed": 0}
    for f in files:
        if (root / f.repo / f.file).is_file():
            outcome, detail = "already present", ""
        else:
            outcome, detail = fetch_one(f, root, source)
        if outcome == "not at the source" and f.required:
            outcome = "failed"
        counts[outcome] += 1
        detail = f" ({detail})" if outcome == "fetched" else f": {detail}" if detail else ""
        print(f"{outcome}  {f.name}{detail}", flush=True)
    counts["not at the source (optional)"] = counts.pop("not at the source")
    print(f"models: {len(files)} files from {source or 'the Hugging Face Hub'} in {root}: "
          + ", ".join(f"{n} {outcome}" for outcome, n in counts.items()))
    return 1 if counts["failed"] else 0


def fetch_one(f: ModelFile, root: Path, source: str | None) -> tuple[str, str]:
    """(outcome, detail) of fetching one file from `source` (a staged folder) or the hub."""
    dest = root / f.repo / f.file
    try:
        if source is None:
            missing = download(f, root)
        else:
            missing = copy_atomic(Path(source) / f.repo / f.file, dest)
    except Exception as exc:  # noqa: BLE001 - one file's failure (disk, network, access) is its line
        return "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if missing:
        return "not at the source", missing
    return "fetched", size(dest.stat().st_size)


def copy_atomic(src: Path, dest: Path) -> str:
    """Copy `src` to `dest` through a temporary name; "" when done, else why there is nothing to copy."""
    if not src.is_file():
        return f"no {src}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return ""


def download(f: ModelFile, root: Path) -> str:
    """Download `f` from the hub into the layout; "" when done, else why the hub has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if not hub_reachable():  # fail at once rather than through the client's retries, per file
        raise ConnectionError("the Hugging Face Hub cannot be reached (offline, or HF_HUB_OFFLINE is set)")
    # local_dir=<root>/<repo> puts the file at <root>/<repo>/<file>; the client downloads to an
    # .incomplete file under <root>/<repo>/.cache/huggingface/ and renames it in place when complete
    try:
        hf_hub_download(repo_id=f.repo, filename=f.file, local_dir=root / f.repo)
    except RemoteEntryNotFoundError:
        return f"the repository {f.repo} has no {f.file}"
    return ""


def size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
