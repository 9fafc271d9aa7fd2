"""Golden template captions for varied tag sets, and the asp-style caption's seed and probabilities."""

from __future__ import annotations

import pyarrow as pa
import pytest

from udfs.caption.template_batch import TemplateCaptions
from udfs.caption.template_caption import (
    AspOptions,
    TemplateVocab,
    asp_caption,
    english_caption,
    name_of,
    title_of,
)

GOLDEN = [
    (["1girl", "blonde_hair", "red_dress", "pink_shoes", "red_eyes"], None,
     "A girl with blonde hair and red eyes is wearing a red dress with pink shoes."),
    (["1girl", "solo", "gotou_hitori", "bocchi_the_rock!", "pink_hair", "long_hair", "blue_eyes", "track_jacket",
      "pink_jacket", "sitting", "holding_guitar", "smile", "indoors"],
     ["general", "general", "character", "copyright"] + ["general"] * 9,
     "Gotou Hitori from Bocchi the Rock! with long pink hair and blue eyes is wearing a pink track jacket. "
     "She is sitting. She is smiling. The scene is indoors. Other details: holding guitar."),
    (["2girls", "multiple_girls", "yuri", "black_hair", "school_uniform", "standing", "outdoors", "cherry_blossoms"],
     None,
     "Two girls with black hair are wearing a school uniform. They are standing. The scene is outdoors. "
     "Other details: yuri and cherry blossoms."),
    (["1boy", "1girl", "short_hair", "brown_hair", "green_eyes", "suit", "necktie", "angry", "blush",
      "white_background", "simple_background"], None,
     "A boy and a girl with short hair, brown hair and green eyes are wearing a suit with a necktie. "
     "They are blushing and look angry. The picture has a simple white background."),
    (["no_humans", "scenery", "sky", "cloud", "blue_sky", "tree", "outdoors", "day", "building"], None,
     "A scene without people. The scene is outdoors. The setting includes scenery, blue sky, cloud, tree, day "
     "and building."),
    (["3girls", "eileen_(ren'py)", "lucy_(ren'py)", "ren'py", "stage", "concert", "open_mouth", "smile"],
     ["general", "character", "character", "copyright", "general", "general", "general", "general"],
     "Three girls. The characters are Eileen and Lucy from Ren'py. They are smiling, with an open mouth. "
     "The setting includes stage. Other details: concert."),
    (["1girl", "very_long_hair", "silver_hair", "twintails", "hair_ribbon", "red_ribbon", "closed_eyes",
      "looking_at_viewer", "upper_body", ":d"], None,
     "A girl with very long silver hair, twintails and a red hair ribbon. She is looking at viewer. "
     "The picture is an upper-body view. She has closed eyes and an open-mouthed smile."),
    (["1girl", "eileen_(ren'py)", "ren'py", "piroshki", "official_art", "short_hair", "red_hair"],
     ["general", "character", "copyright", "artist", "meta", "general", "general"],
     "Eileen from Ren'py with short red hair."),
    # a name that ends in a full stop ends its sentence with it
    (["1girl", "c.c.", "green_hair", "smile"], ["general", "character", "general", "general"],
     "C.c. with green hair. She is smiling."),
    (["2girls", "kallen_stadtfeld", "c.c."], ["general", "character", "character"],
     "Kallen Stadtfeld and C.c."),
]


@pytest.fixture(scope="module")
def vocab():
    return TemplateVocab()


@pytest.mark.parametrize("tags,categories,expected", GOLDEN)
def test_golden_english_captions(vocab, tags, categories, expected):
    categories = categories or ["general"] * len(tags)
    assert english_caption(tags, categories, vocab) == expected


def test_batched_path_equals_per_row_path(vocab):
    tags = [g[0] for g in GOLDEN]
    cats = [g[1] or ["general"] * len(g[0]) for g in GOLDEN]
    batched = TemplateCaptions(vocab).english(pa.array(tags), pa.array(cats))
    assert batched == [english_caption(t, c, vocab) for t, c in zip(tags, cats, strict=True)]
    # a slice of a batch (Ray hands out zero-copy slices): its list offsets start past zero
    sliced = TemplateCaptions(vocab).english(pa.array(tags).slice(2, 3), pa.array(cats).slice(2, 3))
    assert sliced == batched[2:5]


