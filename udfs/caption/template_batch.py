"""The English template over a whole batch at once: numpy over the flat tag list, Arrow for strings.

`english_from_infos` (template_caption.py) is the definition, one image at a time; this module
renders the same captions for a batch without a Python pass over each image's tags:

- every distinct (tag, category) is described once, in a table that lives as long as the
  vocabulary: its group, words, head, modifier units, and how it reads in each sentence;
- a batch is then a few array operations per sentence over the flat tags: selecting a group,
  dropping repeats within an image (`np.unique` on row and string id), ordering modifiers,
  merging the tags of one head ("short_hair" + "red_hair" -> "short red hair");
- each sentence adds its pieces (constants, subject strings, phrases, commas and "and") to one
  layout per batch (`Pieces`), and the captions are made by one take and one `binary_join`: at
  the caption job's 500 rows a batch, the fixed cost of an Arrow call per clause was a third of
  the template's time;
- Python runs once per distinct subject (the count, character and copyright tags with the head
  count), and per image only to test for ".." and to capitalise the rare caption with no count of people.

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
NO_HEAD_COUNT = np.iinfo(np.int64).min  # a row's n_people of None, in a subject key
MAX_CACHED_SUBJECTS = 200_000  # distinct subjects (count, characters, series, head count) remembered


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
        tags = tags.fill_null("") if tags.null_count else tags  # no Arrow call for a batch without nulls
        categories = categories.fill_null("general") if categories.null_count else categories
        pairs = pc.binary_join_element_wise(tags, categories, "\x1f")
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
    """Who each row's caption speaks of (Subject), one value per row: numbers as numpy, the
    strings the sentences start with as Arrow strings."""

    unknown: np.ndarray  # bool: nothing says how many people there are
    people: np.ndarray  # int
    plural: np.ndarray  # bool: "are wearing"
    noun_phrase: pa.Array  # "Gotou Hitori from Bocchi the Rock!", "Two girls"
    from_series: pa.Array  # " from Bocchi the Rock!", or ""
    names: pa.Array  # the sentence naming the characters and a space, or ""
    she_is: pa.Array  # the pronoun and its verbs: "She is ", "They are "
    she_has: pa.Array  # "She has "
    she_looks: pa.Array  # "She looks "
    and_looks: pa.Array  # " and looks "


SUBJECT_NUMBERS = 3  # the numpy fields of SubjectColumns, first
SUBJECT_TEXTS = pa.struct([(name, pa.string())
                           for name in list(SubjectColumns.__dataclass_fields__)[SUBJECT_NUMBERS:]])


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
        self.articles = (self.table.strings.id("a"), self.table.strings.id("an"))
        self._subjects: dict[tuple[int, ...], tuple] = {}

    def english(self, tags: pa.ListArray, categories: pa.ListArray, n_people: list[int | None]) -> list[str]:
        n = len(tags)
        if not same_lengths(tags, categories):
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
        pieces = Pieces(n, self.table.strings)
        self.first_sentence(pieces, subject, features, clothes)
        pieces.add(np.arange(n), pieces.column(subject.names) + np.arange(n))
        self.pose_sentences(pieces, subject, pick("pose", people_only=True))
        self.expression_sentence(pieces, subject, pick("expression", people_only=True))
        self.background_sentences(pieces, pick("background"))
        self.also_sentence(pieces, every.where(also_group >= 0), also_group[also_group >= 0])
        # each sentence ends in ". " or is empty: drop the last space
        out = python_strings(pc.utf8_rtrim(pieces.text(), characters=" "))
        # no count and no head count: the first sentence only says what is seen, capitalised as
        # Python does (a row whose first sentence is empty starts with another, capital already)
        for i in np.flatnonzero(subject.unknown):
            out[i] = _capital(out[i])
        # the few captions with a name that ends in a full stop (Python's `in` on each string is
        # several times faster than Arrow's match_substring kernel over the batch)
        return [one_full_stop(text) if ".." in text else text for text in out]

    # -- the subject: once per distinct combination of count, character and copyright tags ------

    def subjects(self, found: Elements, n_people: list[int | None], n: int) -> SubjectColumns:
        # a row's subject: its head count, then its subject tags in reading order (-1 after them),
        # as a row of one matrix (no key strings to build, join and encode by Arrow)
        position, counts = _positions(found.row, n)
        key = np.full((n, int(counts.max(initial=0)) + 1), -1, np.int64)
        key[:, 0] = [NO_HEAD_COUNT if p is None else p for p in n_people]
        key[found.row, position + 1] = found.tag
        first, which = _distinct_rows(key)
        distinct = key[first]
        known = self._subjects
        sizes = (distinct >= 0).sum(axis=1) + (distinct[:, 0] < 0)  # the head count and the tags
        facts = [known[k] if k in known else known.setdefault(k, self._subject(k))
                 for k in (tuple(row[:size]) for row, size in zip(distinct.tolist(), sizes.tolist(), strict=True))]
        numbers = np.array([f[:SUBJECT_NUMBERS] for f in facts], np.int64).reshape(-1, SUBJECT_NUMBERS)[which]
        # the strings of every row by one take of the distinct subjects' (a struct array)
        texts = pa.array([f[SUBJECT_NUMBERS:] for f in facts], SUBJECT_TEXTS).take(pa.array(which)).flatten()
        return SubjectColumns(numbers[:, 0].astype(bool), numbers[:, 1], numbers[:, 2].astype(bool), *texts)

    def _subject(self, key: tuple[int, ...]) -> tuple:
        """The fields of SubjectColumns for one distinct subject (`key`: the head count or
        NO_HEAD_COUNT, then the TagTable ids of its count, character and copyright tags)."""
        by_group: dict[str, list[TagInfo]] = {}
        for i in key[1:]:
            info = self.table.infos[i]
            by_group.setdefault(info.group, []).append(info)
        subject = Subject.of(by_group, None if key[0] == NO_HEAD_COUNT else key[0])
        pronoun = subject.pronoun
        look = "look" if pronoun == "They" else "looks"
        return (subject.unknown, subject.people, subject.plural,
                _capital(subject.noun_phrase()) if subject.people else "",
                " from " + join_and(subject.series) if subject.series else "",
                names + " " if (names := subject.names_sentence()) else "",
                f"{pronoun} {subject.be(pronoun)} ", f"{pronoun} {'have' if pronoun == 'They' else 'has'} ",
                f"{pronoun} {look} ", f" and {look} ")

    # -- sentences: the pieces of each row's sentences (Pieces), in reading order -----------------

    def first_sentence(self, pieces: Pieces, subject: SubjectColumns, features: tuple[np.ndarray, pa.Array],
                       clothes: tuple[np.ndarray, pa.Array]) -> None:
        """Who, with their hair and eyes, wearing their clothes (Subject.first_sentence)."""
        n = pieces.n
        (f_rows, f_text), (c_rows, c_text) = features, clothes
        f_picks = pieces.column(f_text) + np.arange(len(f_rows))
        c_picks = pieces.column(c_text) + np.arange(len(c_rows))
        people, unknown = subject.people > 0, subject.unknown
        nobody = ~people & ~unknown
        # someone: "A girl with long hair is wearing a dress with a hat and gloves."
        lead = np.where(people, pieces.column(subject.noun_phrase) + np.arange(n), K["A scene without people"])
        pieces.add(np.flatnonzero(~unknown), lead[~unknown])
        said = people[f_rows]
        pieces.add(*_listed(f_rows[said], f_picks[said], K[" with "], n))
        said = people[c_rows]
        rows, picks = c_rows[said], c_picks[said]
        position, counts = _positions(rows, n)
        wearing = np.where(subject.plural[rows], K[" are wearing "], K[" is wearing "])
        # clothes[0], then " with " + join_and(clothes[1:])
        before = np.where(position == 0, wearing, np.where(position == 1, K[" with "], np.where(
            position == counts[rows] - 1, K[" and "], K[", "])))
        pieces.add(np.repeat(rows, 2), _interleaved(before, picks))
        # nobody: "A scene without people showing ... from <series>."; unknown: only what is seen
        both_rows, both_picks = np.concatenate([f_rows, c_rows]), np.concatenate([f_picks, c_picks])
        order = np.argsort(both_rows, kind="stable")
        both_rows, both_picks = both_rows[order], both_picks[order]
        said = ~people[both_rows]
        first = np.where(unknown[both_rows[said]], K[""], K[" showing "])
        pieces.add(*_listed(both_rows[said], both_picks[said], first, n))
        pieces.add(np.flatnonzero(nobody), pieces.column(subject.from_series) + np.flatnonzero(nobody))
        ends = ~unknown | (np.bincount(both_rows, minlength=n) > 0)
        pieces.add(np.flatnonzero(ends), np.full(int(ends.sum()), K[". "]))

    def pose_sentences(self, pieces: Pieces, subject: SubjectColumns, found: Elements) -> None:
        """What they do ('She is sitting, with ...' or 'She has ...'), and the view ('The picture is ...')."""
        c, n = self.table.columns, pieces.n
        kind = c.pose[found.tag]
        text = np.where(kind == POSE_VIEW, c.phrase[found.tag], c.words[found.tag])
        verbs, others = found.where(kind == POSE_VERB), found.where(kind == POSE_OTHER)
        has_verbs = np.bincount(verbs.row, minlength=n) > 0
        pieces.add(*_listed(verbs.row, ~text[kind == POSE_VERB], pieces.column(subject.she_is) + verbs.row, n))
        first = np.where(has_verbs[others.row], K[", with "], pieces.column(subject.she_has) + others.row)
        pieces.add(*_listed(others.row, ~text[kind == POSE_OTHER], first, n))
        pieces.end(np.concatenate([verbs.row, others.row]), ". ")
        views = found.row[kind == POSE_VIEW]
        pieces.add(*_listed(views, ~text[kind == POSE_VIEW], K["The picture is "], n))
        pieces.end(views, ". ")

    def expression_sentence(self, pieces: Pieces, subject: SubjectColumns, found: Elements) -> None:
        """'She is smiling and looks happy, with ...' (_expression_sentence): verbs, adjectives and
        the rest, each without repeats."""
        c, n = self.table.columns, pieces.n
        (v_rows, verbs), (a_rows, adjectives), (o_rows, others) = (
            self._distinct(found.row, column[found.tag]) for column in (c.verb, c.adjective, c.other))
        has_verbs = np.bincount(v_rows, minlength=n) > 0
        has_clauses = has_verbs | (np.bincount(a_rows, minlength=n) > 0)
        # a row whose tags say nothing of these: "She has ." (as english_from_infos)
        silent = (np.bincount(found.row, minlength=n) > 0) & ~has_clauses & (np.bincount(o_rows, minlength=n) == 0)
        pieces.add(np.flatnonzero(silent), pieces.column(subject.she_has) + np.flatnonzero(silent))
        pieces.add(*_listed(v_rows, ~verbs, pieces.column(subject.she_is) + v_rows, n))
        first = np.where(has_verbs[a_rows], pieces.column(subject.and_looks) + a_rows,
                         pieces.column(subject.she_looks) + a_rows)
        pieces.add(*_listed(a_rows, ~adjectives, first, n))
        first = np.where(has_clauses[o_rows], K[", with "], pieces.column(subject.she_has) + o_rows)
        pieces.add(*_listed(o_rows, ~others, first, n))
        pieces.end(found.row, ". ")

    def background_sentences(self, pieces: Pieces, found: Elements) -> None:
        """The kind of background (deduped, in modifier order), the place (indoors, outdoors), and
        the things of the setting (merged like clothes, deduped, no articles)."""
        c, s, n = self.table.columns, self.table.strings, pieces.n
        kind, place = c.kind[found.tag], c.place[found.tag]
        kinds = found.where(kind >= 0)
        kind_ids = kind[kind >= 0]
        keep = _first_of_each(kinds.row, kind_ids)
        rows, kind_ids = kinds.row[keep], kind_ids[keep]
        order = np.lexsort((np.arange(len(rows)), s.facts("first")[kind_ids], rows))
        rows, kind_ids = rows[order], kind_ids[order]
        # with_article(kinds + " background"): "background" is neither bare nor plural
        position, _ = _positions(rows, n)
        article = np.where(s.facts("vowel")[kind_ids], K["The picture has an "], K["The picture has a "])
        pieces.add(np.repeat(rows, 2), _interleaved(np.where(position == 0, article, K[" "]), ~kind_ids))
        pieces.end(rows, " background. ")
        places = found.where(place >= 0)
        pieces.add(*_listed(places.row, ~place[place >= 0], K["The scene is "], n))
        pieces.end(places.row, ". ")
        thing_rows, things = self.phrases(found.where((kind < 0) & (place < 0)), np.ones(n, bool), articles=False)
        keep = _first_of_each(thing_rows, pc.dictionary_encode(things).indices.to_numpy(zero_copy_only=False))
        picks = pieces.column(things) + np.flatnonzero(keep)
        pieces.add(*_listed(thing_rows[keep], picks, K["The setting includes "], n))
        pieces.end(thing_rows, ". ")

    def also_sentence(self, pieces: Pieces, found: Elements, order: np.ndarray) -> None:
        """'Other details: ...': the words of the tags no other sentence says (deduped), pose tags
        first, then expression tags, then the rest (as english_from_infos lists them)."""
        sort = np.lexsort((np.arange(len(found)), order, found.row))
        rows, words = self._distinct(found.row[sort], self.table.columns.words[found.tag[sort]])
        pieces.add(*_listed(rows, ~words, K["Other details: "], pieces.n))
        pieces.end(rows, ". ")  # none: a tag of underscores alone

    def _distinct(self, rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's string ids, first occurrences only, empty strings and -1 left out (as `_dedupe`)."""
        keep = ids >= 0
        rows, ids = rows[keep], ids[keep]
        keep = _first_of_each(rows, ids) & (ids != self.table.strings.id(""))
        return rows[keep], ids[keep]

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
        words, word_group = words[order], word_group[order]
        if articles:  # "a" or "an" as the first word of each group whose head takes one
            lead = words[np.searchsorted(word_group, np.arange(len(heads)))]
            takes = np.flatnonzero(s.facts("takes_article")[heads])
            a, an = self.articles
            words = np.concatenate([np.where(s.facts("vowel")[lead[takes]], an, a), words])
            word_group = np.concatenate([takes, word_group])
        # each ready phrase a group of one word, after its row's merged groups; all the phrases'
        # words are joined at once (one take, one join, whatever their kinds)
        ready_rows = found.row[ready]
        rows = np.concatenate([group_rows, ready_rows])
        final = np.lexsort((np.arange(len(rows)), np.concatenate([np.zeros(len(heads)), np.ones(len(ready_rows))]),
                            rows))
        place = np.empty(len(rows), np.int64)
        place[final] = np.arange(len(rows))
        words = np.concatenate([words, c.phrase[found.tag][ready]])
        word_group = place[np.concatenate([word_group, len(heads) + np.arange(len(ready_rows))])]
        order = np.argsort(word_group, kind="stable")
        return rows[final], pc.binary_join(_lists(word_group[order], s.take(words[order]), len(rows)), " ")


