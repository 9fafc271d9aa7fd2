"""The vllm backend without a GPU: what can be checked here is the ray.data.llm processor config,
the request rows (prompt with the tag block, the draft and the image) and the reply handling.
The engine itself needs CUDA and vllm: bench/gpu_smoke_caption.py runs it on a GPU machine."""

from __future__ import annotations

import json

import pytest

from jobs.config import load_config
from udfs.caption.caption_prompts import caption_messages
from udfs.caption.vllm_captioner import (
    PLACEHOLDER,
    engine_kwargs,
    http_config,
    http_postprocess,
    http_preprocess,
    postprocess,
    preprocess,
    processor_config,
)


@pytest.fixture
def opts():
    return dict(load_config()["caption"], vllm_batch_size=8, vllm_concurrency=2, max_tokens=120)


def test_processor_config_values(opts):
    config = processor_config(opts)
    assert type(config).__name__ == "vLLMEngineProcessorConfig"
    assert config.model_source == "fancyfeast/llama-joycaption-beta-one-hf-llava"
    assert config.batch_size == 8 and config.concurrency == 2
    assert config.should_continue_on_error  # a failed row is an errors row, not a failed job
    kwargs = engine_kwargs(opts)
    assert kwargs["enable_prefix_caching"] is True and kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert kwargs["max_model_len"] == 4096 and kwargs["tensor_parallel_size"] == 1


def test_rewrite_processor_is_text_only_with_the_rewrite_model(opts):
    config = processor_config(dict(opts, rewrite_model="some/llm"), rewrite=True)
    assert config.model_source == "some/llm"
    assert "limit_mm_per_prompt" not in config.engine_kwargs


def test_http_config_posts_chat_completions_with_the_key(opts, monkeypatch):
    monkeypatch.setenv("SERVE_KEY", "s3cret")
    config = http_config("http://gpu-node:8000/v1/", opts, "SERVE_KEY")
    assert config.url == "http://gpu-node:8000/v1/chat/completions"
    assert config.headers == {"Authorization": "Bearer s3cret"}
    assert http_config("http://gpu-node:8000/v1", opts, "").headers == {}


def test_request_rows_carry_prompt_image_and_sampling(opts):
    messages = caption_messages(["1girl", "gotou_hitori", "bocchi_the_rock!"], ["general", "character", "copyright"],
                                "Gotou Hitori from Bocchi the Rock!.", "data:image/jpeg;base64,AAAA",
                                template=opts["prompt"])
    request = {"unit": "u", "stage": "a0", "key": "k", "error": "", "seed": 11, "messages": json.dumps(messages)}
    row = preprocess(request, 120, 0.6)
    assert row["sampling_params"] == {"max_tokens": 120, "temperature": 0.6, "seed": 11}
    assert (row["unit"], row["stage"], row["key"]) == ("u", "a0", "k")
    user = row["messages"][1]["content"]
    assert user[0]["image_url"]["url"] == "data:image/jpeg;base64,AAAA"
    text = user[1]["text"]
    assert "copyright: bocchi the rock!\ncharacter: gotou hitori\ngeneral tags: 1girl" in text
    assert "Gotou Hitori from Bocchi the Rock!." in text
    carried = {"unit": "u", "stage": "a0", "key": "k", "error": ""}
    assert postprocess({**carried, "generated_text": ' "A girl.\n" '}) == {**carried, "caption": "A girl."}


def test_unreadable_image_rows_cross_the_stream_as_one_token_placeholders():
    failed = {"unit": "u", "stage": "a0", "key": "k", "error": "unreadable_image: cannot read x.png", "seed": 1,
              "messages": ""}
    row = http_preprocess(failed, "m", 120, 0.6)
    assert row["payload"]["messages"] == PLACEHOLDER and row["payload"]["max_tokens"] == 1
    reply = http_postprocess({**row, "http_response": {"choices": [{"message": {"content": "x"}}]}})
    assert reply["caption"] is None and reply["error"] == failed["error"]
    empty = http_postprocess({**row, "error": "", "http_response": {"error": "overloaded"}})
    assert empty["caption"] is None and empty["error"].startswith("model_error: no reply")