def test_n_people_names_the_subject_without_count_tags(vocab):
    assert english_caption(["long_hair"], ["general"], vocab, n_people=2).startswith("Two people with long hair")


def test_names_and_titles():
    assert name_of("gotou_hitori_(bocchi_the_rock!)") == "Gotou Hitori"
    assert title_of("bocchi_the_rock!") == "Bocchi the Rock!"
    assert title_of("the_question_(ren'py)") == "The Question"


def test_asp_caption_is_reproducible_and_keeps_count_tags_first(vocab):
    tags = ["1girl", "solo", "gotou_hitori", "bocchi_the_rock!"] + [f"tag_{i}" for i in range(40)]
    cats = ["general", "general", "character", "copyright"] + ["general"] * 40
    options = AspOptions({"copyright": 1.0, "rating": 0.0}, max_tags=5)
    first = asp_caption("key/1", tags, cats, "general", 7, vocab, options)
    assert first == asp_caption("key/1", tags, cats, "general", 7, vocab, options)
    parts = first.split(", ")
    assert parts[:4] == ["1girl", "solo", "gotou hitori", "bocchi the rock!"]
    assert len(parts) == 4 + 5  # tags capped
    assert "general" not in parts  # rating left out with probability 0
    others = {asp_caption("key/1", tags, cats, "general", s, vocab, options) for s in range(8)}
    assert len(others) > 1  # another seed, another shuffle


def test_asp_caption_keeps_the_underscores_of_kaomoji(vocab):
    tags, cats = ["1girl", "o_o", "u_u", "(o)_(o)", "long_hair"], ["general"] * 5
    caption = asp_caption("k", tags, cats, None, 0, vocab, AspOptions({}, shuffle=False))
    assert caption == "1girl, o_o, u_u, (o)_(o), long hair"


def test_asp_component_probabilities(vocab):
    tags, cats = ["1girl", "gotou_hitori", "smile"], ["general", "character", "general"]
    options = AspOptions({"characters": 0.5}, shuffle=False)
    with_name = sum("gotou hitori" in asp_caption(f"k{i}", tags, cats, None, 0, vocab, options) for i in range(400))
    assert 140 < with_name < 260


def person(position: str, quadrant: str, tags: list[str]) -> dict:
    return {"position": position, "quadrant": quadrant, "tags": tags,
            "categories": ["character" if t.endswith(")") else "general" for t in tags]}


PERSON_GOLDEN = [
    # two people apart: one clause each, by third of the width; the scene after
    ([person("left", "bottom left", ["eileen_(ren'py)", "short_hair", "red_hair", "white_shirt"]),
      person("right", "bottom right", ["long_hair", "black_hair", "glasses"])],
     "Two girls. On the left, Eileen from Ren'py with short red hair, wearing a white shirt; on the right, a girl "
     "with long black hair, wearing glasses. They are smiling. The scene is outdoors."),
    # both in the centre third: their quadrants tell them apart
    ([person("centre", "top left", ["red_hair"]), person("centre", "bottom right", ["black_hair"])],
     "Two girls with short hair and long hair are wearing glasses with a white shirt. At the top left, a girl with "
     "red hair; at the bottom right, a girl with black hair. The character is Eileen from Ren'py. They are smiling. "
     "The scene is outdoors."),
]


@pytest.mark.parametrize("persons,expected", PERSON_GOLDEN)
def test_golden_person_clauses(vocab, persons, expected):
    tags = ["2girls", "eileen_(ren'py)", "ren'py", "red_hair", "short_hair", "black_hair", "long_hair", "glasses",
            "white_shirt", "smile", "outdoors"]
    categories = ["general", "character", "copyright"] + ["general"] * 8
    got = TemplateCaptions(vocab).english(pa.array([tags]), pa.array([categories]), pa.array([None], pa.int32()),
                                          [persons])
    assert got == [expected]
    # one person alone: the same caption as without persons
    alone = TemplateCaptions(vocab).english(pa.array([tags]), pa.array([categories]), None, [persons[:1]])
    assert alone == TemplateCaptions(vocab).english(pa.array([tags]), pa.array([categories]))


