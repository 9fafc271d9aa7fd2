"""Template captions and lexical scores: what the caption job runs (Arrow batches) against the
loop a careful engineer would write (per row, with the same memo caches), in the same run.

    python bench/caption.py [--images 100000] [--embed-images 2000] [--repeats 3] [--quick]

Synthetic images: a count tag, sometimes a character and a copyright, 12-28 general tags drawn
from the WD v3 label list (../shared/tagdata) or, without it, from the template vocabulary.
Ours runs in batches of the caption job's unit (caption.unit_size, 500 by default: the job renders
and scores a unit's rows at once); --batch sets another size.
- template: TemplateCaptions.english over Arrow batches (template_batch.py: each distinct tag
  described once, each sentence built by array operations over the batch's flat tags) vs
  english_from_infos row by row with the same TemplateVocab.info cache;
- lexical scoring: CaptionScorer.lexical over a batch (tag_inclusion as array arithmetic over
  word ids over a byte-table word split, subject_consistency through Arrow's regex kernels, the
  numbers of every count phrase summed from one regex replace) vs tag_inclusion row by row with
  tag words memoised and subject_consistency row by row;
- english_similarity: one batched MiniLM call vs one call per caption, over --embed-images rows
  (printed, no goal).
Both sides run in one process on one thread, alternated --repeats times (median). Ends with
    RESULT caption_template_and_scoring_vs_memoised_loop ratio=<loop s / ours s> goal=3.0 met=yes|no
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import alternated, result  # noqa: E402
from jobs.config import load_config  # noqa: E402
from udfs.caption.caption_scoring import CaptionScorer, SentenceEncoder, subject_consistency  # noqa: E402
from udfs.caption.template_batch import TemplateCaptions  # noqa: E402
from udfs.caption.template_caption import TemplateVocab, english_from_infos  # noqa: E402

TOTAL_GOAL = 3.0  # issue 16: template + scoring at least 3x the memoised per-row loop
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


def template_sides(data: Batch, args: argparse.Namespace, captions: dict[str, list[str]]) -> dict:
    """Template captions: ours over Arrow batches (what the caption job runs), and the memoised
    per-row loop (the same TemplateVocab.info dict cache, one english_from_infos call per row)."""
    ours, loop_vocab = TemplateCaptions(TemplateVocab()), TemplateVocab()

    def template_ours() -> None:
        captions["ours"] = [c for i in range(0, data.n, args.batch)
                            for c in ours.english(*data.slice(i, args.batch))]

    def template_loop() -> None:
        captions["loop"] = [english_from_infos([loop_vocab.info(t, c) for t, c in zip(ts, cs, strict=True)],
                                               loop_vocab, n)
                            for ts, cs, n in zip(data.tags, data.cats, data.people, strict=True)]

    return {"template ours": template_ours, "template loop": template_loop}


def scoring_sides(data: Batch, args: argparse.Namespace, captions: list[str], skip: frozenset,
                  scores: dict[str, tuple]) -> dict:
    """Lexical scores (tag_inclusion, subject_consistency): ours is CaptionScorer.lexical over a
    batch (what the caption job runs); the loop is the same scorer's per-row tag_inclusion, with
    its tag words memoised, and subject_consistency row by row."""
    ours, loop = CaptionScorer(None, skip_tags=skip), CaptionScorer(None, skip_tags=skip)
    names: list[list[str]] = [[]] * data.n

    def scoring_ours() -> None:
        parts = [ours.lexical(captions[i:i + args.batch], *data.slice(i, args.batch)[:2], data.people[i:i + args.batch],
                              names[i:i + args.batch]) for i in range(0, data.n, args.batch)]
        scores["ours"] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def scoring_loop() -> None:
        rows = [(loop.tag_inclusion(c, t, k), subject_consistency(c, n, m))
                for c, t, k, n, m in zip(captions, data.tags, data.cats, data.people, names, strict=True)]
        scores["loop"] = (np.array([r[0] for r in rows], np.float32), np.array([r[1] for r in rows], np.float32))

    return {"scoring ours": scoring_ours, "scoring loop": scoring_loop}


@dataclass
class Batch:
    """The synthetic images as Python lists (the loop's input) and Arrow arrays (ours)."""

    tags: list[list[str]]
    cats: list[list[str]]
    people: list[int]

    def __post_init__(self) -> None:
        self.n = len(self.tags)
        self.arrow = (pa.array(self.tags, pa.list_(pa.string())), pa.array(self.cats, pa.list_(pa.string())),
                      pa.array(self.people, pa.int32()))

    def slice(self, start: int, length: int) -> tuple[pa.Array, pa.Array, pa.Array]:
        return tuple(a.slice(start, length) for a in self.arrow)


def similarity_line(captions: list[str], references: list[str], skip: frozenset) -> str:
    """english_similarity: one batched MiniLM call vs one call per caption (no goal: on CPU the
    model's arithmetic, not the batching, sets the pace)."""
    encoder = SentenceEncoder()
    with_model = CaptionScorer(encoder, skip_tags=skip)
    with_model.similarity(captions[:32], references[:32])  # warm-up
    started = time.perf_counter()
    ours = with_model.similarity(captions, references)
    ours_t = time.perf_counter() - started
    started = time.perf_counter()
    base = np.array([1.0 if c == r else float(encoder.encode([c])[0] @ encoder.encode([r])[0])
                     for c, r in zip(captions, references, strict=True)])
    base_t = time.perf_counter() - started
    assert np.allclose(ours, base, atol=1e-3)
    return (f"english_similarity: {len(captions)} captions, batched {len(captions) / ours_t:.0f}/s, "
            f"one call per caption {len(captions) / base_t:.0f}/s, ratio {base_t / ours_t:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--embed-images", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=int(load_config(None)["caption"]["unit_size"]))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 images, 200 embedded (about a minute)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.embed_images = 20_000, 200
    vocab = TemplateVocab()
    data = Batch(*synthesize(args.images, vocab))
    print(f"{args.images} synthetic images, {sum(map(len, data.tags))} tags, batches of {args.batch}; "
          f"{args.repeats} alternated rounds, median; one process, one thread each side", flush=True)
    captions: dict[str, list[str]] = {}
    seconds = alternated(template_sides(data, args, captions), args.repeats)
    assert captions["ours"] == captions["loop"]
    # captions to score: drop the last sentence of every other caption
    scored = [c.rsplit(". ", 1)[0] + "." if i % 2 else c for i, c in enumerate(captions["ours"])]
    skip = frozenset(vocab.count) | frozenset(vocab.count_words)
    scores: dict[str, tuple] = {}
    seconds |= alternated(scoring_sides(data, args, scored, skip, scores), args.repeats)
    assert all(np.array_equal(a, b) for a, b in zip(scores["ours"], scores["loop"], strict=True))
    for step in ("template", "scoring"):
        ours, loop = seconds[f"{step} ours"], seconds[f"{step} loop"]
        print(f"{step:<9} ours {args.images / ours:>9,.0f} captions/s  memoised loop {args.images / loop:>9,.0f}/s  "
              f"ratio {loop / ours:.2f}", flush=True)
    n = min(args.embed_images, args.images)
    print(similarity_line(scored[:n], captions["ours"][:n], skip), flush=True)
    ours = seconds["template ours"] + seconds["scoring ours"]
    loop = seconds["template loop"] + seconds["scoring loop"]
    print(result("caption_template_and_scoring_vs_memoised_loop", loop / ours, TOTAL_GOAL))


if __name__ == "__main__":
    main()
