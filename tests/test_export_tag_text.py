"""Trainer-ready KEY.txt from tags (issue 14, item 6): category order, sort by score, exclusions,
escaped parentheses, kohya's keep_tokens and its separator, the CLIP token budget; on the rules
and on a real export."""

from __future__ import annotations

import json

import pytest

from tests.test_export import fresh
from udfs.export.tag_text import TagTextRules

TAGS = ["solo", "1girl", "eileen_(ren'py)", "long_hair", "smile", "general", "^_^"]
CATEGORIES = ["general", "general", "character", "general", "general", "rating", "general"]
SCORES = [1.0, 1.0, 0.95, 0.6, 0.9, 0.8, 0.7]


def test_default_rules_keep_the_curated_order_with_spaces():
    assert TagTextRules().text(TAGS, CATEGORIES, SCORES) == \
        "solo, 1girl, eileen (ren'py), long hair, smile, general, ^_^"


@pytest.mark.parametrize("tag", ["o_o", "u_u", "x_x", "(o)_(o)", ">_o", "^_^", "0_0", "long_hair",
                                 "eileen_(ren'py)", "\\m/", "\\||/"])
@pytest.mark.parametrize("escape", [False, True])
def test_a_tag_is_spelled_as_imgutils_writes_it(tag, escape):
    """Kaomoji keep their underscores (o_o was "o o"), backslashes are escaped with the
    parentheses: as imgutils.tagging.tags_to_text, a dependency, writes a tag with spaces."""
    from imgutils.tagging import tags_to_text

    assert TagTextRules(escape_parentheses=escape).spell(tag) == tags_to_text({tag: 1.0}, use_spaces=True,
                                                                              use_escape=escape)
    assert TagTextRules(underscores=True, escape_parentheses=escape).spell(tag) == tags_to_text(
        {tag: 1.0}, use_spaces=False, use_escape=escape)


@pytest.mark.parametrize("tag", [";_;", "-_-", "<_<", "!_!"])
def test_a_tag_without_letters_keeps_its_underscores_beyond_imgutils_list(tag):
    """imgutils keeps the underscores of the kaomoji on its list only (";_;" became "; ;"); a tag
    without a letter is a kaomoji whatever the list says, as the export spelled it before."""
    assert TagTextRules().spell(tag) == tag


def test_categories_first_then_by_score_without_excluded_tags():
    rules = TagTextRules(category_order=("character", "rating"), sort="score",
                         exclude_tags=frozenset({"solo"}), escape_parentheses=True)
    assert rules.text(TAGS, CATEGORIES, SCORES) == \
        "eileen \\(ren'py\\), general, 1girl, smile, ^_^, long hair"


def test_excluded_categories_and_keep_tokens_separator():
    rules = TagTextRules(underscores=True, exclude_categories=frozenset({"rating"}), keep_tokens=2,
                         keep_tokens_separator="|||")
    assert rules.text(TAGS, CATEGORIES, SCORES) == "solo, 1girl ||| eileen_(ren'py), long_hair, smile, ^_^"
    # the separator also when nothing follows the kept tags: kohya keeps exactly what is before it,
    # and without it falls back to its own keep_tokens count (0: the kept tags shuffled and dropped)
    text = TagTextRules(keep_tokens=9, keep_tokens_separator="|||").text(TAGS[:2], CATEGORIES[:2], SCORES[:2])
    assert text == "solo, 1girl |||" and kohya_fixed_tags(text, "|||") == ["solo", "1girl"]
    assert TagTextRules(keep_tokens=9, keep_tokens_separator="|||").text([], [], []) == ""


def kohya_fixed_tags(text: str, separator: str) -> list[str]:
    """The tags kohya sd-scripts never shuffles when the caption holds its keep_tokens_separator
    (train_util's process_caption: what is before the first separator, split at commas)."""
    assert separator in text
    return [t.strip() for t in text.split(separator, 1)[0].split(",") if t.strip()]


