"""The caption job's map_batches UDFs: caption whole units, score, loop back, write, commit.

`UnitCaptioner` holds what every backend shares (template drafts, the evidence each caption is
scored against and its reference caption, the scorer, the loop-back, quality tags, the caption
lint, the rewriter, region captions, the unit-level commit); a subclass per backend
supplies `caption()`. Each batch is one or more complete units (the job makes one block per
unit and asks for whole blocks), so a unit's rows are written and committed together and a
restarted job redoes only uncommitted units.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.staging import read_unit_rows
from store.workspace import Workspace
from udfs.caption.caption_lint import TraitLint
from udfs.caption.caption_prompts import CAPTION_PROMPT, REWRITE_PROMPT, EchoCheck, refusal
from udfs.caption.caption_scoring import CaptionScorer, ClaimEvidence, QualityBands, Scores, SentenceEncoder
from udfs.caption.reply_cache import ReplyCache
from udfs.caption.tags_digest import tags_digest
from udfs.caption.template_batch import TemplateCaptions
from udfs.caption.template_caption import AspOptions, TemplateVocab, asp_caption, name_of

PINNED = ("count", "count_word", "character", "copyright")  # tag groups loop-back never drops nor moves
# The attempt number of an image's own captions (caption.own_captions): before the backend's 0, 1, ...
OWN_ATTEMPT = -1


@dataclass
class Hint:
    """The tags one attempt works from (loop-back: fewer, reordered) and its seed."""

    tags: list[str]
    categories: list[str]
    seed: int


def hint_for(row: dict, attempt: int, seed: int, drop_share: float, vocab: TemplateVocab) -> Hint:
    """Attempt 0: all tags in rank order. Attempt k: general tags shuffled with seed+k, the
    lowest-ranked k*drop_share of them left out; count, character and copyright tags stay first."""
    tags, cats = list(row["tags"]), list(row["categories"])
    if attempt == 0:
        return Hint(tags, cats, seed)
    pinned = [(t, c) for t, c in zip(tags, cats, strict=True) if vocab.info(t, c or "general").group in PINNED]
    rest = [(t, c) for t, c in zip(tags, cats, strict=True) if vocab.info(t, c or "general").group not in PINNED]
    keep = max(1, int(round(len(rest) * (1.0 - min(0.9, attempt * drop_share))))) if rest else 0
    rest = rest[:keep]
    random.Random((seed + attempt) * 1_000_003 + zlib.crc32(row["key"].encode())).shuffle(rest)
    kept = pinned + rest
    return Hint([t for t, _ in kept], [c for _, c in kept], seed + attempt)


def without_traits(row: dict) -> dict:
    """An input row whose tags (and tagger evidence) lack its character's fixed traits: captions
    are not asked to say them, nor scored for leaving them out (caption.lint_strip_traits)."""
    traits = set(row.get("traits") or [])
    if not traits:
        return row
    def drop(holder: dict, tags: str, categories: str) -> dict:
        kept = [(t, c) for t, c in zip(holder.get(tags) or [], holder.get(categories) or [], strict=True)
                if t not in traits]
        return {**holder, tags: [t for t, _ in kept], categories: [c for _, c in kept]}

    out = drop(drop(row, "tags", "categories"), "tagger_tags", "tagger_categories")
    if row.get("persons"):
        out["persons"] = [drop(p, "tags", "categories") for p in row["persons"]]
    return out


def count_people(tags: list[str], vocab: TemplateVocab) -> int | None:
    """People from the count tags (1girl, 2boys, no_humans, ...); None when there are none."""
    counts = [vocab.count[t][0] for t in tags if t in vocab.count]
    return sum(counts) if counts else None


def image_people(row: dict, vocab: TemplateVocab) -> int | None:
    """n_people from image_meta, else from the count tags, else unknown."""
    if row.get("n_people") is not None:
        return int(row["n_people"])
    return count_people(row["tags"], vocab)


def image_names(row: dict) -> list[str]:
    chars = row.get("characters") or [t for t, c in zip(row["tags"], row["categories"], strict=True)
                                      if c == "character"]
    return [name_of(c) for c in chars]


@dataclass(frozen=True)
class Evidence:
    """What one image's captions are scored against: never what they were built from.

    against: "tagger" (the tagger's own tags and the person detections), "curated_tags" (a VLM's
    caption where no tagger ran: the tags it was given as hints, but it wrote from the image), or
    None with `not_scored` saying why.
    """

    against: str | None
    tags: list[str]
    categories: list[str]
    people: int | None
    not_scored: str | None = None
    # what a caption's claims are checked against (caption_scoring.Claims): the image's characters;
    # the tags the tagger scored near its threshold (no verdict on them); closed: the tagger's
    # evidence, where a value it scored well below its threshold is denied
    characters: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()
    closed: bool = False


BUILT_FROM_TAGS = Evidence(None, [], [], None, "built_from_tags")


def evidence_for(row: dict, builds_from_tags: bool, vocab: TemplateVocab) -> Evidence:
    """The evidence for one image (a row of sql/caption_inputs.sql) and a backend.

    A template caption is built from the curated tags, which hold every tag we have (source and
    tagger): nothing independent is left, so it is not scored.
    """
    if builds_from_tags:
        return BUILT_FROM_TAGS
    characters = tuple(row.get("characters") or ())
    if row.get("tagger_ran"):
        tags, categories = list(row["tagger_tags"]), list(row["tagger_categories"])
        people = row.get("n_people_detected") or count_people(tags, vocab)
        return Evidence("tagger", tags, categories, people, characters=characters,
                        uncertain=tuple(row.get("tagger_near") or ()), closed=True)
    return Evidence("curated_tags", list(row["tags"]), list(row["categories"]), image_people(row, vocab),
                    characters=characters)


def own_evidence(row: dict, vocab: TemplateVocab) -> Evidence:
    """The evidence for an image's own caption: as for a model shown the image, but an image with
    neither tagger tags nor curated tags has none, nor has one whose tags were taken from its own
    text (caption.tags_from_text): they say what the caption says."""
    evidence = evidence_for(row, False, vocab)
    if evidence.against == "curated_tags" and (not evidence.tags or row.get("tags_from_text")):
        return Evidence(None, [], [], None, "no_evidence")
    return evidence


@dataclass
class Judge:
    """One unit's evidence, reference captions (the template of the evidence) and names."""

    evidence: list[Evidence]
    references: list[str]
    names: list[list[str]]

    def score(self, scorer: CaptionScorer, images: list[int], captions: list[str]) -> Scores:
        evidence = [self.evidence[i] for i in images]
        claims = ClaimEvidence([list(e.characters) for e in evidence], [list(e.uncertain) for e in evidence],
                               [e.closed for e in evidence])
        return scorer.score(captions, [self.references[i] for i in images], [e.tags for e in evidence],
                            [e.categories for e in evidence], [e.people for e in evidence],
                            [self.names[i] for i in images], claims)


