"""Millions of images on a cluster, in miniature: a real three-node Ray cluster on this machine
(`ray start --head` and two `ray start --address`, each node with its own temp dir; one declares
a GPU) whose Python does not have booruset, so the code must travel with the job; the workspace
on a real S3-compatible server on loopback (moto's server, a separate process), the endpoint in
the workspace URI and the credentials in the standard AWS variables.

`booruset run` joins the cluster through `ray.address` and must end with the tables and shards
of a local run; the face detector (a tiny fake with the production contract) asks for GPU
shares, so its actors must have run on the node that declared the GPU (on its CPU: no CUDA
here); `booruset sql` reads the S3 workspace and stays read-only. The README's cluster section
describes the same steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import psutil
import pytest
from s3_server import AWS, free_port

from store.workspace import Workspace
from tests.conftest import REPO, SAMPLE_SHARDS
from tests.onnx_fakes import face_model_dir


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """(address, id of the node with the GPU) of a head and two worker nodes started with a Python
    that has every dependency but not booruset (a venv whose only path is this venv's
    site-packages: the editable install's hook there is never run)."""
    root = tmp_path_factory.mktemp("cluster")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "nodeenv")], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (root / "nodeenv" / "lib" / version / "site-packages" / "deps.pth").write_text(sysconfig.get_paths()["purelib"])
    python = str(root / "nodeenv" / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    assert subprocess.run([python, "-c", "import jobs"], cwd=root, env=env, capture_output=True).returncode != 0
    address = f"127.0.0.1:{free_port()}"
    head = ["--head", f"--port={address.split(':')[1]}", "--disable-usage-stats", "--include-dashboard=false"]
    nodes = {"head": head,
             "gpu": [f"--address={address}", "--num-gpus=1"], "cpu": [f"--address={address}"]}
    try:
        for name, args in nodes.items():
            started = subprocess.run([python, "-m", "ray.scripts.scripts", "start", *args, "--num-cpus=1",
                                      f"--temp-dir={root / name}", "--object-store-memory=150000000"],
                                     cwd=root, env=env, capture_output=True, text=True, timeout=300)
            assert started.returncode == 0, f"ray start ({name}): {started.stdout[-2000:]}{started.stderr[-2000:]}"
        probe = ("import json, ray; ray.init(address=%r); "
                 "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')]))")
        found = subprocess.run([python, "-c", probe % address], cwd=root, env=env, capture_output=True, text=True,
                               timeout=120, check=True)
        gpu_nodes = json.loads(found.stdout.strip().splitlines()[-1])
        assert len(gpu_nodes) == 1
        yield address, gpu_nodes[0]
    finally:  # `ray stop` would stop every Ray on the machine: end only this cluster's processes
        for process in psutil.process_iter(["cmdline"]):
            if any(str(root) in part for part in process.info["cmdline"] or []):
                process.kill()


def booruset(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **AWS, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_HOME": str(cwd / "hf-home")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def table(ws: Workspace, query: str) -> list[tuple]:
    return ws.connect().execute(query).fetchall()


def exported(folder: Path) -> dict[str, bytes]:
    members = {}
    for shard in sorted((folder / "webdataset").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                members[member.name] = tar.extractfile(member).read()
    return members


QUERIES = {
    "images": "select key, width, height, sha256, phash from images order by all",
    "detections": "select key, model, label, score from detections order by all",
    "tags": "select key, tag, category, rank from tags order by all",
    "image_meta": "select key, n_faces, n_people, characters, rating from image_meta order by all",
    "duplicates": "select key, dup_group, reason from duplicates order by all",
    "captions": "select key, attempt, caption, accuracy, accepted from captions order by all",
    "balance": "select key, multiply from balance order by all",
}


def test_run_on_a_cluster_with_an_s3_workspace_matches_a_local_run(tmp_path, s3_endpoint, ray_cluster):
    if not list(SAMPLE_SHARDS.glob("*.tar")):
        pytest.skip("bundled sample shards missing")
    address, gpu_node = ray_cluster
    models = ["--set", 'annotate.models=["cascade_face", "face"]',
              "--set", f"annotate.models_dir={json.dumps(str(face_model_dir(tmp_path / 'models')))}"]
    uri = f"s3://ws-bucket/run?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    remote = booruset(tmp_path, "run", "-w", uri, *models, "--set", f'ray.address="{address}"',
                      "--set", f'export.out="{tmp_path / "s3-export"}"',
                      "--set", f'report.out="{tmp_path / "s3-report"}"')
    assert remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-3000:]
    local = booruset(tmp_path, "run", "-w", str(tmp_path / "local"), *models, "--set", "ray.num_cpus=2")
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    # the GPU-requesting face actors ran on the node that declared the GPU (on its CPU)
    face_note = next(line for line in remote.stdout.splitlines() if line.startswith("face_detect"))
    assert f"on Ray node {gpu_node[:12]};" in face_note, face_note

    os.environ.update(AWS)  # this process reads the S3 workspace too, as `booruset sql` would
    s3_ws, local_ws = Workspace(uri, create=False), Workspace(str(tmp_path / "local"), create=False)
    assert not s3_ws.local
    for name, query in QUERIES.items():
        rows = table(s3_ws, query)
        assert rows and rows == table(local_ws, query), name
    assert exported(tmp_path / "s3-export") == exported(tmp_path / "local" / "export")
    assert (tmp_path / "s3-report" / "index.html").is_file()

    answer = booruset(tmp_path, "sql", "-w", uri, "select count(*) as n from image_tag_lists")
    assert answer.returncode == 0 and "24" in answer.stdout, answer.stdout + answer.stderr
    refused = booruset(tmp_path, "sql", "-w", uri, "select * from read_csv('/etc/passwd')")
    assert refused.returncode == 2 and "root:" not in refused.stdout
    assert refused.stderr.count("\n") == 1  # one line
