"""A real S3-compatible server on loopback for the object-storage tests: moto's server in its own
process, one per test session, with a bucket `ws-bucket` (fixture `s3_endpoint`, host:port); the
credentials any client must give are AWS."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

AWS = {"AWS_ACCESS_KEY_ID": "booruset-test", "AWS_SECRET_ACCESS_KEY": "booruset-test",
       "AWS_DEFAULT_REGION": "us-east-1"}


# Ports Ray's components take by default on every node (dashboard agent, dashboard, client
# server): a port drawn by the OS is in the same range as the agent's 52365, and once was it,
# which failed `ray start` ("... is trying to use a port number 52365 that is used by other components")
RAY_DEFAULT_PORTS = {52365, 8265, 10001}
SERVER_LOGS: dict[str, Path] = {}  # endpoint -> the server's log: one line per request it answered


def free_port() -> int:
    """A free loopback port that none of Ray's default ports is."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


def start_moto(log: Path, bucket: str) -> tuple[subprocess.Popen, str]:
    """(the process, host:port) of a moto S3 server on loopback with `bucket`, logging to `log`
    (one line per request); RuntimeError when it does not come up within a minute."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"127.0.0.1:{port}"
    SERVER_LOGS[endpoint] = log
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True,
                           access_key=AWS["AWS_ACCESS_KEY_ID"], secret_key=AWS["AWS_SECRET_ACCESS_KEY"])
    deadline = time.monotonic() + 60
    while True:
        try:
            fs.create_dir(bucket)
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """host:port of a moto S3 server process with a bucket `ws-bucket`. Up to three ports: the one
    drawn is free when drawn, and may be another process's by the time moto binds it."""
    for attempt in range(3):
        try:
            server, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "server.log", "ws-bucket")
            break
        except RuntimeError as exc:
            if attempt == 2:
                pytest.fail(str(exc))
    yield endpoint
    server.kill()
    server.wait()


def get_requests(endpoint: str, bucket_key: str) -> int:
    """How many GETs of the object `bucket_key` the server at `endpoint` has answered so far (its
    log line is written, line-buffered, as it starts the response)."""
    log = SERVER_LOGS[endpoint].read_text(errors="replace")
    return sum(log.count(f"GET /{bucket_key}{end}") for end in (" HTTP", "?"))


def s3_filesystem(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                             access_key=AWS["AWS_ACCESS_KEY_ID"], secret_key=AWS["AWS_SECRET_ACCESS_KEY"])
