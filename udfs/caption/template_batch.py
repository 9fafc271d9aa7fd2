"""The English template over a whole batch at once: numpy over the flat tag list, Arrow for strings.

`english_from_infos` (template_caption.py) is the definition, one image at a time; this module
renders the same captions for a batch without a Python pass over each image's tags:

- every distinct (tag, category) is described once, in a table that lives as long as the
  vocabulary: its group, words, head, modifier units, and how it reads in each sentence;
- a batch is then a few array operations per sentence over the flat tags: selecting a group,
  dropping repeats within an image (`np.unique` on row and string id), ordering modifiers,
  merging the tags of one head ("short_hair" + "red_hair" -> "short red hair"), and joining
  with commas and "and" (Arrow's `binary_join` over per-image lists);
- Python runs once per distinct subject (the count, character and copyright tags with the head
  count) and once per image to put its finished sentences together.

Written by hand because no library renders a template over columns; the per-image function
stays the reference, and tests and bench/caption.py check that both give the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from udfs.caption.template_caption import (
    Person,
    Subject,
    TagInfo,
    TemplateVocab,
    _capital,
    english_from_infos,
    join_and,
    one_full_stop,
    person_places,
    with_article,
)

GROUP_CODES = ("hidden", "count", "count_word", "character", "copyright", "hair", "eyes", "clothes", "pose",
               "expression", "background", "also")
G = {name: code for code, name in enumerate(GROUP_CODES)}
SUBJECT_GROUPS = (G["count"], G["character"], G["copyright"])
POSE_VIEW, POSE_VERB, POSE_OTHER = 0, 1, 2
MAX_CACHED_SUBJECTS = 200_000  # distinct subjects (count, characters, series, head count) remembered
SEPARATORS = pa.array(["", ", ", " and "])  # join_and: before the first item, between, before the last


class StringTable:
    """Every string the template writes, by a dense id, with the facts the template asks of it."""

    def __init__(self, vocab: TemplateVocab) -> None:
        self.vocab = vocab
        self.ids: dict[str, int] = {}
        self.values: list[str] = []
        self.first: list[int] = []  # order among modifiers (vocab.first), the rest after
        self.vowel: list[bool] = []  # starts with a vowel: "an"
        self.takes_article: list[bool] = []  # as with_article: last word neither bare nor plural
        self._array: pa.Array | None = None
        self._facts: dict[str, np.ndarray] = {}

    def id(self, text: str) -> int:
        found = self.ids.get(text)
        if found is None:
            found = self.ids[text] = len(self.values)
            self.values.append(text)
            self.first.append(self.vocab.first.get(text, len(self.vocab.first)))
            self.vowel.append(text[:1] in "aeiou")
            self.takes_article.append(with_article(text, self.vocab.bare) != text)
            self._array = None
        return found

    @property
    def array(self) -> pa.Array:
        if self._array is None or len(self._array) != len(self.values):
            self._array = pa.array(self.values, pa.string())
            self._facts = {name: np.array(getattr(self, name)) for name in ("first", "vowel", "takes_article")}
        return self._array

    def facts(self, name: str) -> np.ndarray:
        """`first`, `vowel` or `takes_article` of every string, as an array."""
        self.array  # noqa: B018 (rebuilds the arrays when strings were added)
        return self._facts[name]

    def take(self, ids: np.ndarray) -> pa.Array:
        return self.array.take(pa.array(ids, pa.int64()))


@dataclass
class InfoColumns:
    """Per distinct tag (a TagTable id), what each sentence needs of it, as numpy arrays."""

    group: np.ndarray
    words: np.ndarray  # string ids
    tag: np.ndarray
    head: np.ndarray
    phrase: np.ndarray  # -1: none
    unit_offsets: np.ndarray  # modifier units of tag i: units[unit_offsets[i]:unit_offsets[i + 1]]
    units: np.ndarray
    pose: np.ndarray  # POSE_VIEW, POSE_VERB or POSE_OTHER
    verb: np.ndarray  # expression: the verb ("smiling"), -1: none
    adjective: np.ndarray  # expression: the tag as an adjective, -1: none
    other: np.ndarray  # expression: the phrase or words with an article, -1: said as a verb or adjective
    kind: np.ndarray  # background: the kind of background ("simple", "plain"), -1: not a background kind
    place: np.ndarray  # background: indoors / outdoors, -1: none


class TagTable:
    """A dense id per distinct (tag, category), and its InfoColumns, kept across batches."""

    def __init__(self, vocab: TemplateVocab) -> None:
        self.vocab = vocab
        self.strings = StringTable(vocab)
        self.ids: dict[str, int] = {}  # "tag\x1fcategory" -> id
        self.infos: list[TagInfo] = []
        self._rows: list[tuple] = []
        self._units: list[int] = []
        self._columns: InfoColumns | None = None

    def ids_of(self, tags: pa.Array, categories: pa.Array) -> np.ndarray:
        """The table id of every (tag, category) of a flat batch (each distinct pair looked up once)."""
        pairs = pc.binary_join_element_wise(tags.fill_null(""), categories.fill_null("general"), "\x1f")
        encoded = pc.dictionary_encode(pairs)
        known = self.ids
        keys = python_strings(encoded.dictionary)
        distinct = np.array([known.get(k, -1) for k in keys], dtype=np.int64)
        for at in np.flatnonzero(distinct < 0):  # pairs not met before
            distinct[at] = self._add(keys[at])
        return distinct[encoded.indices.to_numpy(zero_copy_only=False)] if len(pairs) else np.zeros(0, np.int64)

    def _add(self, pair: str) -> int:
        info = self.vocab.info(*pair.split("\x1f", 1))
        s, vocab = self.strings.id, self.vocab
        units = [s(u) for u in vocab.modifier_units(info.modifier)]
        words = info.words
        pose = POSE_VIEW if info.phrase else POSE_VERB if words.split()[:1] and words.split()[0].endswith("ing") \
            else POSE_OTHER
        verb = vocab.verbs.get(info.tag, "")
        self._rows.append((
            G.get(info.group, G["also"]), s(words), s(info.tag), s(info.head), s(info.phrase) if info.phrase else -1,
            len(units), pose, s(verb) if verb else -1, s(info.tag) if info.tag in vocab.adjectives else -1,
            -1 if info.tag in vocab.verbs or info.tag in vocab.adjectives
            else s(info.phrase or with_article(words, vocab.bare)),
            s(info.modifier or "plain") if info.head == "background" else -1,
            s(info.tag) if info.tag in ("outdoors", "indoors") else -1))
        self._units.extend(units)
        self.infos.append(info)
        self._columns = None
        self.ids[pair] = len(self.infos) - 1
        return self.ids[pair]

    @property
    def columns(self) -> InfoColumns:
        if self._columns is None:
            c = np.array(self._rows, dtype=np.int64).reshape(-1, 12).T
            self._columns = InfoColumns(
                group=c[0], words=c[1], tag=c[2], head=c[3], phrase=c[4],
                unit_offsets=np.concatenate([[0], np.cumsum(c[5])]), units=np.array(self._units, np.int64),
                pose=c[6], verb=c[7], adjective=c[8], other=c[9], kind=c[10], place=c[11])
        return self._columns


@dataclass
class SubjectColumns:
    """Who each row's caption speaks of (Subject), one value per row."""

    unknown: np.ndarray  # bool: nothing says how many people there are
    people: np.ndarray  # int
    noun_phrase: pa.Array  # "Gotou Hitori from Bocchi the Rock!", "Two girls"
    wear: pa.Array  # "is" or "are" (wearing)
    series: pa.Array
    names: pa.Array  # the sentence naming the characters, or ""
    pronoun: pa.Array
    be: pa.Array
    have: pa.Array
    look: pa.Array


