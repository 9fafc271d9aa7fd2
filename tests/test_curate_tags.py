"""curate, step 1: tags (thresholds, aliases, blacklist, impossible combinations, overlap, traits, rank)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from curate_data import curate_config, image_rows, score_rows, source_rows, tags_of
from imgutils.tagging import overlap as imgutils_overlap

from jobs import curate


def run_curate(ws, **options):
    return curate.run(curate_config(ws, **options), ws)


def test_thresholds_per_category_and_top_rating(workspace):
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("tag_scores", "p", score_rows("a", {"smile": 0.36, "frown": 0.34})
                         + score_rows("a", {"alice_(game)": 0.86, "bob_(game)": 0.84}, "character")
                         + score_rows("a", {"general": 0.7, "sensitive": 0.2}, "rating"))
    run_curate(workspace)
    assert sorted(tags_of(workspace)["a"]) == ["alice_(game)", "general", "smile"]
    rating = [r for r in workspace.read_table("tags").to_pylist() if r["category"] == "rating"]
    assert rating[0]["tag"] == "general"


def test_source_rating_wins_over_tagger_rating(workspace):
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["explicit"], "rating"))
    workspace.add_part("tag_scores", "p", score_rows("a", {"general": 0.9}, "rating"))
    run_curate(workspace)
    assert tags_of(workspace)["a"] == ["explicit"]


def test_a_plain_source_tag_the_tag_list_calls_a_rating_is_the_only_rating(workspace, tmp_path):
    """`explicit` in a kohya .txt (category general) is a rating once the tag list categorizes it,
    or one of its aliases: the tagger's rating stood beside it (two ratings)."""
    tag_list = tmp_path / "danbooru.csv"
    tag_list.write_text('general,9,1,""\nexplicit,9,1,"nsfw"\nsmile,0,1,""\n', encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a", "b", "c"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["explicit", "smile"]) + source_rows("b", ["nsfw"])
                       + source_rows("c", ["smile"]))
    workspace.add_part("tag_scores", "p", [r for k in "abc" for r in score_rows(k, {"general": 0.9}, "rating")])
    run_curate(workspace, tag_list=str(tag_list))
    ratings = sorted((r["key"], r["tag"]) for r in workspace.read_table("tags").to_pylist()
                     if r["category"] == "rating")
    assert ratings == [("a", "explicit"), ("b", "explicit"), ("c", "general")]


def test_aliases_from_rules_and_tag_list_and_categories(workspace, tmp_path):
    tag_list = tmp_path / "danbooru.csv"
    tag_list.write_text('1girl,0,100,"1girls,sole_female"\nlong_hair,0,50,"/lh,longhair"\n'
                        'hatsune_miku,4,10,miku\n', encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["sole_female", "longhair", "miku", "smile"]))
    run_curate(workspace, tag_list=str(tag_list))
    rows = {r["tag"]: r["category"] for r in workspace.read_table("tags").to_pylist()}
    assert rows == {"1girl": "general", "long_hair": "general", "hatsune_miku": "character", "smile": "general"}


