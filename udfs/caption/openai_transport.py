"""An OpenAI-compatible chat endpoint (vllm serve, llama.cpp server, GPT-4o, Gemini's OpenAI API).

Written on httpx rather than the `openai` client so that the retry policy is ours and
visible: retries on 429, 5xx and transport errors with exponential backoff (honouring
Retry-After), a timeout per request (the whole exchange, not each read), and a bounded number
of requests in flight. The API key comes from an environment variable and never appears in
reprs, logs or error messages. A reply is the server's text: what Parquet cannot hold (half a
UTF-16 pair) and control characters are taken out of it, and a reply that is no chat
completion (a proxy's HTML page, an empty body, malformed, nested past the parser, an undecodable
body) is a bad_reply, retried as a 5xx is and a passing failure the next run asks again. A reply
max_tokens cut off (finish_reason "length") ends after its last whole sentence; one the service's
content filter stopped (finish_reason "content_filter") is a refusal.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import httpcore
import httpx

from udfs.caption.caption_prompts import REASONING, whole_reply
from udfs.ingest.sidecars import printable

if TYPE_CHECKING:
    from udfs.caption.reply_cache import ReplyCache

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# Refused for every request alike until the config is fixed (a key, an account out of credit, a
# model or path the server does not have): not retried, and like an unreachable host a passing
# failure whose units the next run does again (they were committed with no caption for good).
REFUSED_STATUS = frozenset({401, 402, 403, 404})
# A chat completion is kilobytes (32,000 tokens of reasoning in escaped CJK are under 400 KB): a body
# past this is no caption. It is parsed whole, and JSON of empty lists takes 25 times its size in
# memory: 16 MB of it took 400 MB, for each of the requests in flight.
MAX_REPLY_BYTES = 2 << 20
# Failures of a server that does not answer at all: down or hung (after each request's retries),
# or that rate-limits every request through its retries (a quota spent for the day).
# Once OUTAGE_AFTER of them (or max_concurrency, if more) come in a row, the requests of that
# chat_many not yet started are not sent: each would take its retries (15 s refused, 10 minutes
# hung at the defaults), 8 at a time, and a unit of 500 images took 16 minutes to 11 hours to
# end with every image failed. They fail as the last one did, and the next run asks them again.
# Not a 5xx (a 500 may be a request's own, every run: the requests after it would never be
# asked); a 429 is never a request's own, nor a reply that is no chat completion (bad_reply: a
# proxy's HTML page to every request, 200 each time).
OUTAGE_KINDS = frozenset({"unreachable", "timeout", "rate_limited", "bad_reply"})
OUTAGE_AFTER = 8
KEEP_EVERY_S = 2.0  # replies got are written to the unit's reply cache at least this often


class Overdue(Exception):
    """The whole reply did not come within timeout_s (a server trickling its body)."""


class Deadlines:
    """httpcore's network backend with a deadline on each thread's request: a read or write ends
    at the deadline `until` set (httpx times each read alone, and a server sending its status line
    and headers a byte at a time held a request for hours: the deadline of _post, looked at between
    body chunks, had no word while the headers came). A request runs in its thread from the start
    to its body's last read, so the thread's deadline is its own."""

    def __init__(self) -> None:
        self.backend = httpcore.SyncBackend()
        self.local = threading.local()

    def until(self, deadline: float | None) -> None:
        self.local.deadline = deadline

    def timeout(self, timeout: float | None) -> float | None:
        """`timeout` or the time left to the thread's deadline, whichever is shorter."""
        deadline = getattr(self.local, "deadline", None)
        if deadline is None:
            return timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the whole reply did not come within the request's timeout")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: object = None) -> DeadlineStream:
        return DeadlineStream(self.backend.connect_tcp(host, port, self.timeout(timeout), local_address,
                                                       socket_options), self)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: object = None) -> DeadlineStream:
        return DeadlineStream(self.backend.connect_unix_socket(path, self.timeout(timeout), socket_options), self)

    def sleep(self, seconds: float) -> None:
        self.backend.sleep(seconds)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose reads and writes end at its thread's deadline (Deadlines)."""

    def __init__(self, stream: httpcore.NetworkStream, deadlines: Deadlines) -> None:
        self.stream, self.deadlines = stream, deadlines

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, self.deadlines.timeout(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, self.deadlines.timeout(timeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context: object, server_hostname: str | None = None,
                  timeout: float | None = None) -> DeadlineStream:
        return DeadlineStream(self.stream.start_tls(ssl_context, server_hostname, self.deadlines.timeout(timeout)),
                              self.deadlines)

    def get_extra_info(self, info: str) -> object:
        return self.stream.get_extra_info(info)


def with_deadlines(client: httpx.Client, limits: httpx.Limits, deadlines: Deadlines) -> None:
    """Give the client's own transport a pool of Deadlines connections, as httpx builds it but for
    the network backend, which httpx takes no argument for. Not by Client(transport=...): a client
    given its transport leaves out the proxies of the environment (HTTPS_PROXY, ...), which keep
    httpx's own pool (their headers bounded only by httpx's timeout of each read)."""
    transport = getattr(client, "_transport", None)
    if not isinstance(getattr(transport, "_pool", None), httpcore.ConnectionPool):
        return  # an httpx that builds its transport otherwise: each read keeps httpx's own timeout
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=deadlines)


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
        self.timeout_s = float(timeout_s)
        self.deadlines = Deadlines()
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout_s, limits=limits)
        with_deadlines(self.client, limits, self.deadlines)
        # what was paid for: requests sent (each try), retries among them, requests answered by
        # the kept replies (chat_many); counted from many threads
        self.counts: Counter[str] = Counter()
        self._counting = threading.Lock()
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
            self.count("sent")
            if attempt:
                self.count("retries")
            try:
                status, headers, body = self._post(payload)
                if status == 200:
                    return _reply_text(body)
            except (httpx.TimeoutException, Overdue) as exc:
                # the deadline cuts a read short, where httpx says no more than "timed out"
                last = (f"timeout: no whole reply within {self.timeout_s:g} s (caption.timeout_s): "
                        f"{type(exc).__name__}: {exc}")
                kind, wait = "timeout", None
            except httpx.TransportError as exc:
                last, kind, wait = f"transport error: {type(exc).__name__}: {exc}", "unreachable", None
            except httpx.DecodingError as exc:  # a body its Content-Encoding does not decode
                last, kind, wait = f"undecodable reply: {exc}", "bad_reply", None
            except EndpointError as exc:
                if exc.kind != "bad_reply":  # the model's own reply (a refusal, nothing said): final
                    raise
                # no chat completion at all (a proxy's HTML page, an empty body, JSON without
                # choices, a body past MAX_REPLY_BYTES): the server's fault of the moment, as a 502 is
                last, kind, wait = str(exc), "bad_reply", None
            else:
                last = f"HTTP {status}: {_excerpt(body)}"
                if status in REFUSED_STATUS or (status == 429 and _out_of_credit(body)):
                    raise EndpointError("endpoint_refused", f"{last} (check the base_url, model and key of {self!r})")
                if status not in RETRY_STATUS:
                    raise EndpointError("http_error", last)
                kind, wait = ("rate_limited" if status == 429 else "server_error"), _retry_after(headers)
            if attempt < self.max_retries:
                self.sleep(self._backoff(attempt, wait))
        raise EndpointError(kind, f"gave up after {self.max_retries + 1} tries: {last}")

    def count(self, what: str, n: int = 1) -> None:
        with self._counting:
            self.counts[what] += n

    @property
    def retries_done(self) -> int:
        return self.counts["retries"]

    def _post(self, payload: dict) -> tuple[int, httpx.Headers, bytes]:
        """(status, headers, body) of one request, the whole of it (connecting, the headers, the
        body) within timeout_s of the start (httpx's timeout bounds each read: a byte a second held
        a request, and its job, for ever) and the body at most MAX_REPLY_BYTES long."""
        deadline = time.monotonic() + self.timeout_s
        self.deadlines.until(deadline)
        try:
            with self.client.stream("POST", "chat/completions", json=payload) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
                        raise EndpointError("bad_reply", f"a reply of more than {MAX_REPLY_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise Overdue("its body was still coming")
                return response.status_code, response.headers, bytes(body)
        finally:
            self.deadlines.until(None)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return min(self.backoff_s * (2 ** attempt), self.max_backoff_s)

    def chat_many(self, requests: list[dict]) -> list[str | EndpointError]:
        """Many chats with at most `max_concurrency` in flight; each result is a reply or its error.
        With a `cache` (udfs/caption/reply_cache.py: the replies of the unit being captioned), a
        request it holds is not sent, and the replies got are added to it as they come (every
        KEEP_EVERY_S, also while no further reply comes), so that a run killed in the middle asks
        only for the rest."""
        if self.cache is None:
            results: list[str | EndpointError | None] = [None] * len(requests)
            for k, reply in self._send_each(requests):
                results[k] = reply
            return results
        ids = [request_id(self.base_url, self.model, request) for request in requests]
        results = [self.cache.get(rid) for rid in ids]
        todo = [k for k, reply in enumerate(results) if reply is None]
        self.count("reused", len(requests) - len(todo))
        kept = KeptReplies(self.cache)
        try:
            for j, reply in self._send_each([requests[k] for k in todo], kept.due_in, kept.keep):
                results[todo[j]] = reply
                if isinstance(reply, str):
                    kept.add(ids[todo[j]], reply)
                kept.keep()
        finally:
            kept.keep(now=True)
        return results

    def _send_each(self, requests: list[dict], due_in: Callable[[], float | None] = lambda: None,
                   on_time: Callable[[], None] = lambda: None) -> Iterator[tuple[int, str | EndpointError]]:
        """(index, reply or error) of each request, as they come back. While none comes, `on_time`
        is called every `due_in()` seconds (None: no call), so that what was got is kept while a
        slow request is still out."""
        def one(request: dict) -> str | EndpointError:
            try:
                return self.chat(**request)
            except EndpointError as exc:
                return exc

        if not requests:
            return
        outage = Outage(max(OUTAGE_AFTER, self.max_concurrency))
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            futures = {pool.submit(one, request): k for k, request in enumerate(requests)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=due_in(), return_when=FIRST_COMPLETED)
                if not done:
                    on_time()
                for future in done:
                    outage.saw(future.result())
                    yield futures[future], future.result()
                if outage.down():  # the requests not started yet are not sent
                    for future in [f for f in pending if f.cancel()]:
                        pending.discard(future)
                        yield futures[future], outage.error()

    def close(self) -> None:
        self.client.close()


class Outage:
    """Whether the requests of one chat_many have met a server that is down: `after` failures
    of OUTAGE_KINDS in a row, with no reply between them."""

    def __init__(self, after: int) -> None:
        self.after, self.in_a_row = after, 0
        self.last: EndpointError | None = None

    def saw(self, result: str | EndpointError) -> None:
        if isinstance(result, EndpointError) and result.kind in OUTAGE_KINDS:
            self.in_a_row, self.last = self.in_a_row + 1, result
        else:
            self.in_a_row = 0

    def down(self) -> bool:
        return self.in_a_row >= self.after

    def error(self) -> EndpointError:
        return EndpointError(self.last.kind, f"not sent: the {self.in_a_row} requests before it failed "
                                             f"(the last: {self.last})")


class KeptReplies:
    """The replies chat_many got that its cache does not hold yet: written to it at most every
    KEEP_EVERY_S (one file each time, not one per reply), and at the latest KEEP_EVERY_S after
    they came."""

    def __init__(self, cache: ReplyCache) -> None:
        self.cache, self.kept_at = cache, time.monotonic()
        self.got: dict[str, str] = {}

    def add(self, rid: str, reply: str) -> None:
        self.got[rid] = reply

    def due_in(self) -> float | None:
        """Seconds until the replies got are due to be written; None while there are none."""
        return max(0.0, self.kept_at + KEEP_EVERY_S - time.monotonic()) if self.got else None

    def keep(self, now: bool = False) -> None:
        """Write the replies got if they are due (or `now`)."""
        if self.got and (now or time.monotonic() - self.kept_at >= KEEP_EVERY_S):
            self.cache.add(self.got)
            self.got, self.kept_at = {}, time.monotonic()


def request_id(base_url: str, model: str, request: dict) -> str:
    """What identifies a request (chat's arguments): the same id is the same question, image
    included, to the same model."""
    what = json.dumps({"url": base_url, "model": model, **request}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(what.encode()).hexdigest()


def _reply_text(body: bytes) -> str:
    """The text of a chat completion's first choice (a string, or a list of text parts), with
    half UTF-16 pairs (a JSON "\\udc80" escape) as "?" and control characters removed."""
    try:
        choices = json.loads(body)["choices"]
        if choices == []:
            # A completion of this request with nothing in it is the service's answer to the
            # request, each time it is asked: a guardrail blocking it gives no choice, Gemini's
            # OpenAI API a choice whose message is null (PROHIBITED_CONTENT, for a picture). No
            # passing failure (bad_reply: retried, redone by every run, and 8 of them in a row cut
            # off the rest of a healthy server's call).
            raise EndpointError("refusal", "the service blocked the request: a completion with no choice")
        choice = choices[0]
        message, finish = choice.get("message"), choice.get("finish_reason")
        if message is None and finish != "content_filter":  # that one is said below
            raise EndpointError("empty_caption", "a choice with no message (finish_reason "
                                                 f"{printable(str(finish))[:40]}): the service said nothing")
        content = None if message is None else message["content"]
        message = message or {}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as exc:
        raise EndpointError("bad_reply", f"reply is not a chat completion: {_excerpt(body)}") from exc
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}]
        content = "".join(str(part.get("text") or "") for part in content
                          if isinstance(part, dict) and part.get("type") == "text")
    if content is not None and not isinstance(content, str):
        raise EndpointError("bad_reply", f"the reply's content is a {type(content).__name__}, not text")
    if finish == "content_filter":
        # the service's filter (Azure OpenAI, Gemini) stopped the reply: what came is half a
        # caption, or nothing; the model (its service) declined
        said = printable(content or "")[:200]
        raise EndpointError("refusal", f"the server's content filter stopped the reply (finish_reason "
                                       f"content_filter): {said!r}")
    declined = message.get("refusal")
    if not content and isinstance(declined, str) and declined.strip():
        # OpenAI's API says a model declined in `refusal`, with no content: that was an "empty reply"
        raise EndpointError("refusal", f"the model declined: {printable(declined)[:200]}")
    text = printable(content or "")
    if finish != "length":
        return text
    said = whole_reply(text)
    if not any(ch.isalnum() for ch in REASONING.sub(" ", said)):
        # a reasoning model that spent max_tokens thinking: an "empty reply" said nothing of why
        thought = message.get("reasoning_content") or message.get("reasoning") or ""
        spent = len(text) + (len(thought) if isinstance(thought, str) else 0)
        raise EndpointError("empty_caption", f"max_tokens cut the reply off before any caption ({spent} characters "
                                             "of reasoning or nothing): raise caption.max_tokens")
    return said


def _out_of_credit(body: bytes) -> bool:
    """Whether a 429 says the account is out of credit: OpenAI's error code insufficient_quota, so
    for every request until the account is topped up (a 402 elsewhere), not a rate limit."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return False
    return isinstance(error, dict) and "insufficient_quota" in (error.get("code"), error.get("type"))


def _excerpt(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace")


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from Retry-After-Ms or Retry-After, in seconds or an HTTP date (RFC 9110)."""
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value:
            try:
                return max(0.0, float(value) / divisor)
            except ValueError:
                pass
            if header == "retry-after":
                return _seconds_until(value)
    return None


def _seconds_until(http_date: str) -> float | None:
    """Seconds from now until an HTTP date ("Wed, 21 Oct 2026 07:28:00 GMT"); None if it is none."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP dates are
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())
