"""ray.data.llm processors of the `vllm` caption backend (udfs/caption/caption_stream.py runs them).

Two transports behind one request row (unit, stage, key, seed, messages, error):
- a vLLM engine in GPU actors (`vLLMEngineProcessorConfig`, default JoyCaption);
- an OpenAI-compatible server such as `vllm serve` on GPU nodes (`caption.vllm_url`): the same
  stream, with the engine kept outside the job, its requests sent by ChatRequests with the
  `openai` backend's transport (udfs/caption/openai_transport.py). Not ray.data.llm's
  HttpRequestProcessorConfig: its stage ends the whole job on a 5xx that outlasts its retries
  or on a reply that is not JSON, bounds no request's total time, and cannot say which
  failures are passing (to be asked again by the next run) and which are the reply's own.

Each request row carries its digest (`request`: request_digest, the same question, image
included, to the same model with the same sampling) into its reply, so that a committed unit's
replies answer the unit that replaces it (udfs/caption/reply_cache.py). A row such a kept reply
answers (`kept`) is not asked: the server transport does not send it, the engine gets the
one-token placeholder of a row that could not be read, and the reply is the kept one.

The configs and the pre/post-processing are plain code importable without vllm (the engine is
only imported inside the GPU actors), so they are tested on machines without a GPU;
bench/gpu_smoke_caption.py runs the engine where there is one.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from udfs.caption.caption_prompts import clean_reply, whole_reply

# request columns every stage hands on to the replies; error is "" or "<kind>: <message>"; request:
# the row's request_digest ("" for an error row); kept: the kept reply that answers it, or None
CARRIED = ("unit", "stage", "key", "error", "request", "kept")
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
        chat_template_stage=True, tokenize_stage=True, detokenize_stage=True,
        runtime_env=engine_environment(str(opts["vllm_environment"])))


def engine_environment(where: str) -> dict[str, Any] | None:
    """The runtime_env of the engine stages (caption.vllm_environment): "isolated" installs the vLLM
    that this Ray's ray.data.llm pins into a virtualenv of their own (the project's numpy<2 cannot
    hold it); "node" leaves them the node's environment."""
    if where == "node":
        return None
    import ray

    return {"pip": [f"ray[llm]=={ray.__version__}"]}


def sampling(row: dict[str, Any], max_tokens: int, temperature: float) -> tuple[list, dict]:
    """The messages and sampling parameters of one request row (a placeholder for an error row, or
    for one a kept reply answers)."""
    if row.get("error") or row.get("kept") is not None:
        return PLACEHOLDER, {"max_tokens": 1, "temperature": 0.0}
    return json.loads(row["messages"]), {"max_tokens": max_tokens, "temperature": temperature, "seed": int(row["seed"])}


def model_settings(opts: dict[str, Any], rewrite: bool = False) -> dict[str, Any]:
    """Where the requests of a pass go and how they are sampled: url ("" for the engine), model,
    max_tokens, temperature; the captioner's, or the rewriter's."""
    url = (opts["rewrite_base_url"] if rewrite else opts["vllm_url"]) if opts.get("vllm_url") else ""
    return {"url": url, "model": opts["rewrite_model"] if rewrite else opts["vllm_model"],
            "max_tokens": int(opts["rewrite_max_tokens"] if rewrite else opts["max_tokens"]),
            "temperature": 0.2 if rewrite else float(opts["temperature"])}


def request_digest(opts: dict[str, Any], rewrite: bool, messages: list[dict], seed: int) -> str:
    """What identifies a request row: the request that sampling() makes of it (the messages, the
    image as its data URL, and the sampling parameters), to the model of model_settings; the id
    the openai transport keeps its replies by (openai_transport.request_id). Runs in the CPU tasks:
    the engine's actors, in an environment of their own, need not import the transport."""
    from udfs.caption.openai_transport import request_id

    settings = model_settings(opts, rewrite)
    return request_id(settings["url"], settings["model"],
                      {"messages": messages, "max_tokens": settings["max_tokens"],
                       "temperature": settings["temperature"], "seed": int(seed)})