class UnitCaptioner:
    """Base of the per-backend callable classes handed to map_batches."""

    backend = "base"
    needs_tags = True  # the template cannot caption an image without tags; a VLM can
    sees_image = False  # a VLM backend is shown the picture (when send_images is on)
    model_writes = True  # its captions are a model's replies, checked as such (_acceptable's `model`)

    def __init__(self, workspace: str, options: dict[str, Any]) -> None:
        self.ws = Workspace(workspace)
        self.opts = options
        # a caption made from the tags alone (the template; a VLM not shown the picture) has no
        # independent evidence left to be scored against
        self.builds_from_tags = not (self.sees_image and options.get("send_images", True))
        self.vocab = TemplateVocab()
        self.templates = TemplateCaptions(self.vocab)
        # nothing to score: no model to load
        self.scorer = self.make_scorer(None if self.builds_from_tags else self.make_encoder())
        self._own_scorer: CaptionScorer | None = None  # see own_scorer
        self.lint = TraitLint(self.scorer)
        self.bands = QualityBands(tuple((float(lo), str(name)) for lo, name in options["quality_bands"]),
                                  int(options["accuracy_step"]), float(options["review_floor"]))
        self.rewriter = self.make_rewriter(options) if options.get("rewrite") else None
        # a reply holding a line of these is the prompt repeated, not a caption
        self.echo = EchoCheck([options.get("prompt") or CAPTION_PROMPT, options.get("region_prompt") or "",
                               REWRITE_PROMPT])

    def make_encoder(self) -> SentenceEncoder:
        return SentenceEncoder(self.opts["embedding_model"], batch_size=int(self.opts["embedding_batch_size"]),
                               cpu_batch_size=int(self.opts["embedding_cpu_batch_size"]))

    def make_scorer(self, encoder: SentenceEncoder | None) -> CaptionScorer:
        skip = frozenset(self.vocab.count) | frozenset(self.vocab.count_words)
        # caption.characters: the dataset's character tags (the job's), the names a caption may make up
        return CaptionScorer(encoder, skip_tags=skip, categories=tuple(self.opts["score_categories"]),
                             characters=self.opts.get("characters") or ())

    def own_scorer(self) -> CaptionScorer:
        """The scorer of the images' own captions: the backend's, or for a backend whose captions
        are not scored (the template) one made at the first own caption, so that the sentence
        model is loaded only for a dataset that brings captions."""
        if self.scorer.encoder is not None:
            return self.scorer
        if self._own_scorer is None:
            self._own_scorer = self.make_scorer(self.make_encoder())
        return self._own_scorer

    def make_rewriter(self, options: dict[str, Any]):
        from udfs.caption.rewriter import make_rewriter

        return make_rewriter(options)

    # ---- what a backend supplies ------------------------------------------------------------
    def caption(self, rows: list[dict], hints: list[Hint], drafts: list[str], attempt: int) -> list[str | Exception]:
        raise NotImplementedError

    def backend_name(self, row: dict) -> str:
        return self.backend

    # ---- map_batches entry ------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> dict[str, list]:
        """Caption each unit of the batch (its rows read from the file the job staged), write, commit."""
        out: dict[str, list] = {"unit": [], "info": []}
        previous = batch["previous"].to_pylist() if "previous" in batch.column_names else [[]] * batch.num_rows
        for unit, path, expected, borrowed in zip(batch["unit"].to_pylist(), batch["path"].to_pylist(),
                                                  batch["rows"].to_pylist(), previous, strict=True):
            rows = read_unit_rows(self.ws, path)
            if rows.num_rows != expected:  # a unit committed with rows missing would never be redone
                raise RuntimeError(f"unit {unit}: {path} holds {rows.num_rows} of its {expected} rows")
            started, asked = time.perf_counter(), self.request_counts()
            replies = self.keep_replies(unit, borrowed or [])
            captions, errors = self.caption_unit(rows)
            regions, region_errors = self.region_rows(rows)
            errors += region_errors
            info = unit_info(rows, captions, errors, time.perf_counter() - started, len(regions))
            info["requests"] = dict(self.request_counts() - asked)  # of this unit
            if replies is not None:  # kept: a failure's rerun, or a unit replacing this one, asks less
                keys = rows["key"]
                replies.settle(pc.min(keys).as_py(), pc.max(keys).as_py())
            self.commit(unit, captions, errors, regions, info)
            out["unit"].append(unit)
            out["info"].append(json.dumps(info))
        return out

    def endpoints(self) -> list:
        """The OpenAI-compatible endpoints this captioner asks (the rewriter's; a VLM backend's)."""
        return [self.rewriter.endpoint] if self.rewriter is not None else []

    def request_counts(self) -> Counter:
        """Requests sent, retried and answered by kept replies so far, over every endpoint."""
        counts: Counter[str] = Counter()
        for endpoint in self.endpoints():
            counts.update(endpoint.counts)
        return counts

    def keep_replies(self, unit: str, previous: list[str]) -> ReplyCache | None:
        """The unit's reply cache, given to every endpoint: a run killed in the middle of the unit
        has kept the replies it got, and they are not asked for again; nor are those of the
        `previous` units it replaces (udfs/caption/reply_cache.py)."""
        endpoints = self.endpoints()
        if not endpoints:
            return None
        replies = ReplyCache(self.ws, unit, previous)
        for endpoint in endpoints:
            endpoint.cache = replies
        return replies

    def commit(self, unit: str, captions: list[dict], errors: list[dict], regions: list[dict], info: dict) -> None:
        """Write a unit's parts and commit it: its rows appear together, or (killed) not at all.
        New part names each time: a unit done again (a passing failure) never rewrites the files
        a published generation names; publishing retires them."""
        name = f"{unit}-{uuid.uuid4().hex[:8]}"
        self.ws.write_part("captions", name, captions)
        self.ws.write_part("errors", f"caption-{name}", errors)
        parts = {"captions": [name], "errors": [f"caption-{name}"]}
        if regions:
            self.ws.write_part("caption_regions", name, regions)
            parts["caption_regions"] = [name]
        self.ws.commit_unit("caption", unit, info, parts=parts)

    def region_rows(self, table: pa.Table) -> tuple[list[dict], list[dict]]:
        """caption_regions rows (caption.regions) and their errors rows. Each region is first the
        English template of its own tags; a backend shown the image captions each region's crop
        instead (`caption_regions`), and a region it fails keeps its template caption and gets an
        errors row (not dropped)."""
        if not self.opts["regions"] or "regions" not in table.column_names:
            return [], []
        # what a backend and the lint look at: where the image is, its rating (routing), its traits
        images = table.select([c for c in ("key", "source", "member", "member_offset", "bytes", "rating", "traits")
                               if c in table.column_names]).to_pylist()
        out, owners = [], []
        for image, regions in zip(images, table["regions"].to_pylist(), strict=True):
            for region in regions or []:
                out.append({"key": image["key"], "region": region["region"], "backend": "template:english",
                            "tags": region["tags"], "_categories": region["categories"]})
                owners.append(image)
        if not out:
            return [], []
        hints = [Hint(r["tags"], r.pop("_categories"), int(self.opts["seed"])) for r in out]
        drafts = self._english([h.tags for h in hints], [h.categories for h in hints], [None] * len(out))
        for row, text in zip(out, drafts, strict=True):
            row["caption"] = text if row["tags"] else ""
        if self.builds_from_tags:
            return out, []
        errors: list[dict] = []
        results = self.caption_regions(owners, [r["region"] for r in out], hints, drafts)
        for row, image, draft, result in zip(out, owners, drafts, results, strict=True):
            if self._acceptable(image, result, f"region {row['region']} (its template caption kept)", errors, draft):
                row["caption"], row["backend"] = self._text(image, result), self.backend_name(image)
        return out, errors

    def caption_regions(self, images: list[dict], regions: list[str], hints: list[Hint],
                        drafts: list[str]) -> list[str | Exception]:
        """A caption of each named region of each image (a backend that sees the image supplies it)."""
        raise NotImplementedError

    # ---- one unit -----------------------------------------------------------------------------
    def caption_unit(self, table: pa.Table) -> tuple[list[dict], list[dict]]:
        """All attempt rows (scored, best accepted, quality tags) and error rows of one unit."""
        rows = table.to_pylist()
        for r in rows:  # of the image's tags as the review page has them: before lint_strip_traits
            r["tags_digest"] = tags_digest(r["tags"])
        if self.opts["lint_strip_traits"]:
            rows = [without_traits(r) for r in rows]
        errors: list[dict] = []
        own_on = self.opts["own_captions"] == "score"
        todo = [r for r in rows if self.can_caption(r) or (own_on and r.get("own_captions"))]
        for r in rows:
            if not (self.can_caption(r) or (own_on and r.get("own_captions"))):
                # not lost here: the export writes the image with whatever text it has by then (a
                # person's caption in review); without any, not to kohya folders (empty_text rows)
                errors.append(self._error(r, "no_tags", "no curated or source tags: the template has nothing to say",
                                          dropped=False))
        drafts = self._english([r["tags"] for r in todo], [r["categories"] for r in todo],
                               [r["n_people"] for r in todo], [r.get("persons") for r in todo])
        evidence = [evidence_for(r, self.builds_from_tags, self.vocab) for r in todo]
        references = [""] * len(todo) if self.builds_from_tags else self._english(
            [e.tags for e in evidence], [e.categories for e in evidence], [e.people for e in evidence])
        judge = Judge(evidence, references, [image_names(r) for r in todo])
        seed, target = int(self.opts["seed"]), float(self.opts["target"])
        attempts = self._own_captions(todo, target, errors)
        # an image with no score is settled by its first caption; one by an own caption at target
        best: dict[int, float] = {r["_i"]: r["accuracy"] for r in attempts if not r.get("_fallback")}
        pending = [i for i in range(len(todo)) if i not in best and self.can_caption(todo[i])]
        asked = set(pending)  # the images the backend is asked to caption
        for attempt in range(int(self.opts["max_attempts"])):
            if not pending:
                break
            hints = [hint_for(todo[i], attempt, seed, float(self.opts["drop_per_attempt"]), self.vocab)
                     for i in pending]
            attempt_drafts = self._drafts(todo, pending, hints, drafts, attempt)
            results = self.caption([todo[i] for i in pending], hints, attempt_drafts, attempt)
            done, interrupted = [], set()
            for i, hint, draft, result in zip(pending, hints, attempt_drafts, results, strict=True):
                if self._acceptable(todo[i], result, f"attempt {attempt}", errors, draft, model=self.model_writes):
                    done.append((i, hint.seed, self._text(todo[i], result), self.backend_name(todo[i])))
                elif getattr(result, "kind", None) in TRANSIENT_KINDS | UNREADABLE:
                    # not a poor caption: the next run asks this attempt again (its unit is redone,
                    # transient_failures), rather than this one spending the image's later attempts;
                    # an image that cannot be read cannot be asked with fewer tags either
                    interrupted.add(i)
            for row in self._scored(done, attempt, todo, judge):
                attempts.append(row)
                settled = math.inf if row["accuracy"] is None else row["accuracy"]
                best[row["_i"]] = max(best.get(row["_i"], -1.0), settled)
            pending = [i for i in pending if best.get(i, -1.0) < target and i not in interrupted]
            if not pending:
                break
        if self.rewriter is not None:
            attempts += self._rewrites(attempts, todo, judge, errors)
        captioned = {row["_i"] for row in attempts}
        for i, r in enumerate(todo):
            if i not in captioned:
                errors.append(self._error(r, "no_caption", "every caption attempt failed", dropped=True))
            elif i in asked and i not in best:  # a row saying so, and a passing failure is asked again
                errors.append(self._error(r, "no_model_caption", "every caption attempt failed: the image's own "
                                          "caption (below caption.target) was kept"))
        return self._accept(attempts), errors

    def _own_captions(self, todo: list[dict], target: float, errors: list[dict]) -> list[dict]:
        """Attempt rows (OWN_ATTEMPT, backend "own") of the captions the images came with, when
        caption.own_captions is "score". Each is scored like a caption of a model shown the image,
        against evidence it was not written from (evidence_for). One that reaches `target` is
        accepted as it is, and no model is asked for its image; one below (or not scorable) is
        marked `_fallback`: accepted only when the backend gives the image no caption."""
        if self.opts["own_captions"] != "score":
            return []
        done = [(i, int(self.opts["seed"]), self._text(row, text), "own")
                for i, row in enumerate(todo) for text in row.get("own_captions") or []
                if self._acceptable(row, text, "own caption", errors, model=False)]
        if not done:
            return []
        rows = self._scored(done, OWN_ATTEMPT, todo, self._own_judge(todo, done), self.own_scorer())
        for row in rows:
            if row["accuracy"] is None or row["accuracy"] < target:
                row["_fallback"] = True
        return rows

    def _own_judge(self, todo: list[dict], done: list[tuple]) -> Judge:
        """The judge of the own captions in `done` (and of their rewrites): own_evidence."""
        images = sorted({i for i, *_ in done})
        evidence = {i: own_evidence(todo[i], self.vocab) for i in images}
        english = self._english([evidence[i].tags for i in images], [evidence[i].categories for i in images],
                                [evidence[i].people for i in images])
        references = dict(zip(images, english, strict=True))
        return Judge([evidence.get(i, BUILT_FROM_TAGS) for i in range(len(todo))],
                     [references.get(i, "") for i in range(len(todo))], [image_names(r) for r in todo])

    def can_caption(self, row: dict) -> bool:
        return bool(row["tags"]) or not self.needs_tags

    def _text(self, row: dict, result: str) -> str:
        """A caption's final text: trimmed, and without the character's traits when asked."""
        text = result.strip()
        if self.opts["lint_strip_traits"]:
            text = self.lint.strip(text, row.get("traits") or [])
        return text

    def _english(self, tags: list, categories: list, people: list, persons: list | None = None) -> list[str]:
        strings = pa.list_(pa.string())
        return self.templates.english(pa.array(tags, strings), pa.array(categories, strings),
                                      pa.array(people, pa.int32()), persons)

    def _drafts(self, todo, pending, hints, drafts, attempt) -> list[str]:
        if attempt == 0:
            return [drafts[i] for i in pending]
        return self._english([h.tags for h in hints], [h.categories for h in hints],
                             [todo[i]["n_people"] for i in pending], [todo[i].get("persons") for i in pending])

    def _scored(self, done, attempt, todo, judge: Judge, scorer: CaptionScorer | None = None) -> list[dict]:
        """Attempt rows of the captions in `done`, scored against each image's evidence."""
        if not done:
            return []
        scored = [j for j, d in enumerate(done) if judge.evidence[d[0]].against is not None]
        scores = judge.score(scorer or self.scorer, [done[j][0] for j in scored], [done[j][2] for j in scored]) \
            if scored else None
        by_done = dict(zip(scored, range(len(scored)), strict=True))
        rows = []
        for j, (i, seed, caption, backend) in enumerate(done):
            row = {"_i": i, "key": todo[i]["key"], "attempt": attempt, "backend": backend, "seed": seed,
                   "caption": caption, "tag_inclusion": None, "english_similarity": None,
                   "subject_consistency": None, "accuracy": None, "scored_against": judge.evidence[i].against,
                   "not_scored": judge.evidence[i].not_scored,
                   "lint": self.lint.offending(caption, todo[i].get("traits") or []), "quality_tags": [],
                   "flagged": False, "accepted": False, "tags_digest": todo[i]["tags_digest"]}
            if j in by_done:
                k = by_done[j]
                # float32 scores: (0.8 + 1 + 0) / 3 is 0.59999996, under a band or target of 0.6
                acc = round(float(scores.accuracy[k]), 6)
                row.update(tag_inclusion=float(scores.tag_inclusion[k]),
                           english_similarity=float(scores.english_similarity[k]),
                           subject_consistency=float(scores.subject_consistency[k]), accuracy=acc,
                           quality_tags=self.bands.tags(acc), flagged=self.bands.flagged(acc))
            rows.append(row)
        return rows

    def _rewrites(self, attempts, todo, judge: Judge, errors) -> list[dict]:
        """A rewrite of each image's best caption (refusals and echoes refused: the caption stays).
        It is scored as that caption was: against the same evidence by the same scorer (an own
        caption's rewrite against own_evidence), or not, with the same reason (a template
        caption's rewrite was built from the tags too). It wins only where it is not worse: within
        rewrite_tolerance of the original, and never below caption.target where that reached it."""
        best = _best_rows(attempts)
        chosen = [best[i] for i in sorted(best)]
        keep = [self.rewriter.must_keep(todo[r["_i"]]["tags"], todo[r["_i"]]["categories"]) for r in chosen]
        results = self.rewriter.rewrite([todo[r["_i"]] for r in chosen], [r["caption"] for r in chosen], keep)
        own, done = [], []
        for r, result in zip(chosen, results, strict=True):
            if self._acceptable(todo[r["_i"]], result, "rewrite", errors, written_from=r["caption"]):
                (own if r["attempt"] == OWN_ATTEMPT else done).append(
                    (r["_i"], r["seed"], self._text(todo[r["_i"]], result), f"rewrite:{self.rewriter.name}"))
        attempt = max((r["attempt"] for r in attempts), default=-1) + 1
        rows = self._scored(done, attempt, todo, judge)
        if own:
            rows += self._scored(own, attempt, todo, self._own_judge(todo, own), self.own_scorer())
        originals = {r["_i"]: r for r in chosen}
        tolerance, target = float(self.opts["rewrite_tolerance"]), float(self.opts["target"])
        for row in rows:
            row["_wins"] = _rewrite_wins(row, originals[row["_i"]], tolerance, target)
        return rows

    def _acceptable(self, row: dict, result: str | Exception | None, what: str, errors: list[dict],
                    draft: str | None = None, model: bool = True, written_from: str | None = None) -> bool:
        """A caption with a word in it, within max_caption_chars; from a model, neither the prompt (or the
        `draft` it gave) handed back nor a refusal nor a loop (one the draft, or the caption a
        rewrite was `written_from`, holds is none). Else an errors row saying why not (and the
        loop-back asks again)."""
        limit = int(self.opts["max_caption_chars"])
        # a draft handed back is refused only where captions are scored: the template's caption is
        # its draft, and a caption made from the tags alone is not scored anyway
        echo = self.echo.why(result, None if self.builds_from_tags else draft) \
            if model and isinstance(result, str) else None
        if echo is not None:
            errors.append(self._error(row, "prompt_echo", f"{what}: {echo}"))
            return False
        if model and isinstance(result, str) and refusal(result):
            errors.append(self._error(row, "refusal", f"{what}: the model declined: {result[:200]}"))
            return False
        text = result.strip() if isinstance(result, str) else ""
        if says_a_word(text) and len(text) <= limit:
            loop = repeated_phrase(text) if model else None
            # a repetition the draft (or the caption a rewrite was `written_from`) holds, a crowd
            # said clause by clause, is that text's, not a loop
            source = written_from or draft
            held = repeated_phrase(source) if loop is not None and source else None
            if loop is None or (held is not None and held[1] >= loop[1]):
                return True
            phrase, times = loop
            errors.append(self._error(row, "repetition", f"{what}: the reply says {phrase[:200]!r} {times} times "
                                                         "in a row (a model stuck in a loop)"))
            return False
        if len(text) > limit:
            errors.append(self._error(row, "caption_too_long",
                                      f"{what}: {len(text)} characters > max_caption_chars {limit}"))
        elif text:
            errors.append(self._error(row, "empty_caption", f"{what}: not a word in the reply: {text[:200]!r}"))
        else:
            kind = getattr(result, "kind", "empty_caption") if result is not None else "empty_caption"
            errors.append(self._error(row, kind, f"{what}: {result or 'empty reply'}"))
        return False

    def _accept(self, attempts: list[dict]) -> list[dict]:
        for row in _best_rows(attempts).values():
            row["accepted"] = True
        for row in attempts:
            row.pop("_i", None)
            row.pop("_wins", None)
            row.pop("_fallback", None)
        return attempts

    def _error(self, row: dict, kind: str, message: str, dropped: bool = False) -> dict:
        return {"key": row["key"], "source": row.get("source") or "", "member": row.get("member") or "",
                "stage": f"caption:{self.backend}", "kind": kind, "message": str(message)[:2000], "dropped": dropped}


