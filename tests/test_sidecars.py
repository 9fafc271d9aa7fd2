"""How sidecar bytes become text: UTF-8, UTF-16 with and without a byte order mark, legacy code pages."""

from __future__ import annotations

import codecs

import pytest

from udfs.ingest.sidecars import decode_text, without_controls


@pytest.mark.parametrize(("data", "expected"), [
    (b"1girl, solo", ("1girl, solo", None)),
    ("\ufeff1girl, café".encode(), ("1girl, café", None)),
    ("かわいい".encode("utf-16"), ("かわいい", "utf-16")),  # with a BOM, no NUL in it
    ("1girl, solo".encode("utf-16-le"), ("1girl, solo", "utf-16-le")),
    ("a, b".encode("utf-16-be"), ("a, b", "utf-16-be")),  # short: the NULs' side says the order
    ("かわいい, smile".encode("utf-16-le"), ("かわいい, smile", "utf-16-le")),
    ("かわいい, 猫耳".encode("cp932"), ("かわいい, 猫耳", "cp932")),
    ("café, résumé".encode("cp1252"), ("café, résumé", "cp1252")),  # short: was read as cp1006 (Urdu)
    ("猫, 可爱".encode("gb18030"), ("猫, 可爱", "gb18030")),
    ("кошка, девушка".encode("cp1251"), ("кошка, девушка", "cp1251")),
    ("長い髪, 少女, 笑顔, 青い目".encode("utf-16-be"), ("長い髪, 少女, 笑顔, 青い目", "utf-16-be")),  # CJK: few NULs
])
def test_decode_text(data, expected):
    assert decode_text(data) == expected


def test_stray_nuls_stay_utf8_and_are_removed_by_the_caller():
    text, guessed = decode_text(b"1girl\x00, \x00solo, smile")
    assert guessed is None
    assert without_controls(text) == ("1girl, solo, smile", 2)
    assert without_controls("line one\r\nline\ttwo\x07") == ("line one\r\nline\ttwo", 1)


def test_a_json_tags_string_splits_like_a_tags_file():
    from udfs.ingest.sidecars import parse_sidecar

    tags = parse_sidecar("json", '{"tags": "1girl long_hair smile"}')[0]
    assert [t for t, _ in tags] == ["1girl", "long_hair", "smile"]
    assert [t for t, _ in parse_sidecar("json", '{"tags": "1girl, long hair"}')[0]] == ["1girl", "long_hair"]


@pytest.mark.parametrize(("text", "expected"), [
    ('{"tags": {"general": ["1girl"], "character": ["miku"], "species": ["cat"]}}',  # e621, gallery-dl
     [("1girl", "general"), ("miku", "character"), ("cat", "general")]),
    ('{"tags": null, "caption": "a cat"}', []),
])
def test_json_tags_of_other_shapes(text, expected):
    from udfs.ingest.sidecars import parse_sidecar

    assert parse_sidecar("json", text)[0] == expected


@pytest.mark.parametrize("text", ['{"tags": [true]}', '{"tags": [["a"]]}', '{"tags": {"general": "a"}}', '{"tags": 3}'])
def test_json_tags_that_are_not_tag_strings_are_refused(text):
    from udfs.ingest.sidecars import SidecarError, parse_sidecar

    with pytest.raises(SidecarError):
        parse_sidecar("json", text)


def test_a_json_tag_holding_commas_is_the_tags_it_joins():
    """Export writes KEY.txt with commas between tags, and no Danbooru tag holds one: an item
    "smile, open mouth" read as one tag came back as two tags after export."""
    from udfs.ingest.sidecars import parse_sidecar

    assert parse_sidecar("json", '{"tags": ["1girl", "smile, open mouth", " , "]}')[0] == [
        ("1girl", "general"), ("smile", "general"), ("open_mouth", "general")]
    assert parse_sidecar("json", '{"tags": {"character": ["miku, rin"]}}')[0] == [
        ("miku", "character"), ("rin", "character")]


def test_a_category_prefix_with_no_tag_after_it_names_no_tag():
    from udfs.ingest.sidecars import parse_sidecar

    tags = parse_sidecar("txt", "character:, 1girl, artist: , copyright:renpy")[0]
    assert tags == [("1girl", "general"), ("renpy", "copyright")]