# ---------------------------------------------------------------------------------------
# per-row lists over flat arrays (rows ascending)
# ---------------------------------------------------------------------------------------


CONSTANTS = ("", ", ", " and ", ". ", " ", " with ", " is wearing ", " are wearing ", "A scene without people",
             " showing ", ", with ", "The picture is ", "The picture has a ", "The picture has an ", " background. ",
             "The scene is ", "The setting includes ", "Other details: ")
K = {text: i for i, text in enumerate(CONSTANTS)}  # a constant's place among the pieces' sources
CONSTANT_ARRAY = pa.array(CONSTANTS, pa.string())


class Pieces:
    """The captions of a batch as pieces, added a run at a time (a clause's opening, a list,
    a full stop), then joined by one take and one join. A run gives some rows a piece each or
    more (rows ascending); a row's pieces follow the order their runs were added. A piece is a
    constant (K), a string of a `column`, or ~id for the string table's string `id`.

    One join for the whole caption, not a few Arrow calls for each clause: at the caption job's
    500 rows a batch, the fixed cost of each Arrow call was about a third of the template's time."""

    def __init__(self, n: int, strings: StringTable) -> None:
        self.n, self.strings = n, strings
        self.sources: list[pa.Array] = [CONSTANT_ARRAY]
        self.size = len(CONSTANTS)
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.columns: dict[int, int] = {}  # id of an array given to `column` -> its first piece

    def column(self, values: pa.Array) -> int:
        """The piece number of values[0] (values[i] is that + i); an array given again is not
        copied again (the batch's arrays live as long as the Pieces, so their ids are theirs)."""
        at = self.columns.get(id(values))
        if at is None:
            at = self.columns[id(values)] = self.size
            self.sources.append(values)
            self.size += len(values)
        return at

    def add(self, rows: np.ndarray, picks: np.ndarray) -> None:
        self.runs.append((rows, picks))

    def end(self, rows: np.ndarray, text: str) -> None:
        """`text` once after each row that has any of `rows` (ascending)."""
        ends = np.flatnonzero(np.bincount(rows, minlength=self.n) > 0)
        self.add(ends, np.full(len(ends), K[text]))

    def text(self) -> pa.Array:
        """Each row's pieces joined."""
        if not self.n:
            return pa.array([], pa.string())
        counts = np.array([np.bincount(rows, minlength=self.n) for rows, _ in self.runs])
        earlier = np.cumsum(counts, axis=0) - counts  # in each row, the pieces of the runs before
        per_row = counts.sum(axis=0)
        starts = np.cumsum(per_row) - per_row
        picks = np.empty(int(per_row.sum()), np.int64)
        for run, (rows, run_picks) in enumerate(self.runs):
            within = np.arange(len(rows)) - (np.cumsum(counts[run]) - counts[run])[rows]
            picks[starts[rows] + earlier[run, rows] + within] = run_picks
        table = picks < 0  # the string table's strings: one take of all
        picks[table] = self.column(self.strings.take(~picks[table])) + np.arange(int(table.sum()))
        text = pa.concat_arrays(self.sources).take(pa.array(picks))
        offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]), pa.int32())
        return pc.binary_join(pa.ListArray.from_arrays(offsets, text), "")