def says_a_word(text: str) -> bool:
    """Whether a caption holds a letter or a digit, in any script: "... !!! ???" or a zero-width
    space is no caption."""
    return any(ch.isalnum() for ch in text)


# A phrase said at least LOOP_REPEATS times back to back, and LOOP_WORDS words or more in all, is a
# model stuck in a loop until max_tokens ("A girl smiles, A girl smiles, ..."), not a caption: no
# caption says "smiling" 24 times in a row or one sentence three times over, while "no no no" or
# "very very long" stay captions. In a script written without spaces (Chinese, Japanese) each
# character is a word: "女の子が笑っている" said 100 times with no punctuation was one word of 900
# characters, and no loop.
LOOP_REPEATS, LOOP_WORDS = 3, 24
NO_SPACES = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"  # kana, han
LOOP_WORD = re.compile(rf"(?=\w)[{NO_SPACES}]|[^\W{NO_SPACES}]+")  # a kana's "・" or "゛" is no word
JOINED = re.compile(rf"(?<=[{NO_SPACES}]) (?=[{NO_SPACES}])")
# A loop's period is found among the distances between a run of LOOP_SPAN words and its two
# nearest earlier occurrences (the phrase's own period, where the loop is said), and only those
# are checked word by word: every period up to a third of the reply, each a pass over it, took
# 13 ms for a 2,000-character reply of single-character words, 50 ms at max_caption_chars.
# LOOP_SPAN is at most the (LOOP_REPEATS - 1) / LOOP_REPEATS * LOOP_WORDS words a loop repeats.
LOOP_SPAN = 8