@dataclass
class Elements:
    """Some of a batch's tags: the image (row, ascending) and table id of each, in reading order."""

    row: np.ndarray
    tag: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def where(self, keep: np.ndarray) -> Elements:
        return Elements(self.row[keep], self.tag[keep])


class BatchTemplate:
    """English captions of a batch; the same text as english_from_infos for each image."""

    def __init__(self, vocab: TemplateVocab) -> None:
        self.vocab = vocab
        self.table = TagTable(vocab)
        self._subjects: dict[str, tuple] = {}

    def english(self, tags: pa.ListArray, categories: pa.ListArray, n_people: list[int | None]) -> list[str]:
        n = len(tags)
        if pc.any(pc.not_equal(pc.list_value_length(tags), pc.list_value_length(categories))).as_py():
            raise ValueError("every row needs one category per tag")  # as the per-image zip(strict=True)
        if len(self._subjects) > MAX_CACHED_SUBJECTS:  # a long-lived actor meets new subjects forever
            self._subjects.clear()
        ids = self.table.ids_of(tags.flatten(), categories.flatten())
        c = self.table.columns
        every = Elements(pc.list_parent_indices(tags).to_numpy().astype(np.int64), ids)
        group = c.group[every.tag]
        subject = self.subjects(every.where(_in_groups(group, SUBJECT_GROUPS)), n_people, n)
        merge = subject.people <= 1  # one person's "long_hair" and "red_hair" are one head of hair
        with_people = subject.people[every.row] > 0

        def pick(*names: str, people_only: bool = False) -> Elements:
            keep = _in_groups(group, [G[g] for g in names])
            return every.where(keep & with_people if people_only else keep)

        hair_eyes = pick("hair", "eyes")  # all hair tags, then the eyes tags (as _phrases reads them)
        hair_eyes = hair_eyes.where(np.lexsort((np.arange(len(hair_eyes)), c.group[hair_eyes.tag], hair_eyes.row)))
        features, clothes = self.phrases(hair_eyes, merge), self.phrases(pick("clothes"), merge)
        also_group = np.where(group == G["also"], 2, np.where(with_people, -1, np.select(
            [group == G["pose"], group == G["expression"]], [0, 1], -1)))
        sentences = [self.first_sentence(subject, features, clothes, n), _sentence(subject.names),
                     *self.pose_sentences(subject, pick("pose", people_only=True), n),
                     self.expression_sentence(subject, pick("expression", people_only=True), n),
                     *self.background_sentences(pick("background"), n),
                     self.also_sentence(every.where(also_group >= 0), also_group[also_group >= 0], n)]
        # each sentence ends in ". " or is empty: join, then drop the last space
        joined = pc.utf8_rtrim(pc.binary_join_element_wise(*sentences, ""), characters=" ")
        # the few captions with a name that ends in a full stop (Python's `in` on each string is
        # several times faster than Arrow's match_substring kernel over the batch)
        return [one_full_stop(text) if ".." in text else text for text in python_strings(joined)]

    # -- the subject: once per distinct combination of count, character and copyright tags ------

    def subjects(self, found: Elements, n_people: list[int | None], n: int) -> SubjectColumns:
        ids = pc.cast(pa.array(found.tag), pa.string())
        keys = pc.binary_join(_lists(found.row, ids, n), ",")
        people = pc.cast(pa.array(n_people, pa.int64()), pa.string()).fill_null("")
        encoded = pc.dictionary_encode(pc.binary_join_element_wise(keys, people, "|"))
        known = self._subjects
        distinct = [known[k] if k in known else known.setdefault(k, self._subject(k))
                    for k in python_strings(encoded.dictionary)]
        which = encoded.indices
        column = [pa.array(values).take(which) for values in zip(*distinct, strict=True)] if distinct else \
            [pa.array([], pa.string())] * len(SubjectColumns.__dataclass_fields__)
        column[0] = column[0].to_numpy(zero_copy_only=False)
        column[1] = column[1].to_numpy(zero_copy_only=False).astype(np.int64)
        return SubjectColumns(*column)

    def _subject(self, key: str) -> tuple:
        """The fields of SubjectColumns for one distinct subject."""
        tags, people = key.rsplit("|", 1)
        by_group: dict[str, list[TagInfo]] = {}
        for i in tags.split(",") if tags else ():
            info = self.table.infos[int(i)]
            by_group.setdefault(info.group, []).append(info)
        subject = Subject.of(by_group, int(people) if people else None)
        pronoun = subject.pronoun
        return (subject.unknown, subject.people, _capital(subject.noun_phrase()) if subject.people else "",
                "are" if subject.plural else "is", join_and(subject.series), subject.names_sentence(), pronoun,
                subject.be(pronoun), "have" if pronoun == "They" else "has", "look" if pronoun == "They" else "looks")

    # -- sentences: each an Arrow string per row, "" or the sentence and a space (written in the
    # sentence's own join, not by a second join of every sentence) ------------------------------

    def first_sentence(self, subject: SubjectColumns, features: tuple[np.ndarray, pa.Array],
                       clothes: tuple[np.ndarray, pa.Array], n: int) -> pa.Array:
        """Who, with their hair and eyes, wearing their clothes (Subject.first_sentence)."""
        (f_rows, f_text), (c_rows, c_text) = features, clothes
        both_rows = np.concatenate([f_rows, c_rows])
        order = np.argsort(both_rows, kind="stable")
        seen = _join_and(both_rows[order], pa.concat_arrays([f_text, c_text]).take(pa.array(order)), n)
        position, _ = _positions(c_rows, n)
        first_clothes = _put(n, c_rows[position == 0], c_text.filter(pa.array(position == 0)))
        more_clothes = _join_and(c_rows[position > 0], c_text.filter(pa.array(position > 0)), n)
        wearing = _say(" ", subject.wear, " wearing ", first_clothes, _maybe(" with ", more_clothes),
                       when=first_clothes)
        people = _say(subject.noun_phrase, _maybe(" with ", _join_and(f_rows, f_text, n)), wearing, ". ")
        nobody = _say("A scene without people", _maybe(" showing ", seen), _maybe(" from ", subject.series), ". ")
        # no count and no head count: only what is seen, capitalised as Python does (few rows)
        unknown = np.flatnonzero(subject.unknown)
        said = [_capital(text) + ". " if text else "" for text in python_strings(seen.take(pa.array(unknown)))]
        sentence = pc.if_else(pa.array(subject.people > 0), people, nobody)
        if len(unknown):
            sentence = pc.replace_with_mask(sentence, pa.array(subject.unknown), pa.array(said, pa.string()))
        return sentence

    def pose_sentences(self, subject: SubjectColumns, found: Elements, n: int) -> tuple[pa.Array, pa.Array]:
        """What they do ('She is sitting, with ...' or 'She has ...'), and the view ('The picture is ...')."""
        c, s = self.table.columns, self.table.strings
        kind = c.pose[found.tag]
        text = np.where(kind == POSE_VIEW, c.phrase[found.tag], c.words[found.tag])
        verbs, others, views = (_join_and(found.row[kind == k], s.take(text[kind == k]), n)
                                for k in (POSE_VERB, POSE_OTHER, POSE_VIEW))
        doing = _say(subject.pronoun, " ", subject.be, " ", verbs, _maybe(", with ", others), ". ", when=verbs)
        having = _say(subject.pronoun, " ", subject.have, " ", others, ". ", when=others)
        return pc.if_else(pc.not_equal(verbs, ""), doing, having), _say("The picture is ", views, ". ", when=views)

    def expression_sentence(self, subject: SubjectColumns, found: Elements, n: int) -> pa.Array:
        """'She is smiling and looks happy, with ...' (_expression_sentence): verbs, adjectives and
        the rest, each without repeats."""
        c = self.table.columns
        verbs, adjectives, others = (self._join_distinct(found.row, column[found.tag], n)
                                     for column in (c.verb, c.adjective, c.other))
        doing, looking = _say(subject.be, " ", verbs, when=verbs), _say(subject.look, " ", adjectives, when=adjectives)
        clauses = pc.if_else(pc.not_equal(doing, ""), _say(doing, _maybe(" and ", looking)), looking)
        said = pc.if_else(pc.not_equal(clauses, ""),
                          _say(subject.pronoun, " ", clauses, _maybe(", with ", others), ". "),
                          _say(subject.pronoun, " ", subject.have, " ", others, ". "))
        return pc.if_else(pa.array(np.bincount(found.row, minlength=n) > 0), said, "")

    def background_sentences(self, found: Elements, n: int) -> tuple[pa.Array, ...]:
        """The kind of background (deduped, in modifier order), the place (indoors, outdoors), and
        the things of the setting (merged like clothes, deduped, no articles)."""
        c, s = self.table.columns, self.table.strings
        kind, place = c.kind[found.tag], c.place[found.tag]
        kinds = found.where(kind >= 0)
        kind_ids = kind[kind >= 0]
        keep = _first_of_each(kinds.row, kind_ids)
        rows, kind_ids = kinds.row[keep], kind_ids[keep]
        order = np.lexsort((np.arange(len(rows)), s.facts("first")[kind_ids], rows))
        kind_text = pc.binary_join(_lists(rows[order], s.take(kind_ids[order]), n), " ")
        # with_article(kinds + " background"): "background" is neither bare nor plural
        article = pc.if_else(pc.match_substring_regex(kind_text, "^[aeiou]"), "an ", "a ")
        places = _join_and(found.row[place >= 0], s.take(place[place >= 0]), n)
        thing_rows, things = self.phrases(found.where((kind < 0) & (place < 0)), np.ones(n, bool), articles=False)
        keep = _first_of_each(thing_rows, pc.dictionary_encode(things).indices.to_numpy(zero_copy_only=False))
        things = _join_and(thing_rows[keep], things.filter(pa.array(keep)), n)
        return (_say("The picture has ", article, kind_text, " background. ", when=kind_text),
                _say("The scene is ", places, ". ", when=places),
                _say("The setting includes ", things, ". ", when=things))

    def also_sentence(self, found: Elements, order: np.ndarray, n: int) -> pa.Array:
        """'Other details: ...': the words of the tags no other sentence says (deduped), pose tags
        first, then expression tags, then the rest (as english_from_infos lists them)."""
        sort = np.lexsort((np.arange(len(found)), order, found.row))
        found = Elements(found.row[sort], found.tag[sort])
        also = self._join_distinct(found.row, self.table.columns.words[found.tag], n)
        return _say("Other details: ", also, ". ", when=also)  # none: a tag of underscores alone

    def _join_distinct(self, rows: np.ndarray, ids: np.ndarray, n: int) -> pa.Array:
        """join_and of each row's strings, first occurrences only, empty strings and -1 left out
        (as `_dedupe`)."""
        keep = ids >= 0
        rows, ids = rows[keep], ids[keep]
        keep = _first_of_each(rows, ids) & (ids != self.table.strings.id(""))
        return _join_and(rows[keep], self.table.strings.take(ids[keep]), n)

    # -- noun phrases: the tags of one head merge ------------------------------------------------

    def phrases(self, found: Elements, merge: np.ndarray, articles: bool = True) -> tuple[np.ndarray, pa.Array]:
        """`_phrases` for every row: the (row, phrase) list, rows ascending, each row's merged
        heads in order of first appearance, then its ready phrases."""
        c, s = self.table.columns, self.table.strings
        if not len(found):
            return np.zeros(0, np.int64), pa.array([], pa.string())
        ready = c.phrase[found.tag] >= 0
        merged = found.where(~ready)
        # a group per (row, head) when merging, per (row, tag) when not
        key = np.where(merge[merged.row], c.head[merged.tag], c.tag[merged.tag] + len(s.values))
        _, first, group = np.unique(merged.row * (2 * len(s.values) + 1) + key, return_index=True,
                                    return_inverse=True)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        group = rank[group.reshape(-1)]  # groups numbered in order of first appearance
        heads = np.empty(len(first), np.int64)
        heads[group] = c.head[merged.tag]
        group_rows = np.empty(len(first), np.int64)
        group_rows[group] = merged.row
        # each merged tag's modifier units, first occurrence per group, then the head last
        starts, lengths = c.unit_offsets[merged.tag], np.diff(c.unit_offsets)[merged.tag]
        units = c.units[np.repeat(starts, lengths) + _ranks(lengths)]
        unit_group = np.repeat(group, lengths)
        keep = _first_of_each(unit_group, units)
        units, unit_group = units[keep], unit_group[keep]
        words = np.concatenate([units, heads])
        word_group = np.concatenate([unit_group, np.arange(len(heads))])
        first_rank = np.concatenate([s.facts("first")[units], np.full(len(heads), np.iinfo(np.int64).max)])
        order = np.lexsort((np.arange(len(words)), first_rank, word_group))
        text = pc.binary_join(_lists(word_group[order], s.take(words[order]), len(heads)), " ")
        if articles:
            lead = words[order][np.searchsorted(word_group[order], np.arange(len(heads)))]
            article = np.where(~s.facts("takes_article")[heads], 0, np.where(s.facts("vowel")[lead], 2, 1))
            text = pc.binary_join_element_wise(pa.array(["", "a ", "an "]).take(pa.array(article)), text, "")
        ready_rows = found.row[ready]
        rows = np.concatenate([group_rows, ready_rows])
        order = np.lexsort((np.arange(len(rows)), np.concatenate([np.zeros(len(heads)), np.ones(len(ready_rows))]),
                           rows))
        return rows[order], pa.concat_arrays([text, s.take(c.phrase[found.tag][ready])]).take(pa.array(order))


