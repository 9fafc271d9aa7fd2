"""Where a model's files come from: a local models directory, else the Hugging Face Hub cache.

GPU clusters are often offline with models staged on shared storage: `annotate.models_dir`
holds `<repo>/<file>` (the hub layout), e.g. `models/deepghs/ccip_onnx/<model>/model_feat.onnx`.
Without it, files come from the Hugging Face cache, downloaded on first use when online.
`booruset models fetch` (jobs/models.py) stages every configured model into `annotate.models_dir`
and records in `<models_dir>/booruset-models.json` the revision each file was fetched at (the
commit it resolved to, its size and sha256).

A model's `revision` (a branch, tag or commit of its repository) pins it: "main" takes what is
there (the staged file, or the cache's main); any other revision takes a staged file only when
the record says it was fetched at that revision, else the Hugging Face cache's snapshot of it.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import socket
from pathlib import Path
from urllib.parse import urlparse


class ModelUnavailable(Exception):
    """A model file that cannot be had here; the message says how to make it available."""


DEFAULT_REVISION = "main"
RECORD = "booruset-models.json"  # in models_dir: "<repo>/<file>" -> revision, commit, size, sha256


def model_file(repo: str, file: str, models_dir: str = "", revision: str = DEFAULT_REVISION) -> str:
    """Local path of `file` of hub repository `repo` at `revision`."""
    other = ""  # a staged file of another revision (or one staged with no record) is not this one
    if models_dir:
        local = Path(models_dir) / repo / file
        if local.is_file():
            record = staged_record(models_dir, repo, file)
            if at_revision(record, revision):
                return str(local)
            other = f"the staged file is revision {record['revision']}; " if record else \
                "the staged file has no record of its revision; "
    from huggingface_hub import hf_hub_download

    try:
        try:
            return hf_hub_download(repo_id=repo, filename=file, revision=revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: download, when the hub can be reached
            if not hub_reachable():
                raise ConnectionError("the Hugging Face Hub cannot be reached") from None
            return hf_hub_download(repo_id=repo, filename=file, revision=revision)
    except Exception as exc:  # offline, not cached, no such file, no access: all mean "not here"
        raise ModelUnavailable(unavailable_hint(repo, file, models_dir, other + type(exc).__name__, revision)) from exc


def at_revision(record: dict | None, revision: str) -> bool:
    """Whether a staged file (its record, None when it has none) is `revision`: any file is
    "main"; another revision must be the one it was fetched at, or the commit that resolved to."""
    if revision == DEFAULT_REVISION:
        return True
    return bool(record) and revision in (record.get("revision"), record.get("commit"))


def staged_records(models_dir: str | Path) -> dict[str, dict]:
    """What `booruset models fetch` recorded of the files it staged in `models_dir`."""
    try:
        with open(Path(models_dir) / RECORD, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def staged_record(models_dir: str | Path, repo: str, file: str) -> dict | None:
    return staged_records(models_dir).get(f"{repo}/{file}")


def unavailable_hint(repo: str, file: str, models_dir: str, reason: str, revision: str = DEFAULT_REVISION) -> str:
    """Why `repo/file` is not here and the commands that make it available (the installed
    huggingface_hub's CLI is `hf`; `huggingface-cli download` no longer works)."""
    at = f" at revision {revision}" if revision != DEFAULT_REVISION else ""
    flag = f" --revision {shlex.quote(revision)}" if revision != DEFAULT_REVISION else ""
    if models_dir:
        target, option = shlex.quote(f"{models_dir}/{repo}"), shlex.quote(f"annotate.models_dir={models_dir}")
        return (f"{repo}/{file}{at} is neither in {models_dir} nor in the Hugging Face cache ({reason}); "
                f"fetch every configured model with `booruset models fetch --set {option}` (or this one with "
                f"`hf download {repo} {file}{flag} --local-dir {target}`, which records no revision)")
    return (f"{repo}/{file}{at} is not available ({reason}); download it once online with "
            f"`hf download {repo} {file}{flag}`, or stage every configured model for an offline cluster with "
            f"`booruset models fetch --set annotate.models_dir=DIR` and run with annotate.models_dir=DIR")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP check per process, so that an offline machine does not sit through the
    hub client's retries with backoff once per model file."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def optional_file(repo: str, file: str, models_dir: str = "", revision: str = DEFAULT_REVISION) -> str | None:
    """Like model_file, for side files that a repository may lack (model_type.json, ...)."""
    try:
        return model_file(repo, file, models_dir, revision)
    except ModelUnavailable:
        return None
