"""Captions back to tags: for images that have a caption or SD prompt but no tags.

Candidates are the known tags whose words occur in the text (n-grams up to MAX_WORDS, SD
prompt syntax such as "(blue hair:1.2)" and underscores read as plain words); they are ranked
KeyBERT-style by the cosine similarity of each tag's embedding to the whole text's, and the
top ones go to source_tags with origin "caption".
"""

from __future__ import annotations

import csv
import re
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from jobs.config import Config
from store.workspace import Workspace
from udfs.caption.caption_scoring import SentenceEncoder

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
    """map_batches class: rank the candidate tags of each text by embedding similarity."""

    def __init__(self, vocabulary: list[tuple[str, str]], top_k: int, min_similarity: float, model: str = "") -> None:
        self.phrases = {}
        for tag, category in vocabulary:
            phrase = phrase_of(tag)
            if phrase and category not in ("meta", "rating", "artist"):
                self.phrases.setdefault(phrase, (tag, category))
        self.encoder = SentenceEncoder(model)
        self.top_k, self.min_similarity = top_k, min_similarity

    def __call__(self, batch: pa.Table) -> dict[str, list]:
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


def load_vocabulary(ws: Workspace, path: str) -> list[tuple[str, str]]:
    """Known tags: a Danbooru tag CSV (name,category,count,aliases) when given, plus the dataset's own."""
    vocabulary: list[tuple[str, str]] = []
    if path:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if row and not row[0].startswith("#"):
                    vocabulary.append((row[0], DANBOORU_CATEGORIES.get(row[1] if len(row) > 1 else "0", "general")))
    con = ws.connect()
    try:
        seen = con.sql(_sql("caption_tag_vocabulary.sql")).fetchall()
    finally:
        con.close()
    return [(t, c) for t, c in seen] + vocabulary


def tags_from_text(cfg: Config, ws: Workspace) -> int:
    """Derive source_tags (origin caption) for untagged images with text; returns rows written."""
    opts: dict[str, Any] = cfg["caption"]
    con = ws.connect()
    try:
        texts = con.sql(_sql("caption_text_images.sql")).to_arrow_table()
    finally:
        con.close()
    if texts.num_rows == 0:
        ws.publish({OWNER: {}})
        return 0
    from jobs.ray_env import Progress, init_ray

    init_ray(cfg)
    vocabulary = load_vocabulary(ws, opts["tag_vocabulary"])
    ds = ray.data.from_arrow(texts).map_batches(
        TextTagger, batch_format="pyarrow", batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=max(1, int(opts["concurrency"]))), num_cpus=float(opts["num_cpus"]),
        fn_constructor_kwargs={"vocabulary": vocabulary, "top_k": int(opts["text_tags_top_k"]),
                               "min_similarity": float(opts["text_tags_min_similarity"]),
                               "model": opts["embedding_model"]})
    # the rows found are written by tasks, a part per batch; the driver gets part names and counts
    ds = ds.map_batches(write_text_tags, batch_format="pyarrow", fn_kwargs={"workspace": ws.root})
    parts, written = [], 0
    with Progress("caption (tags from text)", texts.num_rows, what="texts") as progress:
        for row in ds.iter_rows():
            parts.append(row["part"])
            written += row["rows"]
        progress.add(texts.num_rows)
    ws.publish({OWNER: {"source_tags": parts}})  # the whole result replaces the last run's at once
    return written


def write_text_tags(batch: pa.Table, workspace: str) -> dict[str, list]:
    """map_batches UDF (task): one batch of found tags as a new source_tags part; its name and rows."""
    if batch.num_rows == 0:
        return {"part": [], "rows": []}
    part = f"{PART}-{uuid.uuid4().hex[:16]}"  # named by no generation until the job publishes it
    Workspace(workspace).write_part("source_tags", part, batch)
    return {"part": [part], "rows": [batch.num_rows]}


def _sql(name: str) -> str:
    from jobs.config import REPO

    return (REPO / "sql" / name).read_text(encoding="utf-8")