def test_a_separator_keeps_every_character_of_a_multi_character_image():
    """keep_tokens counts tags, and a count cannot fit images with one character and images with
    two: keep_tokens=1 kept eileen and let kohya shuffle lucy among the general tags. With a
    separator the kept part is per image: the count, and the rest of a category of
    tag_category_order that it ends inside."""
    tags = ["2girls", "lucy", "eileen", "renpy", "smile"]
    categories = ["general", "character", "character", "copyright", "general"]
    rules = TagTextRules(category_order=("character", "copyright"), keep_tokens=1, keep_tokens_separator="|||")
    text = rules.text(tags, categories, [1.0] * 5)
    assert text == "lucy, eileen ||| renpy, 2girls, smile"
    assert kohya_fixed_tags(text, "|||") == ["lucy", "eileen"]
    # one character: the count alone; a count that ends on a category's last tag: as it was
    assert rules.text(tags[2:], categories[2:], [1.0] * 3) == "eileen ||| renpy, smile"
    two = TagTextRules(category_order=("character", "copyright"), keep_tokens=3, keep_tokens_separator="|||")
    assert two.text(tags, categories, [1.0] * 5) == "lucy, eileen, renpy ||| 2girls, smile"
    # the budget never leaves a kept tag out, the extended ones included
    budget = TagTextRules(category_order=("character",), keep_tokens=1, keep_tokens_separator="|||",
                          clip_token_budget=8)
    assert budget.fitted(tags, categories, [1.0] * 5) == ("lucy, eileen ||| 2girls", 2)
    assert TagTextRules(category_order=("character",), keep_tokens=1, keep_tokens_separator="|||",
                        clip_token_budget=2).fitted(tags, categories, [1.0] * 5) == ("lucy, eileen |||", 3)
    # without a separator kohya keeps a fixed count: the text is the same, and the split is said
    plain = TagTextRules(category_order=("character",), keep_tokens=1)
    assert plain.text(tags, categories, [1.0] * 5) == "lucy, eileen, 2girls, renpy, smile"
    assert "keeps 1 of the image's 2 character tags" in plain.keep_warning(tags, categories, [1.0] * 5)
    assert plain.keep_warning(tags[2:], categories[2:], [1.0] * 3) == ""
    assert rules.keep_warning(tags, categories, [1.0] * 5) == ""


def test_a_tag_holding_the_separator_is_left_out_and_exclusions_take_either_spelling():
    rules = TagTextRules.from_options({
        "tag_underscores": False, "tag_category_order": [], "tag_sort": "rank", "exclude_tag_categories": [],
        "exclude_tags": ["Long Hair", " smile ", "eileen \\(ren'py\\)"], "escape_parentheses": False, "keep_tokens": 1,
        "keep_tokens_separator": "|||", "clip_token_budget": 0})
    tags, categories = [*TAGS, "|||", "a|||b"], [*CATEGORIES, "general", "general"]
    # kohya reads text after a second separator as a fixed suffix
    assert rules.text(tags, categories, [*SCORES, 1.0, 1.0]) == "solo ||| 1girl, general, ^_^"


