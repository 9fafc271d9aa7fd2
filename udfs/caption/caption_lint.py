"""Caption lint for character LoRAs: a caption that repeats its character's fixed traits.

A character LoRA's trigger word should learn the character's fixed look (hair, eyes, ...):
a caption that also says "red hair" for Eileen, whose every picture has red hair, teaches the
model that red hair is a separate, optional thing. The traits per character come from curate
(table character_traits); a caption "expresses" a trait by the word rule of tag_inclusion
(udfs/caption/caption_scoring.py: its words near the head word), read with hyphenated words in
their parts ("red-haired" says red_hair), so that the lint flags a trait however it is said.

Stripping removes a trait only where it is said as adjectives right before its noun, the one
form that can go without rewriting the sentence: "short red hair" -> "short hair", "a
red-haired girl" -> "a girl". Anywhere else ("her hair is red") the caption is left as it is,
and stays flagged; so does a one-word trait ("freckles").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from udfs.caption.caption_scoring import NOT_THE_ATTRIBUTE, WORD, CaptionScorer, WordForms, expresses, word_positions

VOWELS = "aeiou"
ADVERBS = frozenset("very quite rather so too most more less".split())  # and words ending in -ly
CONJUNCTIONS = frozenset("and or but nor".split())
NOUN_AFTER = re.compile(r"(,?)\s+([^\W\d_]+)")  # what follows an adjective before its noun: a word


@dataclass(frozen=True)
class Word:
    """A word of the caption, normalised, with where it stands in the original text; the parts of
    a hyphenated word are words of their own, with the index of the word they are parts of."""

    form: str
    start: int
    end: int
    whole: int


class TraitLint:
    """Which traits a caption repeats, and the caption without them."""

    def __init__(self, scorer: CaptionScorer) -> None:
        self.scorer = scorer  # its word forms and its memo of tag words
        self._trait_words: dict[str, tuple[str, ...]] = {}

    def offending(self, caption: str, traits: list[str]) -> list[str]:
        """The trait tags `caption` expresses, in the order given."""
        if not traits:
            return []
        positions = word_positions([w.form for w in caption_words(caption, self.scorer.forms)])
        return [t for t in traits if expresses(self.trait_words(t), positions)]

    def strip(self, caption: str, traits: list[str]) -> str:
        """`caption` without each trait it says as adjectives before the trait's noun."""
        if not traits:
            return caption
        words = caption_words(caption, self.scorer.forms)
        cuts: list[tuple[int, int]] = []
        objects = frozenset(self.scorer.forms.norm(w) for w in NOT_THE_ATTRIBUTE)
        for trait in traits:
            cuts += adjective_cuts(caption, words, self.trait_words(trait), objects)
        cuts = after_commas(caption, sorted(set(cuts)))
        return _tidy(cut_out(caption, cuts)) if cuts else caption

    def trait_words(self, trait: str) -> tuple[str, ...]:
        """The tag's words as caption_words reads a caption (an "x-ray" tag: "x", "ray")."""
        found = self._trait_words.get(trait)
        if found is None:
            said = " ".join(self.scorer.words_of_tag(trait, "general"))
            found = self._trait_words[trait] = tuple(w.form for w in caption_words(said, self.scorer.forms))
        return found


def caption_words(text: str, forms: WordForms) -> list[Word]:
    """The words of `text` as the scorer reads them (WORD over the lower-cased text), placed in
    the original text: lower() may change a string's length ("İ" is two characters lower-cased),
    so the places come from a character by character map. A hyphenated word that is no known
    form of its own ("yellow-haired" is one) is read as its parts."""
    lowered = text.lower()
    if len(lowered) == len(text):  # nearly always: every character keeps its place
        origin: list[int] | range = range(len(text))
    else:
        origin = [i for i, char in enumerate(text) for _ in char.lower()]
    words: list[Word] = []
    for whole, match in enumerate(WORD.finditer(lowered)):
        start = origin[match.start()]
        raw = match.group()
        if "-" not in raw.strip("-") or raw in forms.synonyms:
            words.append(Word(forms.norm(raw), start, origin[match.end() - 1] + 1, whole))
            continue
        for part in re.finditer(r"[^-]+", raw):
            words.append(Word(forms.norm(part.group()), origin[match.start() + part.start()],
                              origin[match.start() + part.end() - 1] + 1, whole))
    return words