@pytest.mark.parametrize("tags,n_persons,expected", [
    # the count tags say one girl, two crops were tagged: no clause per person (it said "A girl.
    # On the left, a girl with red hair; on the right, a girl with black hair.")
    (["1girl", "red_hair", "black_hair"], 2, "as without persons"),
    # no one at all: no person clauses (it said "A scene without people. On the left, a person; ...")
    (["no_humans", "tree"], 2, "as without persons"),
    # 6+girls is six or more: seven crops are seven girls (it said "Six girls." and seven clauses)
    (["6+girls", "red_hair", "blue_hair", "green_hair", "black_hair", "white_hair", "pink_hair", "grey_hair"], 7,
     None),
])
def test_person_clauses_never_contradict_the_head_count(vocab, tags, n_persons, expected):
    """Each person's clause says "a girl": as many clauses as the count tags say people (6+: at
    least six), or none, so that a caption never says how many twice, differently."""
    hair = [t for t in tags if t.endswith("_hair")]
    places = [("left", "top left"), ("left", "bottom left"), ("centre", "top left"), ("centre", "top right"),
              ("right", "top right"), ("right", "bottom right"), ("right", "bottom left")]
    persons = [person(p, q, hair[i:i + 1]) for i, (p, q) in enumerate(places[:n_persons])]
    categories = pa.array([["general"] * len(tags)])
    got = TemplateCaptions(vocab).english(pa.array([tags]), categories, pa.array([None], pa.int32()), [persons])
    if expected is None:  # seven people share thirds and quadrants: no places; count the clauses
        assert got[0].startswith("Seven girls. ") and got[0].lower().count("a girl with") == 7
    else:
        assert got == TemplateCaptions(vocab).english(pa.array([tags]), categories)
        assert ";" not in got[0]  # no clause per person


def test_a_person_with_nothing_to_say_and_no_place_gets_no_clause(vocab):
    """A clause of "a person" alone (no name, no trait, no place to tell them apart) says nothing the
    count does not: twelve of them were "12 people. A person; a person; ...; a person." (60 CLIP
    tokens for nothing)."""
    crowd = [person("centre", "top left", []) for _ in range(12)]
    got = TemplateCaptions(vocab).english(pa.array([["smile"]]), pa.array([["general"]]),
                                          pa.array([12], pa.int32()), [crowd])
    assert got == ["12 people. They are smiling."]
    three = [person("left", "top left", []), person("left", "top left", ["red_hair"]),
             person("right", "top right", [])]
    got = TemplateCaptions(vocab).english(pa.array([["3girls", "red_hair"]]), pa.array([["general"] * 2]),
                                          pa.array([3], pa.int32()), [three])
    assert got == ["Three girls. A girl with red hair."]


def test_person_places():
    from udfs.caption.template_caption import person_places

    assert person_places(["left", "centre", "right"], ["a", "a", "a"]) == ["on the left", "in the centre",
                                                                          "on the right"]
    assert person_places(["left", "left"], ["top left", "bottom left"]) == ["at the top left", "at the bottom left"]
    assert person_places(["left", "left"], ["top left", "top left"]) == ["", ""]