def test_export_writes_tags_as_configured(tmp_path_factory, tmp_path, ray_local):
    import webdataset as wds

    from jobs import export

    out = tmp_path / "out"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', 'export.text="tags"',
                    'export.tag_category_order=["character"]', 'export.exclude_tag_categories=["rating"]',
                    "export.escape_parentheses=true", "export.keep_tokens=1", 'export.keep_tokens_separator="|||"')
    export.run(cfg, ws)
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "webdataset").glob("*.tar")), shardshuffle=False))
    assert samples
    with_character = two_characters = 0
    for sample in samples:
        txt, meta = sample["txt"].decode(), json.loads(sample["json"])
        kept = [t for t, c in zip(meta["tags"], meta["tag_categories"], strict=True) if c != "rating"]
        written = [w.strip() for w in txt.replace("|||", ",").split(",") if w.strip()]
        assert len(written) == len(kept), (txt, kept)  # every tag but the ratings
        assert all(c != "rating" or t not in txt for t, c in zip(meta["tags"], meta["tag_categories"], strict=True))
        characters = [t for t, c in zip(meta["tags"], meta["tag_categories"], strict=True) if c == "character"]
        if characters:
            with_character += 1
            spelled = [c.replace("_", " ").replace("(", "\\(").replace(")", "\\)") for c in characters]
            assert txt.startswith(spelled[0]), txt
            # what kohya keeps is what is before the separator: every character, also of a
            # two-character image (keep_tokens=1 kept the first and shuffled the second)
            if len(kept) > len(characters):
                assert kohya_fixed_tags(txt, "|||") == spelled, txt
                assert meta["keep_tokens"] == len(characters)
                two_characters += len(characters) == 2
        if kept:  # the separator after the kept tags, also when none follows
            assert txt.count("|||") == 1 and "(" not in txt.replace("\\(", "")
    assert with_character > 0 and two_characters > 0


def test_clip_tokens_are_clips_own_bpe_tokens():
    from udfs.export.clip_tokens import clip_tokenizer, clip_tokens

    assert clip_tokens("a photo of a cat") == 5  # CLIP's 77-token context: 5 + start and end
    ids = clip_tokenizer()("1girl, long_hair", add_special_tokens=False)["input_ids"]
    assert clip_tokenizer().convert_ids_to_tokens(ids) == ["1</w>", "girl</w>", ",</w>", "long</w>", "_</w>",
                                                          "hair</w>"]
    assert len(clip_tokenizer()) == 49408  # the whole CLIP vocabulary


def test_the_budget_leaves_out_the_lowest_ranked_tags_but_never_the_kept_ones():
    from udfs.export.clip_tokens import clip_tokens

    tags = ["solo", "1girl", "eileen_(ren'py)"] + [f"tag_number_{i}" for i in range(60)]
    categories = ["general", "general", "character"] + ["general"] * 60
    full = TagTextRules(keep_tokens=3, keep_tokens_separator="|||").text(tags, categories, [1.0] * 63)
    rules = TagTextRules(keep_tokens=3, keep_tokens_separator="|||", clip_token_budget=75)
    text, dropped = rules.fitted(tags, categories, [1.0] * 63)
    assert clip_tokens(full) > 75 >= clip_tokens(text) and dropped > 0
    assert full.startswith(text) and text.startswith("solo, 1girl, eileen (ren'py) ||| tag number 0, ")
    # one tag more would not fit: no more was left out than needed
    longer = TagTextRules(keep_tokens=3, keep_tokens_separator="|||").text(
        tags[: 63 - dropped + 1], categories[: 63 - dropped + 1], [1.0] * (63 - dropped + 1))
    assert clip_tokens(longer) > 75
    # the kept tags stay even when they alone are over the budget
    tight = TagTextRules(keep_tokens=3, clip_token_budget=2).fitted(tags, categories, [1.0] * 63)
    assert tight == ("solo, 1girl, eileen (ren'py)", 60)


def test_a_long_caption_is_cut_after_its_last_whole_sentence_that_fits():
    from udfs.export.clip_tokens import clip_tokens, fit_caption

    caption = " ".join(f"Sentence number {i} says a few words about the picture." for i in range(20))
    text, cut = fit_caption(caption, 75)
    assert cut and caption.startswith(text) and text.endswith("picture.") and clip_tokens(text) <= 75
    following = caption[len(text):].strip().split(". ")[0] + "."
    assert clip_tokens(f"{text} {following}") > 75  # the next whole sentence would not fit
    assert fit_caption("A short caption.", 75) == ("A short caption.", False)
    # one sentence longer than the budget: cut at a word
    words, cut = fit_caption("word " * 100, 10)
    assert cut and clip_tokens(words) == 10 and words == " ".join(["word"] * 10)


