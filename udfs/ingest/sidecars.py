"""Parse sidecar files into (tag, category) lists and caption texts.

Conventions (by extension):
    .txt      kohya style: comma-separated tags; or the three-line form below. A tag may name
              its category: `character:eileen, copyright:renpy, 1girl`
    .tags     space-separated booru tag string, or the three-line form
              `copyright: a, b` / `character: c` / `general tags: x, y`
    .json     Danbooru post JSON (tag_string_general / _character / _copyright / _artist /
              _meta, rating); other JSON with a "tags" list or string, or a "caption"
    .caption  natural-language caption
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections import Counter

from charset_normalizer import from_bytes

# In the order their tags are listed (a tag's position ranks it): who and from what first, as in
# a kohya .txt, so that a `keep_tokens` prefix holds the character, not the last general tag.
DANBOORU_FIELDS = {
    "tag_string_character": "character",
    "tag_string_copyright": "copyright",
    "tag_string_artist": "artist",
    "tag_string_general": "general",
    "tag_string_meta": "meta",
}
RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
THREE_LINE_CATEGORY = {"general tags": "general"}
# a three-line form's label: a space after its colon (or the line ends there), unlike a kohya prefix
THREE_LINE_LABEL = re.compile(r"^\s*(copyright|character|artist|general tags|general|meta)\s*:(\s|$)", re.I)


class SidecarError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# Short texts often fit several legacy code pages equally well; among the best fits, prefer
# the ones that sidecar writers actually use (Windows western, Chinese, Japanese, ...).
PREFERRED_ENCODINGS = ["cp1252", "gb18030", "cp932", "big5", "cp949"]
# The code pages the guesser may choose from: those of the people who write tag files. Left to
# all it knows, it read a short Western text as cp1006 (Urdu) or as UTF-16 CJK.
SIDECAR_ENCODINGS = [*PREFERRED_ENCODINGS, "latin_1", "shift_jis", "euc_jp", "euc_kr", "cp1250", "cp1251",
                     "koi8_r", "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "cp1258", "cp874"]


def decode_text(data: bytes) -> tuple[str, str | None]:
    """(text, None) for UTF-8 (with or without BOM); else (text, the encoding guessed). NUL
    bytes are valid UTF-8: UTF-16 without a BOM (a NUL every other byte for Latin text) would
    pass as UTF-8 with NULs, so a text of more than 30% NULs is read as UTF-16 or guessed. UTF-8
    that ends inside a character is UTF-8 without it: (text, CUT_UTF8)."""
    try:
        utf8: str | None = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf8 = None
        if cut := _cut_utf8(data, exc):
            return cut, CUT_UTF8
    if utf8 is not None and utf8.count("\x00") <= 0.3 * len(data):
        return utf8, None  # stray NULs: removed by the caller (without_controls), and reported
    if wide := utf16_text(data):
        return wide
    matches = list(from_bytes(data, cp_isolation=SIDECAR_ENCODINGS))
    if not matches:
        if utf8 is not None:
            return utf8, None
        if wide := utf16_text(data, loose=True):
            return wide
        raise SidecarError("sidecar_encoding", "not UTF-8 and no text encoding fits")
    return best_reading(data, matches)


def best_reading(data: bytes, matches: list) -> tuple[str, str]:
    """(text, code page) of the legacy code page that reads `data` best: the fewest characters
    a tag file is unlikely to hold (implausible_characters), then charset_normalizer's chaos (of
    the match that stands for it; one it left out counts as chaos 1), then the preferred code
    pages. Its chaos alone read short kanji tag lists in Shift-JIS as Korean or Cyrillic
    (`1girl, 東方, 博麗霊夢, solo` as `1girl, 뱦뺴, 뵊쀭쀬뼯, solo`), a Big5 one as Central European."""
    rank = {name: i for i, name in enumerate(PREFERRED_ENCODINGS)}
    readings = []
    for encoding in SIDECAR_ENCODINGS:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        chaos = min((m.chaos for m in matches if encoding in m.could_be_from_charset), default=1.0)
        readings.append((implausible_characters(text, encoding), chaos, rank.get(encoding, len(rank)), encoding, text))
    *_, encoding, text = min(readings)
    return text, encoding


# The common planes of the multi-byte code pages, as (lead, trail) byte ranges: symbols, kana
# and the first level of Han characters (JIS X 0208, GB 2312, Big5), or the Hangul of KS X 1001.
# Another code page's text read as one of these falls mostly outside them (a GBK or UHC
# extension, a second-level kanji, a Hanja), as a CJK text read as a single-byte code page
# gives punctuation inside words.
COMMON_PLANES = {
    "cp932": ((0x81, 0x84, 0x40, 0xFC), (0x88, 0x98, 0x40, 0xFC)),
    "shift_jis": ((0x81, 0x84, 0x40, 0xFC), (0x88, 0x98, 0x40, 0xFC)),
    "euc_jp": ((0xA1, 0xA5, 0xA1, 0xFE), (0xB0, 0xCF, 0xA1, 0xFE)),
    "gb18030": ((0xA1, 0xA9, 0xA1, 0xFE), (0xB0, 0xD7, 0xA1, 0xFE)),
    "big5": ((0xA1, 0xA3, 0x40, 0xFE), (0xA4, 0xC6, 0x40, 0xFE)),
    "cp949": ((0xA1, 0xAC, 0xA1, 0xFE), (0xB0, 0xC8, 0xA1, 0xFE)),
    "euc_kr": ((0xA1, 0xAC, 0xA1, 0xFE), (0xB0, 0xC8, 0xA1, 0xFE)),
}
TYPOGRAPHY = frozenset("’‘“”–—…·•、。・「」『』（）！？～　，：；【】《》")
# how much of a reading is judged: enough to tell, and a 1 MB sidecar judged in milliseconds
JUDGED_CHARACTERS = 4096


def implausible_characters(text: str, encoding: str) -> int:
    """How many characters of `text` (read as `encoding`) a tag file is unlikely to hold: beyond
    ASCII, neither a letter nor common typography; half-width katakana; letters outside the
    text's main script; for a multi-byte code page, a character outside its common planes; for
    a single-byte one, punctuation between two letters (an apostrophe aside) or a letter of
    another script next to an ASCII letter."""
    text = text[:JUDGED_CHARACTERS]
    planes = COMMON_PLANES.get(encoding)
    scripts: Counter[str] = Counter()
    odd = 0
    for i, char in enumerate(text):
        if char < "\x80" or (char in TYPOGRAPHY and (planes or not _between_letters(text, i) or char == "’")):
            continue
        if not char.isalpha() or "\uff61" <= char <= "\uff9f":
            odd += 1
            continue
        script = _script(char)
        scripts[script] += 1
        if planes:
            code = char.encode(encoding)
            odd += len(code) == 2 and not any(lo <= code[0] <= hi and t_lo <= code[1] <= t_hi
                                               for lo, hi, t_lo, t_hi in planes)
        elif script != "LATIN" and any(n < "\x80" and n.isalpha() for n in text[max(i - 1, 0):i + 2]):
            odd += 1
    return odd + sum(scripts.values()) - max(scripts.values(), default=0)


def _between_letters(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()


def _script(char: str) -> str:
    """The script of a letter, from its Unicode name: Han and kana are one (Japanese writes both)."""
    script = unicodedata.name(char, "OTHER").split()[0]
    return "CJK" if script.startswith(("HIRAGANA", "KATAKANA", "IDEOGRAPHIC")) else script


# decode_text's "encoding" of UTF-8 that ends inside a character (written with a byte limit,
# copied short): read as UTF-8 without that character, not guessed as a legacy code page
CUT_UTF8 = "utf-8 cut inside its last character"


def _cut_utf8(data: bytes, error: UnicodeDecodeError) -> str | None:
    """The text of UTF-8 (`error`: its utf-8-sig decoding's) whose only fault is a last character
    cut short, without it: its bytes before are UTF-8 that starts with a byte order mark or holds
    a character beyond ASCII (a legacy text with its only high byte last, cp1252 `caf\xe9`, does
    neither), and hold no NUL (UTF-16)."""
    if error.reason != "unexpected end of data" or b"\x00" in data:
        return None
    marked = data.startswith(codecs.BOM_UTF8)
    before = data[len(codecs.BOM_UTF8) if marked else 0:][: error.start]  # its positions count after the mark
    return before.decode("utf-8") if marked or max(before, default=0) >= 0x80 else None


def utf16_text(data: bytes, loose: bool = False) -> tuple[str, str] | None:
    """(text, encoding) of UTF-16 with a byte order mark, or without one when the NULs of
    Latin characters sit on one side (charset_normalizer mixes up the byte order of short texts).
    `loose`: any even-length text that decodes, in the byte order its few NULs suggest (CJK text
    without a BOM, whose ASCII commas and spaces are its only NULs): when nothing else fits."""
    candidates = ["utf-16"] if data[:2] in (b"\xff\xfe", b"\xfe\xff") else []
    if len(data) % 2 == 0:
        half, odd, even = len(data) // 2, data[1::2].count(0), data[0::2].count(0)
        if odd >= 0.6 * half > even:
            candidates.append("utf-16-le")
        elif even >= 0.6 * half > odd:
            candidates.append("utf-16-be")
        if loose:  # both orders, the one the NULs favour first
            candidates += ["utf-16-be", "utf-16-le"] if even > odd else ["utf-16-le", "utf-16-be"]
    for encoding in candidates:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            pass
    return None


# C0 controls but tab and line breaks, and DEL: no tag or caption holds them (a NUL-padded file does).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def without_controls(text: str) -> tuple[str, int]:
    """`text` without control characters (CONTROL_CHARACTERS), and how many there were."""
    cleaned = CONTROL_CHARACTERS.sub("", text)
    return cleaned, len(text) - len(cleaned)


def has_lone_surrogate(text: str) -> bool:
    """Whether `text` holds half a UTF-16 pair (a JSON "\\ud800" escape): Parquet's UTF-8 can't."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def replace_lone_surrogates(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")  # each one becomes "?"


