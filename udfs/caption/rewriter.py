"""The rewriter: an LLM condenses a caption and keeps its facts; the prompt lists the tags that must stay.

Two transports, as for captioning: an OpenAI-compatible endpoint (inside the caption actors, any
backend) and ray.data.llm (`rewrite = "vllm"`, the vllm backend's stream: udfs/caption/caption_stream.py).
"""

from __future__ import annotations

from typing import Any

from udfs.caption.caption_prompts import clean_reply, rewrite_messages
from udfs.caption.openai_transport import ChatEndpoint, EndpointError


class OpenAIRewriter:
    """Rewrites through an OpenAI-compatible endpoint, many requests in flight."""

    def __init__(self, endpoint: ChatEndpoint, keep_categories: list[str], max_tokens: int = 200) -> None:
        self.endpoint = endpoint
        self.keep_categories = set(keep_categories)
        self.max_tokens = max_tokens
        self.name = endpoint.model

    def must_keep(self, tags: list[str], categories: list[str]) -> list[str]:
        return must_keep(tags, categories, self.keep_categories)

    def rewrite(self, rows: list[dict], captions: list[str], keep: list[list[str]]) -> list[str | EndpointError]:
        requests = [{"messages": rewrite_messages(c, k), "max_tokens": self.max_tokens, "temperature": 0.2}
                    for c, k in zip(captions, keep, strict=True)]
        return [clean_reply(r) if isinstance(r, str) else r for r in self.endpoint.chat_many(requests)]


def must_keep(tags: list[str], categories: list[str], keep_categories: set[str]) -> list[str]:
    """The tags a rewrite must keep: those of the kept categories."""
    return [t for t, c in zip(tags, categories, strict=True) if (c or "general") in keep_categories]


def make_rewriter(options: dict[str, Any]) -> OpenAIRewriter:
    """The rewriter the caption actors use (rewrite = "vllm" is a pass of the vllm backend's stream)."""
    if options["rewrite"] != "openai":
        raise ValueError(f"caption.rewrite {options['rewrite']!r} is not an endpoint rewriter (only 'openai' is)")
    endpoint = ChatEndpoint(options["rewrite_base_url"], options["rewrite_model"], options["rewrite_api_key_env"],
                            timeout_s=float(options["timeout_s"]), max_retries=int(options["max_retries"]),
                            backoff_s=float(options["backoff_s"]), max_concurrency=int(options["max_concurrency"]))
    return OpenAIRewriter(endpoint, list(options["rewrite_keep_categories"]), int(options["rewrite_max_tokens"]))
