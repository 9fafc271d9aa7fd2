"""Where a model's files come from: a local models directory, else the Hugging Face Hub cache.

GPU clusters are often offline with models staged on shared storage: `annotate.models_dir`
holds `<repo>/<file>` (the hub layout), e.g. `models/deepghs/ccip_onnx/<model>/model_feat.onnx`.
Without it, files come from the Hugging Face cache, downloaded on first use when online.
`booruset models fetch` (jobs/models.py) stages every configured model into `annotate.models_dir`.
"""

from __future__ import annotations

import functools
import os
import shlex
import socket
from pathlib import Path
from urllib.parse import urlparse


class ModelUnavailable(Exception):
    """A model file that cannot be had here; the message says how to make it available."""


def model_file(repo: str, file: str, models_dir: str = "") -> str:
    """Local path of `file` of hub repository `repo`."""
    if models_dir:
        local = Path(models_dir) / repo / file
        if local.is_file():
            return str(local)
    from huggingface_hub import hf_hub_download

    try:
        try:
            return hf_hub_download(repo_id=repo, filename=file, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: download, when the hub can be reached
            if not hub_reachable():
                raise ConnectionError("the Hugging Face Hub cannot be reached") from None
            return hf_hub_download(repo_id=repo, filename=file)
    except Exception as exc:  # offline, not cached, no such file, no access: all mean "not here"
        raise ModelUnavailable(unavailable_hint(repo, file, models_dir, type(exc).__name__)) from exc


def unavailable_hint(repo: str, file: str, models_dir: str, reason: str) -> str:
    """Why `repo/file` is not here and the commands that make it available (the installed
    huggingface_hub's CLI is `hf`; `huggingface-cli download` no longer works)."""
    if models_dir:
        target, option = shlex.quote(f"{models_dir}/{repo}"), shlex.quote(f"annotate.models_dir={models_dir}")
        return (f"{repo}/{file} is neither in {models_dir} nor in the Hugging Face cache ({reason}); "
                f"fetch it with `hf download {repo} {file} --local-dir {target}`, or every "
                f"configured model with `booruset models fetch --set {option}`")
    return (f"{repo}/{file} is not available ({reason}); download it once online with "
            f"`hf download {repo} {file}`, or stage every configured model for an offline cluster with "
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


def optional_file(repo: str, file: str, models_dir: str = "") -> str | None:
    """Like model_file, for side files that a repository may lack (model_type.json, ...)."""
    try:
        return model_file(repo, file, models_dir)
    except ModelUnavailable:
        return None
