"""A workspace on object storage: `booruset run` and `booruset sql` on an S3 workspace served by a
real S3-compatible server on loopback (moto's server, a separate process), with the endpoint in
the workspace URI and credentials in the standard AWS variables. Every job works, and the
tables and exported samples equal those of a local run."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs.workspace import Workspace
from tests.conftest import REPO, SAMPLE_SHARDS

AWS = {"AWS_ACCESS_KEY_ID": "booruset-test", "AWS_SECRET_ACCESS_KEY": "booruset-test",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """host:port of a moto S3 server process with a bucket `ws-bucket`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"127.0.0.1:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True,
                           access_key=AWS["AWS_ACCESS_KEY_ID"], secret_key=AWS["AWS_SECRET_ACCESS_KEY"])
    deadline = time.monotonic() + 60
    while True:
        try:
            fs.create_dir("ws-bucket")
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    yield endpoint
    server.kill()
    server.wait()


def booruset(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **AWS, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_HOME": str(cwd / "hf-home")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args, "--set", "ray.num_cpus=2"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


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
    "tags": "select key, tag, category, rank from tags order by all",
    "image_meta": "select key, n_faces, n_people, characters, rating from image_meta order by all",
    "duplicates": "select key, dup_group, reason from duplicates order by all",
    "captions": "select key, attempt, caption, accuracy, accepted from captions order by all",
    "balance": "select key, multiply from balance order by all",
}


def test_run_and_sql_on_an_s3_workspace_match_a_local_run(tmp_path, s3_endpoint):
    if not list(SAMPLE_SHARDS.glob("*.tar")):
        pytest.skip("bundled sample shards missing")
    uri = f"s3://ws-bucket/run?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    remote = booruset(tmp_path, "run", "-w", uri, "--set", f'export.out="{tmp_path / "s3-export"}"',
                      "--set", f'report.out="{tmp_path / "s3-report"}"')
    assert remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-3000:]
    local = booruset(tmp_path, "run", "-w", str(tmp_path / "local"))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

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
    assert io.StringIO(refused.stderr).read().count("\n") == 1  # one line