def test_a_listed_tag_is_never_an_alias_whatever_the_row_order(workspace, tmp_path):
    """Danbooru's list keeps stale aliases: `sonic_the_hedgehog`, a character with a row of its own,
    is also listed as an alias of the copyright `sonic_(series)` (row 2388 of ../shared's list, the
    character's own row 4842). A name was no alias only when its row came first: the character
    became the copyright, and `sonic`, its alias, a character still (images of one character
    split in two tags)."""
    tag_list = tmp_path / "danbooru.csv"
    tag_list.write_text('sonic_(series),3,11362,sonic_the_hedgehog\nsonic_the_hedgehog,4,3890,sonic\n',
                        encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a", "b"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["sonic_the_hedgehog"]) + source_rows("b", ["sonic"]))
    run_curate(workspace, tag_list=str(tag_list))
    rows = sorted((r["key"], r["tag"], r["category"]) for r in workspace.read_table("tags").to_pylist())
    assert rows == [("a", "sonic_the_hedgehog", "character"), ("b", "sonic_the_hedgehog", "character")]


def test_the_rules_aliases_win_over_the_tag_lists_and_chains_end_at_one_tag(workspace, tmp_path):
    """aliases.csv choosing `blond_hair` where the list says blond_hair -> blonde_hair made a circle
    followed one step: `blond_hair` became blonde_hair and `blonde_hair` blond_hair. A list alias of
    a name the file aliases goes on to the file's tag (yellow_hair -> blonde_hair -> blond_hair)."""
    tag_list = tmp_path / "danbooru.csv"
    tag_list.write_text('blonde_hair,0,100,"blond_hair,yellow_hair"\n', encoding="utf-8")
    rules = _rules_without_conflicts(workspace)
    Path(rules, "aliases.csv").write_text("alias,tag\nblonde_hair,blond_hair\n", encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a", "b", "c"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["blonde_hair"]) + source_rows("b", ["blond_hair"])
                       + source_rows("c", ["yellow_hair"]))
    run_curate(workspace, tag_list=str(tag_list), rules_dir=rules)
    assert tags_of(workspace) == {"a": ["blond_hair"], "b": ["blond_hair"], "c": ["blond_hair"]}


def test_blacklist_impossible_and_count_rules_written_with_an_alias_act_on_its_tag(workspace, tmp_path):
    """The images' tags are read through the aliases; a rule written with an alias name (the tag
    list makes `blonde_hair` an alias of `blond_hair`) acted on no image."""
    from jobs.config import ConfigError

    tag_list = tmp_path / "danbooru.csv"
    tag_list.write_text('blond_hair,0,100,"blonde_hair"\nsmile,0,100,"smiling"\n1girl,0,100,"one_girl"\n'
                        'frown,0,100,""\n', encoding="utf-8")
    rules = _rules_without_conflicts(workspace)
    Path(rules, "impossible_tags.csv").write_text("tag_a,tag_b,winner\nsmiling,frown,a\n", encoding="utf-8")
    Path(rules, "count_tags.csv").write_text("tag,gender,n\none_girl,girls,1\n", encoding="utf-8")
    blacklist = tmp_path / "blacklist.txt"
    blacklist.write_text("blonde_hair\n", encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["blond_hair", "smile", "frown", "1girl"]))
    run_curate(workspace, tag_list=str(tag_list), rules_dir=rules, blacklist=str(blacklist))
    assert sorted(tags_of(workspace)["a"]) == ["1girl", "smile"]
    assert workspace.read_table("image_meta").to_pylist()[0]["n_people_tags"] == 1

    Path(rules, "impossible_tags.csv").write_text("tag_a,tag_b,winner\nsmiling,smile,a\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"impossible_tags.csv: smiling, smile are one tag \(smile\)"):
        run_curate(workspace, tag_list=str(tag_list), rules_dir=rules, blacklist=str(blacklist))


def test_aliases_that_go_round_in_a_circle_are_a_config_error(workspace):
    from jobs.config import ConfigError

    rules = _rules_without_conflicts(workspace)
    Path(rules, "aliases.csv").write_text("alias,tag\nx,y\ny,z\nz,x\n", encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a"]))
    with pytest.raises(ConfigError, match="x -> y -> z -> x"):
        run_curate(workspace, rules_dir=rules)


def test_lookup_files_saved_with_a_byte_order_mark_read_as_without(workspace, tmp_path):
    """A tagger label file saved by Excel ("CSV UTF-8") starts with a byte order mark: its header
    was no longer `tag_id,name,category`, the file was read as a Danbooru list of ids, and every
    tag was general (characters lost); aliases.csv with one failed curate with KeyError 'alias'."""
    tag_list = tmp_path / "selected_tags.csv"
    tag_list.write_text("\ufefftag_id,name,category,count\n1,eileen_(ren'py),4,10\n", encoding="utf-8")
    rules = _rules_without_conflicts(workspace)
    Path(rules, "aliases.csv").write_text("\ufeffalias,tag\neileen,eileen_(ren'py)\n", encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["eileen", "smile"]))
    run_curate(workspace, tag_list=str(tag_list), rules_dir=rules)
    rows = {r["tag"]: r["category"] for r in workspace.read_table("tags").to_pylist()}
    assert rows == {"eileen_(ren'py)": "character", "smile": "general"}


def test_category_learned_from_other_sidecars(workspace):
    workspace.add_part("images", "p", image_rows(["a", "b"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["eileen_(ren'py)", "smile"])
                         + source_rows("b", ["eileen_(ren'py)"], "character"))
    run_curate(workspace)
    cats = {(r["key"], r["tag"]): r["category"] for r in workspace.read_table("tags").to_pylist()}
    assert cats[("a", "eileen_(ren'py)")] == "character"
    assert cats[("a", "smile")] == "general"


def test_blacklist_default_and_custom(workspace, tmp_path):
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["cosplay", "smile", "sky"]))
    run_curate(workspace)
    assert sorted(tags_of(workspace)["a"]) == ["sky", "smile"]
    custom = tmp_path / "black.txt"
    custom.write_text("# mine\nsky\n", encoding="utf-8")
    run_curate(workspace, blacklist=str(custom))
    assert sorted(tags_of(workspace)["a"]) == ["cosplay", "smile"]


