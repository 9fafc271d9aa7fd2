"""An OpenAI-compatible chat endpoint (vllm serve, llama.cpp server, GPT-4o, Gemini's OpenAI API).

Written on httpx rather than the `openai` client so that the retry policy is ours and
visible: retries on 429, 5xx and transport errors with exponential backoff (honouring
Retry-After), a timeout per request, and a bounded number of requests in flight. The API key
comes from an environment variable and never appears in reprs, logs or error messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """A request that failed for good (after its retries, or with a status not worth retrying)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ChatEndpoint:
    """Chat completions against one base URL and model."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "", timeout_s: float = 120.0,
                 max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 max_concurrency: int = 8, sleep: Callable[[float], None] = time.sleep) -> None:
        if not base_url:
            raise ValueError("an OpenAI-compatible backend needs a base_url")
        self.base_url = base_url.rstrip("/") + "/"
        self.model = model
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_concurrency = max(1, int(max_concurrency))
        self.sleep = sleep
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=float(timeout_s), limits=limits)
        self.retries_done = 0
        self.cache = None  # a ReplyCache while a unit is captioned (chat_many)

    def __repr__(self) -> str:  # no key here, ever
        return f"ChatEndpoint({self.base_url!r}, model={self.model!r})"

    def chat(self, messages: list[dict], max_tokens: int = 300, temperature: float = 0.6,
             seed: int | None = None) -> str:
        """The reply text of one chat completion, retrying what is worth retrying."""
        payload = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                   "temperature": float(temperature)}
        if seed is not None:
            payload["seed"] = int(seed)
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries_done += 1
            try:
                response = self.client.post("chat/completions", json=payload)
            except httpx.TimeoutException as exc:
                last, kind, wait = f"timeout: {type(exc).__name__}", "timeout", None
            except httpx.TransportError as exc:
                last, kind, wait = f"transport error: {type(exc).__name__}: {exc}", "unreachable", None
            else:
                if response.status_code == 200:
                    return _reply_text(response)
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise EndpointError("http_error", last)
                kind, wait = ("rate_limited" if response.status_code == 429 else "server_error"), _retry_after(response)
            if attempt < self.max_retries:
                self.sleep(self._backoff(attempt, wait))
        raise EndpointError(kind, f"gave up after {self.max_retries + 1} tries: {last}")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return min(self.backoff_s * (2 ** attempt), self.max_backoff_s)

    def chat_many(self, requests: list[dict]) -> list[str | EndpointError]:
        """Many chats with at most `max_concurrency` in flight; each result is a reply or its error.
        With a `cache` (udfs/caption/reply_cache.py: the replies of the unit being captioned), a
        request it holds is not sent, and the replies got are added to it."""
        if self.cache is None:
            return self._send_many(requests)
        ids = [request_id(self.base_url, self.model, request) for request in requests]
        results: list[str | EndpointError | None] = [self.cache.get(rid) for rid in ids]
        todo = [k for k, reply in enumerate(results) if reply is None]
        for k, reply in zip(todo, self._send_many([requests[k] for k in todo]), strict=True):
            results[k] = reply
        self.cache.add({ids[k]: results[k] for k in todo if isinstance(results[k], str)})
        return results

    def _send_many(self, requests: list[dict]) -> list[str | EndpointError]:
        def one(request: dict) -> str | EndpointError:
            try:
                return self.chat(**request)
            except EndpointError as exc:
                return exc

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(one, requests))

    def close(self) -> None:
        self.client.close()


def request_id(base_url: str, model: str, request: dict) -> str:
    """What identifies a request (chat's arguments): the same id is the same question, image
    included, to the same model."""
    what = json.dumps({"url": base_url, "model": model, **request}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(what.encode()).hexdigest()


def _reply_text(response: httpx.Response) -> str:
    try:
        return response.json()["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise EndpointError("bad_reply", f"reply is not a chat completion: {response.text[:300]}") from exc


def _retry_after(response: httpx.Response) -> float | None:
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value:
            try:
                return max(0.0, float(value) / divisor)
            except ValueError:
                continue
    return None