@pytest.mark.parametrize("caption, first", [
    ("A portrait of Dr. Eileen Sato, a scientist in a white lab coat, standing beside a window in a quiet "
     "laboratory at dusk. She holds a clipboard and smiles warmly at the viewer while the light falls on her hair.",
     "A portrait of Dr. Eileen Sato, a scientist in a white lab coat, standing beside a window in a quiet "
     "laboratory at dusk."),
    ("Mr. and Mrs. Smith stand on the pier with St. Mary's church behind them in the evening light and the sea "
     "around them. A gull flies over the water and the boats.",
     "Mr. and Mrs. Smith stand on the pier with St. Mary's church behind them in the evening light and the sea "
     "around them."),
    ("The room is full of small things, e.g. a cup of tea, a book and a cat, i.e. a quiet evening at home by "
     "the fireplace. A clock hangs on the wall above it and ticks.",
     "The room is full of small things, e.g. a cup of tea, a book and a cat, i.e. a quiet evening at home by "
     "the fireplace."),
    ("1. A girl with red hair stands in a field of flowers under a wide blue sky. 2. A boy with a kite runs "
     "along the river bank beside a tall tree and a red bridge over the water.",
     "1. A girl with red hair stands in a field of flowers under a wide blue sky."),
    ("She says \"Good morning.\" Then she waves at the viewer from the window of the old school building "
     "with cherry blossoms falling around her.",
     "She says \"Good morning.\""),
    ("She shouts \"Look out!\" at the boy who runs across the busy street with a red kite in his hands. Then "
     "the car stops at the crossing under the traffic lights and the driver waves at them.",
     "She shouts \"Look out!\" at the boy who runs across the busy street with a red kite in his hands."),
])
def test_a_long_caption_is_cut_at_a_real_sentence_end(caption, first):
    """An abbreviation's period (Dr., Mr., e.g.) or a list's number (1.) is no sentence end: the
    cut fell after it, and KEY.txt ended in a fragment ("A portrait of Dr.", "..., e.g.",
    "... blue sky. 2."). A closing quote after the period is part of its sentence, and a quote the
    sentence goes on after (a lower-case word) ends none."""
    from udfs.export.clip_tokens import clip_tokens, fit_caption

    budget = clip_tokens(first) + 5  # the first sentence fits, the second does not
    assert clip_tokens(caption) > budget
    assert fit_caption(caption, budget) == (first, True)
    for budget in range(4, clip_tokens(first)):  # shorter budgets: a comma's part or whole words
        text, cut = fit_caption(caption, budget)
        assert cut and clip_tokens(text) <= budget and caption.startswith(text)
        assert not text.endswith(("Dr.", "Mr.", "Mrs.", "St.", "e.g.", "i.e.", " 1.", " 2.")) and text != "1."
        assert caption[len(text)] in " ,", (budget, text)  # never inside a word


def test_a_quote_the_sentence_goes_on_after_is_no_sentence_end():
    """'She shouts "Look out!" at the boy ...' was cut to 'She shouts "Look out!"' when the rest of
    its sentence did not fit: the lower-case word after the quote says the sentence goes on."""
    from udfs.export.clip_tokens import clip_tokens, fit_caption

    caption = ("She shouts \"Look out!\" at the boy who runs across the busy street with a red kite in his hands. "
               "Then the car stops.")
    words = "She shouts \"Look out!\" at the boy"
    assert fit_caption(caption, clip_tokens(words)) == (words, True)