def test_a_rating_prefix_is_the_images_rating_not_a_tag():
    """`rating:explicit` in a tag list (Hydrus's namespace, a booru's metatag) was the general tag
    `rating:explicit`: written into KEY.txt and the template caption ("Other details: rating:explicit")
    whatever export.exclude_tag_categories said, beside the tagger's rating. A letter or a word is read
    as a JSON sidecar's "rating" is; another value stays a tag."""
    from udfs.ingest.sidecars import parse_sidecar

    tags = parse_sidecar("txt", "1girl, rating:explicit, smile")[0]
    assert tags == [("1girl", "general"), ("explicit", "rating"), ("smile", "general")]
    assert parse_sidecar("txt", "Rating: Q, rating:g")[0] == [("questionable", "rating"), ("general", "rating")]
    assert parse_sidecar("txt", "rating:other, rating:")[0] == [("rating:other", "general")]
    assert parse_sidecar("tags", "1girl rating:e")[0] == [("1girl", "general"), ("explicit", "rating")]
    # in the three-line form too, which it still is
    three = "copyright: ren'py\ncharacter: eileen\ngeneral tags: 1girl, rating:explicit, smile"
    assert parse_sidecar("txt", three) == ([("ren'py", "copyright"), ("eileen", "character"), ("1girl", "general"),
                                           ("explicit", "rating"), ("smile", "general")], [], "three_line")


def test_a_prefixed_tag_list_over_two_lines_is_not_the_three_line_form():
    """Read as the three-line form, `smile` was a character and `general:2girls` a character tag
    of that name; curate then made `smile` a character in other images too."""
    from udfs.ingest.sidecars import parse_sidecar

    tags, _, origin = parse_sidecar("txt", "character:eileen, smile\ncharacter:lucy, general:2girls")
    assert origin == "txt"
    assert tags == [("eileen", "character"), ("smile", "general"), ("lucy", "character"), ("2girls", "general")]
    tags, _, origin = parse_sidecar("txt", "character:eileen, smile\ncopyright:renpy, 1girl")
    assert origin == "txt" and ("smile", "general") in tags and ("1girl", "general") in tags
    three = parse_sidecar("txt", "character: eileen, lucy\ncharacter: mary")  # a label twice: still the form
    assert three == ([("eileen", "character"), ("lucy", "character"), ("mary", "character")], [], "three_line")
    three = parse_sidecar("tags", "copyright: touhou\ncharacter: hakurei reimu, kirisame marisa\ngeneral tags: 2girls")
    assert three == ([("touhou", "copyright"), ("hakurei_reimu", "character"), ("kirisame_marisa", "character"),
                      ("2girls", "general")], [], "three_line")
    assert parse_sidecar("txt", "1girl, smile\nlong hair")[0] == [
        ("1girl", "general"), ("smile", "general"), ("long_hair", "general")]
    assert parse_sidecar("tags", "1girl smile\nlong_hair")[0] == [
        ("1girl", "general"), ("smile", "general"), ("long_hair", "general")]


def test_tags_that_look_the_same_are_one_tag():
    from udfs.ingest.sidecars import parse_sidecar

    text = "cafe\u0301, caf\u00e9, smile\u200b, \u202esmile, 猫耳，笑顔"
    assert [t for t, _ in parse_sidecar("txt", text)[0]] == ["caf\u00e9", "caf\u00e9", "smile", "smile", "猫耳", "笑顔"]


