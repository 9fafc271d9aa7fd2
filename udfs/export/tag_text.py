"""KEY.txt from tags, the way trainers want it: an order (categories first, then by rank or by
score), exclusions (by category, by tag), spelling (underscores or spaces, escaped parentheses)
and kohya's keep_tokens (which tags lead, optionally marked by keep_tokens_separator)."""

from __future__ import annotations

from dataclasses import dataclass

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

    @classmethod
    def from_options(cls, opts: dict) -> TagTextRules:
        """From the [export] options (checked by jobs/export.check_options)."""
        return cls(underscores=bool(opts["tag_underscores"]),
                   category_order=tuple(opts["tag_category_order"]), sort=str(opts["tag_sort"]),
                   exclude_categories=frozenset(opts["exclude_tag_categories"]),
                   exclude_tags=frozenset(opts["exclude_tags"]),
                   escape_parentheses=bool(opts["escape_parentheses"]), keep_tokens=int(opts["keep_tokens"]),
                   keep_tokens_separator=str(opts["keep_tokens_separator"]))

    def ordered(self, tags: list[str], categories: list[str], scores: list[float]) -> list[str]:
        """The tags to write, in order (the input order is the curated rank)."""
        first = {category: i for i, category in enumerate(self.category_order)}
        kept = [(first.get(c, len(first)), -float(s) if self.sort == "score" else 0.0, i, t)
                for i, (t, c, s) in enumerate(zip(tags, categories, scores, strict=True))
                if c not in self.exclude_categories and t not in self.exclude_tags]
        return [t for *_, t in sorted(kept)]

    def spell(self, tag: str) -> str:
        # underscores become spaces except in kaomoji such as ^_^ (no letters)
        text = tag if self.underscores or not any(c.isalpha() for c in tag) else tag.replace("_", " ")
        if self.escape_parentheses:
            text = text.replace("(", "\\(").replace(")", "\\)")
        return text

    def text(self, tags: list[str], categories: list[str], scores: list[float]) -> str:
        words = [self.spell(t) for t in self.ordered(tags, categories, scores)]
        if self.keep_tokens_separator and 0 < self.keep_tokens < len(words):
            head, tail = words[:self.keep_tokens], words[self.keep_tokens:]
            return f"{', '.join(head)} {self.keep_tokens_separator} {', '.join(tail)}"
        return ", ".join(words)
