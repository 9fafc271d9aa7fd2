"""Captions committed under earlier reply checks, looked at again once.

A model's reply becomes a caption only when it passes the checks of UnitCaptioner._acceptable: a
refusal, a loop, chat text wrapped around the caption, a reply without a word are `errors` rows
instead. Those checks get better from version to version, and a unit committed before keeps what
the checks of its day let through: "I'm sorry, but I can't describe this image." as a training
caption. A unit's marker says which REPLY_CHECKS it was committed under. The caption job has the
captions of the units committed under older ones read here, in tasks, once: a unit holding a
caption that refused_now refuses is run again (its kept replies answer its requests, so nothing is
asked again but what the checks refuse now), the others are marked as checked.

refused_now is a sieve, not the judge: a unit it flags runs through the whole _acceptable again,
which knows what a caption was written from (a rewrite of a crowd caption repeating its clauses is
no loop), so a flag it raises in error costs one unit's CPU, never a caption.
"""

from __future__ import annotations

from store.workspace import Workspace
from udfs.caption.caption_prompts import clean_reply, refusal
from udfs.caption.caption_unit import repeated_phrase, says_a_word

# captions a model wrote (a caption backend's, or the rewriter's); "template:*" and "own" are not
MODEL_BACKENDS = ("openai:", "vllm:", "rewrite:")


def refused_now(text: str) -> str | None:
    """Why the reply checks of this version would refuse a committed model caption, or None."""
    if not says_a_word(text):
        return "no word"
    if refusal(text):
        return "refusal"
    if repeated_phrase(text) is not None:
        return "repetition"
    if clean_reply(text) != text:
        return "chat text around the caption"
    return None


def recheck_units(units: list[dict], workspace: str) -> list[dict]:
    """Ray task: the units (each {"unit", "captions": its captions parts, "regions": its
    caption_regions parts}) whose accepted model captions hold one refused_now refuses, each
    {"unit", "refused": how many, "example": why and the first}. A region's caption passes the
    same checks (a refused one keeps its template caption); each region row is the one kept. One
    unit's captions in memory at a time."""
    ws = Workspace(workspace, create=False)
    flagged = []
    for unit in units:
        refused, example = 0, ""
        parts = [("captions", p) for p in unit["captions"]] + [("caption_regions", p) for p in unit.get("regions", [])]
        for table, part in parts:
            for row in ws.read_part(table, part, ["caption", "backend", "accepted"]):
                if not row.get("accepted", True) or not (row["backend"] or "").startswith(MODEL_BACKENDS):
                    continue
                why = refused_now(row["caption"] or "")
                if why is not None:
                    refused += 1
                    example = example or f"{why}: {(row['caption'] or '')[:120]!r}"
        if refused:
            flagged.append({"unit": unit["unit"], "refused": refused, "example": example})
    return flagged