@pytest.mark.parametrize("text", [
    # gelbooru, yande.re, konachan, safebooru via gallery-dl's `tags` option: space-joined strings
    '{"category": "gelbooru", "tags": "1girl hatsune_miku smile vocaloid highres", "rating": "general", '
    '"tags_character": "hatsune_miku", "tags_copyright": "vocaloid", "tags_general": "1girl smile", '
    '"tags_metadata": "highres"}',
    # sankaku, zerochan: lists
    '{"tags": ["1girl", "Hatsune Miku", "smile", "vocaloid", "highres"], "tags_character": ["Hatsune Miku"], '
    '"tags_copyright": ["vocaloid"], "tags_general": ["1girl", "smile"], "tags_meta": ["highres"]}',
])
def test_gallery_dl_tag_categories_name_the_characters(text):
    """gallery-dl writes a booru post's tags as one `tags` field plus `tags_<category>` fields;
    read as plain tags, every character was general, and the character first (as Danbooru
    posts are read), so that a keep_tokens prefix holds it."""
    from udfs.ingest.sidecars import parse_sidecar

    tags, _, origin = parse_sidecar("json", text)
    assert tags == [("hatsune_miku", "character"), ("vocaloid", "copyright"), ("1girl", "general"),
                    ("smile", "general"), ("highres", "meta")]
    assert origin == "json"


def test_gallery_dl_category_fields_of_other_types_are_refused():
    from udfs.ingest.sidecars import SidecarError, parse_sidecar

    with pytest.raises(SidecarError, match="tags_character"):
        parse_sidecar("json", '{"tags": "a b", "tags_character": 3}')


@pytest.mark.parametrize("text", ["1girl, 長い髪, 笑顔, 猫耳", "初音ミク, ツインテール", "café, naïve, 長"])
@pytest.mark.parametrize("cut", [1, 2])
def test_utf8_cut_inside_its_last_character_stays_utf8(text, cut):
    """A sidecar written with a byte limit, or copied short, ends inside a character: it was
    guessed as a legacy code page, every tag of it garbled (`й•·гЃ„й«Є` for `長い髪`, read as cp1251)."""
    from udfs.ingest.sidecars import CUT_UTF8

    data = text.encode()
    assert decode_text(data[:-cut]) == (text[:-1], CUT_UTF8)
    assert decode_text(codecs.BOM_UTF8 + data[:-cut]) == (text[:-1], CUT_UTF8)  # the mark is no character


def test_a_byte_order_mark_says_utf8_whatever_is_cut():
    from udfs.ingest.sidecars import CUT_UTF8

    assert decode_text(codecs.BOM_UTF8 + b"caf\xc3") == ("caf", CUT_UTF8)


@pytest.mark.parametrize("data", ["café".encode("cp1252"), "naïve".encode("cp1252"), "東".encode("cp932")])
def test_a_legacy_text_ending_in_a_high_byte_is_not_taken_for_cut_utf8(data):
    from udfs.ingest.sidecars import CUT_UTF8

    assert decode_text(data)[1] != CUT_UTF8


def test_a_cut_utf8_sidecar_keeps_its_tags_and_says_what_was_cut():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hostile_data import encode, picture

    from jobs.config import load_config
    from jobs.ingest import unit_options
    from udfs.ingest.ingest_unit import UnitRows
    from udfs.ingest.sources import Sample, Unit

    text = "1girl, 長い髪, 笑顔".encode()[:-1]
    sample = Sample("a", {"png": encode(picture(), "PNG"), "txt": text}, {"png": "a.png", "txt": "a.txt"})
    rows = UnitRows(Unit("tar", "s.tar", "s"), frame_store=None)
    rows.add(sample, unit_options(load_config(None, [])))
    assert [(r["tag"], r["category"]) for r in rows.tables["source_tags"]] == [
        ("1girl", "general"), ("長い髪", "general"), ("笑", "general")]
    [error] = rows.tables["errors"]
    assert (error["kind"], error["dropped"]) == ("bad_characters", False)
    assert "cut inside its last character" in error["message"]


@pytest.mark.parametrize(("text", "encoding"), [
    ("1girl, 東方, 博麗霊夢, solo", "cp932"),  # was Korean: 1girl, 뱦뺴, 뵊쀭쀬뼯, solo
    ("桜, 眼鏡, 博麗霊夢, 長髪", "cp932"),
    ("1girl, 東方, 博麗霊夢, 巫女, 赤いリボン, solo, 笑顔", "cp932"),  # was Cyrillic: 1girl, “Њ•ы, ...
    ("1girl, 和服, solo", "gb18030"),  # was cp1252: 1girl, ºÍ·þ, solo
    ("貓耳, 1girl, 泳裝, 微笑", "big5"),  # was half-width katakana: ｿﾟｦﾕ, 1girl, ...
    ("очки, 1girl, solo", "cp1251"),  # was Chinese: 铟觇, 1girl, solo
    ("żółw, dívka, úsměv, dlouhé vlasy", "cp1250"),  # was cp1252: ¿ó³w, ...
])
def test_legacy_tag_lists_are_read_in_their_code_page(text, encoding):
    """charset_normalizer's chaos alone misread short tag lists of the code pages tag writers use
    (of 200 random lists of common tags, it read 126 of Shift-JIS and 119 of Big5 right)."""
    assert decode_text(text.encode(encoding)) == (text, encoding)


