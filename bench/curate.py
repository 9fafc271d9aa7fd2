"""Benchmark: every curate step on synthetic Danbooru-shaped data, and tag pruning against a
Python loop doing imgutils-style per-image pruning (the baseline), in the same run.

    python bench/curate.py [--images 1000000] [--tags 30] [--crops 50000] [--sample 20000]

Data: --images images with ~--tags source tags each, drawn with Danbooru's tag frequencies
(../shared/tagdata/danbooru_tags.csv when present, Zipf otherwise), 60% with a character tag,
a rating, 1-2 face detections, a random 64-bit phash (1% planted near copies), and CCIP vectors
for --crops person crops (random identities of ~50 crops; 768 floats each, so fewer than one per image).
Prints seconds per step, rows, peak memory, and images/s of our tag pruning vs the baseline.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs import curate  # noqa: E402
from jobs.config import load_config  # noqa: E402
from schemas import CCIP_DIM  # noqa: E402
from store.workspace import Workspace  # noqa: E402

TAGDATA = REPO.parent / "shared" / "tagdata"
CHUNK = 100_000


def tag_pool(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(general tags, their probabilities, character tags, where they came from)."""
    path = TAGDATA / "danbooru_tags.csv"
    if path.is_file():
        general, counts, characters = [], [], []
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if row[1] == "0":
                    general.append(row[0])
                    counts.append(int(row[2]))
                elif row[1] == "4":
                    characters.append(row[0])
        weights = np.array(counts, dtype=np.float64)
        return np.array(general), weights / weights.sum(), np.array(characters[:20000]), str(path)
    general = np.array([f"tag_{i}" for i in range(50_000)])
    weights = 1.0 / np.arange(1, len(general) + 1) ** 1.1
    return general, weights / weights.sum(), np.array([f"character_{i}" for i in range(5000)]), "Zipf (no ../shared)"


