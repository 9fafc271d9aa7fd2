"""Trainer-ready KEY.txt from tags (issue 14, item 6): category order, sort by score, exclusions,
escaped parentheses, kohya's keep_tokens and its separator; on the rules and on a real export."""

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


def test_categories_first_then_by_score_without_excluded_tags():
    rules = TagTextRules(category_order=("character", "rating"), sort="score",
                         exclude_tags=frozenset({"solo"}), escape_parentheses=True)
    assert rules.text(TAGS, CATEGORIES, SCORES) == \
        "eileen \\(ren'py\\), general, 1girl, smile, ^_^, long hair"


def test_excluded_categories_and_keep_tokens_separator():
    rules = TagTextRules(underscores=True, exclude_categories=frozenset({"rating"}), keep_tokens=2,
                         keep_tokens_separator="|||")
    assert rules.text(TAGS, CATEGORIES, SCORES) == "solo, 1girl ||| eileen_(ren'py), long_hair, smile, ^_^"
    # no separator when nothing follows the kept tags
    assert TagTextRules(keep_tokens=9, keep_tokens_separator="|||").text(TAGS[:2], CATEGORIES[:2], SCORES[:2]) \
        == "solo, 1girl"


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
    with_character = 0
    for sample in samples:
        txt, meta = sample["txt"].decode(), json.loads(sample["json"])
        kept = [t for t, c in zip(meta["tags"], meta["tag_categories"], strict=True) if c != "rating"]
        written = [w.strip() for w in txt.replace("|||", ",").split(",") if w.strip()]
        assert len(written) == len(kept), (txt, kept)  # every tag but the ratings
        assert meta["keep_tokens"] == 1
        assert all(c != "rating" or t not in txt for t, c in zip(meta["tags"], meta["tag_categories"], strict=True))
        characters = [t for t, c in zip(meta["tags"], meta["tag_categories"], strict=True) if c == "character"]
        if characters:
            with_character += 1
            first = characters[0].replace("_", " ").replace("(", "\\(").replace(")", "\\)")
            assert txt.startswith(first), txt
        if len(kept) > 1:
            assert txt.count(" ||| ") == 1 and "(" not in txt.replace("\\(", "")
    assert with_character > 0


@pytest.mark.parametrize("override", ['export.tag_sort="random"', "export.keep_tokens=-1"])
def test_bad_tag_text_options_are_refused(tmp_path_factory, override):
    from jobs import export
    from jobs.config import ConfigError

    with pytest.raises(ConfigError):  # when the config is read (keep_tokens) or when export starts (tag_sort)
        export.run(*fresh(tmp_path_factory, override))
