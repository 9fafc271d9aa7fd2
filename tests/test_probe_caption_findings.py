"""Findings of a probe of captions and the text trainers get (branch probe-caption).

Each test states what a user would expect and is marked xfail(strict=True): it fails today
and will pass (and so turn the xfail into an error) once the finding is fixed, at which point
the mark should go. Fast: no Ray, no model server (one loopback http.server in a thread); the
sentence model loads once for the scoring tests.
Job-level reproductions (a hostile OpenAI-compatible server, a killed run) are in the probe
report, not here.
"""

from __future__ import annotations

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


# ---- honest scores ------------------------------------------------------------------------------

@XFAIL
def test_a_vlm_that_hands_back_its_draft_is_not_scored_as_a_perfect_caption(vlm):
    """The draft is the template caption of the tags; a template caption is not scored (built
    from the tags), but the same text handed back by a VLM scores ~0.95 against the tagger tags
    the draft was written from (1.0 against curated_tags where no tagger ran)."""
    row = accepted(vlm, lambda hint, draft: draft)
    assert row["accuracy"] is None or row["accuracy"] < 0.75, row


@XFAIL
def test_a_caption_naming_the_wrong_character_and_colours_scores_below_target(vlm):
    """'Sylvie with green hair and yellow eyes' for Eileen with red hair and blue eyes."""
    def swapped(hint, draft):
        for a, b in (("Eileen", "Sylvie"), ("red", "green"), ("blue", "yellow"), ("white", "black")):
            draft = draft.replace(a, b)
        return draft

    row = accepted(vlm, swapped)
    assert row["accuracy"] < 0.6 and "auto_good_caption" not in row["quality_tags"], row


@XFAIL
def test_a_caption_adding_a_character_and_objects_not_on_the_image_loses_accuracy(vlm):
    draft = accepted(vlm, lambda hint, draft: draft)
    added = accepted(vlm, lambda hint, draft: draft + " Hatsune Miku and Lucy stand beside her holding a sword.")
    assert added["accuracy"] < draft["accuracy"] - 0.1, (draft["accuracy"], added["accuracy"])


@XFAIL
def test_a_reply_that_repeats_the_prompt_is_not_accepted_as_a_good_caption(vlm):
    from udfs.caption.caption_prompts import caption_messages

    def echo(hint, draft):
        return caption_messages(hint.tags, hint.categories, draft, None)[1]["content"]

    row = accepted(vlm, echo)
    assert row["accuracy"] < 0.6, row


@XFAIL
def test_a_reasoning_block_is_not_part_of_the_caption():
    from udfs.caption.caption_prompts import clean_reply

    reply = "<think>The tags say red hair and blue eyes.</think>\n\nEileen smiles."
    assert clean_reply(reply) == "Eileen smiles."


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
