"""The vllm backend without a GPU: what can be checked here is the ray.data.llm processor config,
the request rows (prompt with the tag block, the draft and the image) and the reply handling.
The engine itself needs CUDA and vllm: bench/gpu_smoke_caption.py runs it on a GPU machine."""

from __future__ import annotations

import json

import pytest

from jobs.config import load_config
from udfs.caption_prompts import caption_messages
from udfs.vllm_captioner import engine_kwargs, postprocess, preprocess, processor_config


@pytest.fixture
def opts():
    return dict(load_config()["caption"], vllm_batch_size=8, vllm_concurrency=2, max_tokens=120)


def test_processor_config_values(opts):
    config = processor_config(opts)
    assert type(config).__name__ == "vLLMEngineProcessorConfig"
    assert config.model_source == "fancyfeast/llama-joycaption-beta-one-hf-llava"
    assert config.batch_size == 8 and config.concurrency == 2
    kwargs = engine_kwargs(opts)
    assert kwargs["enable_prefix_caching"] is True and kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert kwargs["max_model_len"] == 4096 and kwargs["tensor_parallel_size"] == 1


def test_request_rows_carry_prompt_image_and_sampling(opts):
    messages = caption_messages(["1girl", "gotou_hitori", "bocchi_the_rock!"], ["general", "character", "copyright"],
                                "Gotou Hitori from Bocchi the Rock!.", "data:image/jpeg;base64,AAAA",
                                template=opts["prompt"])
    row = preprocess({"request": 3, "seed": 11, "messages": json.dumps(messages)}, 120, 0.6)
    assert row["sampling_params"] == {"max_tokens": 120, "temperature": 0.6, "seed": 11}
    user = row["messages"][1]["content"]
    assert user[0]["image_url"]["url"] == "data:image/jpeg;base64,AAAA"
    text = user[1]["text"]
    assert "copyright: bocchi the rock!\ncharacter: gotou hitori\ngeneral tags: 1girl" in text
    assert "Gotou Hitori from Bocchi the Rock!." in text
    assert postprocess({"request": 3, "generated_text": ' "A girl.\n" '}) == {"request": 3, "caption": "A girl."}
