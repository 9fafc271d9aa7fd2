"""How sidecar bytes become text: UTF-8, UTF-16 with and without a byte order mark, legacy code pages."""

from __future__ import annotations

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
