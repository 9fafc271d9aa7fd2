"""Hostile input is bounded at every stage: a 1 MB tag, 10,000 tags on one image, tags of every
Unicode class and a huge caption become errors rows at ingest (the image stays), curate's
substring rule only looks for tags that exist, and no caption passes max_caption_chars."""

from __future__ import annotations

import random
import sys

import pytest
from hostile_data import picture

from jobs import caption, curate, ingest
from jobs.config import load_config
from store.workspace import Workspace

pytestmark = pytest.mark.usefixtures("ray_local")


def unicode_tags(count: int, seed: int = 0) -> list[str]:
    """Tags drawn from every plane and class (letters, marks, symbols, CJK, emoji, RTL, private use),
    without the characters a tag list splits on."""
    rng = random.Random(seed)
    tags = []
    while len(tags) < count:
        chars = []
        while len(chars) < rng.randint(1, 30):
            c = chr(rng.randint(0x21, sys.maxunicode))
            if c not in ",\\" and not c.isspace() and not 0xD800 <= ord(c) <= 0xDFFF:
                chars.append(c)
        tags.append("".join(chars))
    return tags


def hostile_folder(folder) -> None:
    folder.mkdir()
    picture(seed=1).save(folder / "huge_tag.png")
    (folder / "huge_tag.txt").write_text("1girl, " + "a" * 1_000_000 + ", smile", encoding="utf-8")
    picture(seed=2).save(folder / "many_tags.png")
    (folder / "many_tags.txt").write_text(", ".join(f"tag_{i}" for i in range(10_000)), encoding="utf-8")
    picture(seed=3).save(folder / "unicode.png")
    (folder / "unicode.txt").write_text(", ".join(unicode_tags(500)), encoding="utf-8")
    picture(seed=4).save(folder / "long_caption.png")
    (folder / "long_caption.txt").write_text("1girl, hat, hatsune_miku, shirt, white_shirt", encoding="utf-8")
    (folder / "long_caption.caption").write_text("A girl. " * 5000, encoding="utf-8")


def errors_by_key(ws) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for row in ws.read_table("errors").to_pylist():
        found.setdefault(row["key"].rsplit("/", 1)[-1], set()).add(row["kind"])
    return found


def test_hostile_tags_and_texts_are_bounded_through_curate_and_caption(tmp_path):
    hostile_folder(tmp_path / "in")
    cfg = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', f'ingest.inputs=["{tmp_path / "in"}"]',
                             "caption.max_caption_chars=300", "ray.num_cpus=2"])
    ws = Workspace(str(tmp_path / "ws"))
    ingest.run(cfg, ws)

    assert ws.read_table("images").num_rows == 4  # nothing dropped for its tags or texts
    errors = errors_by_key(ws)
    assert errors["huge_tag"] == {"tag_too_long"}
    assert errors["many_tags"] == {"too_many_tags"}
    assert errors["long_caption"] == {"text_too_long"}
    tags = ws.read_table("source_tags").to_pylist()
    per_key: dict[str, list[str]] = {}
    for row in tags:
        per_key.setdefault(row["key"].rsplit("/", 1)[-1], []).append(row["tag"])
    assert per_key["huge_tag"] == ["1girl", "smile"]
    assert len(per_key["many_tags"]) == 1000 and per_key["many_tags"][-1] == "tag_999"
    assert len(per_key["unicode"]) == 500 and "unicode" not in errors
    assert max(len(t) for t in (r["tag"] for r in tags)) <= 200
    assert not ws.read_table("source_text").num_rows

    curate.run(cfg, ws)
    curated: dict[str, set[str]] = {}
    for row in ws.read_table("tags").to_pylist():
        curated.setdefault(row["key"].rsplit("/", 1)[-1], set()).add(row["tag"])
    # the substring rule still holds among tags that exist: shirt <- white_shirt, hat <- hatsune_miku
    assert curated["long_caption"] == {"1girl", "white_shirt", "hatsune_miku"}
    assert len(curated["many_tags"]) == 1000 - 99  # tag_1..tag_99 are substrings of longer ones: tag_1 <- tag_10
    assert len(curated["unicode"]) >= 400

    caption.run(cfg, ws)
    captions = ws.read_table("captions").to_pylist()
    assert captions and max(len(c["caption"]) for c in captions) <= 300
    refused = [e for e in ws.read_table("errors").to_pylist() if e["kind"] == "caption_too_long"]
    assert {e["key"].rsplit("/", 1)[-1] for e in refused} >= {"many_tags"}  # 1,000 tags make a long caption
    assert all("max_caption_chars 300" in e["message"] for e in refused)
