"""The vllm backend without a GPU: what can be checked here is the ray.data.llm processor config,
the request rows (prompt with the tag block, the draft and the image), the reply handling and the
server transport (`caption.vllm_url`) against a loopback server.
The engine itself needs CUDA and vllm: bench/gpu_smoke_caption.py runs it on a GPU machine."""

from __future__ import annotations

import json

import pytest

from jobs.config import ConfigError, load_config
from udfs.caption.caption_prompts import caption_messages
from udfs.caption.vllm_captioner import (
    CARRIED,
    PLACEHOLDER,
    ChatRequests,
    engine_kwargs,
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


def test_engines_get_an_environment_of_their_own_with_the_vllm_this_ray_pins(opts):
    """The vLLM that ray[llm] pins needs numpy 2, which dghs-imgutils' numpy<2 keeps out of the
    project's environment ([gpu] could not be installed): by default Ray builds the engines one."""
    import ray

    for rewrite in (False, True):
        config = processor_config(opts, rewrite=rewrite)
        assert config.runtime_env == {"pip": [f"ray[llm]=={ray.__version__}"]}
    assert processor_config(dict(opts, vllm_environment="node")).runtime_env is None


def test_the_engine_environment_is_one_of_two_words():
    with pytest.raises(ConfigError, match="caption.vllm_environment"):
        load_config(None, ['caption.vllm_environment="conda"'])


def test_rewrite_processor_is_text_only_with_the_rewrite_model(opts):
    config = processor_config(dict(opts, rewrite_model="some/llm"), rewrite=True)
    assert config.model_source == "some/llm"
    assert "limit_mm_per_prompt" not in config.engine_kwargs


def test_request_rows_carry_prompt_image_and_sampling(opts):
    messages = caption_messages(["1girl", "gotou_hitori", "bocchi_the_rock!"], ["general", "character", "copyright"],
                                "Gotou Hitori from Bocchi the Rock!.", "data:image/jpeg;base64,AAAA",
                                template=opts["prompt"])
    request = {"unit": "u", "stage": "a0", "key": "k", "error": "", "request": "r", "kept": None, "seed": 11,
               "messages": json.dumps(messages)}
    row = preprocess(request, 120, 0.6)
    assert row["sampling_params"] == {"max_tokens": 120, "temperature": 0.6, "seed": 11}
    assert (row["unit"], row["stage"], row["key"]) == ("u", "a0", "k")
    user = row["messages"][1]["content"]
    assert user[0]["image_url"]["url"] == "data:image/jpeg;base64,AAAA"
    text = user[1]["text"]
    assert "copyright: bocchi the rock!\ncharacter: gotou hitori\ngeneral tags: 1girl" in text
    assert "Gotou Hitori from Bocchi the Rock!." in text
    carried = {"unit": "u", "stage": "a0", "key": "k", "error": "", "request": "r", "kept": None}
    assert postprocess({**carried, "generated_text": ' "A girl.\n" '}) == {**carried, "caption": "A girl."}


def test_a_row_a_kept_reply_answers_crosses_the_engine_as_a_placeholder_and_gets_that_reply():
    """A request that a replaced unit's kept reply answers (udfs/caption/caption_stream.request_messages)
    is not asked again: the engine gets the one-token placeholder, the reply is the kept one."""
    row = {"unit": "u", "stage": "a0", "key": "k", "error": "", "request": "r", "kept": "A girl, kept.", "seed": 1,
           "messages": json.dumps([{"role": "user", "content": "hi"}])}
    engine_row = preprocess(row, 120, 0.6)
    assert engine_row["messages"] == PLACEHOLDER and engine_row["sampling_params"]["max_tokens"] == 1
    replied = postprocess({**engine_row, "generated_text": "x", "num_generated_tokens": 1}, 120)
    assert replied["caption"] == "A girl, kept." and (replied["request"], replied["error"]) == ("r", "")


def test_an_engine_reply_cut_by_max_tokens_keeps_its_whole_sentences():
    """A reply of max_tokens tokens was cut off by the limit: it ends after its last whole
    sentence (one without any stays as it is)."""
    carried = {"unit": "u", "stage": "a0", "key": "k", "error": "", "request": "r", "kept": None}
    cut = {**carried, "generated_text": "A girl smiles. She holds a red umbr", "num_generated_tokens": 120}
    assert postprocess(cut, 120) == {**carried, "caption": "A girl smiles."}
    assert postprocess({**cut, "num_generated_tokens": 80}, 120)["caption"] == "A girl smiles. She holds a red umbr"
    alone = {**cut, "generated_text": "A girl holds a red umbr"}
    assert postprocess(alone, 120)["caption"] == "A girl holds a red umbr"


def test_unreadable_image_rows_cross_the_engine_as_one_token_placeholders():
    failed = {"unit": "u", "stage": "a0", "key": "k", "error": "unreadable_image: cannot read x.png", "seed": 1,
              "messages": "", "request": "", "kept": None}
    row = preprocess(failed, 120, 0.6)
    assert row["messages"] == PLACEHOLDER and row["sampling_params"]["max_tokens"] == 1
    assert postprocess({**row, "generated_text": "x"}) == {**{k: failed[k] for k in CARRIED}, "caption": None}


def test_the_server_transport_asks_each_request_once_and_says_why_one_failed(opts, monkeypatch):
    """ChatRequests on a loopback server: a row that could not be read is not sent, nor one that a
    kept reply answers (its reply is that one), a reply is cleaned, a 503 past the retries is a
    server_error (a passing failure), with the key sent."""
    import pyarrow as pa
    from test_caption_openai import Script, serve

    monkeypatch.setenv("SERVE_KEY", "s3cret")
    script = Script([200, 503])
    server, url = serve(script)
    try:
        stage = ChatRequests(url, "m", "SERVE_KEY", 120, 0.6, dict(opts, max_retries=0, vllm_batch_size=1))
        messages = json.dumps([{"role": "user", "content": "hi"}])
        batch = pa.Table.from_pylist([
            {"unit": "u", "stage": "a0", "key": "k0", "seed": 1, "messages": messages, "error": "", "request": "r0",
             "kept": None},
            {"unit": "u", "stage": "a0", "key": "k1", "seed": 2, "messages": "", "error": "unreadable_image: x.png",
             "request": "", "kept": None},
            {"unit": "u", "stage": "a0", "key": "k3", "seed": 4, "messages": messages, "error": "", "request": "r3",
             "kept": "A girl, kept."},
            {"unit": "u", "stage": "a0", "key": "k2", "seed": 3, "messages": messages, "error": "", "request": "r2",
             "kept": None}])
        out = stage(batch).to_pylist()
    finally:
        script.stop.set()
        server.shutdown()
        server.server_close()
    assert [(r["key"], r["caption"]) for r in out] == [("k0", "caption by m"), ("k1", None), ("k3", "A girl, kept."),
                                                       ("k2", None)]
    assert [r["request"] for r in out] == ["r0", "", "r3", "r2"]
    assert out[1]["error"] == "unreadable_image: x.png" and out[3]["error"].startswith("server_error: ")
    assert out[2]["error"] == ""
    assert [r["seed"] for r in script.received] == [1, 3] and script.received[0]["max_tokens"] == 120
    assert script.headers[0]["Authorization"] == "Bearer s3cret"
