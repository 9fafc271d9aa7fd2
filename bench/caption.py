"""Template captions/s and scoring captions/s, batched (what the caption job runs) vs a plain per-row loop.

    python bench/caption.py [--images 100000] [--embed-images 2000]

Synthetic images: a count tag, sometimes a character and a copyright, 12-28 general tags drawn
from the WD v3 label list (../shared/tagdata) or, without it, from the template vocabulary.
- template: TemplateCaptions.english over Arrow batches (each distinct tag classified once per
  actor) vs english_caption() row by row (each tag classified for each row);
- lexical scoring (tag_inclusion + subject_consistency): CaptionScorer over the batch (tag words
  built once per distinct tag) vs the same functions row by row with tag words rebuilt each time;
- english_similarity: one batched MiniLM call vs one call per caption, over --embed-images rows.
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from udfs.caption.caption_scoring import (
    SCORED_CATEGORIES,
    CaptionScorer,
    SentenceEncoder,
    expresses,
    subject_consistency,
    tag_words,
    word_positions,
)
from udfs.caption.template_caption import TemplateCaptions, TemplateVocab, english_caption

SHARED_TAGS = Path(__file__).resolve().parents[2] / "shared" / "tagdata" / "wd_v3_selected_tags.csv"


def general_pool(vocab: TemplateVocab) -> list[str]:
    if SHARED_TAGS.exists():
        with open(SHARED_TAGS, newline="", encoding="utf-8") as f:
            return [r["name"] for r in csv.DictReader(f) if r["category"] == "0"]
    return [h.replace(" ", "_") for h, _ in vocab.heads] + [f"{c}_{h}" for c in ("red", "blue", "long", "white")
                                                           for h, _ in vocab.heads]


def synthesize(n: int, vocab: TemplateVocab, seed: int = 0) -> tuple[list[list[str]], list[list[str]], list[int]]:
    rng = random.Random(seed)
    pool = general_pool(vocab)
    weights = 1.0 / np.arange(1, len(pool) + 1)  # Zipf-like: a few tags are everywhere
    counts = [("1girl", 1), ("1boy", 1), ("2girls", 2), ("no_humans", 0), ("3girls", 3)]
    np_rng = np.random.default_rng(seed)
    tags, cats, people = [], [], []
    for _ in range(n):
        count, n_people = counts[rng.randrange(len(counts))]
        t, c = [count], ["general"]
        if rng.random() < 0.4:
            t += [f"character_{rng.randrange(2000)}", f"series_{rng.randrange(200)}"]
            c += ["character", "copyright"]
        k = rng.randint(12, 28)
        picks = np_rng.choice(len(pool), size=k, replace=False, p=weights / weights.sum())
        t += [pool[i] for i in picks]
        c += ["general"] * k
        tags.append(t)
        cats.append(c)
        people.append(n_people)
    return tags, cats, people


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def report(name: str, n: int, ours: float, base: float) -> None:
    print(f"{name:<22} n={n:>7}  ours {rate(n, ours):>10.0f}/s  per-row loop {rate(n, base):>10.0f}/s  "
          f"ratio {base / ours:5.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--embed-images", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    vocab = TemplateVocab()
    tags, cats, people = synthesize(args.images, vocab)
    print(f"{args.images} synthetic images, {sum(map(len, tags))} tags", flush=True)

    # --- template captions ---
    started = time.perf_counter()
    batched = TemplateCaptions(TemplateVocab())
    ours_captions: list[str] = []
    for i in range(0, args.images, args.batch):
        ours_captions += batched.english(pa.array(tags[i:i + args.batch]), pa.array(cats[i:i + args.batch]),
                                         pa.array(people[i:i + args.batch], pa.int32()))
    ours_t = time.perf_counter() - started
    started = time.perf_counter()
    plain_vocab = TemplateVocab()
    base_captions = [english_caption(t, c, plain_vocab, n) for t, c, n in zip(tags, cats, people, strict=True)]
    base_t = time.perf_counter() - started
    assert ours_captions == base_captions
    report("template captions", args.images, ours_t, base_t)

    # captions to score: drop the last sentence of every other caption
    captions = [c.rsplit(". ", 1)[0] + "." if i % 2 else c for i, c in enumerate(ours_captions)]
    names: list[list[str]] = [[]] * args.images
    skip = frozenset(vocab.count) | frozenset(vocab.count_words)

    # --- lexical scoring ---
    scorer = CaptionScorer(None, skip_tags=skip)
    started = time.perf_counter()
    ours_scores = [(scorer.tag_inclusion(c, t, k), subject_consistency(c, n, m))
                   for c, t, k, n, m in zip(captions, tags, cats, people, names, strict=True)]
    ours_t = time.perf_counter() - started
    started = time.perf_counter()
    base_scores = [(plain_inclusion(c, t, k, scorer, skip), subject_consistency(c, n, m))
                   for c, t, k, n, m in zip(captions, tags, cats, people, names, strict=True)]
    base_t = time.perf_counter() - started
    assert ours_scores == base_scores
    report("lexical scoring", args.images, ours_t, base_t)

    # --- english_similarity ---
    n = min(args.embed_images, args.images)
    encoder = SentenceEncoder()
    with_model = CaptionScorer(encoder, skip_tags=skip)
    with_model.similarity(captions[:32], ours_captions[:32])  # warm-up
    started = time.perf_counter()
    ours_sim = with_model.similarity(captions[:n], ours_captions[:n])
    ours_t = time.perf_counter() - started
    started = time.perf_counter()
    base_sim = np.array([1.0 if c == r else float(encoder.encode([c])[0] @ encoder.encode([r])[0])
                         for c, r in zip(captions[:n], ours_captions[:n], strict=True)])
    base_t = time.perf_counter() - started
    assert np.allclose(ours_sim, base_sim, atol=1e-3)
    report("english_similarity", n, ours_t, base_t)


def plain_inclusion(caption: str, tags: list[str], cats: list[str], scorer: CaptionScorer, skip: frozenset) -> float:
    """tag_inclusion as a plain loop writes it: tag words rebuilt for every tag of every row."""
    positions = word_positions(scorer.forms.words(caption))
    scored = [tag_words(t, c or "general", scorer.forms) for t, c in zip(tags, cats, strict=True)
              if (c or "general") in SCORED_CATEGORIES and t not in skip]
    scored = [w for w in scored if w]
    if not scored:
        return 1.0
    return sum(expresses(w, positions) for w in scored) / len(scored)


if __name__ == "__main__":
    main()