def printable(text: str) -> str:
    """Text a model or a server sent, as Parquet can hold it: half UTF-16 pairs as "?", no
    control characters."""
    return without_controls(replace_lone_surrogates(text))[0]


def cleaned_tags(tags: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Parsed tags that Parquet can hold and a trainer can use, and what was done to them:
    half UTF-16 pairs (a JSON "\\ud800" escape) become "?", control characters (a JSON "\\u0000"
    escape, past without_controls on the raw text) go, and a tag left empty goes too."""
    problems = []
    joined = "".join(t for t, _ in tags)  # one look at them all: most tag lists hold neither
    if not CONTROL_CHARACTERS.search(joined) and not has_lone_surrogate(joined):
        return tags, problems
    if any(has_lone_surrogate(t) for t, _ in tags):
        problems.append("tags with half a UTF-16 pair (a \\udXXX escape): each replaced with '?'")
        tags = [(replace_lone_surrogates(t), c) for t, c in tags]
    cleaned = [(without_controls(t)[0], c) for t, c in tags]
    if cleaned != tags:
        problems.append("control characters in tags (a JSON \\u0000 escape) removed")
        tags = [(t, c) for t, c in cleaned if t]
    return tags, problems


# Format characters (Unicode Cf: bidi overrides, zero-width spaces and joiners, BOMs): invisible,
# in no Danbooru tag, and they make two tags of one that looks the same
FORMAT_CHARACTERS = re.compile(r"[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]")
WHITESPACE = re.compile(r"\s+")
# prompt syntax's escapes, as imgutils' tags_to_text writes them: `\(`, `\)` and `\\` (a tag
# such as `\m/` or `\(^o^)/`), taken back in one pass from the left: `\\\(` is `\(`
PROMPT_ESCAPE = re.compile(r"\\([\\()])")


def normalize_tag(tag: str) -> str:
    """Danbooru form: lower case, underscores, prompt escapes (`\\(`, `\\)`, `\\\\`) removed; one Unicode form
    (NFC: `é` typed as e + a combining accent is `é`), no invisible format characters."""
    if not tag.isascii():  # ASCII is in NFC and holds no format character
        tag = unicodedata.normalize("NFC", FORMAT_CHARACTERS.sub("", tag))
    tag = PROMPT_ESCAPE.sub(r"\1", tag.strip())
    return WHITESPACE.sub("_", tag).lower()


def split_tags(text: str, sep: str) -> list[str]:
    return [t for t in (normalize_tag(p) for p in _parts(text, sep)) if t]


def _parts(text: str, sep: str) -> list[str]:
    """A tag list cut at `sep` (" " or ","); a comma list at full-width commas too (`猫耳，笑顔`)."""
    return text.split() if sep == " " else text.replace("\uff0c", ",").split(",")


# An explicit category in a tag list: `character:eileen`, `copyright: my series`. Only these
# words count, so Danbooru tags with a colon (`re:zero_kara...`, `:d`) stay tags.
# A prefix with nothing after it (`character:`) names no tag and is dropped. Hydrus's namespaces
# for the artist and the work (its tag exports: a tag a line) are these categories too, and
# `rating:explicit` (`rating:e`, Hydrus's and the boorus' rating) is the image's rating.
CATEGORY_PREFIX = re.compile(
    r"^\s*(character|copyright|artist|meta|general|creator|series|studio|rating)\s*:\s*(.*)$", re.I)
HYDRUS_NAMESPACES = {"creator": "artist", "series": "copyright", "studio": "copyright"}
# the values a `rating:` prefix gives: a letter or a word, read by its first letter as a JSON
# sidecar's "rating" is (RATINGS); `rating:other` is no rating and stays a tag
RATING_VALUES = {*RATINGS, *RATINGS.values(), "safe"}


def categorized_tags(text: str, sep: str) -> list[tuple[str, str]]:
    """(tag, category) of a tag list: "general", unless the tag says `category:tag`."""
    tags = []
    for part in _parts(text, sep):
        # no colon, no prefix (and no regex run: most tags have none)
        match = CATEGORY_PREFIX.match(part) if ":" in part else None
        category, raw = (match.group(1).lower(), match.group(2)) if match else ("general", part)
        category = HYDRUS_NAMESPACES.get(category, category)
        if category == "rating":  # was a tag, `rating:explicit` in KEY.txt, beside the tagger's rating
            value = normalize_tag(raw)
            if value in RATING_VALUES:
                raw = RATINGS[value[0]]
            else:  # no rating: the tag as it was written (`rating:` alone names none)
                category, raw = "general", part if value else ""
        if tag := normalize_tag(raw):
            tags.append((tag, category))
    return tags


def parse_sidecar(ext: str, data: bytes | str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    """(tags as (tag, category), texts as (kind, text), origin) of one sidecar (already decoded)."""
    text = data if isinstance(data, str) else decode_text(data)[0]
    if ext == "caption":
        return [], [("caption", text.strip())] if text.strip() else [], "caption"
    if ext == "json":
        return _parse_json(text)
    if _is_three_line(text):
        return _parse_three_line(text), [], "three_line"
    lines = ",".join(text.splitlines())  # a comma list over several lines: a line ends a tag too
    if ext == "tags":
        commas = "," in text or "\uff0c" in text
        return (categorized_tags(lines, ",") if commas else categorized_tags(text, " ")), [], "booru"
    return categorized_tags(lines, ","), [], "txt"


def _is_three_line(text: str) -> bool:
    """`copyright: ...` / `character: ...` / `general tags: ...`: every line a label, a colon and a
    space. A kohya tag list with prefixes over lines (`character:eileen, smile` /
    `copyright:renpy, 1girl`) writes them without the space, or prefixes a later tag; read as
    three lines, it made `smile` a character and `1girl` a copyright. A `rating:` tag is in either
    form, and tells them apart no more than any other tag."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or not all(THREE_LINE_LABEL.match(ln) for ln in lines):
        return False
    prefixes = (CATEGORY_PREFIX.match(part) for ln in lines for part in ln.split(",")[1:])
    return not any(m and m.group(1).lower() != "rating" for m in prefixes)


def _parse_three_line(text: str) -> list[tuple[str, str]]:
    tags = []
    for line in text.splitlines():
        match = THREE_LINE_LABEL.match(line)
        if not match:
            continue
        label = match.group(1).lower()
        category = THREE_LINE_CATEGORY.get(label, label)
        # its tags have no prefix but `rating:` (_is_three_line), the image's rating
        tags += [(t, c if c == "rating" else category) for t, c in categorized_tags(line[match.end():], ",")]
    return tags


# e621 / gallery-dl's categories of a "tags" object or of `tags_<category>` fields (gelbooru's
# `metadata`); any other name is a general tag
JSON_TAG_CATEGORIES = {"character": "character", "copyright": "copyright", "artist": "artist", "meta": "meta",
                       "metadata": "meta"}
# the order of a post's tags by category, as Danbooru posts are read (DANBOORU_FIELDS)
CATEGORY_ORDER = {category: rank for rank, category in enumerate(DANBOORU_FIELDS.values())}


def _json_tags(raw: object) -> list[tuple[str, str]]:
    """(tag, category) of a JSON sidecar's "tags": a list of tag strings; one string split as a
    .tags file (comma-separated, else space-separated); or an object of lists by category (e621,
    gallery-dl). Missing or null: no tags."""
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = raw.split("," if "," in raw else None)
    by_category = raw.items() if isinstance(raw, dict) else [("general", raw)]
    tags = []
    for category, items in by_category:
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise SidecarError("sidecar_json", '"tags" holds something other than tag strings')
        # No Danbooru tag holds a comma, and export's KEY.txt separates tags with commas: an item
        # "smile, open mouth" is two tags joined by the tool that wrote it.
        category = JSON_TAG_CATEGORIES.get(str(category).lower(), "general")
        tags += [(t, category) for item in items for t in split_tags(item, ",")]
    return tags


def _gallery_dl_categories(post: dict) -> dict[str, str]:
    """tag -> category from gallery-dl's `tags_<category>` fields, which it writes beside the
    post's `tags` (its `tags` option): space-joined strings (gelbooru, moebooru) or lists
    (sankaku, zerochan). A field of another type is refused where its name is a category."""
    found: dict[str, str] = {}
    for field, value in post.items():
        name = str(field)[5:].lower()
        if not str(field).startswith("tags_"):
            continue
        if isinstance(value, str):
            value = value.split("," if "," in value else None)
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            if name in JSON_TAG_CATEGORIES or name == "general":
                raise SidecarError("sidecar_json", f'"{field}" holds something other than tag strings')
            continue
        for tag in (t for item in value for t in split_tags(item, ",")):
            found.setdefault(tag, JSON_TAG_CATEGORIES.get(name, "general"))
    return found


def _categorized(tags: list[tuple[str, str]], categories: dict[str, str]) -> list[tuple[str, str]]:
    """`tags` with the categories gallery-dl's fields give them (and the tags only those fields
    name), characters first as in a Danbooru post; `tags` as they were without such fields."""
    if not categories:
        return tags
    listed = {t for t, _ in tags}
    named = [(t, categories.get(t, c)) for t, c in tags] + [(t, c) for t, c in categories.items() if t not in listed]
    return sorted(named, key=lambda tag: CATEGORY_ORDER.get(tag[1], len(CATEGORY_ORDER)))


# the fields of a JSON sidecar read besides Danbooru's per-category ones (and gallery-dl's `tags_<category>`)
READ_FIELDS = ("tag_string", "tags", "caption", "prompt")


def _parse_json(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    try:
        post = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also an int past 4300 digits, nesting past the stack
        raise SidecarError("sidecar_json", f"invalid JSON: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(post, dict):
        raise SidecarError("sidecar_json", "JSON sidecar is not an object")
    if not any(f in post for f in (*DANBOORU_FIELDS, *READ_FIELDS)) and not any(str(f).startswith("tags_")
                                                                              for f in post):
        fields = ", ".join(sorted(map(str, post))[:10]) or "none"
        raise SidecarError("sidecar_json", f"no tags, tag_string, caption or prompt field (its fields: {fields}): "
                                           "nothing read")
    tags: list[tuple[str, str]] = []
    texts: list[tuple[str, str]] = []
    # a post fetched with only its whole tag list has no per-category fields: all general
    fields = DANBOORU_FIELDS if any(f in post for f in DANBOORU_FIELDS) else {"tag_string": "general"}
    if any(f in post for f in fields):
        for field, category in fields.items():
            tags += [(t, category) for t in split_tags(str(post.get(field) or ""), " ")]
        rating = RATINGS.get(str(post.get("rating", "")).lower()[:1])
        if rating:
            tags.append((rating, "rating"))
        origin = "danbooru_json"
    else:
        tags, origin = _categorized(_json_tags(post.get("tags")), _gallery_dl_categories(post)), "json"
    for kind in ("caption", "prompt"):
        if isinstance(post.get(kind), str) and post[kind].strip():
            texts.append(("caption" if kind == "caption" else "sd_prompt", post[kind].strip()))
    return tags, texts, origin