def repeated_phrase(text: str) -> tuple[str, int] | None:
    """(the phrase, how many times in a row) where `text` repeats one phrase over and over; else None."""
    words = LOOP_WORD.findall(text.lower())
    if len(words) < LOOP_WORDS:
        return None
    ids = np.unique(words, return_inverse=True)[1].astype(np.uint64)
    for period in _loop_periods(ids):
        # words[i + period] == words[i] for a run of k words: the phrase of `period` words from i
        # is said k // period + 1 times in a row
        same = np.concatenate(([False], ids[period:] == ids[:-period], [False]))
        edges = np.flatnonzero(same[1:] != same[:-1])
        starts, runs = edges[::2], edges[1::2] - edges[::2]
        if not len(runs):
            continue
        longest = int(np.argmax(runs))
        times = int(runs[longest]) // period + 1
        if times >= LOOP_REPEATS and times * period >= LOOP_WORDS:
            start = int(starts[longest])
            return JOINED.sub("", " ".join(words[start:start + period])), times
    return None


def _loop_periods(ids: np.ndarray) -> list[int]:
    """The periods a loop in the words `ids` may have, shortest first: the distances from each run
    of LOOP_SPAN words to its nearest and second nearest earlier occurrence (by hash: a collision
    only adds a period to check), up to a third of the words."""
    n = len(ids) - LOOP_SPAN + 1  # at least LOOP_WORDS - LOOP_SPAN + 1
    spans = np.zeros(n, np.uint64)
    for k in range(LOOP_SPAN):  # a polynomial hash of each span; uint64 wraps around, as meant
        spans = spans * np.uint64(1_000_003) + ids[k:k + n] + np.uint64(1)
    order = np.argsort(spans, kind="stable")  # equal spans in the order they come
    ranked = spans[order]
    found = np.concatenate([(order[j:] - order[:-j])[ranked[j:] == ranked[:-j]] for j in (1, 2)])
    return [int(p) for p in np.unique(found) if 0 < p <= len(ids) // LOOP_REPEATS]


def _rewrite_wins(rewrite: dict, original: dict, tolerance: float, target: float) -> bool:
    """Whether a rewrite replaces the caption it was written from. Unscored (as its original was),
    it wins: it was asked for, and nothing says it is worse. Scored, a shorter caption may lose a
    little accuracy (rewrite_tolerance) and still win, but never fall below the target its
    original reached."""
    if rewrite["accuracy"] is None or original["accuracy"] is None:
        return rewrite["accuracy"] is None and original["accuracy"] is None
    if original["accuracy"] >= target > rewrite["accuracy"]:
        return False
    return rewrite["accuracy"] + tolerance >= original["accuracy"]


def _best_rows(attempts: list[dict]) -> dict[int, dict]:
    """Per image the row with the highest accuracy; the first on ties. A rewrite is the best row
    where it beats the caption it was written from (_rewrite_wins), else never."""
    best: dict[int, dict] = {}
    for row in attempts:
        current = best.get(row["_i"])
        if current is None or _rank(row) > _rank(current):
            best[row["_i"]] = row
    return best


def _rank(row: dict) -> float:
    if "_wins" in row:  # a rewrite: its original is the best of the rest
        return math.inf if row["_wins"] else -math.inf
    if row.get("_fallback"):
        return -2.0  # an own caption below target: only when the backend gave none
    return 0.0 if row["accuracy"] is None else row["accuracy"]


# Failures of the moment (a server down, overloaded, slow, or a proxy answering with what is no
# chat completion: bad_reply) or of the endpoint's config (a key or model it refuses:
# openai_transport.REFUSED_STATUS): an image left without a caption by them is asked again by the
# next run, which redoes its unit (jobs/caption.py). A valid completion with nothing in it
# (empty_caption) is the model's own answer, as a refusal is: the same request gets it again, so
# the loop-back asks with the next attempt's hint instead, and the next run does not.
TRANSIENT_KINDS = frozenset({"unreachable", "timeout", "rate_limited", "server_error", "endpoint_refused",
                             "bad_reply"})


# The image could not be read to be shown: no later attempt can show it (one errors row, not one each).
UNREADABLE = frozenset({"unreadable_image"})


def transient_failures(errors: list[dict]) -> int:
    """Images with a request that failed for a passing reason (TRANSIENT_KINDS): their unit is
    done again by the next run, which asks only for what failed (the replies are kept), so that
    it ends as a run without the failure would have (the same attempts, the same caption)."""
    return len({e["key"] for e in errors if e["kind"] in TRANSIENT_KINDS})


# a marker's flag: its unit's id was made from row digests that hold the picture where a VLM is
# shown it (sql/caption_units.sql); a marker without it was made before, by legacy_digest
PICTURES_IN_DIGEST = "pictures_in_digest"
# a marker's version of the checks a model's reply passed before it was accepted (_acceptable):
# raised with each change that refuses replies an earlier version let through, so that the units
# committed before are looked at again once (udfs/caption/reply_recheck.py); none: before any.
# 2: refusals in Chinese, Japanese and Spanish and after a first sentence; loops in a script
# without spaces
REPLY_CHECKS_KEY, REPLY_CHECKS = "reply_checks", 2


def unit_info(rows: pa.Table, captions: list[dict], errors: list[dict], seconds: float, regions: int = 0) -> dict:
    """A caption unit's marker info: its counts, and its first key (jobs/caption_cuts.py finds its
    range from it)."""
    accepted = [c for c in captions if c["accepted"]]
    scored = [c["accuracy"] for c in accepted if c["accuracy"] is not None]
    return {"images": rows.num_rows, "first_key": rows["key"][0].as_py() if rows.num_rows else None,
            PICTURES_IN_DIGEST: True, REPLY_CHECKS_KEY: REPLY_CHECKS,
            "rows": len(captions), "captioned": len(accepted), "scored": len(scored),
            "scored_rows": sum(c["accuracy"] is not None for c in captions),  # attempts not accepted too
            "not_scored": dict(Counter(c["not_scored"] for c in accepted if c["not_scored"])),
            "scored_against": dict(Counter(c["scored_against"] for c in accepted if c["scored_against"])),
            "flagged": sum(c["flagged"] for c in accepted),
            "accuracy_sum": float(np.sum(scored)) if scored else 0.0,
            "attempts": Counter(str(c["attempt"]) for c in captions),
            "own_captions": sum(c["attempt"] == OWN_ATTEMPT for c in captions),
            "own_accepted": sum(c["attempt"] == OWN_ATTEMPT for c in accepted),
            "error_kinds": dict(Counter(e["kind"] for e in errors)),
            "dropped": sum(e["dropped"] for e in errors), "transient": transient_failures(errors),
            "regions": regions,  # caption_regions rows
            "seconds": round(seconds, 4)}


class TemplateCaptioner(UnitCaptioner):
    """No model: the English template, or the anime_screenshot_pipeline-style tag caption."""

    backend = "template"
    model_writes = False  # its caption is the draft: no refusal, echo nor loop of a model

    def __init__(self, workspace: str, options: dict[str, Any]) -> None:
        super().__init__(workspace, options)
        self.style = options["template_style"]
        if self.style not in ("english", "asp"):
            raise ValueError(f"caption.template_style must be english or asp, not {self.style!r}")
        self.asp = AspOptions(dict(options["asp_probabilities"]), int(options["asp_max_tags"]),
                              bool(options["asp_shuffle"]), bool(options["asp_underscores"]))

    def backend_name(self, row: dict) -> str:
        return f"template:{self.style}"

    def caption(self, rows: list[dict], hints: list[Hint], drafts: list[str], attempt: int) -> list[str | Exception]:
        if self.style == "english":
            return drafts  # the draft *is* the English template of this attempt's tags
        return [asp_caption(r["key"], h.tags, h.categories, r.get("rating"), h.seed, self.vocab, self.asp)
                for r, h in zip(rows, hints, strict=True)]
