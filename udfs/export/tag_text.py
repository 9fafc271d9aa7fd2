"""KEY.txt from tags, the way trainers want it: an order (categories first, then by rank or by
score), exclusions (by category, by tag), spelling (underscores or spaces, escaped parentheses)
kohya's keep_tokens (which tags lead, optionally marked by keep_tokens_separator) and a CLIP
token budget (the lowest-ranked tags are left out until the text fits; udfs/export/clip_tokens.py)."""

from __future__ import annotations

from dataclasses import dataclass

from udfs.export.clip_tokens import fit_tags  # the tokenizer itself loads on the first count
from udfs.ingest.sidecars import normalize_tag
from udfs.tag_spelling import escaped, spaced

SORTS = ("rank", "score")


@dataclass(frozen=True)
class TagTextRules:
    underscores: bool = False
    category_order: tuple[str, ...] = ()  # these categories first, in this order; the rest after
    sort: str = "rank"  # within a category: curated rank, or tagger score (highest first)
    exclude_categories: frozenset[str] = frozenset()
    exclude_tags: frozenset[str] = frozenset()
    escape_parentheses: bool = False  # `(` -> `\(`: prompt syntax reads bare parentheses as weights
    keep_tokens: int = 0  # the first N tags: kohya's --keep_tokens never shuffles them
    keep_tokens_separator: str = ""  # written after them (kohya's --keep_tokens_separator), "" for none
    clip_token_budget: int = 0  # at most this many CLIP tokens (75, 150, 225); 0: no limit

    @classmethod
    def from_options(cls, opts: dict) -> TagTextRules:
        """From the [export] options (checked by jobs/export.check_options)."""
        return cls(underscores=bool(opts["tag_underscores"]),
                   category_order=tuple(opts["tag_category_order"]), sort=str(opts["tag_sort"]),
                   exclude_categories=frozenset(opts["exclude_tag_categories"]),
                   # as the tables hold them, however the user spelled them ("Long hair", "a \\(b\\)")
                   exclude_tags=frozenset(normalize_tag(t) for t in opts["exclude_tags"]),
                   escape_parentheses=bool(opts["escape_parentheses"]), keep_tokens=int(opts["keep_tokens"]),
                   keep_tokens_separator=str(opts["keep_tokens_separator"]),
                   clip_token_budget=int(opts["clip_token_budget"]))

    def ordered(self, tags: list[str], categories: list[str], scores: list[float]) -> list[str]:
        """The tags to write, in order (the input order is the curated rank)."""
        first = {category: i for i, category in enumerate(self.category_order)}
        kept = [(first.get(c, len(first)), -float(s) if self.sort == "score" else 0.0, i, t)
                for i, (t, c, s) in enumerate(zip(tags, categories, scores, strict=True))
                if c not in self.exclude_categories and t not in self.exclude_tags and not self.parts_text(t)]
        return [t for *_, t in sorted(kept)]

    def parts_text(self, tag: str) -> bool:
        """A tag holding the keep_tokens separator would split the text where kohya looks for it."""
        separator = self.keep_tokens_separator.strip()
        return bool(separator) and separator in tag

    def spell(self, tag: str) -> str:
        """As imgutils.tagging.tags_to_text writes it (udfs/tag_spelling.py): underscores as
        spaces except in kaomoji (o_o, ^_^), and `\\`, `(`, `)` escaped."""
        text = tag if self.underscores else spaced(tag)
        return escaped(text) if self.escape_parentheses else text

    def text(self, tags: list[str], categories: list[str], scores: list[float]) -> str:
        return self.fitted(tags, categories, scores)[0]

    def whole_text(self, tags: list[str], categories: list[str], scores: list[float]) -> str:
        """The text without the CLIP token budget."""
        return self.join([self.spell(t) for t in self.ordered(tags, categories, scores)])

    def fitted(self, tags: list[str], categories: list[str], scores: list[float]) -> tuple[str, int]:
        """The text, and how many of its lowest-ranked tags the CLIP token budget left out (never
        the keep_tokens ones)."""
        if not self.clip_token_budget:
            return self.whole_text(tags, categories, scores), 0
        words = [self.spell(t) for t in self.ordered(tags, categories, scores)]
        return fit_tags(words, self.keep_tokens, self.clip_token_budget, self.join)

    def join(self, words: list[str]) -> str:
        if self.keep_tokens_separator and 0 < self.keep_tokens < len(words):
            head, tail = words[:self.keep_tokens], words[self.keep_tokens:]
            return f"{', '.join(head)} {self.keep_tokens_separator} {', '.join(tail)}"
        return ", ".join(words)