def test_an_image_whose_only_tags_curate_removed_has_none_in_its_tag_lists(workspace):
    """image_tag_lists falls back to source tags for an image curate has not seen; one whose tags
    were all blacklisted got them back, and export wrote `cosplay` to its KEY.txt."""
    workspace.add_part("images", "p", image_rows(["a", "b"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["cosplay"]) + source_rows("b", ["smile"]))
    con = workspace.connect()
    assert dict(con.execute("select key, tags from image_tag_lists").fetchall()) == {"a": ["cosplay"], "b": ["smile"]}
    run_curate(workspace)
    con = workspace.connect()
    assert dict(con.execute("select key, tags from image_tag_lists").fetchall()) == {"b": ["smile"]}
    workspace.add_part("images", "q", image_rows(["c"]))  # ingested after curate: its own tags
    workspace.add_part("source_tags", "q", source_rows("c", ["cosplay"]))
    con = workspace.connect()
    assert dict(con.execute("select key, tags from image_tag_lists").fetchall()) == {"b": ["smile"], "c": ["cosplay"]}
    # tags the caption job derives from an image's own text after curate stand in for none
    workspace.add_part("source_tags", "r", [{**row, "origin": "caption"} for row in source_rows("a", ["1girl"])])
    con = workspace.connect()
    assert dict(con.execute("select key, tags from image_tag_lists").fetchall()) == {
        "a": ["1girl"], "b": ["smile"], "c": ["cosplay"]}


@pytest.mark.parametrize(("scores", "kept"), [
    ({"1girl": 0.9, "multiple_girls": 0.5}, ["1girl"]),
    ({"1girl": 0.5, "multiple_girls": 0.9}, ["multiple_girls"]),
    ({"solo": 0.99, "2girls": 0.4}, ["2girls"]),  # rule winner b: the count tag wins whatever the score
    ({"open_mouth": 0.6, "closed_mouth": 0.7}, ["closed_mouth"]),
])
def test_impossible_combinations(workspace, scores, kept):
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("tag_scores", "p", score_rows("a", scores))
    run_curate(workspace)
    assert tags_of(workspace)["a"] == kept


def test_an_impossible_combination_of_a_tag_with_itself_is_a_config_error(workspace):
    """A row `smile,smile,a` in impossible_tags.csv paired every image's smile with itself, and the
    loser, smile, left every image without a word."""
    from jobs.config import ConfigError

    rules = _rules_without_conflicts(workspace)
    Path(rules, "impossible_tags.csv").write_text("tag_a,tag_b,winner\nsmile,smile,a\n", encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["smile", "1girl"]))
    with pytest.raises(ConfigError, match="impossible_tags.csv: smile cannot rule out itself"):
        run_curate(workspace, rules_dir=rules)