def adjective_cuts(text: str, words: list[Word], trait: tuple[str, ...],
                   objects: frozenset[str] = frozenset()) -> list[tuple[int, int]]:
    """The spans to cut for each place `trait` (its words, the noun last) is said as adjectives
    right before its noun ("red hair", "very long hair"; nothing but spaces between them): its
    adjectives, or the whole of a hyphenated word made of the trait alone ("red-haired") where a
    noun follows it. Left as they are: a trait partly inside a hyphenated word ("dark-red hair"),
    after an adverb ("very red hair" is no "very hair"), and one whose noun names a thing of it
    (`objects`, the scorer's NOT_THE_ATTRIBUTE: "a red hair ribbon" is a red ribbon, not red hair)."""
    n = len(trait)
    if n < 2:
        return []  # a one-word trait cannot be cut without rewriting the sentence
    cuts = []
    for i in range(n - 1, len(words)):
        run = words[i - n + 1:i + 1]
        if tuple(w.form for w in run) != trait or not all(_joined(text, a, b) for a, b in zip(run, run[1:],
                                                                                             strict=False)):
            continue
        if i >= n and _joined(text, words[i - n], run[0]) and _adverb(text[words[i - n].start:words[i - n].end]):
            continue
        if i + 1 < len(words) and words[i + 1].form in objects and _joined(text, run[-1], words[i + 1]):
            continue
        wholes = [[w for w in words if w.whole == r.whole] for r in run]
        if all(len(whole) == 1 for whole in wholes):  # words of their own: the adjectives go
            cuts.append((run[0].start, run[-2].end))
        elif all(whole == run for whole in wholes):  # "red-haired": the hyphenated word is the trait
            noun = NOUN_AFTER.match(text, run[-1].end)
            if noun and noun.group(2).lower() not in CONJUNCTIONS:
                cuts.append((run[0].start, noun.end(1)))  # with its comma: "a blue-eyed, red-haired girl"
    return cuts


def _joined(text: str, a: Word, b: Word) -> bool:
    """Nothing but spaces between two words (or one hyphen, inside a hyphenated word)."""
    between = text[a.end:b.start]
    return between == "-" if a.whole == b.whole else bool(between) and between.isspace()


def _adverb(word: str) -> bool:
    word = word.lower()
    return word in ADVERBS or word.endswith("ly")


def after_commas(text: str, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The cuts (in order) that leave no dangling comma: one right after a comma ("long, red
    hair", "with a smile, red hair flowing") is left, unless that comma goes with an earlier cut."""
    kept: list[tuple[int, int]] = []
    for start, end in cuts:
        before = text[:start].rstrip()
        if before.endswith(",") and not any(s < len(before) <= e for s, e in kept):
            continue
        kept.append((start, end))
    return kept


def cut_out(text: str, cuts: list[tuple[int, int]]) -> str:
    """`text` without the spans (in order), an article before a cut fitted to the word now after
    it ("an auburn-haired girl" -> "a girl"), and a sentence whose first word went starting with
    a capital again."""
    pieces, last = [], 0
    for start, end in cuts:
        if start < last:  # within a span cut already (two traits sharing a word)
            pieces[-1] = (pieces[-1][0], max(end, pieces[-1][1]))
            last = max(last, end)
            continue
        pieces.append((last, start))
        last = end
    pieces.append((last, len(text)))
    out = [text[a:b] for a, b in pieces]
    for k in range(len(out) - 1):
        out[k] = _fit_article(out[k], "".join(out[k + 1:]))  # the next word may be past further cuts
        starts_sentence = (k == 0 and not out[k].strip()) or out[k].rstrip().endswith((".", "!", "?"))
        if starts_sentence and text[pieces[k][1]].isupper():
            out[k + 1] = re.sub(r"^(\W*)(\w)", lambda m: m.group(1) + m.group(2).upper(), out[k + 1])
    return "".join(out)


def _fit_article(before: str, after: str) -> str:
    """`before` with its last word, if an article, fitted to the first word of `after`."""
    article = re.search(r"\b(an?)(\s*)$", before, re.IGNORECASE)
    following = re.match(r"\s*([A-Za-z])", after)
    if not article or not following:
        return before
    wanted = "an" if following.group(1).lower() in VOWELS else "a"
    word = article.group(1)
    fitted = (wanted.capitalize() if word[0].isupper() else wanted) if word.lower() != wanted else word
    return before[:article.start(1)] + fitted + article.group(2)


def _tidy(text: str) -> str:
    text = re.sub(r"\s+([,.;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[])\s+", r"\1", text)  # "Eileen (red hair)" -> "Eileen (hair)", not "( hair)"
    return re.sub(r"\s{2,}", " ", text).strip()
