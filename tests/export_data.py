"""One workspace per test session with the bundled sample through ingest, curate and caption
(template), shared by the export and report tests (the jobs run once, in a few tens of seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_SHARDS

_PREPARED: dict[str, str] = {}


def base_config(ws_path: Path, *overrides: str) -> dict:
    from jobs.config import load_config

    return load_config(None, [f'workspace.path="{ws_path}"', "ray.num_cpus=2",
                              # caption: the template captioner; its extras are tested by the caption tests
                              "caption.tags_from_text=false", "caption.related_tags=false", *overrides])


def prepared_workspace(tmp_path_factory) -> Path:
    """ingest -> curate -> caption on the bundled sample, once per session (the path of a fresh copy)."""
    if not list(SAMPLE_SHARDS.glob("*.tar")):
        pytest.skip("bundled sample shards missing")
    if "ws" not in _PREPARED:
        from jobs import caption, curate, ingest
        from store.workspace import Workspace

        path = tmp_path_factory.mktemp("prepared") / "ws"
        cfg, ws = base_config(path), Workspace(str(path))
        for job in (ingest, curate, caption):
            job.run(cfg, ws)
        _PREPARED["ws"] = str(path)
    copy = tmp_path_factory.mktemp("ws") / "ws"
    shutil.copytree(_PREPARED["ws"], copy)
    return copy
