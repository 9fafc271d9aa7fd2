"""Benchmark: curate on synthetic Danbooru-shaped data at two sizes (N/4 and N), and its tag
step against a careful Python loop applying the same rules with every lookup precomputed.

    python bench/curate.py [--images 1000000] [--tags 30] [--crops 10000] [--sample 20000] [--quick]

Data: --images images with ~--tags source tags each, drawn with Danbooru's tag frequencies
(../shared/tagdata/danbooru_tags.csv when present, Zipf otherwise), 60% with a character tag,
a rating, 0-2 face detections, a random 64-bit phash (1% planted near copies), and CCIP vectors
for --crops person crops (random identities of ~50 crops; 768 floats each). A real set has about
one person crop per image; clustering at that scale is measured by bench/cluster.py.
Curate runs in a child process with its own local Ray (started outside the timing); the peak
memory is that of the Ray worker that ran curate's SQL (the job's summary says it). The loop
(PrecomputedPruning) must give the same tags in the same order as curate for its --sample
images; it runs on one core (CPU seconds), ours per core is images / tag-step seconds / cores.
Prints each step's seconds, the largest operators of one tag partition (DuckDB's profile), and ends with
    RESULT curate_tag_step_per_core_vs_precomputed_loop ratio=<ours per core / loop> goal=10
    RESULT curate_tag_step_4x_data_within_4.4x_time ratio=<4.4 / (tag step at N / at N/4)> goal=1
    RESULT curate_1M_within_60s[_projected_from_N] ratio=<60 s / total at 1M> goal=1
        (projected: the total but the clusters step, on the line through its values at N/4 and N,
        at 1M; plus the clusters step at N, which clusters the same --crops crops at any size.
        A line, not a scaling of the value at N: the job's fixed costs (a worker, lookups,
        publish) do not grow with the images. One run at 1M, with 250,000 at 1/4: 55.7 s
        measured; the line through 62,500 and 250,000 said 56.2 s, the scaling 68 s)
    RESULT curate_peak_memory_within_4GB ratio=<4096 MiB / peak RSS> goal=1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import result  # noqa: E402
from jobs import curate  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.ray_env import init_ray  # noqa: E402
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
                     "member_offset": pa.nulls(n, pa.int64()),
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


class PrecomputedPruning:
    """The baseline: curate's tag rules as a careful Python loop would apply them, every lookup
    (aliases, blacklist, impossible pairs, the implications of sql/020, character traits, count
    tags) computed once from the same tables curate builds, then one pass per image."""

    def __init__(self, con, drop_traits: bool) -> None:
        pairs = con.sql
        self.aliases = dict(pairs("select alias, tag from tag_aliases").fetchall())
        self.category = dict(pairs("select tag, category from tag_vocabulary").fetchall())
        self.blacklist = {t for (t,) in pairs("select tag from tag_blacklist").fetchall()}
        self.rules: dict[str, list[tuple[str, str]]] = {}
        for a, b, winner in pairs("select tag_a, tag_b, winner from impossible_tags").fetchall():
            self.rules.setdefault(a, []).append((b, winner))
        self.implies: dict[str, list[str]] = {}
        for tag, by in pairs("select tag, implied_by from tag_implications").fetchall():
            self.implies.setdefault(by, []).append(tag)
        self.traits = {t for (t,) in pairs("select tag from character_trait_tags").fetchall()} if drop_traits else set()
        self.counts = {t for (t,) in pairs("select tag from count_tags").fetchall()}

    def tags(self, rows: list[tuple[str, str, int]]) -> list[str]:
        """One image's curated tags in rank order, from its (tag, category, position) source rows."""
        seen: dict[str, tuple[str, int]] = {}
        for tag, category, position in sorted(rows, key=lambda r: r[2]):
            tag = self.aliases.get(tag, tag)
            if tag not in seen and tag not in self.blacklist:
                seen[tag] = (category if category != "general" else self.category.get(tag, "general"), position)
        losers = {b if winner in ("a", "score") else a  # source tags all score 1: a tie, and a wins ties
                  for a in seen for b, winner in self.rules.get(a, ()) if b in seen}
        kept = {t: v for t, v in seen.items() if t not in losers}
        general = {t for t, (c, _) in kept.items() if c == "general"}
        dropped = {t for u in general for t in self.implies.get(u, ()) if t in general}
        if self.traits and any(c == "character" for c, _ in kept.values()):
            dropped |= general & self.traits
        return sorted((t for t in kept if t not in dropped), key=lambda t: (
            0 if t == "solo" else 1 if t in self.counts else 2 if kept[t][0] == "character" else 3, kept[t][1], t))