def test_a_caption_is_not_cut_inside_a_number_with_a_thousands_comma():
    """"A crowd of 1,000 people" was cut at its comma, to "A crowd of 1"."""
    from udfs.export.clip_tokens import clip_tokens, fit_caption

    caption = ("A crowd of 1,000 people and 2,500 lanterns fill the street at night under the festival banners, "
               "with stalls and music and dancing everywhere around them")
    for budget in range(4, clip_tokens(caption)):
        text, cut = fit_caption(caption, budget)
        assert cut and clip_tokens(text) <= budget and caption.startswith(text)
        assert caption[len(text)] in " ," and not text.endswith((" 1", " 2")), (budget, text)


def test_a_caption_that_lists_tags_is_cut_between_two_tags():
    """A caption that is a tag list (an asp template caption, a sidecar's tags as its caption) has no
    sentence end: it was cut at a word, inside a tag ("..., day, blue" of "blue sky"; "eileen (ren'py"
    without its parenthesis) or after a comma. It is cut after its last whole tag that fits."""
    from udfs.export.clip_tokens import clip_tokens, fit_caption

    tags = ["1girl", "solo", "eileen (ren'py)", "long hair", "looking at viewer", ":d", "^_^", "school uniform",
            "pleated skirt", "cherry blossoms", "blue sky", "holding bag", "zettai ryouiki", "looking back"]
    caption = ", ".join(tags * 4)
    for budget in range(8, 75):
        text, cut = fit_caption(caption, budget)
        assert cut and clip_tokens(text) <= budget
        n = len(text.split(", "))
        assert text == ", ".join((tags * 4)[:n]), (budget, text)  # whole tags, no comma at the end
        assert clip_tokens(", ".join((tags * 4)[:n + 1])) > budget  # the next tag would not fit
    # a sentence's clauses too, and a first part longer than the budget still at a word
    text, _ = fit_caption("A girl with red hair, wearing a school uniform with a pleated skirt and a white shirt "
                          "and a red neckerchief, standing outdoors under the cherry blossoms", 20)
    assert text == "A girl with red hair"  # was "... and a white shirt and"
    assert fit_caption("word " * 50 + ", end", 10)[0] == " ".join(["word"] * 10)


def test_a_caption_without_spaces_is_cut_not_emptied():
    """Japanese and Chinese captions have no spaces (and no space after 。): a caption over the
    budget was cut to nothing, its image then left out of the kohya and EveryDream folders as one
    without text. It is cut after its last whole sentence that fits, else at its longest start."""
    from udfs.export.clip_tokens import clip_tokens, fit_caption

    sentence = "金髪の少女が教室の窓際に立って微笑んでいる。"
    text, cut = fit_caption(sentence * 10, 75)
    assert cut and text and clip_tokens(text) <= 75
    assert text == sentence * (len(text) // len(sentence))  # whole sentences
    assert clip_tokens(text + sentence) > 75
    one = "金髪の少女が教室の窓際に立って微笑んでいる" * 10  # one sentence, no end mark
    text, cut = fit_caption(one, 75)
    assert cut and text and one.startswith(text) and clip_tokens(text) <= 75 < clip_tokens(one[:len(text) + 1])


@pytest.mark.parametrize("unit", ["🇯🇵", "👨\u200d👩\u200d👧", "e\u0301", "👍🏽"])
def test_a_caption_cut_at_a_character_keeps_every_character_whole(unit):
    """A cut at the longest start that fits falls between what a reader sees as characters (grapheme
    clusters), not inside one: a flag was cut to half a flag (🇯), a family emoji to a couple, é (e and
    a combining accent) to e, a thumb to one without its skin tone."""
    from udfs.export.clip_tokens import clip_tokens, fit_caption

    text, cut = fit_caption(unit * 200, 75)
    assert cut and text and clip_tokens(text) <= 75
    assert text == unit * (len(text) // len(unit))


def test_export_keeps_every_key_txt_within_the_clip_budget(tmp_path_factory, tmp_path, ray_local):
    import webdataset as wds

    from jobs import export
    from udfs.export.clip_tokens import clip_tokens

    out = tmp_path / "out"
    # a budget the sample's tag lists are over: some are cut, none is written longer
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', 'export.text="tags"', "export.clip_token_budget=40")
    summary = export.run(cfg, ws)
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "webdataset").glob("*.tar")), shardshuffle=False))
    assert samples and all(clip_tokens(s["txt"].decode()) <= 40 for s in samples)
    metas = [json.loads(s["json"]) for s in samples]
    assert all(m["clip_tokens"]["tokens"] == clip_tokens(s["txt"].decode())
               for m, s in zip(metas, samples, strict=True))
    cut = {m["key"] for m in metas if m["clip_tokens"]["cut"]}
    assert cut and len(cut) < len(samples)
    for meta, sample in zip(metas, samples, strict=True):  # KEY.json keeps the whole tag text
        whole = meta["captions"]["tags"]
        assert (whole == sample["txt"].decode()) == (meta["key"] not in cut)
        assert len(whole.split(", ")) == len(meta["tags"])
    manifest = {r["key"]: r["text_cut"] for r in ws.read_table("export_manifest").to_pylist()}
    assert {k for k, n in manifest.items() if n} == cut
    assert f"clip_token_budget 40: KEY.txt of {len(cut)} images cut to fit" in " ".join(summary.notes)