# ---------------------------------------------------------------------------------------
# per-row lists over flat arrays (rows ascending)
# ---------------------------------------------------------------------------------------


def _say(*parts: pa.Array | str, when: pa.Array | None = None) -> pa.Array:
    """The parts (per-row strings or constants) concatenated; "" where `when` is empty."""
    text = pc.binary_join_element_wise(*parts, "")
    return text if when is None else pc.if_else(pc.not_equal(when, ""), text, "")


def _maybe(prefix: str, text: pa.Array) -> pa.Array:
    """prefix + text, or "" where text is empty."""
    return _say(prefix, text, when=text)


def _sentence(text: pa.Array) -> pa.Array:
    """A sentence and the space after it, or "" for none."""
    return _say(text, " ", when=text)


def _put(n: int, rows: np.ndarray, values: pa.Array) -> pa.Array:
    """n strings: values at rows, "" elsewhere."""
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(pa.array([""] * n, pa.string()), pa.array(mask), values)


def _positions(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each element's place within its row, and each row's element count."""
    counts = np.bincount(rows, minlength=n)
    return np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows], counts


def _lists(rows: np.ndarray, values: pa.Array, n: int) -> pa.ListArray:
    counts = np.bincount(rows, minlength=n)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32()), values)


def _join_and(rows: np.ndarray, values: pa.Array, n: int) -> pa.Array:
    """join_and of each row's values: 'a', 'a and b', 'a, b and c' ('' for none)."""
    position, counts = _positions(rows, n)
    # each value after its separator, as one list per row: one take, not a take and a join
    picks = np.empty(2 * len(rows), np.int64)
    picks[0::2] = np.where(position == 0, 0, np.where(position == counts[rows] - 1, 2, 1))
    picks[1::2] = np.arange(len(SEPARATORS), len(SEPARATORS) + len(rows))
    pieces = pa.concat_arrays([SEPARATORS, values]).take(pa.array(picks))
    offsets = pa.array(np.concatenate([[0], 2 * np.cumsum(counts)]), pa.int32())
    return pc.binary_join(pa.ListArray.from_arrays(offsets, pieces), "")


def python_strings(strings: pa.Array) -> list[str]:
    """Python strings of an Arrow array: through numpy, which is several times faster for strings
    than to_pylist."""
    return strings.to_numpy(zero_copy_only=False).tolist()


def _in_groups(group: np.ndarray, codes: list[int] | tuple[int, ...]) -> np.ndarray:
    """np.isin(group, codes) by a table of the few group codes: several times faster."""
    table = np.zeros(len(GROUP_CODES), dtype=bool)
    table[list(codes)] = True
    return table[group]


def _first_of_each(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """True for the first occurrence of each (row, id)."""
    keep = np.zeros(len(rows), dtype=bool)
    if len(rows):
        _, first = np.unique(rows * (int(ids.max()) + 1) + ids, return_index=True)
        keep[first] = True
    return keep


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..count-1 for each count, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


# ---------------------------------------------------------------------------------------
# the map_batches entry point
# ---------------------------------------------------------------------------------------


class TemplateCaptions:
    """Captions of a whole Arrow batch: list columns `tags`, `categories` (rank order), `n_people`."""

    def __init__(self, vocab: TemplateVocab | None = None) -> None:
        self.vocab = vocab or TemplateVocab()
        self.batch = BatchTemplate(self.vocab)

    def english(self, tags: pa.ListArray, categories: pa.ListArray, n_people: pa.Array | None = None,
                persons: list[list[dict]] | None = None) -> list[str]:
        """English captions of every row. `persons`: per row, its person_tags rows (position,
        quadrant, tags, categories); a row with two or more takes the per-image template, which
        gives each person a clause."""
        tags, categories = _combined(tags), _combined(categories)
        people = n_people.to_pylist() if n_people is not None else [None] * len(tags)
        out = self.batch.english(tags, categories, people)
        for i, rows in enumerate(persons or []):
            if rows and len(rows) > 1:
                infos = [self.vocab.info(t, c or "general") for t, c in zip(tags[i].as_py(), categories[i].as_py(),
                                                                            strict=True)]
                out[i] = english_from_infos(infos, self.vocab, people[i], self.persons(rows))
        return out

    def persons(self, rows: list[dict] | None) -> list[Person]:
        if not rows or len(rows) < 2:
            return []
        places = person_places([r["position"] for r in rows], [r["quadrant"] for r in rows])
        return [Person(where, [self.vocab.info(t, c or "general") for t, c in zip(r["tags"], r["categories"],
                                                                                   strict=True)])
                for where, r in zip(places, rows, strict=True)]


def _combined(array: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.fill_null(pa.scalar([], type=array.type)) if array.null_count else array