def test_a_long_legacy_sidecar_is_judged_quickly_and_right():
    import time

    data = ("1girl, 東方, 博麗霊夢, solo, " * 30_000).encode("cp932")  # about a megabyte; was Korean
    started = time.perf_counter()
    assert decode_text(data)[1] == "cp932"
    assert time.perf_counter() - started < 5


def test_hydrus_namespaces_in_a_txt_name_the_artist_and_copyright():
    """A hydrus tag export (`Image_1.jpg.txt`, a tag a line) writes the artist as `creator:` and
    the work as `series:` (or `studio:`): those were tags `creator:splashbrush`, in every caption."""
    from udfs.ingest.sidecars import parse_sidecar

    text = "character:samus aran\ncreator:splashbrush\nseries:metroid\nstudio:nintendo\nblue eyes\n"
    assert parse_sidecar("txt", text)[0] == [("samus_aran", "character"), ("splashbrush", "artist"),
                                             ("metroid", "copyright"), ("nintendo", "copyright"),
                                             ("blue_eyes", "general")]


def test_a_danbooru_post_with_only_its_whole_tag_string_gives_its_tags():
    """A post fetched with `only=...,tag_string` has no per-category fields: its tags were lost."""
    from udfs.ingest.sidecars import parse_sidecar

    tags, _, origin = parse_sidecar("json", '{"id": 1, "tag_string": "1girl solo hatsune_miku", "rating": "g"}')
    assert tags == [("1girl", "general"), ("solo", "general"), ("hatsune_miku", "general"), ("general", "rating")]
    assert origin == "danbooru_json"


@pytest.mark.parametrize("text", ['{"content": "new art!", "hashtags": ["miku"]}', '{}'])
def test_a_json_sidecar_with_no_field_read_says_so(text):
    """A JSON of another shape (a gallery-dl twitter post) gave no tag and no errors row: its tags
    were lost without a word."""
    from udfs.ingest.sidecars import SidecarError, parse_sidecar

    with pytest.raises(SidecarError, match="no tags, tag_string, caption or prompt field"):
        parse_sidecar("json", text)


@pytest.mark.parametrize("text", ['{"tags": []}', '{"tags": null, "caption": "a cat"}', '{"tags_general": "a"}'])
def test_a_json_sidecar_with_an_empty_field_read_is_no_error(text):
    from udfs.ingest.sidecars import parse_sidecar

    parse_sidecar("json", text)


def test_a_tag_list_written_with_prompt_escapes_gives_the_tags_it_escapes():
    """imgutils' tags_to_text (use_escape, its default) writes `\\m/` as `\\\\m/` and `\\(^o^)/`
    as `\\\\\\(^o^\\)/`: only `\\(` and `\\)` were taken back, so such a tag was read with a
    doubled backslash (another tag than Danbooru's) and the export, escaping it again, wrote four."""
    from imgutils.tagging import tags_to_text

    from udfs.ingest.sidecars import parse_sidecar

    tags = ["\\m/", "\\(^o^)/", "star_(symbol)", ":\\"]
    text = tags_to_text(dict.fromkeys(tags, 1.0), use_spaces=True, use_escape=True)
    assert sorted(t for t, _ in parse_sidecar("txt", text)[0]) == sorted(tags)  # in its order of scores
    # a backslash before anything else stays: `\m/` in a .tags file is the tag itself
    assert [t for t, _ in parse_sidecar("tags", "\\m/ star_(symbol)")[0]] == ["\\m/", "star_(symbol)"]