def test_kept_tags_over_the_budget_and_a_split_character_run_are_errors_rows(tmp_path_factory, tmp_path, ray_local):
    """The budget never leaves out the kept tags, so KEY.txt could go over it with nothing said;
    and keep_tokens without a separator shuffles the second character of a two-character image.
    Both are errors rows (the image is exported) counted in the summary."""
    import webdataset as wds

    from jobs import export
    from udfs.export.clip_tokens import clip_tokens

    out = tmp_path / "out"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', 'export.text="tags"',
                    'export.tag_category_order=["character"]', "export.keep_tokens=2", "export.clip_token_budget=5")
    summary = export.run(cfg, ws)
    samples = {s["__key__"]: s for s in wds.WebDataset(sorted(str(p) for p in (out / "webdataset").glob("*.tar")),
                                                         shardshuffle=False)}
    over = {json.loads(s["json"])["key"] for s in samples.values() if clip_tokens(s["txt"].decode()) > 5}
    errors = [r for r in ws.read_table("errors").to_pylist() if r["stage"] == "export"]
    flagged = {r["key"] for r in errors if r["kind"] == "over_token_budget"}
    assert over and flagged == over and not any(r["dropped"] for r in errors)
    assert summary.errors_by_kind["over_token_budget"] == len(over) and summary.dropped == 0
    assert len(samples) == summary.rows_out["webdataset samples"]  # all exported all the same

    out2 = tmp_path / "out2"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out2}"', 'export.text="tags"',
                    'export.tag_category_order=["character"]', "export.keep_tokens=1")
    summary = export.run(cfg, ws)
    split = {r["key"] for r in ws.read_table("errors").to_pylist() if r["kind"] == "keep_tokens_split"}
    two = {key for (key,) in ws.connect().execute(
        "select key from image_meta where len(characters) = 2 and key in (select key from export_manifest)").fetchall()}
    assert split and split == two
    assert summary.errors_by_kind["keep_tokens_split"] == len(two)


def test_keep_tokens_that_can_never_fit_the_budget_are_refused(tmp_path_factory):
    from jobs import export
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match="cannot fit export.clip_token_budget 75"):
        export.run(*fresh(tmp_path_factory, "export.keep_tokens=40", "export.clip_token_budget=75"))


@pytest.mark.parametrize("override", ['export.tag_sort="random"', "export.keep_tokens=-1",
                                      'export.alpha_background="not a colour"', 'export.keep_tokens_separator=" "',
                                      'export.keep_tokens_separator="|||\\n"', 'export.keep_tokens_separator=","',
                                      'export.keep_tokens_separator="|,|"', 'export.exclude_tag_categories=["ratings"]',
                                      'export.tag_category_order=["Character"]'])
