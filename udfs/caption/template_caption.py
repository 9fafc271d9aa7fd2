"""Template captions: Danbooru tags -> English sentences, and anime_screenshot_pipeline-style tag captions.

No model. The English template names the subject from the count, character and copyright
tags ("Gotou Hitori from Bocchi the Rock!"), then writes hair and eyes, clothes, pose,
expression and background as sentences in that order, and appends what is left.

This module is the definition, one image at a time; template_batch.py renders the same
captions for a whole Arrow batch (the caption job's path).
"""

from __future__ import annotations

import random
import re
import tomllib
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from udfs.tag_spelling import spaced

VOCAB_PATH = Path(__file__).resolve().parents[2] / "data" / "caption" / "template_vocab.toml"
GROUPS = ("hair", "eyes", "clothes", "pose", "expression", "background")
NUMBER_WORDS = ["no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SMALL_WORDS = {"the", "of", "a", "an", "and", "no", "to", "in", "on", "wa", "ga", "ni", "de", "for", "at"}
NOT_IN_TEXT = ("artist", "meta", "rating")  # categories with nothing to see in the picture


@dataclass(frozen=True)
class TagInfo:
    """How one tag reads in the English template."""

    tag: str
    category: str
    group: str  # count, count_word, character, copyright, hidden, hair, ..., background, also
    head: str = ""  # the noun tags of one group merge on ("hair" for short_hair and red_hair)
    modifier: str = ""  # the words before the head ("short", "very long")
    phrase: str = ""  # a ready phrase that replaces modifier + head
    count: int = -1  # people a count tag stands for
    noun: str = ""  # girl, boy, person (count tags)
    words: str = ""  # the tag as plain words (words_of): made once per tag, not once per row

    def __post_init__(self) -> None:
        if not self.words:
            object.__setattr__(self, "words", words_of(self.tag))  # frozen: set the derived field once


def words_of(tag: str) -> str:
    """Tag to plain words: underscores become spaces, but in kaomoji, written as trainers' texts
    write them (udfs/tag_spelling.spaced: "o_o" and ";_;" read "o o" and "; ;"); "" for a tag
    of underscores alone."""
    return spaced(tag).strip() if tag.strip("_ ") else ""


def name_of(tag: str) -> str:
    """A character tag as a name: 'gotou_hitori_(bocchi_the_rock!)' -> 'Gotou Hitori'."""
    base = tag.split("_(")[0] if "_(" in tag and tag.endswith(")") else tag
    return " ".join(w[:1].upper() + w[1:] for w in words_of(base).split())


def title_of(tag: str) -> str:
    """A copyright tag as a title: 'bocchi_the_rock!' -> 'Bocchi the Rock!'."""
    base = tag.split("_(")[0] if "_(" in tag and tag.endswith(")") else tag
    words = words_of(base).split()
    return " ".join(w if (i and w in SMALL_WORDS) else w[:1].upper() + w[1:] for i, w in enumerate(words))


def join_and(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def with_article(phrase: str, bare: frozenset[str]) -> str:
    last = phrase.split()[-1] if phrase else ""
    if not phrase or last in bare or (last.endswith("s") and not last.endswith("ss")):
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class TemplateVocab:
    """The template's word lists (data/caption/template_vocab.toml) and the tag classifier."""

    def __init__(self, path: str | Path = VOCAB_PATH) -> None:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        self.count = {tag: (int(n), noun) for tag, (n, noun) in data["count"].items()}
        self.count_words = set(data["count_words"]["tags"])
        # longest heads first so that "tank_top" wins over "top"
        self.heads = sorted(((h, g) for g, hs in data["heads"].items() for h in hs), key=lambda x: -len(x[0]))
        self.tag_groups = dict(data["tags"])
        self.phrases = dict(data["phrases"])
        self.verbs = dict(data["verbs"])
        order = [w.replace("_", " ") for w in data["order"]["first"] + data["order"]["colours"]]
        self.first = {w: i for i, w in enumerate(order)}
        self.joiners = set(data["order"]["joiners"])
        self.adjectives = set(data["adjectives"]["tags"])
        self.bare = frozenset(data["articles"]["none"])
        self._cache: dict[tuple[str, str], TagInfo] = {}
        self._units: dict[str, list[str]] = {}

    def classify(self, tag: str, category: str) -> TagInfo:
        """What one tag is in the template (no cache)."""
        category = category or "general"
        if tag in self.count:
            n, noun = self.count[tag]
            return TagInfo(tag, category, "count", count=n, noun=noun)
        if tag in self.count_words:
            return TagInfo(tag, category, "count_word")
        if category in ("character", "copyright"):
            return TagInfo(tag, category, category)
        if category in NOT_IN_TEXT:
            return TagInfo(tag, category, "hidden")
        group, head, modifier = self._group_of(tag)
        phrase = self.phrases.get(tag, "")
        return TagInfo(tag, category, group, head=head, modifier=modifier, phrase=phrase)

    def _group_of(self, tag: str) -> tuple[str, str, str]:
        if tag in self.tag_groups:
            return self.tag_groups[tag], words_of(tag), ""
        for head, group in self.heads:
            if tag == head or tag.endswith("_" + head):
                return group, words_of(head), words_of(tag[: -len(head)].rstrip("_"))
        return "also", words_of(tag), ""

    def modifier_units(self, modifier: str) -> list[str]:
        """_modifier_units, once per distinct modifier (callers must not change the list)."""
        found = self._units.get(modifier)
        if found is None:
            found = self._units[modifier] = _modifier_units(modifier, self)
        return found

    def info(self, tag: str, category: str) -> TagInfo:
        key = (tag, category)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self.classify(tag, category)
        return found


# ---------------------------------------------------------------------------------------
# English template
# ---------------------------------------------------------------------------------------


def english_caption(tags: list[str], categories: list[str], vocab: TemplateVocab,
                    n_people: int | None = None) -> str:
    """Tags of one image to English, classifying each tag afresh (for one-off captions and tests)."""
    infos = [vocab.classify(t, c) for t, c in zip(tags, categories, strict=True)]
    return english_from_infos(infos, vocab, n_people)


@dataclass(frozen=True)
class Person:
    """One person of a picture for the template: where they are and their own tags (curate's
    person_tags)."""

    where: str  # "on the left", "at the top right", or "" when no position tells them apart
    infos: list[TagInfo]


PERSON_GROUPS = ("character", "hair", "eyes", "clothes")  # what a person clause says of its person


def english_from_infos(infos: list[TagInfo], vocab: TemplateVocab, n_people: int | None = None,
                       persons: list[Person] | None = None) -> str:
    """The English caption of one image from its classified tags (in rank order). With two or
    more `persons`, each gets a clause of their own name, traits and clothes by position, and the
    image-level sentences say the rest (the scene)."""
    persons = counted_persons(infos, persons)
    theirs = {i.tag for p in persons for i in p.infos if i.group in PERSON_GROUPS}
    by_group: dict[str, list[TagInfo]] = {}
    for info in infos:
        if not theirs or info.tag not in theirs or info.group not in PERSON_GROUPS:
            by_group.setdefault(info.group, []).append(info)
    subject = Subject.of(by_group, n_people if not persons else max(n_people or 0, len(persons)))
    if persons and subject.people < len(persons):  # 6+girls: six or more, as many as were seen
        subject = Subject({next(iter(subject.counts)): len(persons)}, subject.names, subject.series)
    merge = subject.people <= 1  # one person's "long_hair" and "red_hair" are one head of hair
    sentences = [subject.first_sentence(_phrases(by_group, ("hair", "eyes"), vocab, merge=merge),
                                        _phrases(by_group, ("clothes",), vocab, merge=merge))]
    if persons:
        sentences.append(_persons_sentence(persons, subject, by_group, vocab))
    sentences.append(subject.names_sentence())
    if subject.people:
        sentences.append(_pose_sentence(subject, by_group.get("pose", []), vocab))
        sentences.append(_expression_sentence(subject, by_group.get("expression", []), vocab))
        also = by_group.get("also", [])
    else:  # pose / expression words without people read as plain details
        also = by_group.get("pose", []) + by_group.get("expression", []) + by_group.get("also", [])
    sentences.append(_background_sentence(by_group.get("background", []), vocab))
    also_words = _dedupe(i.words for i in also)  # none when its tags are underscores alone ("_")
    if also_words:
        sentences.append("Other details: " + join_and(also_words) + ".")
    return one_full_stop(" ".join(s for s in sentences if s))


def counted_persons(infos: list[TagInfo], persons: list[Person] | None) -> list[Person]:
    """The persons that get a clause each: two or more, and as many as the count tags say
    (6+girls: six or more of one noun), or any number without count tags. Else none: "A girl. On
    the left, a girl ...; on the right, a girl ..." said how many twice, differently (a poster
    or a reflection the person detector took for someone)."""
    if not persons or len(persons) < 2:
        return []
    counts = [i for i in infos if i.group == "count"]
    if not counts:
        return persons
    said = sum(max(i.count, 0) for i in counts)
    open_ended = len({i.noun for i in counts}) == 1 and any(i.tag.startswith("6+") for i in counts)
    return persons if len(persons) == said or (open_ended and len(persons) > said) else []


DOUBLE_FULL_STOP = re.compile(r"(?<!\.)\.\.(?!\.)")


def one_full_stop(text: str) -> str:
    """A name that ends in a full stop (C.C., Dr.) ends its sentence with it: "is C.c.." would
    read as a typo. An ellipsis stays."""
    return DOUBLE_FULL_STOP.sub(".", text) if ".." in text else text


def _persons_sentence(persons: list[Person], subject: Subject, by_group: dict[str, list[TagInfo]],
                      vocab: TemplateVocab) -> str:
    """'On the left, Eileen with short red hair; on the right, a girl with black hair and glasses.'"""
    noun = next(iter(subject.counts), "person") if len(subject.counts) == 1 else "person"
    series = _dedupe(title_of(i.tag) for i in by_group.get("copyright", []))
    clauses = []
    for person in persons:
        own: dict[str, list[TagInfo]] = {}
        for info in person.infos:
            own.setdefault(info.group, []).append(info)
        names = _dedupe(name_of(i.tag) for i in own.get("character", []))
        who = Subject({noun or "person": 1}, names, series if len(names) == 1 else []).noun_phrase()
        features = _phrases(own, ("hair", "eyes"), vocab)
        clothes = _phrases(own, ("clothes",), vocab)
        if not (person.where or names or features or clothes):
            continue  # "a person" and nothing else: the count says as much
        clause = (person.where + ", " if person.where else "") + who
        clause += (" with " + join_and(features) if features else "") + (", wearing " + join_and(clothes)
                                                                          if clothes else "")
        clauses.append(clause)
    return _capital("; ".join(clauses)) + "." if clauses else ""


def person_places(positions: list[str], quadrants: list[str]) -> list[str]:
    """The words that tell each person apart: their third of the width when no one shares it,
    else their quadrant when no one shares that, else none."""
    def unique(values: list[str]) -> bool:
        return len(set(values)) == len(values)

    if unique(positions):
        return ["in the centre" if p == "centre" else f"on the {p}" for p in positions]
    if unique(quadrants):
        return [f"at the {q}" for q in quadrants]
    return [""] * len(positions)


@dataclass
class Subject:
    """Who the picture shows: counts by noun, named characters, series."""

    counts: dict[str, int]
    names: list[str]
    series: list[str]
    unknown: bool = False  # nothing says how many people there are (no count tag, no head count)

    @classmethod
    def of(cls, by_group: dict[str, list[TagInfo]], n_people: int | None) -> Subject:
        counts: dict[str, int] = {}
        for info in by_group.get("count", []):
            if info.count > 0:
                counts[info.noun] = counts.get(info.noun, 0) + info.count
            elif info.count == 0:
                counts.setdefault("", 0)
        names = _dedupe(name_of(i.tag) for i in by_group.get("character", []))
        if not counts and n_people:  # no count tag: the curated head count says how many
            counts["person"] = int(n_people)
        if sum(counts.values()) < len(names):
            counts = {"person": len(names)} if not counts or "" in counts else counts
        series = _dedupe(title_of(i.tag) for i in by_group.get("copyright", []))
        return cls(counts, names, series, unknown=not counts and n_people is None)

    @cached_property
    def people(self) -> int:  # cached: asked for many times per caption, counts set once in `of`
        return sum(self.counts.values())

    @property
    def plural(self) -> bool:
        return self.people > 1

    @property
    def named(self) -> bool:
        """The names stand for everyone in the picture."""
        return bool(self.names) and len(self.names) >= self.people

    @property
    def pronoun(self) -> str:
        if self.plural or not self.people:
            return "They"
        noun = next(iter(self.counts))
        return {"girl": "She", "boy": "He"}.get(noun, "They")

    def be(self, pronoun: str) -> str:
        return "are" if self.plural or pronoun == "They" else "is"

    def noun_phrase(self) -> str:
        if self.named:
            return join_and(self.names) + self._from_series()
        parts = []
        for noun, n in self.counts.items():
            if n == 1:
                parts.append(("an " if noun[:1] in "aeiou" else "a ") + noun)
            elif n > 1:
                number = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
                parts.append(f"{number} {'people' if noun == 'person' else noun + 's'}")
        return join_and(parts)

    def _from_series(self) -> str:
        return (" from " + join_and(self.series)) if self.series else ""

    def first_sentence(self, features: list[str], clothes: list[str]) -> str:
        if self.unknown:  # say what is there, and nothing of who (a 2x2 region, say)
            return _capital(join_and(features + clothes)) + "." if features or clothes else ""
        if not self.people:
            scene = "A scene without people"
            if features or clothes:
                scene += " showing " + join_and(features + clothes)
            return scene + (" from " + join_and(self.series) if self.series else "") + "."
        text = _capital(self.noun_phrase())
        if features:
            text += " with " + join_and(features)
        if clothes:
            verb = "are" if self.plural else "is"
            text += f" {verb} wearing " + clothes[0] + (" with " + join_and(clothes[1:]) if clothes[1:] else "")
        return text + "."

    def names_sentence(self) -> str:
        if not self.names or self.named:
            return ""
        if len(self.names) == 1:
            return f"The character is {self.names[0]}{self._from_series()}."
        return f"The characters are {join_and(self.names)}{self._from_series()}."


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _dedupe(items) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _phrases(by_group: dict[str, list[TagInfo]], groups: tuple[str, ...], vocab: TemplateVocab,
             articles: bool = True, merge: bool = True) -> list[str]:
    """Noun phrases of some groups: tags with one head merge ('short_hair' + 'red_hair' -> 'short red hair')."""
    merged: dict[str, list[str]] = {}
    singles: list[str] = []
    for group in groups:
        for info in by_group.get(group, []):
            if info.phrase:
                singles.append(info.phrase)
                continue
            mods = merged.setdefault(info.head if merge else info.tag + "\x1f" + info.head, [])
            for unit in vocab.modifier_units(info.modifier):
                if unit not in mods:
                    mods.append(unit)
    out = []
    for head, mods in merged.items():
        mods = sorted(mods, key=lambda m: vocab.first.get(m, len(vocab.first)))
        phrase = " ".join(mods + [head.split("\x1f")[-1]])
        out.append(with_article(phrase, vocab.bare) if articles else phrase)
    return out + singles


def _modifier_units(modifier: str, vocab: TemplateVocab) -> list[str]:
    """'very long wavy' -> ['very long', 'wavy']: words that belong together stay together."""
    units: list[str] = []
    pending = ""
    for word in modifier.split():
        if word in vocab.joiners:
            pending += word + " "
            continue
        units.append(pending + word)
        pending = ""
    return units + ([pending.strip()] if pending else [])


def _pose_sentence(subject: Subject, infos: list[TagInfo], vocab: TemplateVocab) -> str:
    if not infos:
        return ""
    verbs, others, views = [], [], []
    for info in infos:
        words = info.words
        if info.phrase:
            views.append(info.phrase)
        elif words.split()[0].endswith("ing"):
            verbs.append(words)
        else:
            others.append(words)
    pronoun = subject.pronoun
    parts = []
    if verbs:
        parts.append(f"{pronoun} {subject.be(pronoun)} {join_and(verbs)}" + (
            f", with {join_and(others)}" if others else "") + ".")
    elif others:
        parts.append(f"{pronoun} {'have' if pronoun == 'They' else 'has'} {join_and(others)}.")
    if views:
        parts.append(f"The picture is {join_and(views)}.")
    return " ".join(parts)


def _expression_sentence(subject: Subject, infos: list[TagInfo], vocab: TemplateVocab) -> str:
    if not infos:
        return ""
    verbs = _dedupe(vocab.verbs.get(i.tag, "") for i in infos)
    adjectives = _dedupe(i.tag for i in infos if i.tag in vocab.adjectives)
    others = _dedupe(i.phrase or with_article(i.words, vocab.bare) for i in infos
                     if i.tag not in vocab.verbs and i.tag not in vocab.adjectives)
    pronoun = subject.pronoun
    clauses = []
    if verbs:
        clauses.append(f"{subject.be(pronoun)} {join_and(verbs)}")
    if adjectives:
        clauses.append(f"{'look' if pronoun == 'They' else 'looks'} {join_and(adjectives)}")
    if not clauses:
        return f"{pronoun} {'have' if pronoun == 'They' else 'has'} {join_and(others)}."
    return f"{pronoun} {' and '.join(clauses)}" + (f", with {join_and(others)}" if others else "") + "."


def _background_sentence(infos: list[TagInfo], vocab: TemplateVocab) -> str:
    if not infos:
        return ""
    kinds, places, things = [], [], []
    for info in infos:
        if info.head == "background":
            kinds.append(info.modifier or "plain")
        elif info.tag in ("outdoors", "indoors"):
            places.append(info.tag)
        else:
            things.append(info)
    things = _phrases({"background": things}, ("background",), vocab, articles=False)
    parts = []
    if kinds:
        kinds = sorted(_dedupe(kinds), key=lambda k: vocab.first.get(k, len(vocab.first)))
        parts.append(f"The picture has {with_article(' '.join(kinds) + ' background', vocab.bare)}.")
    if places:
        parts.append(f"The scene is {join_and(places)}.")
    if things:
        parts.append(f"The setting includes {join_and(_dedupe(things))}.")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------
# anime_screenshot_pipeline-style caption
# ---------------------------------------------------------------------------------------

ASP_COMPONENTS = ("n_people", "characters", "copyright", "artist", "rating", "tags")


@dataclass(frozen=True)
class AspOptions:
    """Probabilities and caps of the tag-list caption, as anime_screenshot_pipeline has them."""

    probabilities: dict[str, float]
    max_tags: int = 30
    shuffle: bool = True
    underscores: bool = False
    separator: str = ", "


def asp_caption(key: str, tags: list[str], categories: list[str], rating: str | None, seed: int,
                vocab: TemplateVocab, options: AspOptions) -> str:
    """Components each kept with its probability, tags shuffled and capped, count tags first.

    The random stream depends only on (seed, key), so a run is reproducible and an image's
    caption does not change when other images are added.
    """
    rng = random.Random((seed << 32) ^ zlib.crc32(key.encode("utf-8")))
    parts: dict[str, list[str]] = {c: [] for c in ASP_COMPONENTS}
    for tag, category in zip(tags, categories, strict=True):
        info = vocab.info(tag, category or "general")
        if info.group in ("count", "count_word"):
            parts["n_people"].append(tag)
        elif info.group == "character":
            parts["characters"].append(tag)
        elif category in ("copyright", "artist"):
            parts[category].append(tag if category == "copyright" else f"by {tag}")
        elif category in ("meta", "rating"):
            continue
        else:
            parts["tags"].append(tag)
    if rating:
        parts["rating"].append(rating)
    if options.shuffle:
        rng.shuffle(parts["tags"])
    parts["tags"] = parts["tags"][: options.max_tags]
    out: list[str] = []
    for component in ASP_COMPONENTS:
        if parts[component] and rng.random() < options.probabilities.get(component, 1.0):
            out.extend(parts[component])
    if not options.underscores:
        out = [spaced(t) for t in out]  # kaomoji (o_o) keep theirs, as imgutils writes them
    return options.separator.join(out)
