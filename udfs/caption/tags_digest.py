"""The digest of the tag list a caption was written from (captions.tags_digest): the review page
compares it with the image's tags now, to say when a caption is older than the tags."""

from __future__ import annotations

import hashlib


def tags_digest(tags: list[str] | None) -> str:
    # tags hold no newline (a tag is one line of a booru's list), so the joined text is unambiguous
    return hashlib.md5("\n".join(tags or []).encode()).hexdigest()