def test_bad_tag_text_options_are_refused(tmp_path_factory, override):
    """Refused before any work. A separator with a comma: KEY.txt joins tags with ", ", and kohya cuts the text at the
    separator's first occurrence, the comma after the first tag (keep_tokens 3 kept one). A category no tag has
    ("ratings") was no category at all: every rating tag stayed in KEY.txt."""
    from jobs import export
    from jobs.config import ConfigError

    with pytest.raises(ConfigError):  # when the config is read (keep_tokens) or when export starts (tag_sort)
        export.run(*fresh(tmp_path_factory, override))


def test_a_caption_edited_in_review_wins_over_the_region_captions(workspace):
    """export.text = "regions": KEY.txt was the generated region captions also for an image whose
    caption a person rewrote in review (the review page's preview showed their text ignored). Their
    caption is the image's text, as it is with text = "caption"; an image nobody edited keeps its
    region captions."""
    import datetime

    from jobs.config import default_config, merge
    from jobs.export import sql_text
    from udfs.export.export_plan import sample_plan

    for key in ("a/edited", "a/generated"):
        workspace.add_part("images", key.replace("/", "_"), [{
            "key": key, "source": "s.tar", "member": "x.png", "width": 64, "height": 64, "format": "PNG",
            "mode": "RGB", "n_frames": 1, "bytes": 1, "sha256": key, "phash": 0}])
        workspace.add_part("captions", key.replace("/", "_"), [{
            "key": key, "attempt": 0, "backend": "template:english", "seed": 0, "caption": "Eileen with red hair.",
            "accepted": True, "flagged": False, "not_scored": "built_from_tags", "quality_tags": [], "lint": []}])
        workspace.add_part("caption_regions", key.replace("/", "_"), [
            {"key": key, "region": "top left", "backend": "template:english", "tags": ["red_hair"],
             "caption": "Eileen with red hair."}])
    workspace.add_part("edits", "u", [{"key": "a/edited", "field": "caption", "old": "Eileen with red hair.",
                                       "new": "Lucy with\nblack hair.", "time": datetime.datetime.now(datetime.UTC),
                                       "seq": 0, "batch": "b"}])
    params = {"drop_duplicates": True, "drop_flagged": True, "drop_excluded": True, "gone_inputs": []}
    cursor = workspace.connect().execute(sql_text("export_selection.sql"), params)
    rows = {r[0]: dict(zip([d[0] for d in cursor.description], r, strict=True)) for r in cursor.fetchall()}
    options = default_config()["export"]
    merge(options, {"text": "regions"})
    edited, generated = sample_plan(rows["a/edited"], options), sample_plan(rows["a/generated"], options)
    assert edited["txt"] == "Lucy with black hair." and json.loads(edited["json"])["text_from"] == "caption"
    assert generated["txt"] == "top left: Eileen with red hair" and json.loads(generated["json"])["text_from"] == \
        "regions"


def test_an_excluded_tag_written_as_the_escaped_key_txt_spells_it_is_left_out():
    """exclude_tags takes a tag as KEY.txt spells it: with escape_parentheses that is `\\\\m/` for
    `\\m/`, which was not left out (only `\\(` and `\\)` were taken back)."""
    options = {"tag_underscores": False, "tag_category_order": [], "tag_sort": "rank", "exclude_tag_categories": [],
               "exclude_tags": [], "escape_parentheses": True, "keep_tokens": 0, "keep_tokens_separator": "",
               "clip_token_budget": 0}
    tags, categories = ["1girl", "\\m/", "\\(^o^)/"], ["general"] * 3
    written = TagTextRules.from_options(options).text(tags, categories, [1.0] * 3)
    assert written == "1girl, \\\\m/, \\\\\\(^o^\\)/"
    excluded = TagTextRules.from_options({**options, "exclude_tags": written.split(", ")[1:]})
    assert excluded.text(tags, categories, [1.0] * 3) == "1girl"