def _listed(rows: np.ndarray, picks: np.ndarray, first: np.ndarray | int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A Pieces run: join_and of each row's values (picks), each after its separator: `first`
    (a piece, or one per value) before a row's first value, " and " before its last, ", " between."""
    position, counts = _positions(rows, n)
    before = np.where(position == 0, first, np.where(position == counts[rows] - 1, K[" and "], K[", "]))
    return np.repeat(rows, 2), _interleaved(before, picks)


def _interleaved(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a[0], b[0], a[1], b[1], ..."""
    out = np.empty(2 * len(a), np.int64)
    out[0::2], out[1::2] = a, b
    return out


def _positions(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each element's place within its row, and each row's element count."""
    counts = np.bincount(rows, minlength=n)
    return np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows], counts


def _lists(rows: np.ndarray, values: pa.Array, n: int) -> pa.ListArray:
    counts = np.bincount(rows, minlength=n)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32()), values)


def _distinct_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(matrix, axis=0, return_index=True, return_inverse=True)[1:] (distinct rows in
    sorted order: where each is first, and which one each row is), without its sort of rows as
    bytes (several times slower): rows are told apart by a hash, int64 arithmetic that wraps
    around, checked, so that rows of one hash that differ (a rare collision) take np.unique's way."""
    weights = np.cumprod(np.full(matrix.shape[1], 1_000_003, np.int64))
    _, first, which = np.unique(matrix @ weights, return_index=True, return_inverse=True)
    which = which.reshape(-1)
    if not np.array_equal(matrix[first][which], matrix):
        _, first, which = np.unique(matrix, axis=0, return_index=True, return_inverse=True)
    return first, which.reshape(-1)


def same_lengths(a: pa.ListArray, b: pa.ListArray) -> bool:
    """Whether each row of two list arrays has as many values in both (a null row none): from the
    offsets in numpy where there are no nulls, without four Arrow calls."""
    if a.null_count or b.null_count:
        return not pc.any(pc.not_equal(pc.list_value_length(a), pc.list_value_length(b))).as_py()
    return len(a) == len(b) and np.array_equal(np.diff(a.offsets.to_numpy()), np.diff(b.offsets.to_numpy()))


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