def random_rows(vocab: TemplateVocab, n: int, seed: int) -> tuple[list, list, list]:
    """Tag lists drawn from every part of the template vocabulary, with repeats, emoticons, empty
    and odd tags, characters and series, and head counts that agree, disagree or are missing."""
    import random

    rng = random.Random(seed)
    general = ([h.replace(" ", "_") for h, _ in vocab.heads] + list(vocab.tag_groups) + list(vocab.phrases)
               + list(vocab.verbs) + sorted(vocab.adjectives) + [f"{m}_{h.replace(' ', '_')}" for m in
                                                                  ("very_long", "red", "light_blue", "dark")
                                                                  for h, _ in vocab.heads[:20]]
               + ["outdoors", "indoors", "simple_background", "white_background", "underwater_background", "",
                  "_", "ünïcode_tag"])
    specials = [(t, "general") for t in list(vocab.count) + sorted(vocab.count_words)] + [
        ("eileen_(ren'py)", "character"), ("lucy_(ren'py)", "character"), ("ren'py", "copyright"),
        ("piroshki", "artist"), ("general", "rating"), ("absurdres", "meta"), ("gotou_hitori", "")]
    tags, cats, people = [], [], []
    for _ in range(n):
        row = [(rng.choice(general), "general") for _ in range(rng.randint(0, 14))]
        row += [rng.choice(specials) for _ in range(rng.randint(0, 3))]
        rng.shuffle(row)
        tags.append([t for t, _ in row])
        cats.append([c for _, c in row])
        people.append(rng.choice([None, 0, 1, 2, 3]))
    return tags, cats, people


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_template_equals_per_image_template_on_random_rows(vocab, seed):
    tags, cats, people = random_rows(vocab, 600, seed)
    expected = [english_caption(t, c, vocab, p) for t, c, p in zip(tags, cats, people, strict=True)]
    got = TemplateCaptions(vocab).english(pa.array(tags, pa.list_(pa.string())), pa.array(cats, pa.list_(pa.string())),
                                          pa.array(people, pa.int32()))
    assert got == expected
    # one batch after another through the same captioner (its tables grow between batches)
    captioner = TemplateCaptions(vocab)
    halves = [captioner.english(pa.array(tags[a:b], pa.list_(pa.string())), pa.array(cats[a:b], pa.list_(pa.string())),
                                pa.array(people[a:b], pa.int32())) for a, b in ((0, 300), (300, 600))]
    assert halves[0] + halves[1] == expected


def test_batched_template_edge_batches(vocab):
    captioner = TemplateCaptions(vocab)
    strings = pa.list_(pa.string())
    assert captioner.english(pa.array([], strings), pa.array([], strings)) == []
    assert captioner.english(pa.array([[], None], strings), pa.array([[], None], strings)) == ["", ""]
    nulls = captioner.english(pa.array([[None, "1girl"]], strings), pa.array([["general", None]], strings))
    assert nulls == [english_caption(["", "1girl"], ["general", "general"], vocab)]
    with pytest.raises(ValueError):
        captioner.english(pa.array([["1girl", "smile"]], strings), pa.array([["general"]], strings))


def test_kaomoji_keep_their_underscores_in_the_template_and_the_tag_block(vocab):
    """A kaomoji is written as trainers' texts write it (udfs/tag_spelling.spaced): "o_o", not
    "o o"; ";_;", not "; ;". Other tags still read as words."""
    from udfs.caption.caption_prompts import tag_block

    tags, categories = ["1girl", "o_o", ";_;", "cat_ears", "_"], ["general"] * 5
    caption = english_caption(tags, categories, vocab)
    batch = TemplateCaptions(vocab).english(pa.array([tags]), pa.array([categories]))[0]
    assert caption == batch
    assert "o_o" in caption and ";_;" in caption and "cat ears" in caption
    assert "o o" not in caption and "; ;" not in caption and "_." not in caption
    block = tag_block(tags, categories)
    assert "o_o" in block and ";_;" in block and "o o" not in block


@pytest.mark.parametrize("tags", [["1girl", "_"], ["_", "__"], ["1girl", "smile", "___"]])
def test_a_tag_of_underscores_alone_adds_no_empty_sentence(vocab, tags):
    """A tag with no words ("_", from a sidecar's "tag, _, tag") was the only one of the other
    details: the caption ended in "Other details: ." in both paths."""
    categories = ["general"] * len(tags)
    caption = english_caption(tags, categories, vocab)
    assert caption == TemplateCaptions(vocab).english(pa.array([tags]), pa.array([categories]))[0]
    assert "Other details" not in caption and not caption.endswith(": .")
