"""`booruset run` with no arguments, as a new user runs it: a real subprocess in an empty folder
takes the bundled sample through every job (models that cannot be had offline are skipped with
a message), ends with shards that webdataset reads and a report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLE_SHARDS


def booruset_command() -> list[str]:
    script = shutil.which("booruset", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "jobs.cli"]


def test_run_without_arguments_exports_the_sample_and_writes_the_report(tmp_path):
    import webdataset as wds

    if not list(SAMPLE_SHARDS.glob("*.tar")):
        pytest.skip("bundled sample shards missing")
    # an empty Hugging Face cache, offline: the hub models are skipped as on a new user's machine without network
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as for a new user (not the test session's)
    done = subprocess.run([*booruset_command(), "run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workspace = tmp_path / "workspace"
    shards = sorted(str(p) for p in (workspace / "export" / "webdataset").glob("shard-*.tar"))
    assert shards
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert samples and all(s["txt"] and ("jpg" in s or "png" in s or "webp" in s) for s in samples)
    assert (workspace / "report" / "index.html").is_file() and (workspace / "report" / "stages.png").is_file()
    assert f"shards: {workspace / 'export' / 'webdataset'}" in done.stdout
    assert f"report: {workspace / 'report' / 'index.html'}" in done.stdout
    assert "annotate: tagger: skipped" in done.stdout  # offline: says how to enable the model


def test_a_run_stopped_by_its_error_rate_still_writes_the_report(tmp_path, ray_local, capsys):
    """Pictures without tags or captions (no tagger offline): caption has nothing to say (no_tags,
    not a drop), an export to kohya folders leaves every image out (empty_text: kohya refuses an
    empty caption file), which stops the run, and the report that shows why is still written."""
    from jobs.cli import run_jobs
    from store.workspace import Workspace
    from tests.export_data import base_config
    from tests.hostile_data import encode, picture

    folder = tmp_path / "in"
    folder.mkdir()
    for seed in range(3):
        (folder / f"p{seed}.png").write_bytes(encode(picture(seed=seed), "PNG"))
    cfg = base_config(tmp_path / "ws", f'ingest.inputs=["{folder}"]', f'export.out="{tmp_path / "out"}"',
                      'export.formats=["kohya"]')
    ws = Workspace(str(tmp_path / "ws"))
    assert run_jobs(cfg, ws, ["ingest", "curate", "caption", "export", "report"]) == 1
    err = capsys.readouterr().err
    assert "export: error rate 100.0% > max_error_rate; stopping; the report is still written" in err
    assert "caption: error rate" not in err
    kinds = ws.connect().execute("select stage, kind, dropped from errors order by all").fetchall()
    assert kinds == [("caption:template", "no_tags", False)] * 3 + [("export", "empty_text", True)] * 3
    assert (tmp_path / "ws" / "report" / "index.html").is_file()


@pytest.mark.parametrize("num_cpus", ["1", "0"])
def test_a_job_starts_its_own_ray_whatever_cluster_ray_start_left_named(tmp_path, num_cpus):
    """ray.init() without an address joins the cluster named in <ray temp dir>/ray_current_cluster
    (written by `ray start`, left there when that cluster died): with ray.num_cpus a job failed
    ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided"), without
    it the job hung trying to reach the dead address (and an alive one, another project's, ran it)."""
    import tempfile

    if not list(SAMPLE_SHARDS.glob("*.tar")):
        pytest.skip("bundled sample shards missing")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    try:
        os.makedirs(f"{ray_tmp}/ray")
        with open(f"{ray_tmp}/ray/ray_current_cluster", "w", encoding="utf-8") as f:
            f.write("127.0.0.1:9")  # a `ray start` long gone
        shard = tmp_path / "in"
        shard.mkdir()
        shutil.copy(sorted(SAMPLE_SHARDS.glob("*.tar"))[0], shard)
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run([*booruset_command(), "ingest", "-w", str(tmp_path / "ws"), "-i", str(shard),
                               "--set", f"ray.num_cpus={num_cpus}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "rows out: images" in done.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