def test_overlap_rules_written_with_an_alias_act_on_its_tag(workspace, tmp_path):
    """imgutils' overlap data names 78 tags that Danbooru's list makes aliases (`object_hug` for
    hugging_object, `see-through` for see-through_clothes): the image's tags are read through the
    aliases, the rules were not, so `hugging_object` stayed beside `pillow_hug`."""
    tag_list = tmp_path / "danbooru.csv"
    tag_list.write_text('hugging_object,0,24850,object_hug\npillow_hug,0,10,""\n', encoding="utf-8")
    overlap = tmp_path / "overlap.json"
    overlap.write_text(json.dumps({"object_hug": ["pillow_hug", "doll_hug"]}), encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a", "b"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["object_hug", "pillow_hug"])
                       + source_rows("b", ["hugging_object"]))
    run_curate(workspace, tag_list=str(tag_list), overlap_tags=str(overlap))
    assert tags_of(workspace) == {"a": ["pillow_hug"], "b": ["hugging_object"]}


@pytest.mark.parametrize("data", [{"long_hair": "very_long_hair"}, ["long_hair"], {"long_hair": [["very_long_hair"]]}])
def test_an_overlap_file_not_of_tags_to_lists_of_tags_is_a_config_error(workspace, tmp_path, data):
    """`{"long_hair": "very_long_hair"}` (a string, not a list) made the rules long_hair <- v,
    long_hair <- e, ... one per letter: none acted, and curate said nothing."""
    from jobs.config import ConfigError

    overlap = tmp_path / "overlap.json"
    overlap.write_text(json.dumps(data), encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a"]))
    with pytest.raises(ConfigError, match="overlap.json: expected"):
        run_curate(workspace, overlap_tags=str(overlap))


def test_overlap_table_and_substring_rule(workspace, tmp_path):
    overlap = tmp_path / "overlap.json"
    overlap.write_text(json.dumps({"long_hair": ["very_long_hair"], "breasts": ["large_breasts"]}), encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a", "b"]))
    workspace.add_part("source_tags", "p",
                         source_rows("a", ["long_hair", "very_long_hair", "shirt", "white_shirt", "breasts"])
                         + source_rows("b", ["long_hair", "shirt"]))
    run_curate(workspace, overlap_tags=str(overlap))
    got = tags_of(workspace)
    assert sorted(got["a"]) == ["breasts", "very_long_hair", "white_shirt"]
    assert sorted(got["b"]) == ["long_hair", "shirt"]


def _random_images(vocabulary: list[str], n: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {f"img{i:03d}": rng.sample(vocabulary, rng.randint(1, min(12, len(vocabulary)))) for i in range(n)}


def _assert_matches_imgutils(workspace, monkeypatch, overlap_data: dict, images: dict[str, list[str]], path: str):
    monkeypatch.setattr(imgutils_overlap, "_get_overlap_tags", lambda: overlap_data)
    workspace.add_part("images", "p", image_rows(list(images)))
    workspace.add_part("source_tags", "p", [r for k, tags in images.items() for r in source_rows(k, tags)])
    run_curate(workspace, overlap_tags=path, blacklist=_empty_blacklist(workspace),
               rules_dir=_rules_without_conflicts(workspace))
    got = tags_of(workspace)
    for key, tags in images.items():
        assert sorted(got.get(key, [])) == sorted(imgutils_overlap.drop_overlap_tags(tags)), key


def _empty_blacklist(workspace) -> str:
    path = f"{workspace.root}/../empty_blacklist.txt"
    open(path, "w").close()
    return path


def _rules_without_conflicts(workspace) -> str:
    """A rules dir whose impossible / alias tables are empty: only the overlap rule acts."""
    import shutil

    from udfs.curate.tag_rules import RULES_DIR

    target = Path(workspace.root).parent / "rules"
    target.mkdir(exist_ok=True)
    shutil.copy(RULES_DIR / "count_tags.csv", target)
    (target / "impossible_tags.csv").write_text("tag_a,tag_b,winner\n", encoding="utf-8")
    (target / "aliases.csv").write_text("alias,tag\n", encoding="utf-8")
    return str(target)


def test_pruning_matches_imgutils_drop_overlap_tags(workspace, monkeypatch, tmp_path):
    overlap_data = {"long_hair": ["very_long_hair", "absurdly_long_hair"], "breasts": ["large_breasts", "cleavage"],
                    "hat": ["witch_hat"], "ribbon": ["hair_ribbon", "red_ribbon"]}
    path = tmp_path / "overlap.json"
    path.write_text(json.dumps(overlap_data), encoding="utf-8")
    vocabulary = ["long_hair", "very_long_hair", "absurdly_long_hair", "hair", "breasts", "large_breasts",
                  "cleavage", "hat", "witch_hat", "hatsune_miku", "ribbon", "hair_ribbon", "red_ribbon", "red",
                  "shirt", "white_shirt", "t-shirt", "smile", "1girl", "solo", "blue_eyes", "eyes", "a"]
    _assert_matches_imgutils(workspace, monkeypatch, overlap_data, _random_images(vocabulary, 150, 1), str(path))


def test_pruning_matches_imgutils_on_danbooru_overlap_data(workspace, monkeypatch):
    from conftest import shared_path

    path = shared_path("tagdata", "overlap_tags.json")
    overlap_data = json.loads(path.read_text(encoding="utf-8"))
    vocabulary = sorted({t for k, v in list(overlap_data.items())[:60] for t in [k, *v[:4]]})
    _assert_matches_imgutils(workspace, monkeypatch, overlap_data, _random_images(vocabulary, 200, 2), str(path))


def test_character_traits_dropped_only_for_named_characters(workspace):
    workspace.add_part("images", "p", image_rows(["named", "anon"]))
    general = ["red_hair", "blue_eyes", "closed_eyes", "chair", "ponytail", "smile", "holding_hat"]
    named = source_rows("named", general) + source_rows("named", ["eileen"], "character")
    workspace.add_part("source_tags", "p", named + source_rows("anon", general))
    run_curate(workspace, drop_character_traits=True)
    got = tags_of(workspace)
    assert sorted(got["named"]) == ["chair", "closed_eyes", "eileen", "holding_hat", "smile"]
    assert sorted(got["anon"]) == sorted(general)


def test_a_characters_fixed_traits_are_those_most_of_its_solo_images_carry(workspace):
    """character_traits (for the caption lint): trait tags on >= trait_share of the images naming
    the character alone, counted from source and tagger tags even when curate drops the traits."""
    keys = [f"e{i}" for i in range(4)] + ["duo", "l0", "l1"]
    workspace.add_part("images", "p", image_rows(keys))
    rows = []
    for i in range(4):  # Eileen: red hair and blue eyes always, a ponytail once, smiling (not a trait)
        tags = ["red_hair", "smile"] + (["ponytail"] if i == 0 else [])
        rows += source_rows(f"e{i}", tags) + source_rows(f"e{i}", ["eileen"], "character")
    rows += source_rows("duo", ["black_hair"]) + source_rows("duo", ["eileen", "lucy"], "character")
    rows += [r for k in ("l0", "l1") for r in source_rows(k, ["black_hair"]) + source_rows(k, ["lucy"], "character")]
    workspace.add_part("source_tags", "p", rows)
    workspace.add_part("tag_scores", "p", [r for i in range(4) for r in score_rows(f"e{i}", {"blue_eyes": 0.9})]
                       + score_rows("e0", {"green_eyes": 0.2}))
    run_curate(workspace, drop_character_traits=True, trait_share=0.5, trait_min_images=3)
    traits = sorted((r["character"], r["tag"], r["images"], r["share"])
                    for r in workspace.read_table("character_traits").to_pylist())
    # lucy has two solo images (< trait_min_images); the duo names two characters and counts for neither
    assert traits == [("eileen", "blue_eyes", 4, 1.0), ("eileen", "red_hair", 4, 1.0)]
    assert "red_hair" not in tags_of(workspace)["e0"]  # dropped from the tags, still counted


def test_character_traits_count_a_trait_written_as_an_alias(workspace, tmp_path):
    """`blond_hair` in the sources is blonde_hair, in the tags and in the traits alike (the traits
    read the raw tag and found none)."""
    tag_list = tmp_path / "danbooru.csv"
    tag_list.write_text('blonde_hair,0,1,"blond_hair"\nsmile,0,1,""\neileen,4,1,""\n', encoding="utf-8")
    keys = [f"e{i}" for i in range(3)]
    workspace.add_part("images", "p", image_rows(keys))
    workspace.add_part("source_tags", "p", [r for k in keys for r in source_rows(k, ["blond_hair", "smile"])
                                            + source_rows(k, ["eileen"], "character")])
    run_curate(workspace, tag_list=str(tag_list), trait_share=0.5, trait_min_images=3)
    assert "blonde_hair" in tags_of(workspace)["e0"]
    assert [(r["character"], r["tag"]) for r in workspace.read_table("character_traits").to_pylist()] == [
        ("eileen", "blonde_hair")]


def test_character_traits_from_anime_screenshot_pipeline_json(workspace):
    path = __import__("conftest").shared_path("tagdata", "character_tags.json")
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["red_hair", "fang", "pubic_hair", "smile"])
                         + source_rows("a", ["eileen"], "character"))
    run_curate(workspace, drop_character_traits=True, character_tags=str(path), character_trait_level=0)
    assert sorted(tags_of(workspace)["a"]) == ["eileen", "fang", "pubic_hair", "smile"]
    run_curate(workspace, drop_character_traits=True, character_tags=str(path), character_trait_level=1)
    assert sorted(tags_of(workspace)["a"]) == ["eileen", "pubic_hair", "smile"]


@pytest.mark.parametrize("data", [{"suffixes": ["hair", "eyes"]}, {"whitelist": "drill"}, ["hair"]])
def test_trait_rules_not_in_anime_screenshot_pipelines_form_are_a_config_error(workspace, tmp_path, data):
    """`"suffixes": ["hair", "eyes"]` (one flat list, not a list of groups) made suffix rules of
    single letters (h, a, i, r): red_hair stayed a trait of no one, and curate said nothing."""
    from jobs.config import ConfigError

    path = tmp_path / "character_tags.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    workspace.add_part("images", "p", image_rows(["a"]))
    with pytest.raises(ConfigError, match="character_tags.json: expected"):
        run_curate(workspace, drop_character_traits=True, character_tags=str(path))


def test_rank_solo_then_count_tags_then_characters_then_score(workspace):
    from imgutils.tagging import sort_tags

    scores = {"smile": 0.9, "sky": 0.5, "1girl": 0.6, "solo": 0.4}
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("tag_scores", "p", score_rows("a", scores) + score_rows("a", {"alice": 0.95}, "character"))
    run_curate(workspace)
    assert tags_of(workspace)["a"] == ["solo", "1girl", "alice", "smile", "sky"]
    assert sort_tags(scores) == ["solo", "1girl", "smile", "sky"]  # imgutils' order, the character aside


def test_tagger_scores_must_be_above_the_threshold(workspace):
    """imgutils.tagging.get_wd14_tags keeps scores strictly above the threshold."""
    workspace.add_part("images", "p", image_rows(["a"]))
    # scores are float32: thresholds a float32 holds exactly, so "equal" is equal
    workspace.add_part("tag_scores", "p", score_rows("a", {"smile": 0.25, "sky": 0.2501})
                         + score_rows("a", {"alice": 0.75, "bob": 0.751}, "character"))
    run_curate(workspace, general_threshold=0.25, character_threshold=0.75)
    assert sorted(tags_of(workspace)["a"]) == ["bob", "sky"]


# imgutils.tagging.is_basic_character_tag's own examples, and plural / whitelist cases around them
TRAIT_CASES = ["red_hair", "cat_ears", "cat_ear", "chair", "hear", "dress", "drill", "drills", "twin_drills",
               "blue_eyes", "eye", "pointy_ear", "hair_ornament", "hair_ornaments", "smile", "long_sleeves",
               "ponytail", "ponytails", "animal_ear_fluff", "hair_bows", "bangs", "bang", "closed_eyes"]


def test_character_traits_match_imgutils(workspace):
    from imgutils.tagging import is_basic_character_tag

    keys = [f"k{i}" for i in range(len(TRAIT_CASES))]  # one tag an image: no overlap pruning between them
    workspace.add_part("images", "p", image_rows(keys))
    rows = [r for key, tag in zip(keys, TRAIT_CASES, strict=True)
            for r in source_rows(key, [tag]) + source_rows(key, ["eileen"], "character")]
    workspace.add_part("source_tags", "p", rows)
    run_curate(workspace, drop_character_traits=True, blacklist=_empty_blacklist(workspace))
    kept = {tag for tags in tags_of(workspace).values() for tag in tags} - {"eileen"}
    assert kept == {t for t in TRAIT_CASES if not is_basic_character_tag(t)}
    assert "drills" in kept and "cat_ear" not in kept


def test_imgutils_character_lists_are_read_without_importing_the_tagging_package():
    """curate reads imgutils' CHAR_* lists from the module's source (importing imgutils.tagging
    imports transformers): the same five lists, and the package is not imported by the read."""
    import subprocess
    import sys

    from imgutils.tagging import character

    from udfs.curate.tag_rules import imgutils_character_lists

    lists = imgutils_character_lists()
    names = ["CHAR_WHITELIST_SUFFIX", "CHAR_WHITELIST_PREFIX", "CHAR_WHITELIST_WORD", "CHAR_SUFFIXES", "CHAR_PREFIXES"]
    assert {name: lists[name] for name in names} == {name: getattr(character, name) for name in names}
    check = ("import sys; from udfs.curate.tag_rules import imgutils_character_lists; imgutils_character_lists(); "
             "print('imgutils.tagging' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_blacklist_entries_take_word_forms_and_spaces(workspace, tmp_path):
    from imgutils.tagging.blacklist import _is_blacklisted, _split_to_words, _words_to_matcher

    entries = ["breast", "no eyewear", "hair_bows"]
    tags = ["breasts", "breast", "no_eyewear", "hair_bow", "large_breasts", "smile"]
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", tags))
    custom = tmp_path / "black.txt"
    custom.write_text("\n".join(entries), encoding="utf-8")
    run_curate(workspace, blacklist=str(custom))
    matchers = set().union(*(_words_to_matcher(_split_to_words(e)) for e in entries))
    assert sorted(tags_of(workspace)["a"]) == sorted(t for t in tags if not _is_blacklisted(t, matchers))
    assert sorted(tags_of(workspace)["a"]) == ["large_breasts", "smile"]


HOSTILE = ["it's", 'say_"hi"', "a;b", "'; drop table tags; --", "back\\slash", "(parens)", "日本語_タグ",
           "emoji_🎉", "percent_%_under_", "$partition", "null"]


def test_hostile_tags_pass_through_unchanged(workspace):
    workspace.add_part("images", "p", image_rows(["k'1", "k;2"]))
    workspace.add_part("source_tags", "p", source_rows("k'1", HOSTILE) + source_rows("k;2", ["x"] + HOSTILE[:3]))
    run_curate(workspace)
    got = tags_of(workspace)
    assert sorted(got["k'1"]) == sorted(HOSTILE)
    assert sorted(got["k;2"]) == sorted(["x"] + HOSTILE[:3])


def test_partitions_give_the_same_rows(workspace):
    images = _random_images(["a_b", "b", "c_d", "d", "1girl", "2girls", "solo", "smile"], 60, 3)
    workspace.add_part("images", "p", image_rows(list(images)))
    workspace.add_part("source_tags", "p", [r for k, tags in images.items() for r in source_rows(k, tags)])
    run_curate(workspace, tag_partitions=1)
    one = sorted(map(str, workspace.read_table("tags").to_pylist()))
    run_curate(workspace, tag_partitions=7)
    seven = sorted(map(str, workspace.read_table("tags").to_pylist()))
    assert one == seven and len(one) > 60
