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
# every tag's category is one of these (the sidecars' prefixes and fields, the tag lists' numbers,
# the tagger's labels: udfs/ingest/sidecars.py, udfs/curate/tag_rules.CATEGORY_NAMES)
CATEGORIES = ("general", "character", "copyright", "artist", "meta", "rating")


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
        return [t for t, _ in self.ordered_pairs(tags, categories, scores)]

    def ordered_pairs(self, tags: list[str], categories: list[str], scores: list[float]) -> list[tuple[str, str]]:
        """(tag, category) of the tags to write, in order."""
        first = {category: i for i, category in enumerate(self.category_order)}
        kept = [(first.get(c, len(first)), -float(s) if self.sort == "score" else 0.0, i, t, c)
                for i, (t, c, s) in enumerate(zip(tags, categories, scores, strict=True))
                if c not in self.exclude_categories and t not in self.exclude_tags and not self.parts_text(t)]
        return [(t, c) for *_, t, c in sorted(kept)]

    def kept(self, categories: list[str]) -> int:
        """How many of the leading tags (of these categories, in written order) a trainer must keep:
        keep_tokens; with a separator also the rest of a run of one category of category_order that
        the count ends inside (the second character of a two-character image: kohya keeps exactly
        what is before the separator, so the kept part is per image). Without a separator kohya
        keeps a fixed count, and such an image has some of its characters shuffled (keep_warning)."""
        n = min(self.keep_tokens, len(categories))
        if self.keep_tokens_separator and n and categories[n - 1] in self.category_order:
            while n < len(categories) and categories[n] == categories[n - 1]:
                n += 1
        return n

    def keep_warning(self, tags: list[str], categories: list[str], scores: list[float]) -> str:
        """Why kohya's fixed keep_tokens count splits this image's leading category (no separator
        to mark its kept part), or ""."""
        if self.keep_tokens_separator or not self.keep_tokens:  # no fixed count to split a category
            return ""
        written = [c for _, c in self.ordered_pairs(tags, categories, scores)]
        n = min(self.keep_tokens, len(written))
        if not n or written[n - 1] not in self.category_order:
            return ""
        run = n
        while run < len(written) and written[run] == written[n - 1]:
            run += 1
        if run == n:
            return ""
        total = sum(1 for c in written if c == written[n - 1])
        return (f"export.keep_tokens {self.keep_tokens} keeps {written[:n].count(written[n - 1])} of the image's "
                f"{total} {written[n - 1]} tags: a trainer shuffles the others; set export.keep_tokens_separator "
                '(e.g. "|||") to write each image\'s kept tags exactly')

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
        pairs = self.ordered_pairs(tags, categories, scores)
        return self.join([self.spell(t) for t, _ in pairs], self.kept([c for _, c in pairs]))

    def fitted(self, tags: list[str], categories: list[str], scores: list[float]) -> tuple[str, int]:
        """The text, and how many of its lowest-ranked tags the CLIP token budget left out (never
        the kept ones, which may alone be over it: see export_plan's over_token_budget)."""
        if not self.clip_token_budget:
            return self.whole_text(tags, categories, scores), 0
        pairs = self.ordered_pairs(tags, categories, scores)
        keep = self.kept([c for _, c in pairs])
        return fit_tags([self.spell(t) for t, _ in pairs], keep, self.clip_token_budget,
                        lambda words: self.join(words, keep))

    def join(self, words: list[str], keep: int | None = None) -> str:
        """The words with the separator after the first `keep` (keep_tokens when not given), also
        when no word follows them (all kept, or the budget left out the rest): kohya falls back to
        its own keep_tokens count for a text without the separator, and shuffled and dropped
        (caption_tag_dropout_rate) the kept tags past that count."""
        keep = min(self.keep_tokens if keep is None else keep, len(words))
        if self.keep_tokens_separator and keep:
            head, tail = words[:keep], words[keep:]
            return f"{', '.join(head)} {self.keep_tokens_separator} {', '.join(tail)}".rstrip()
        return ", ".join(words)