def write_data(ws: Workspace, n_images: int, n_tags: int, n_crops: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    general, probs, characters, origin = tag_pool(rng)
    for start in range(0, n_images, CHUNK):
        n = min(CHUNK, n_images - start)
        keys = np.array([f"bench/{i:08d}" for i in range(start, start + n)])
        ws.add_part("images", f"b{start}", images_chunk(rng, keys))
        ws.add_part("source_tags", f"b{start}", tags_chunk(rng, keys, general, probs, characters, n_tags))
        ws.add_part("detections", f"b{start}", faces_chunk(rng, keys))
    ws.add_part("embeddings", "b", crops(rng, n_images, n_crops))
    return origin


def images_chunk(rng, keys) -> pa.Table:
    n = len(keys)
    phash = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    copies = rng.random(n) < 0.01
    phash[1:][copies[1:]] = phash[:-1][copies[1:]] ^ np.uint64(1 << 5)  # near copy of the previous image
    return pa.table({"key": keys, "source": pa.array(["bench"] * n), "member": keys,
                     "width": pa.array(rng.integers(512, 4096, n), pa.int32()),
                     "height": pa.array(rng.integers(512, 4096, n), pa.int32()),
                     "format": pa.array(["JPEG"] * n), "mode": pa.array(["RGB"] * n),
                     "n_frames": pa.array(np.ones(n), pa.int32()), "bytes": pa.array(rng.integers(1e5, 5e6, n)),
                     "sha256": keys, "phash": pa.array(phash, pa.uint64()),
                     "orientation": pa.array(np.ones(n), pa.int32()),
                     "detail": pa.array(rng.uniform(20, 80, n), pa.float32()),  # detailed art: pHash applies
                     "colour": pa.array(rng.integers(0, 2**48, n, dtype=np.uint64), pa.uint64()),
                     # still images: no clip, frame, frame time or slice
                     "clip": pa.nulls(n, pa.string()), "frame": pa.nulls(n, pa.int32()),
                     "frame_time": pa.nulls(n, pa.float64()), "slice": pa.nulls(n, pa.int32())})


def tags_chunk(rng, keys, general, probs, characters, n_tags) -> pa.Table:
    n = len(keys)
    per_image = np.clip(rng.poisson(n_tags - 2, n), 5, 80)
    total = int(per_image.sum())
    tags = general[rng.choice(len(general), total, p=probs)]
    owner = np.repeat(keys, per_image)
    position = np.concatenate([np.arange(k) for k in per_image])
    named = rng.random(n) < 0.6
    char_keys = keys[named]
    char_tags = characters[rng.integers(0, len(characters), len(char_keys))]
    ratings = np.array(["general", "sensitive", "questionable", "explicit"])[rng.integers(0, 4, n)]
    return pa.table({
        "key": np.concatenate([owner, char_keys, keys]),
        "tag": np.concatenate([tags, char_tags, ratings]),
        "category": np.concatenate([np.full(total, "general"), np.full(len(char_keys), "character"),
                                    np.full(n, "rating")]),
        "origin": pa.array(["danbooru_json"] * (total + len(char_keys) + n)),
        "position": pa.array(np.concatenate([position, np.zeros(len(char_keys) + n, int)]), pa.int32()),
    })


def faces_chunk(rng, keys) -> pa.Table:
    n_faces = rng.integers(0, 3, len(keys))
    owner = np.repeat(keys, n_faces)
    m = len(owner)
    x0, y0 = rng.random(m) * 0.7, rng.random(m) * 0.7
    size = rng.random(m) * 0.3 + 0.02
    return pa.table({"key": owner, "model": pa.array(["face_yolo"] * m), "index": pa.array(np.zeros(m), pa.int32()),
                     "label": pa.array(["face"] * m),
                     "score": pa.array(rng.random(m), pa.float32()), "x0": pa.array(x0, pa.float32()),
                     "y0": pa.array(y0, pa.float32()), "x1": pa.array(x0 + size, pa.float32()),
                     "y1": pa.array(y0 + size * rng.uniform(0.8, 1.3, m), pa.float32())})


def crops(rng, n_images, n_crops) -> pa.Table:
    identities = rng.standard_normal((max(1, n_crops // 50), CCIP_DIM)).astype(np.float32)
    who = rng.integers(0, len(identities), n_crops)
    vectors = identities[who] + 0.3 * rng.standard_normal((n_crops, CCIP_DIM)).astype(np.float32)
    keys = np.array([f"bench/{i:08d}" for i in rng.choice(n_images, n_crops, replace=False)])
    flat = pa.array(vectors.reshape(-1))
    return pa.table({"key": keys, "crop": pa.array(np.zeros(n_crops), pa.int32()),
                     "model": pa.array(["ccip"] * n_crops), "x0": pa.array(np.zeros(n_crops), pa.float32()),
                     "y0": pa.array(np.zeros(n_crops), pa.float32()), "x1": pa.array(np.ones(n_crops), pa.float32()),
                     "y1": pa.array(np.ones(n_crops), pa.float32()),
                     "vector": pa.FixedSizeListArray.from_arrays(flat, CCIP_DIM)})


def baseline_pruning(ws: Workspace, opts: dict, sample: int) -> tuple[float, int]:
    """imgutils-style per-image pruning in a Python loop: seconds for `sample` images."""
    from imgutils.tagging import overlap as imgutils_overlap

    from udfs.curate import tag_rules

    overlap_path = opts["overlap_tags"]
    data = json.loads(Path(overlap_path).read_text(encoding="utf-8")) if overlap_path else {}
    imgutils_overlap._get_overlap_tags = lambda: data  # the Hub copy of the same data
    blacklist = set(tag_rules.blacklist(opts["blacklist"])["tag"].to_pylist())
    impossible = tag_rules.impossible(opts["rules_dir"]).to_pylist()
    con = ws.connect()
    rows = con.sql(f"select key, list(tag order by position) as tags from source_tags "
                   f"where key < 'bench/{sample:08d}' group by key").fetchall()
    started = time.perf_counter()
    for _key, tags in rows:
        tags = [t for t in dict.fromkeys(tags) if t not in blacklist]
        present = set(tags)
        losers = {r["tag_b"] if r["winner"] != "b" else r["tag_a"] for r in impossible
                  if r["tag_a"] in present and r["tag_b"] in present}
        tags = imgutils_overlap.drop_overlap_tags([t for t in tags if t not in losers])
    return time.perf_counter() - started, len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--tags", type=int, default=30)
    parser.add_argument("--crops", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--memory-limit", default="6GB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="booruset-bench-") as tmp:
        ws = Workspace(f"{tmp}/ws")
        began = time.perf_counter()
        origin = write_data(ws, args.images, args.tags, args.crops)
        print(f"data: {args.images:,} images, tag frequencies from {origin}, {args.crops:,} crops; "
              f"written in {time.perf_counter() - began:.1f} s", flush=True)
        cfg = load_config(None, [f'workspace.path="{ws.root}"'])
        opts = cfg["curate"]
        opts["memory_limit"] = args.memory_limit
        if (TAGDATA / "overlap_tags.json").is_file():
            opts["overlap_tags"] = str(TAGDATA / "overlap_tags.json")
        began = time.perf_counter()
        summary = curate.run(cfg, ws)
        total = time.perf_counter() - began
        summary.print()
        base_seconds, base_images = baseline_pruning(ws, opts, args.sample)
    tag_step = float(summary.notes[0].split("tags ")[1].split(" s")[0])
    ours = args.images / tag_step
    baseline = base_images / base_seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"curate total: {total:.1f} s for {args.images:,} images (aim: 120 s on 2 cores); peak RSS {peak:,.0f} MiB")
    print(f"tag pruning: ours {ours:,.0f} images/s (SQL, all {args.images:,}); baseline {baseline:,.0f} images/s "
          f"(Python loop with imgutils drop_overlap_tags, {base_images:,} images); ratio {ours / baseline:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
