"""The `vllm` caption backend: ray.data.llm with a vLLM engine in GPU actors (default JoyCaption).

The processor config and the pre/post-processing are plain code importable without vllm (the
engine itself is only imported inside the GPU actors), so the prompt and config are tested on
machines without a GPU; bench/gpu_smoke_caption.py runs the real thing where there is one.

Loop-back runs attempt by attempt over every pending unit at once: each attempt is one Ray
Data pass through the engine (the engine actors start once per attempt, not per unit); the
rows are then written and committed per unit as in the other backends.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa

from jobs.workspace import Workspace
from udfs.caption_images import data_url, read_members, shrink_jpeg
from udfs.caption_prompts import caption_messages, clean_reply
from udfs.caption_unit import Hint, UnitCaptioner, unit_info


def engine_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    return {"max_model_len": int(opts["vllm_max_model_len"]),
            "gpu_memory_utilization": float(opts["vllm_gpu_memory_utilization"]),
            "tensor_parallel_size": int(opts["vllm_num_gpus"]),
            "enable_prefix_caching": True,  # the instruction part of every prompt is shared
            "limit_mm_per_prompt": {"image": 1}}


def processor_config(opts: dict[str, Any]):
    """ray.data.llm.vLLMEngineProcessorConfig of the captioner (building it needs no GPU nor vllm)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=opts["vllm_model"], engine_kwargs=engine_kwargs(opts),
        concurrency=int(opts["vllm_concurrency"]), batch_size=int(opts["vllm_batch_size"]),
        prepare_multimodal_stage={"enabled": True, "chat_template_content_format": "openai"},
        chat_template_stage=True, tokenize_stage=True, detokenize_stage=True)


def preprocess(row: dict[str, Any], max_tokens: int, temperature: float) -> dict[str, Any]:
    """One request row: chat messages with the image as a data URL, sampling parameters."""
    return {"request": row["request"], "messages": json.loads(row["messages"]),
            "sampling_params": {"max_tokens": max_tokens, "temperature": temperature, "seed": int(row["seed"])}}


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {"request": row["request"], "caption": clean_reply(row.get("generated_text"))}


def build_processor(opts: dict[str, Any]):
    from ray.data.llm import build_processor as build

    max_tokens, temperature = int(opts["max_tokens"]), float(opts["temperature"])
    return build(processor_config(opts),
                 preprocess=lambda row: preprocess(row, max_tokens, temperature), postprocess=postprocess)


class VLLMCaptioner(UnitCaptioner):
    """Runs in the driver: each caption() call is one pass of a Ray Data dataset through the engine."""

    backend = "vllm"
    needs_tags = False

    def __init__(self, workspace: str, options: dict[str, Any]) -> None:
        super().__init__(workspace, options)
        self.processor = build_processor(options)

    def backend_name(self, row: dict) -> str:
        return f"vllm:{self.opts['vllm_model']}"

    def caption(self, rows: list[dict], hints: list[Hint], drafts: list[str], attempt: int) -> list[str | Exception]:
        import ray

        images = read_members([r.get("source") or "" for r in rows], [r.get("member") or "" for r in rows])
        requests, results = [], [None] * len(rows)
        for i, (hint, draft, data) in enumerate(zip(hints, drafts, images, strict=True)):
            if data is None:
                results[i] = RuntimeError(f"cannot read {rows[i].get('member')} from {rows[i].get('source')}")
                continue
            url = data_url(shrink_jpeg(data, int(self.opts["image_max_side"])))
            messages = caption_messages(hint.tags, hint.categories, draft, url, template=self.opts["prompt"])
            requests.append({"request": i, "seed": hint.seed, "messages": json.dumps(messages)})
        if requests:
            for out in self.processor(ray.data.from_items(requests)).take_all():
                results[int(out["request"])] = out["caption"]
        return results


def caption_units_vllm(ws: Workspace, units: list[tuple[str, pa.Table]], opts: dict[str, Any]) -> list[dict]:
    """Caption every pending unit through one engine pass per attempt; write and commit per unit."""
    started = time.perf_counter()
    captioner = VLLMCaptioner(ws.root, opts)
    table = pa.concat_tables([t for _, t in units])
    captions, errors = captioner.caption_unit(table)
    unit_of = dict(zip(table["key"].to_pylist(), table["unit"].to_pylist(), strict=True))
    infos = []
    for unit, part in units:
        mine = [c for c in captions if unit_of[c["key"]] == unit]
        bad = [e for e in errors if unit_of.get(e["key"]) == unit]
        ws.write_part("captions", unit, mine)
        ws.write_part("errors", f"caption-{unit}", bad)
        info = unit_info(part.num_rows, mine, bad, (time.perf_counter() - started) / len(units))
        ws.commit_unit("caption", unit, info, parts={"captions": [unit], "errors": [f"caption-{unit}"]})
        infos.append(info)
    return infos