def lookup_database(ws: Workspace, cfg: dict, folder: str):
    """A DuckDB database with curate's lookups and the tables sql/040 reads, as curate builds them."""
    opts = cfg["curate"]
    con = curate.open_database(Path(folder) / "lookups.duckdb", opts)
    curate.attach_inputs(con, ws)
    curate.load_lookups(con, {**opts, "tag_list": curate.tag_list_path(cfg)}, curate.ccip_spec(cfg))
    params = curate.sql_params(opts)
    for model in ("010_tag_vocabulary", "020_tag_implications", "030_character_trait_tags", "035_image_ids",
                  "037_category_ids"):
        curate.run_model(con, model, params)
    return con, {**params, **curate.category_params(con)}


def loop_rate(con, ws: Workspace, pruning: PrecomputedPruning, sample: int) -> float:
    """Images per second of the loop over the first `sample` images (one core), checked against
    what curate wrote for them: both sides must do the same work."""
    rows: dict[str, list] = {}
    for key, tag, category, position in con.sql(
            f"select key, tag, category, position from source_tags where key < 'bench/{sample:08d}'").fetchall():
        rows.setdefault(key, []).append((tag, category, position))
    started = time.process_time()
    ours = {key: pruning.tags(r) for key, r in rows.items()}
    seconds = time.process_time() - started
    theirs: dict[str, list[str]] = {}
    for key, tag in ws.connect().sql(f"select key, tag from tags where key < 'bench/{sample:08d}' "
                                     "order by key, rank").fetchall():
        theirs.setdefault(key, []).append(tag)
    differ = [k for k in rows if ours[k] != theirs.get(k, [])]
    assert not differ, f"the loop and curate disagree on {len(differ)} images, e.g. {differ[:1]}"
    return len(rows) / seconds


