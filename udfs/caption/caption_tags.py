"""Captions back to tags: for images that have a caption or SD prompt but no tags.

Candidates are the known tags whose words occur in the text (n-grams up to MAX_WORDS, SD
prompt syntax such as "(blue hair:1.2)" and underscores read as plain words); they are ranked
KeyBERT-style by the cosine similarity of each tag's embedding to the whole text's, and the
top ones go to source_tags with origin "caption".
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from store.staging import read_unit_rows
from store.workspace import Workspace
from udfs.caption.caption_scoring import SentenceEncoder

SQL = Path(__file__).resolve().parents[2] / "sql"
MAX_WORDS = 4
WORD = re.compile(r"[a-z0-9][a-z0-9'!\-]*")
PART = "caption-text-tags"
OWNER = "caption:tags_from_text"  # its published source_tags part
DANBOORU_CATEGORIES = {"0": "general", "1": "artist", "3": "copyright", "4": "character", "5": "meta"}


def phrase_of(tag: str) -> str:
    return " ".join(WORD.findall(tag.replace("_", " ").lower()))


def text_words(text: str) -> list[str]:
    text = re.sub(r":\s*-?\d+(\.\d+)?", " ", text.lower())  # prompt weights "(x:1.2)"
    return WORD.findall(text.replace("_", " "))


def candidates(text: str, phrases: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """Known tags whose phrase occurs in the text: longer phrases first, then by position."""
    words = text_words(text)
    found: dict[str, tuple[str, str]] = {}
    for n in range(MAX_WORDS, 0, -1):
        for i in range(len(words) - n + 1):
            hit = phrases.get(" ".join(words[i:i + n]))
            if hit and hit[0] not in found:
                found[hit[0]] = hit
    return list(found.values())


class TextTagger:
    """map_batches class over staged units ({"index", "path"}): rank the candidate tags of each
    text of the unit by embedding similarity and write them as the unit's source_tags part."""

    def __init__(self, workspace: str, part_prefix: str, vocabulary: list[tuple[str, str]], top_k: int,
                 min_similarity: float, model: str = "") -> None:
        self.ws, self.part_prefix = Workspace(workspace, create=False), part_prefix
        self.phrases = tag_phrases(vocabulary)
        self.encoder = SentenceEncoder(model)
        self.top_k, self.min_similarity = top_k, min_similarity

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"part": [], "rows": [], "texts": []}
        for index, path in zip(batch["index"], batch["path"], strict=True):
            texts = read_unit_rows(self.ws, path)
            found = pa.table(self.tag_texts(texts))
            part = f"{self.part_prefix}{int(index)}"
            self.ws.write_part("source_tags", part, found)
            out["part"].append(part)
            out["rows"].append(found.num_rows)
            out["texts"].append(texts.num_rows)
        return out

    def tag_texts(self, batch: pa.Table) -> dict[str, list]:
        """source_tags rows (origin caption) for the (key, text) rows of `batch`."""
        out: dict[str, list] = {"key": [], "tag": [], "category": [], "origin": [], "position": []}
        texts = batch["text"].to_pylist()
        found = [candidates(t, self.phrases) for t in texts]
        flat = [phrase_of(tag) for hits in found for tag, _ in hits]
        vectors = self.encoder.encode(texts + flat) if flat else np.zeros((len(texts), 1))
        text_vectors, tag_vectors = vectors[: len(texts)], vectors[len(texts):]
        at = 0
        for key, text_vector, hits in zip(batch["key"].to_pylist(), text_vectors, found, strict=True):
            sims = tag_vectors[at:at + len(hits)] @ text_vector
            at += len(hits)
            order = [j for j in np.argsort(-sims, kind="stable") if sims[j] >= self.min_similarity][: self.top_k]
            for position, j in enumerate(order):
                out["key"].append(key)
                out["tag"].append(hits[j][0])
                out["category"].append(hits[j][1])
                out["origin"].append("caption")
                out["position"].append(position)
        return out


def tag_phrases(vocabulary: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """phrase -> (tag, category) of the tags a text may name (not meta, rating or artist tags)."""
    phrases: dict[str, tuple[str, str]] = {}
    for tag, category in vocabulary:
        phrase = phrase_of(tag)
        if phrase and category not in ("meta", "rating", "artist"):
            phrases.setdefault(phrase, (tag, category))
    return phrases


def unit_candidates_digests(ws: Workspace, paths: list[str], vocabulary: list[tuple[str, str]]) -> list[str]:
    """A digest of the candidate tags of each text of each staged unit (TextTagger's only use of
    the vocabulary): a tag added to the dataset changes the units whose texts name it, no other.
    Runs in a Ray task (run_in_worker): it reads every staged text."""
    phrases = tag_phrases(vocabulary)
    digests = []
    for path in paths:
        texts = read_unit_rows(ws, path)["text"].to_pylist()
        found = json.dumps([candidates(t, phrases) for t in texts])
        digests.append(hashlib.sha1(found.encode()).hexdigest())
    return digests


def dataset_vocabulary(ws: Workspace) -> list[tuple[str, str]]:
    """The dataset's own tags and categories (sql/caption_tag_vocabulary.sql): a scan of the tag
    tables, so the job runs it in a Ray task (run_in_worker), not in the driver."""
    con = ws.connect()
    try:
        return [(t, c) for t, c in con.sql(_sql("caption_tag_vocabulary.sql")).fetchall()]
    finally:
        con.close()


def csv_vocabulary(path: str) -> list[tuple[str, str]]:
    """Known tags of a Danbooru tag CSV (name,category,count,aliases); [] without one."""
    vocabulary: list[tuple[str, str]] = []
    if path:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if row and not row[0].startswith("#"):
                    vocabulary.append((row[0], DANBOORU_CATEGORIES.get(row[1] if len(row) > 1 else "0", "general")))
    return vocabulary


def _sql(name: str) -> str:
    return (SQL / name).read_text(encoding="utf-8")
