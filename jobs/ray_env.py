"""Start or join Ray the same way for every job."""

from __future__ import annotations

import logging
import os

import ray

from jobs.config import REPO, Config


def init_ray(cfg: Config) -> None:
    """Join the cluster named in the config, the one `ray job submit` runs in, or start a local Ray."""
    if ray.is_initialized():
        return
    address = cfg["ray"]["address"] or None
    kwargs: dict = {"ignore_reinit_error": True, "logging_level": logging.WARNING,
                    "include_dashboard": False, "log_to_driver": True}
    if address is None and "RAY_ADDRESS" not in os.environ:
        if cfg["ray"]["num_cpus"]:
            kwargs["num_cpus"] = int(cfg["ray"]["num_cpus"])
        # tasks import jobs/, udfs/, schemas/ from the repository root
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": _pythonpath()}}
    ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


def _pythonpath() -> str:
    current = os.environ.get("PYTHONPATH", "")
    return f"{REPO}{os.pathsep}{current}" if current else str(REPO)
