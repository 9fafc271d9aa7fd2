"""ray.data.llm processors of the `vllm` caption backend (udfs/caption/caption_stream.py runs them).

Two transports behind one request row (unit, stage, key, seed, messages, error):
- a vLLM engine in GPU actors (`vLLMEngineProcessorConfig`, default JoyCaption);
- an OpenAI-compatible server such as `vllm serve` on GPU nodes (`caption.vllm_url`), through
  `HttpRequestProcessorConfig`: the same stream, with the engine kept outside the job.

The configs and the pre/post-processing are plain code importable without vllm (the engine is
only imported inside the GPU actors), so they are tested on machines without a GPU;
bench/gpu_smoke_caption.py runs the engine where there is one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from udfs.caption.caption_prompts import clean_reply

# request columns every stage hands on to the replies; error is "" or "<kind>: <message>"
CARRIED = ("unit", "stage", "key", "error")
# A request whose image could not be read still goes through the stream, as a one-token prompt, so
# that every request row reaches the end of the stream where a unit's replies are counted.
PLACEHOLDER = [{"role": "user", "content": "."}]


def engine_kwargs(opts: dict[str, Any], images: bool = True) -> dict[str, Any]:
    kwargs = {"max_model_len": int(opts["vllm_max_model_len"]),
              "gpu_memory_utilization": float(opts["vllm_gpu_memory_utilization"]),
              "tensor_parallel_size": int(opts["vllm_num_gpus"]),
              "enable_prefix_caching": True}  # the instruction part of every prompt is shared
    if images:
        kwargs["limit_mm_per_prompt"] = {"image": 1}
    return kwargs


def processor_config(opts: dict[str, Any], rewrite: bool = False):
    """vLLMEngineProcessorConfig of the captioner, or of the rewriter (text only); needs no GPU nor vllm."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=opts["rewrite_model"] if rewrite else opts["vllm_model"],
        engine_kwargs=engine_kwargs(opts, images=not rewrite),
        concurrency=int(opts["vllm_concurrency"]), batch_size=int(opts["vllm_batch_size"]),
        should_continue_on_error=True,  # a failed row becomes an errors row, not a failed job
        prepare_multimodal_stage={"enabled": not rewrite, "chat_template_content_format": "openai"},
        chat_template_stage=True, tokenize_stage=True, detokenize_stage=True)


def http_config(url: str, opts: dict[str, Any], api_key_env: str):
    """HttpRequestProcessorConfig posting chat completions to an OpenAI-compatible server at `url` (…/v1)."""
    from ray.data.llm import HttpRequestProcessorConfig

    key = os.environ.get(api_key_env, "") if api_key_env else ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return HttpRequestProcessorConfig(
        url=f"{url.rstrip('/')}/chat/completions", headers=headers, concurrency=int(opts["vllm_concurrency"]),
        batch_size=int(opts["vllm_batch_size"]), max_retries=int(opts["max_retries"]),
        base_retry_wait_time_in_s=float(opts["backoff_s"]),
        # the stage waits on the server: a whole CPU per actor would starve the stream's tasks
        http_request_stage={"num_cpus": 0.25})


def sampling(row: dict[str, Any], max_tokens: int, temperature: float) -> tuple[list, dict]:
    """The messages and sampling parameters of one request row (a placeholder for an error row)."""
    if row.get("error"):
        return PLACEHOLDER, {"max_tokens": 1, "temperature": 0.0}
    return json.loads(row["messages"]), {"max_tokens": max_tokens, "temperature": temperature, "seed": int(row["seed"])}


def preprocess(row: dict[str, Any], max_tokens: int, temperature: float) -> dict[str, Any]:
    """Engine input: chat messages (the image as a data URL) and sampling parameters, plus the carried columns."""
    messages, params = sampling(row, max_tokens, temperature)
    return {**{c: row[c] for c in CARRIED}, "messages": messages, "sampling_params": params}


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {**{c: row[c] for c in CARRIED}, "caption": None if row["error"] else clean_reply(row.get("generated_text"))}


def http_preprocess(row: dict[str, Any], model: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    messages, params = sampling(row, max_tokens, temperature)
    return {**{c: row[c] for c in CARRIED}, "payload": {"model": model, "messages": messages, **params}}


def http_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    out = {c: row[c] for c in CARRIED}
    if row["error"]:
        return {**out, "caption": None}
    choices = (row.get("http_response") or {}).get("choices") or []
    text = (choices[0].get("message") or {}).get("content") if choices else None
    if not isinstance(text, str):
        answer = json.dumps(row.get("http_response"))[:300]
        return {**out, "caption": None, "error": f"model_error: no reply in {answer}"}
    return {**out, "caption": clean_reply(text)}


def build_processor(opts: dict[str, Any], rewrite: bool = False):
    """The processor of one stream pass: captions (with images) or rewrites (text only)."""
    from ray.data.llm import build_processor as build

    max_tokens = int(opts["rewrite_max_tokens"] if rewrite else opts["max_tokens"])
    temperature = 0.2 if rewrite else float(opts["temperature"])
    if opts.get("vllm_url"):
        url = opts["rewrite_base_url"] if rewrite else opts["vllm_url"]
        model = opts["rewrite_model"] if rewrite else opts["vllm_model"]
        key_env = opts["rewrite_api_key_env"] if rewrite else opts["api_key_env"]
        return build(http_config(url, opts, key_env), postprocess=http_postprocess,
                     preprocess=lambda row: http_preprocess(row, model, max_tokens, temperature))
    return build(processor_config(opts, rewrite), postprocess=postprocess,
                 preprocess=lambda row: preprocess(row, max_tokens, temperature))
