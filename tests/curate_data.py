"""Hand-written workspace tables for the curate tests (published through Workspace.add_part)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jobs.config import load_config
from schemas import CCIP_DIM
from store.workspace import Workspace


def curate_config(ws: Workspace, **options) -> dict:
    cfg = load_config(None, [f'workspace.path="{ws.root}"'])
    cfg["curate"].update({"threads": 2, "memory_limit": "1GB", "min_images_per_combination": 1})
    cfg["curate"].update(options)
    return cfg


def image_rows(keys: list[str], width: int = 1000, height: int = 1000, phash: int | None = None) -> list[dict]:
    return [{"key": k, "source": "test", "member": f"{k}.png", "width": width, "height": height, "format": "PNG",
             "mode": "RGB", "n_frames": 1, "bytes": 1000, "sha256": k, "phash": phash} for k in keys]


def source_rows(key: str, tags: list[str], category: str = "general") -> list[dict]:
    return [{"key": key, "tag": t, "category": category, "origin": "txt", "position": i} for i, t in enumerate(tags)]


def score_rows(key: str, scores: dict[str, float], category: str = "general") -> list[dict]:
    return [{"key": key, "tag": t, "category": category, "score": s, "model": "wd"} for t, s in scores.items()]


def face_row(key: str, x0: float, y0: float, x1: float, y1: float, score: float = 0.9, label: str = "face") -> dict:
    return {"key": key, "model": "det", "label": label, "score": score, "x0": x0, "y0": y0, "x1": x1, "y1": y1}


def embedding_row(key: str, vector: np.ndarray, crop: int = -1) -> dict:
    return {"key": key, "crop": crop, "model": "ccip", "x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0,
            "vector": vector.astype(np.float32).tolist()}


def embedding_table(keys, crops, vectors: np.ndarray) -> pa.Table:
    """Embeddings rows as an Arrow table (boxes 0,0-1,1): many rows at once, unlike embedding_row."""
    n = len(keys)
    return pa.table({"key": keys, "crop": pa.array(crops, pa.int32()), "model": ["ccip"] * n,
                     **{side: pa.array(np.full(n, float(side[1])), pa.float32()) for side in ("x0", "y0", "x1", "y1")},
                     "vector": pa.FixedSizeListArray.from_arrays(
                         pa.array(np.asarray(vectors, np.float32).reshape(-1)), CCIP_DIM)})


def unit_vector(rng: np.random.Generator, near: np.ndarray | None = None, noise: float = 0.0) -> np.ndarray:
    v = rng.standard_normal(CCIP_DIM) if near is None else near + noise * rng.standard_normal(CCIP_DIM)
    return v / np.linalg.norm(v)


def tags_of(ws: Workspace) -> dict[str, list[str]]:
    """{key: tags in rank order} of the curated tags table."""
    rows = sorted(ws.read_table("tags").to_pylist(), key=lambda r: (r["key"], r["rank"]))
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["key"], []).append(r["tag"])
    return out
