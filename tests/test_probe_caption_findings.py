"""Findings of a probe of captions and the text trainers get (branch probe-caption).

Each test states what a user would expect and is marked xfail(strict=True): it fails today
and will pass (and so turn the xfail into an error) once the finding is fixed, at which point
the mark should go. Fast: no Ray, no model server (one loopback http.server in a thread); the
sentence model loads once for the scoring tests.
Job-level reproductions (a hostile OpenAI-compatible server, a killed run) are in the probe
report, not here.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import pyarrow as pa
import pytest

from udfs.caption.caption_unit import TemplateCaptioner, UnitCaptioner

XFAIL = pytest.mark.xfail(strict=True)

TAGS = ["1girl", "solo", "eileen_(ren'py)", "ren'py", "short_hair", "red_hair", "blue_eyes", "smile",
        "white_shirt", "blue_skirt", "standing"]
CATS = ["general", "general", "character", "copyright", "general", "general", "general", "general",
        "general", "general", "general"]


@pytest.fixture(scope="module")
def options():
    from jobs.config import load_config

    return {**load_config()["caption"], "region_overlap": 0.1}


def input_row(key="a/girl", own=None, tagger=True):
    """One row as sql/caption_inputs.sql gives it: the tagger ran and agrees with the curated tags."""
    return {"key": key, "source": "", "member": "", "member_offset": None, "tags": TAGS, "categories": CATS,
            "n_people": 1, "characters": ["eileen_(ren'py)"], "rating": "general", "texts": [],
            "own_captions": own, "tagger_ran": tagger,
            "tagger_tags": [t for t, c in zip(TAGS, CATS, strict=True) if c != "copyright"] if tagger else [],
            "tagger_categories": [c for c in CATS if c != "copyright"] if tagger else [],
            "n_people_detected": 1 if tagger else None, "traits": [], "persons": None, "regions": None}


class ScriptedVLM(UnitCaptioner):
    """A VLM backend shown the image whose reply is `reply(prompt_hint, draft)`: what a server
    answered in the probe, without the server."""

    backend = "openai"
    needs_tags = False
    sees_image = True
    reply = staticmethod(lambda hint, draft: draft)

    def caption(self, rows, hints, drafts, attempt):
        return [self.reply(h, d) for h, d in zip(hints, drafts, strict=True)]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, options):
    return ScriptedVLM(str(tmp_path_factory.mktemp("ws") / "ws"), dict(options, max_attempts=1))


def accepted(captioner, reply, row=None):
    captioner.reply = staticmethod(reply)
    rows, _ = captioner.caption_unit(pa.Table.from_pylist([row or input_row()]))
    return next(r for r in rows if r["accepted"])


# ---- the rewriter -------------------------------------------------------------------------------

class ScriptedRewriter:
    name = "smol"
    endpoint = None

    def __init__(self, text):
        self.text = text

    def must_keep(self, tags, categories):
        return tags

    def rewrite(self, rows, captions, keep):
        return [self.text] * len(rows)


@XFAIL
def test_a_refusal_from_the_rewriter_does_not_replace_an_own_caption_at_target(tmp_path, options):
    """Template backend, own captions scored, rewrite on: the rewrite of an image's own caption is
    marked built_from_tags (it was written from the own caption) and, unscored, always wins."""
    own = "Eileen, a girl with short red hair and blue eyes, smiles in a white shirt and a blue skirt."
    captioner = TemplateCaptioner(str(tmp_path / "ws"), dict(options, rewrite=""))
    captioner.rewriter = ScriptedRewriter("I am sorry, but as an AI I cannot rewrite this caption.")
    rows, _ = captioner.caption_unit(pa.Table.from_pylist([input_row(own=[own], tagger=False)]))
    best = next(r for r in rows if r["accepted"])
    assert best["caption"] == own, rows


@XFAIL
def test_rewrite_max_tokens_is_part_of_a_caption_units_identity():
    """Changing caption.rewrite_max_tokens keeps every unit done: no rewrite is asked again."""
    from jobs.caption import UNIT_OPTIONS

    assert "rewrite_max_tokens" in UNIT_OPTIONS


# ---- quality tags -------------------------------------------------------------------------------

@XFAIL
def test_a_caption_below_every_band_gets_no_band_tag():
    from udfs.caption.caption_scoring import QualityBands

    bands = QualityBands(((0.9, "auto_best_caption"), (0.75, "auto_good_caption")), 10, 0.4)
    assert "auto_good_caption" not in bands.tags(0.3)


@XFAIL
def test_accuracy_step_zero_is_refused_before_the_job_runs():
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError):
        load_config(None, ["caption.accuracy_step=0"])


# ---- caption lint -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lint():
    from udfs.caption.caption_lint import TraitLint
    from udfs.caption.caption_scoring import CaptionScorer

    return TraitLint(CaptionScorer(None))


@XFAIL
def test_stripping_a_trait_never_cuts_inside_a_word(lint):
    """'İ' lower-cases to two characters: the spans of the lower-cased text are off by one."""
    assert lint.strip("İstanbul girl Eileen with red hair smiles.", ["red_hair"]) == \
        "İstanbul girl Eileen with hair smiles."


@XFAIL
def test_stripping_a_trait_said_after_its_noun_leaves_no_broken_clause(lint):
    out = lint.strip("Her eyes are blue and her hair is red.", ["red_hair", "blue_eyes"])
    assert "are and" not in out and not out.endswith("is."), out


@XFAIL
def test_a_hyphenated_trait_is_linted(lint):
    assert lint.offending("A red-haired girl smiles.", ["red_hair"]) == ["red_hair"]


# ---- tag text for trainers ----------------------------------------------------------------------

@XFAIL
@pytest.mark.parametrize("kaomoji", ["o_o", "u_u", "x_x", "(o)_(o)", ">_o"])
def test_kaomoji_keep_their_underscores_as_imgutils_writes_them(kaomoji):
    """imgutils.tagging.format (a dependency) keeps these; kohya's tagger keeps tags of 3 characters."""
    from udfs.export.tag_text import TagTextRules

    assert TagTextRules().spell(kaomoji) == kaomoji


# ---- the reply cache ----------------------------------------------------------------------------

@XFAIL
def test_replies_got_are_kept_while_a_slow_request_is_still_out(tmp_path):
    """Two replies come at once, the third takes 6 s: a kill at 4 s should find the two kept
    ("written as they come, every 2 s"); they are flushed only when the next reply arrives."""
    from store.workspace import Workspace
    from udfs.caption.openai_transport import ChatEndpoint
    from udfs.caption.reply_cache import ReplyCache

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["messages"][0]["content"] == "slow":
                time.sleep(6)
            payload = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ws = Workspace(str(tmp_path / "ws"))
        endpoint = ChatEndpoint(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", timeout_s=30)
        endpoint.cache = ReplyCache(ws, "unit")
        requests = [{"messages": [{"role": "user", "content": c}]} for c in ("a", "b", "slow")]
        worker = threading.Thread(target=endpoint.chat_many, args=(requests,), daemon=True)
        worker.start()
        time.sleep(4)
        kept = len(ReplyCache(ws, "unit").replies)  # what a run killed now would find
        worker.join()
        assert kept == 2
    finally:
        server.shutdown()
        server.server_close()
