"""Shared fixtures: one local Ray (2 CPUs) per test session, paths to ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_server import s3_endpoint  # noqa: F401 (a session fixture: one server)
from served_models import served_models, transformers_server  # noqa: F401 (session fixtures: one server)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SAMPLE_SHARDS = REPO / "sample" / "shards"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token prompt on a test Ray
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip when this clone has no ../shared beside it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: this clone has no ../shared beside it")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session, started on first use."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def workspace(tmp_path):
    from store.workspace import Workspace

    return Workspace(str(tmp_path / "ws"))


@pytest.fixture
def config(tmp_path):
    """The default config with a workspace in tmp_path and a 2-CPU local Ray."""
    from jobs.config import load_config

    return load_config(None, [f'workspace.path="{tmp_path / "ws"}"', "ray.num_cpus=2"])