def preprocess(row: dict[str, Any], max_tokens: int, temperature: float) -> dict[str, Any]:
    """Engine input: chat messages (the image as a data URL) and sampling parameters, plus the carried columns."""
    messages, params = sampling(row, max_tokens, temperature)
    return {**{c: row[c] for c in CARRIED}, "messages": messages, "sampling_params": params}


def postprocess(row: dict[str, Any], max_tokens: int | None = None) -> dict[str, Any]:
    """The reply row of an engine's output; one of `max_tokens` tokens was cut off by the limit
    and ends after its last whole sentence (caption_prompts.whole_reply)."""
    carried = {c: row[c] for c in CARRIED}
    if row["error"] or row["kept"] is not None:  # the placeholder's token is no reply
        return {**carried, "caption": None if row["error"] else row["kept"]}
    text = row.get("generated_text") or ""
    if max_tokens is not None and int(row.get("num_generated_tokens") or 0) >= max_tokens:
        text = whole_reply(text)
    return {**carried, "caption": clean_reply(text)}


class ChatRequests:
    """map_batches UDF of the `vllm_url` transport: each request row's chat completion from the
    server, its reply as `caption` or its failure as `error` ("<kind>: <message>", the kinds of
    EndpointError: server_error, timeout, ... are passing failures the next run asks again)."""

    def __init__(self, url: str, model: str, api_key_env: str, max_tokens: int, temperature: float,
                 opts: dict[str, Any]) -> None:
        from udfs.caption.openai_transport import ChatEndpoint

        self.endpoint = ChatEndpoint(url, model, api_key_env, timeout_s=float(opts["timeout_s"]),
                                     max_retries=int(opts["max_retries"]), backoff_s=float(opts["backoff_s"]),
                                     max_concurrency=int(opts["vllm_batch_size"]))
        self.max_tokens, self.temperature = max_tokens, temperature

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        asked = [i for i, row in enumerate(rows) if not row["error"] and row["kept"] is None]
        requests = []
        for i in asked:
            messages, params = sampling(rows[i], self.max_tokens, self.temperature)
            requests.append({"messages": messages, **params})
        captions: list[str | None] = [None if row["error"] else row["kept"] for row in rows]
        errors = [row["error"] for row in rows]
        for i, reply in zip(asked, self.endpoint.chat_many(requests), strict=True):
            if isinstance(reply, str):
                captions[i] = clean_reply(reply)
            else:
                errors[i] = f"{reply.kind}: {reply}"
        return pa.table({**{c: batch[c] for c in CARRIED if c != "error"},
                         "error": pa.array(errors, pa.string()), "caption": pa.array(captions, pa.string())})


def build_processor(opts: dict[str, Any], rewrite: bool = False):
    """The processor of one stream pass, dataset to dataset: captions (with images) or rewrites
    (text only), by the engine or by the server at `caption.vllm_url`."""
    from ray.data.llm import build_processor as build

    settings = model_settings(opts, rewrite)
    max_tokens, temperature = settings["max_tokens"], settings["temperature"]
    if opts.get("vllm_url"):
        key_env = opts["rewrite_api_key_env"] if rewrite else opts["api_key_env"]
        kwargs = {"url": settings["url"], "model": settings["model"], "api_key_env": key_env,
                  "max_tokens": max_tokens, "temperature": temperature, "opts": opts}
        # the actors wait on the server: a whole CPU each would starve the stream's tasks
        return lambda ds: ds.map_batches(ChatRequests, fn_constructor_kwargs=kwargs, batch_format="pyarrow",
                                         batch_size=int(opts["vllm_batch_size"]),
                                         concurrency=int(opts["vllm_concurrency"]), num_cpus=0.25)
    return build(processor_config(opts, rewrite), postprocess=lambda row: postprocess(row, max_tokens),
                 preprocess=lambda row: preprocess(row, max_tokens, temperature))
