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

import json
import re

from charset_normalizer import from_bytes

DANBOORU_FIELDS = {
    "tag_string_general": "general",
    "tag_string_character": "character",
    "tag_string_copyright": "copyright",
    "tag_string_artist": "artist",
    "tag_string_meta": "meta",
}
RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
THREE_LINE = re.compile(r"^\s*(copyright|character|artist|general tags|general|meta)\s*:", re.I)
THREE_LINE_CATEGORY = {"general tags": "general"}


class SidecarError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# Short texts often fit several legacy code pages equally well; among the best fits, prefer
# the ones that sidecar writers actually use (Windows western, Chinese, Japanese, ...).
PREFERRED_ENCODINGS = ["cp1252", "gb18030", "cp932", "big5", "cp949"]


def decode_text(data: bytes) -> tuple[str, str | None]:
    """(text, None) for UTF-8 (with or without BOM); else (text, the encoding guessed)."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    matches = list(from_bytes(data))
    if not matches:
        raise SidecarError("sidecar_encoding", "not UTF-8 and no text encoding fits")
    least = min(m.chaos for m in matches)
    best = [m for m in matches if m.chaos == least]
    rank = {name: i for i, name in enumerate(PREFERRED_ENCODINGS)}
    chosen = min(best, key=lambda m: rank.get(m.encoding, len(rank)))
    return str(chosen), chosen.encoding


def normalize_tag(tag: str) -> str:
    """Danbooru form: lower case, underscores, prompt escapes `\\(` removed."""
    tag = tag.strip().replace("\\(", "(").replace("\\)", ")")
    return re.sub(r"\s+", "_", tag).lower()


def split_tags(text: str, sep: str) -> list[str]:
    parts = text.split(sep) if sep != " " else text.split()
    return [t for t in (normalize_tag(p) for p in parts) if t]


# An explicit category in a tag list: `character:eileen`, `copyright: my series`. Only these
# words count, so Danbooru tags with a colon (`re:zero_kara...`, `:d`) stay tags.
CATEGORY_PREFIX = re.compile(r"^\s*(character|copyright|artist|meta|general)\s*:\s*(\S.*)$", re.I)


def categorized_tags(text: str, sep: str) -> list[tuple[str, str]]:
    """(tag, category) of a tag list: "general", unless the tag says `category:tag`."""
    parts = text.split(sep) if sep != " " else text.split()
    tags = []
    for part in parts:
        match = CATEGORY_PREFIX.match(part)
        category, raw = (match.group(1).lower(), match.group(2)) if match else ("general", part)
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
    if ext == "tags":
        sep = "," if "," in text else " "
        return categorized_tags(text, sep), [], "booru"
    return categorized_tags(text, ","), [], "txt"


def _is_three_line(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) >= 2 and all(THREE_LINE.match(ln) for ln in lines)


def _parse_three_line(text: str) -> list[tuple[str, str]]:
    tags = []
    for line in text.splitlines():
        match = THREE_LINE.match(line)
        if not match:
            continue
        label = match.group(1).lower()
        category = THREE_LINE_CATEGORY.get(label, label)
        tags += [(t, category) for t in split_tags(line[match.end() :], ",")]
    return tags


def _parse_json(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    try:
        post = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SidecarError("sidecar_json", f"invalid JSON: {exc}") from exc
    if not isinstance(post, dict):
        raise SidecarError("sidecar_json", "JSON sidecar is not an object")
    tags: list[tuple[str, str]] = []
    texts: list[tuple[str, str]] = []
    if any(f in post for f in DANBOORU_FIELDS):
        for field, category in DANBOORU_FIELDS.items():
            tags += [(t, category) for t in split_tags(str(post.get(field) or ""), " ")]
        rating = RATINGS.get(str(post.get("rating", "")).lower()[:1])
        if rating:
            tags.append((rating, "rating"))
        origin = "danbooru_json"
    else:
        raw = post.get("tags", [])
        items = raw if isinstance(raw, list) else str(raw).split(",")
        tags = [(normalize_tag(str(t)), "general") for t in items if str(t).strip()]
        origin = "json"
    for kind in ("caption", "prompt"):
        if isinstance(post.get(kind), str) and post[kind].strip():
            texts.append(("caption" if kind == "caption" else "sd_prompt", post[kind].strip()))
    return tags, texts, origin
