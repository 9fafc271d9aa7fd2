"""Caption lint for character LoRAs: a caption that repeats its character's fixed traits.

A character LoRA's trigger word should learn the character's fixed look (hair, eyes, ...):
a caption that also says "red hair" for Eileen, whose every picture has red hair, teaches the
model that red hair is a separate, optional thing. The traits per character come from curate
(table character_traits); a caption "expresses" a trait by the same word rule as tag_inclusion
(udfs/caption/caption_scoring.py), so what the lint flags is what the scorer would count.

Stripping removes a trait's words around its head word ("short red hair" -> "short hair" for
red_hair); a one-word trait ("freckles") cannot be cut out of a sentence without rewriting it,
so it stays and stays flagged.
"""

from __future__ import annotations

import re

from udfs.caption.caption_scoring import WORD, CaptionScorer, expresses, matches, word_positions


class TraitLint:
    """Which traits a caption repeats, and the caption without them."""

    def __init__(self, scorer: CaptionScorer) -> None:
        self.scorer = scorer  # its word forms and its memo of tag words

    def offending(self, caption: str, traits: list[str]) -> list[str]:
        """The trait tags `caption` expresses, in the order given."""
        if not traits:
            return []
        positions = word_positions(self.scorer.forms.words(caption))
        return [t for t in traits if expresses(self.scorer.words_of_tag(t, "general"), positions)]

    def strip(self, caption: str, traits: list[str]) -> str:
        """`caption` without the non-head words of each trait it expresses."""
        if not traits:
            return caption
        spans = [m.span() for m in WORD.finditer(caption.lower())]
        words = self.scorer.forms.words(caption)
        positions = word_positions(words)
        cut: set[int] = set()
        for trait in traits:
            for near in matches(self.scorer.words_of_tag(trait, "general"), positions):
                cut.update(near)
        if not cut:
            return caption
        out, last = [], 0
        for i in sorted(cut):
            start, end = spans[i]
            out.append(caption[last:start])
            last = end
        out.append(caption[last:])
        return _tidy("".join(out))


def _tidy(text: str) -> str:
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return re.sub(r"\s{2,}", " ", text).strip()