def tag_step_profile(con, ws: Workspace, params: dict, n_images: int, folder: str) -> list[str]:
    """Top operators by CPU time of the first tag partition (DuckDB's EXPLAIN ANALYZE profile),
    written as the job writes it (a Parquet part; removed after)."""
    partitions = max(1, -(-n_images // curate.IMAGES_PER_PARTITION))
    bounds = curate.partition_bounds(con, n_images, partitions, 0)
    out = Path(folder) / "profile.json"
    con.execute("pragma enable_profiling = 'json'")
    con.execute(f"pragma profiling_output = '{out}'")
    curate.write_model(con, ws, "040_tags", {**params, **bounds}, "bench-profile")
    con.execute("pragma disable_profiling")
    ws.delete_part("tags", "bench-profile")
    profile = json.loads(out.read_text())
    operators: list[tuple[float, str, int, str]] = []

    def walk(node: dict) -> None:
        info = node.get("extra_info", {})
        what = info.get("CTE Name") or info.get("Conditions") or info.get("Aggregates") or ""
        operators.append((node.get("timing", 0.0), node.get("type", "?"), node.get("intermediate_rows", 0), str(what)))
        for child in node.get("children", []):
            walk(child)

    for node in profile["operator"]:
        walk(node)
    total = sum(o[0] for o in operators)
    lines = [f"tag partition 1/{partitions} ({bounds['end_id'] - bounds['first_id']:,} images): "
             f"{total:.1f} s of operator CPU time; the largest:"]
    lines += [f"  {t:6.2f} s {100 * t / total:4.0f}%  {kind:<16} {rows:>11,} rows  {what[:80]}"
              for t, kind, rows, what in sorted(operators, key=lambda o: -o[0])[:8]]
    return lines


def curate_in_child(root: str, memory_limit: str) -> dict:
    """Run curate in a child process (its peak memory is then curate's alone); its step timings."""
    done = subprocess.run([sys.executable, __file__, "--child", root, "--memory-limit", memory_limit],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(root: str, memory_limit: str) -> None:
    ws = Workspace(root)
    cfg = bench_config(ws, memory_limit)
    init_ray(cfg)  # not part of the timing: a cluster is up before a job starts
    began = time.perf_counter()
    summary = curate.run(cfg, ws)
    steps = dict(s.rsplit(" ", 2)[:2] for s in summary.notes[0].removeprefix("steps: ").split(", "))
    peak = next(n for n in summary.notes if n.startswith("peak memory of the worker"))
    peak_mib = float(peak.rsplit(" ", 2)[1])  # the Ray worker's that ran curate's SQL
    print(json.dumps({"total": time.perf_counter() - began, "peak_mib": peak_mib,
                      **{k: float(v) for k, v in steps.items()}}))


def bench_config(ws: Workspace, memory_limit: str) -> dict:
    cfg = load_config(None, [f'workspace.path="{ws.root}"'])
    cfg["curate"]["memory_limit"] = memory_limit
    if (TAGDATA / "overlap_tags.json").is_file():
        cfg["curate"]["overlap_tags"] = str(TAGDATA / "overlap_tags.json")
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--tags", type=int, default=30)
    parser.add_argument("--crops", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=20_000, help="images the baseline loop prunes")
    parser.add_argument("--memory-limit", default="3GB", help="curate.memory_limit")
    parser.add_argument("--quick", action="store_true", help="250,000 images (about 2 minutes on 2 cores)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.memory_limit)
        return 0
    if args.quick:
        args.images = 250_000
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="booruset-bench-") as tmp:
        runs = {}
        for n in (args.images // 4, args.images):  # two sizes: cost must grow linearly
            ws = Workspace(f"{tmp}/ws{n}")
            began = time.perf_counter()
            origin = write_data(ws, n, args.tags, args.crops)
            print(f"data: {n:,} images, tag frequencies from {origin}, {args.crops:,} crops; "
                  f"written in {time.perf_counter() - began:.1f} s", flush=True)
            runs[n] = curate_in_child(str(ws.root), args.memory_limit)
            print(f"curate {n:,} images: " + ", ".join(f"{k} {v:.1f} s" for k, v in runs[n].items()
                                                        if k != "peak_mib"), flush=True)
        peak_mib = max(run["peak_mib"] for run in runs.values())
        cfg = bench_config(ws, args.memory_limit)
        con, params = lookup_database(ws, cfg, tmp)
        for line in tag_step_profile(con, ws, params, args.images, tmp):
            print(line)
        loop = loop_rate(con, ws, PrecomputedPruning(con, bool(cfg["curate"]["drop_character_traits"])), args.sample)
        con.close()
    small, big = runs[args.images // 4], runs[args.images]
    ours_per_core = args.images / big["tags"] / cores
    print(f"tag step: ours {args.images / big['tags']:,.0f} images/s on {cores} cores ({ours_per_core:,.0f} per core); "
          f"precomputed loop {loop:,.0f} images per CPU second, same output on {args.sample:,} images")
    print(f"4x the images: tag step {big['tags'] / small['tags']:.2f}x the time, "
          f"total {big['total'] / small['total']:.2f}x; "
          f"peak RSS of curate {peak_mib:,.0f} MiB (memory_limit {args.memory_limit})")
    # the clusters step clusters the same --crops crops at both sizes, as a 1M run of this bench
    # would: it is not scaled with the images
    small_n, big_n = args.images // 4, args.images
    slope = ((big["total"] - big["clusters"]) - (small["total"] - small["clusters"])) / (big_n - small_n)
    projected = big["total"] + slope * (1_000_000 - big_n)  # the clusters step as measured at N
    if args.images != 1_000_000:
        print(f"1M projected: {projected:.1f} s (the line through the totals but clusters at "
              f"{small_n:,} and {big_n:,} images: {slope * 1e6:.1f} s per million images)")
    print(result("curate_tag_step_per_core_vs_precomputed_loop", ours_per_core / loop, 10))
    # the tag step, not the total: the clusters step clusters --crops crops at both sizes
    print(result("curate_tag_step_4x_data_within_4.4x_time", 4.4 / (big["tags"] / small["tags"]), 1))
    print(result("curate_1M_within_60s" + ("" if args.images == 1_000_000 else f"_projected_from_{args.images}"),
                 60 / projected, 1))
    print(result("curate_peak_memory_within_4GB", 4096 / peak_mib, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
