"""curate, steps 3 and 4: near duplicates (phash, embeddings) and CCIP identity clusters."""

from __future__ import annotations

import datetime
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_data import curate_config, embedding_row, embedding_table, image_rows, source_rows, unit_vector

from jobs import curate
from schemas import CCIP_DIM


# ---- duplicates -------------------------------------------------------------------------------
def test_phash_groups_within_distance_and_representative(workspace):
    base = 0x0123_4567_89AB_CDEF
    flips = {"a": 0, "b": (1 << 0) | (1 << 13) | (1 << 26) | (1 << 39),  # 4 bits, one in each of 4 bands
             "c": (1 << 63) | (1 << 50) | (1 << 51),  # 3 bits
             "far": (1 << 1) | (1 << 14) | (1 << 27) | (1 << 40) | (1 << 53)}  # 5 bits, one per band
    rows = []
    for key, flip in flips.items():
        rows += image_rows([key], width=2000 if key == "c" else 1000, phash=base ^ flip)
    rows += image_rows(["other"], phash=~base & (2**64 - 1))
    workspace.add_part("images", "p", rows)
    curate.run(curate_config(workspace, phash_distance=4), workspace)
    dups = {r["key"]: r for r in workspace.read_table("duplicates").to_pylist()}
    assert set(dups) == {"a", "b", "c"}  # far is 5 bits from a (and further from b, c)
    assert {r["dup_group"] for r in dups.values()} == {"c"}  # the largest image
    assert dups["c"]["is_representative"] and not dups["a"]["is_representative"]
    assert {r["reason"] for r in dups.values()} == {"phash"}


@pytest.mark.parametrize("distance", [2, 4, 7])  # probe radius 0, 1, 2
def test_phash_pairs_match_brute_force(workspace, distance):
    rng = np.random.default_rng(5)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64) | (rng.integers(0, 2, 300, dtype=np.uint64) << np.uint64(63))
    for i in range(0, 300, 10):  # plant near copies with 1 to 9 flipped bits
        hashes[i + 1] = hashes[i]
        for bit in rng.choice(64, 1 + (i // 10) % 9, replace=False):
            hashes[i + 1] ^= np.uint64(1 << int(bit))
    keys = [f"k{i:03d}" for i in range(300)]
    workspace.add_part("images", "p", [r for k, h in zip(keys, hashes, strict=True)
                                         for r in image_rows([k], phash=int(h))])
    curate.run(curate_config(workspace, phash_distance=distance), workspace)
    got = {r["key"] for r in workspace.read_table("duplicates").to_pylist()}
    expected = set()
    for i in range(300):
        for j in range(i + 1, 300):
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= distance:
                expected |= {keys[i], keys[j]}
    assert got == expected and len(expected) >= 6


def test_copies_with_one_phash_are_one_group_through_linear_edges(workspace):
    """Thousands of copies of one picture with one pHash (re-encoded, other bytes) are one group,
    from a star of edges: every pair of them made 2,000 copies 2M pairs (4,000: two minutes, 2.5 GB)."""
    base = 0x0123_4567_89AB_CDEF
    copies = [f"copy{i:04d}" for i in range(2000)]
    rows = image_rows(copies, phash=base) + image_rows(["near"], phash=base ^ 0b101)
    rows += image_rows(["far"], phash=base ^ 0xFFFF_0000_0000_FFFF)
    workspace.add_part("images", "p", [{**r, "detail": 30.0} for r in rows])
    con = duckdb.connect()
    con.register("images", workspace.read_table("images"))
    curate.run_model(con, "060_phash_pairs", curate.sql_params(curate_config(workspace)["curate"]))
    assert con.execute("select count(*) from phash_pairs").fetchone()[0] <= len(copies)
    curate.run(curate_config(workspace), workspace)
    dups = workspace.read_table("duplicates").to_pylist()
    assert {r["key"] for r in dups} == {*copies, "near"} and {r["dup_group"] for r in dups} == {"copy0000"}
    assert {r["reason"] for r in dups} == {"phash"}


def test_an_excluded_image_is_not_its_groups_representative(workspace):
    """The export leaves out an excluded image and every member of its duplicate group but the
    representative: a person who excluded the largest copy lost every copy of the picture."""
    rows = image_rows(["big", "small_a", "small_b"], phash=0x0123_4567_89AB_CDEF)
    rows[0]["width"] = 2000
    workspace.add_part("images", "p", [{**r, "sha256": "same bytes"} for r in rows])
    now = datetime.datetime.now(datetime.UTC)
    workspace.add_part("edits", "e", [{"key": "big", "field": "exclude", "old": None, "new": "true", "time": now,
                                       "seq": 0, "batch": "b"}])
    curate.run(curate_config(workspace), workspace)
    dups = {r["key"]: r for r in workspace.read_table("duplicates").to_pylist()}
    assert set(dups) == {"big", "small_a", "small_b"} and {r["dup_group"] for r in dups.values()} == {"small_a"}
    assert [k for k, r in dups.items() if r["is_representative"]] == ["small_a"]
    balance = {r["key"]: r["repeats"] for r in workspace.read_table("balance").to_pylist()}
    assert set(balance) == {"small_a", "small_b"}


def test_embedding_duplicates(workspace):
    rng = np.random.default_rng(1)
    a = unit_vector(rng)
    vectors = {"orig": a, "copy": unit_vector(rng, a, 0.002), "other": unit_vector(rng)}
    workspace.add_part("images", "p", image_rows(list(vectors)))
    workspace.add_part("embeddings", "p", [embedding_row(k, v) for k, v in vectors.items()])
    curate.run(curate_config(workspace), workspace)
    dups = {r["key"]: r for r in workspace.read_table("duplicates").to_pylist()}
    assert set(dups) == {"orig", "copy"} and dups["orig"]["reason"] == "embedding"
    assert dups["copy"]["dup_group"] == "copy"  # same size: the first key


def test_broken_and_zero_embeddings_are_no_ones_duplicates(workspace):
    # DuckDB's `NaN >= 0.96` is true: the old SQL paired every NaN vector, and two zero vectors
    # (a cosine of NaN), with the images it was compared with, and dropped them as duplicates
    rng = np.random.default_rng(2)
    a = unit_vector(rng)
    vectors = {"orig": a, "copy": unit_vector(rng, a, 0.002), "other": unit_vector(rng),
               "nan_1": np.full(CCIP_DIM, np.nan), "nan_2": np.full(CCIP_DIM, np.nan),
               "zero_1": np.zeros(CCIP_DIM), "zero_2": np.zeros(CCIP_DIM)}
    workspace.add_part("images", "p", image_rows(list(vectors)))
    workspace.add_part("embeddings", "p", [embedding_row(k, v) for k, v in vectors.items()])
    curate.run(curate_config(workspace), workspace)
    assert {r["key"] for r in workspace.read_table("duplicates").to_pylist()} == {"orig", "copy"}



def test_embedding_similarity_1_pairs_every_image_with_an_identical_embedding(workspace):
    """embedding_similarity = 1 (the top of its range: equal embeddings only) found 12 of 40 images
    that share their vector with another: float32 rounding gives a vector's cosine with itself as
    0.9999995 as often as 1."""
    rng = np.random.default_rng(9)
    vectors = [unit_vector(rng) * 3.7 for _ in range(20)]
    keys = [f"k{i:02d}" for i in range(40)]
    workspace.add_part("images", "p", image_rows(keys))
    workspace.add_part("embeddings", "p", [embedding_row(k, vectors[i % 20]) for i, k in enumerate(keys)])
    curate.run(curate_config(workspace, embedding_similarity=1.0), workspace)
    dups = workspace.read_table("duplicates").to_pylist()
    assert len(dups) == 40 and len({r["dup_group"] for r in dups}) == 20


def test_annotations_of_images_an_ingest_removed_are_left_out(workspace):
    """Between an ingest that removed files and the next annotate, annotate's rows of those
    files are still there: curate put the removed keys into duplicates and clusters."""
    rng = np.random.default_rng(3)
    a = unit_vector(rng)
    workspace.add_part("images", "p", image_rows(["kept"]))
    workspace.add_part("embeddings", "p", [embedding_row("kept", a), embedding_row("gone", unit_vector(rng, a, 0.002)),
                                           embedding_row("gone_too", unit_vector(rng), crop=0)])
    curate.run(curate_config(workspace), workspace)
    assert workspace.read_table("duplicates").num_rows == 0
    assert {r["key"] for r in workspace.read_table("clusters").to_pylist()} == {"kept"}

# ---- clusters ---------------------------------------------------------------------------------
def _identities(rng, n_ids=3, per_id=10, noise=4, spread=0.25):
    centres = [unit_vector(rng) for _ in range(n_ids)]
    vectors, truth = [], []
    for i, c in enumerate(centres):
        for _ in range(per_id):
            vectors.append(unit_vector(rng, c, spread / np.sqrt(CCIP_DIM)))
            truth.append(i)
    for _ in range(noise):
        vectors.append(unit_vector(rng))
        truth.append(-1)
    return np.stack(vectors).astype(np.float32), np.array(truth)


def _write_crops(ws, vectors, characters=None):
    keys = [f"img{i:03d}" for i in range(len(vectors))]
    ws.add_part("images", "p", image_rows(keys))
    ws.add_part("embeddings", "p", [embedding_row(k, v, crop=0) for k, v in zip(keys, vectors, strict=True)])
    if characters:
        ws.add_part("source_tags", "p", [r for k, c in zip(keys, characters, strict=True) if c
                                           for r in source_rows(k, [c], "character")])
    return keys


def _metric_model(path, scale: float = 1.0) -> str:
    """A tiny ONNX model with CCIP's model_metrics contract (input [N,768] -> output [N,N]):
    1 - cosine similarity (times `scale`). Stand-in for the real metric model, which is on the Hub only."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["input", "input"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes"], ["sumsq"], keepdims=1),
        helper.make_node("Sqrt", ["sumsq"], ["norm"]),
        helper.make_node("Div", ["input", "norm"], ["unit"]),
        helper.make_node("Transpose", ["unit"], ["unit_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["unit", "unit_t"], ["sim"]),
        helper.make_node("Sub", ["one", "sim"], ["difference"]),
        helper.make_node("Mul", ["difference", "scale"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "ccip_metrics",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CCIP_DIM])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "N"])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
         helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
         helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


def _clusters(ws) -> dict[str, int]:
    return {r["key"]: r["cluster"] for r in ws.read_table("clusters").to_pylist()}


def _same_partition(a: list[int], b: list[int]) -> bool:
    """Labels equal up to renaming (noise -1 must stay noise)."""
    mapping: dict[int, int] = {}
    for x, y in zip(a, b, strict=True):
        if (x == -1) != (y == -1) or mapping.setdefault(x, y) != y:
            return False
    return len(set(mapping.values())) == len(mapping)


@pytest.mark.parametrize(("method", "eps", "min_samples"), [("dbscan", 0.1, 3), ("optics", 0.5, 5)])
def test_clusters_match_imgutils_ccip_clustering(workspace, tmp_path, monkeypatch, method, eps, min_samples):
    import onnxruntime
    from imgutils.metrics import ccip as imgutils_ccip

    vectors, _ = _identities(np.random.default_rng(2))
    model = _metric_model(tmp_path / "model_metrics.onnx")
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    monkeypatch.setattr(imgutils_ccip, "_open_metric_model", lambda _name: session)
    # the defaults live on the Hub; explicit eps / min_samples make them unused anyway
    monkeypatch.setattr(imgutils_ccip, "ccip_default_clustering_params", lambda *_a, **_k: (eps, min_samples))
    expected = imgutils_ccip.ccip_clustering(list(vectors), method=method, eps=eps, min_samples=min_samples)
    keys = _write_crops(workspace, vectors)
    for metric_model in (model, ""):  # the metric model, then the built-in 1 - cosine
        curate.run(curate_config(workspace, cluster_method=method, cluster_eps=eps, cluster_min_samples=min_samples,
                                 ccip_metric_model=metric_model), workspace)
        got = _clusters(workspace)
        assert _same_partition([got[k] for k in keys], list(expected)), metric_model
    assert len(set(expected) - {-1}) == 3


def test_a_new_metric_model_at_the_same_path_clusters_again(workspace, tmp_path):
    """curate.ccip_metric_model names a local ONNX file: one replaced at that path (a newer
    metric) left the clusters of the old one, curate saying nothing it reads had changed."""
    vectors, _ = _identities(np.random.default_rng(2))
    _write_crops(workspace, vectors)
    model = _metric_model(tmp_path / "model_metrics.onnx")
    cfg = curate_config(workspace, cluster_method="dbscan", cluster_eps=0.1, cluster_min_samples=3,
                        ccip_metric_model=model)
    curate.run(cfg, workspace)
    first = _clusters(workspace)
    assert curate.run(cfg, workspace).units_skipped == 1
    _metric_model(tmp_path / "model_metrics.onnx", scale=100.0)  # every crop far from every other
    assert curate.run(cfg, workspace).units_done == 1
    again = _clusters(workspace)
    assert set(again.values()) == {-1} and again != first


@pytest.mark.parametrize(("options", "message"), [
    ({"cluster_min_samples": 1}, "cluster_min_samples must be at least 2 for optics"),
    ({"max_block": 3}, "max_block must be at least"),  # under optics' 5
    ({"cluster_method": "dbscan", "cluster_min_samples": 4, "max_block": 3}, "max_block must be at least"),
])
def test_clustering_options_that_leave_every_crop_noise_are_config_errors(workspace, options, message):
    """OPTICS with min_samples 1 (sklearn's OPTICS refuses it) labelled two clear identities of 6
    crops all noise, and so did a max_block under min_samples (k-means cells too small to hold a
    cluster), without a word."""
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        curate.check_options(curate_config(workspace, **options)["curate"])
    curate.check_options(curate_config(workspace, cluster_method="dbscan", cluster_min_samples=1)["curate"])


def test_blocks_by_character_tags_and_large_block_merge(workspace):
    rng = np.random.default_rng(3)
    vectors, truth = _identities(rng, n_ids=2, per_id=12, noise=0)
    keys = _write_crops(workspace, vectors)
    # 24 crops, max_block 10: three k-means cells for two identities, so one identity is cut
    curate.run(curate_config(workspace, cluster_method="dbscan", cluster_eps=0.1, cluster_min_samples=3,
                             max_block=10, ccip_threshold=0.1), workspace)
    got = _clusters(workspace)
    assert _same_partition([got[k] for k in keys], list(truth))  # k-means cells, then merged back
    # the same vectors split by character tags: identity 0 tagged alice for half its crops
    workspace2_chars = ["alice" if t == 0 and i % 2 else None for i, t in enumerate(truth)]
    _write_crops(workspace, vectors, workspace2_chars)
    curate.run(curate_config(workspace, cluster_method="dbscan", cluster_eps=0.1, cluster_min_samples=3), workspace)
    rows = {r["key"]: r for r in workspace.read_table("clusters").to_pylist()}
    tagged = {rows[k]["cluster"] for k, c in zip(keys, workspace2_chars, strict=True) if c}
    untagged0 = {rows[k]["cluster"] for k, c, t in zip(keys, workspace2_chars, truth, strict=True) if not c and t == 0}
    assert len(tagged) == 1 and not tagged & untagged0  # blocks never share a cluster
    assert {rows[k]["character"] for k, c in zip(keys, workspace2_chars, strict=True) if c} == {"alice"}


def test_reference_classification_and_noise(workspace, tmp_path):
    rng = np.random.default_rng(4)
    vectors, truth = _identities(rng, n_ids=2, per_id=8, noise=3)
    keys = _write_crops(workspace, vectors)
    refs = tmp_path / "refs.parquet"
    centres = [vectors[truth == i].mean(axis=0) for i in range(2)]
    pq.write_table(pa.table({"character": ["alice", "bob"],
                             "vector": pa.array([c.tolist() for c in centres], pa.list_(pa.float32(), CCIP_DIM))}),
                   refs)
    curate.run(curate_config(workspace, cluster_method="dbscan", cluster_eps=0.1, cluster_min_samples=3,
                             references=str(refs), ccip_threshold=0.1), workspace)
    rows = {r["key"]: r for r in workspace.read_table("clusters").to_pylist()}
    for key, t in zip(keys, truth, strict=True):
        assert rows[key]["character"] == {0: "alice", 1: "bob", -1: None}[int(t)]
        assert (rows[key]["cluster"] == -1) == (t == -1)


@pytest.mark.parametrize("table", [
    pa.table({"character": ["alice"], "vector": ["not a vector"]}),  # pyarrow: ArrowNotImplementedError
    pa.table({"character": ["alice"], "vector": pa.array([[0.5] * 512], pa.list_(pa.float32()))}),
    pa.table({"name": ["alice"], "vector": pa.array([[0.5] * CCIP_DIM], pa.list_(pa.float32()))}),
])
def test_a_references_file_that_is_no_references_table_is_a_config_error(workspace, tmp_path, table):
    """A references Parquet whose vector column is text ended curate with a traceback (exit 1);
    every table that is not (character, vector of 768 floats) is one line naming the file."""
    from jobs.config import ConfigError

    refs = tmp_path / "refs.parquet"
    pq.write_table(table, refs)
    workspace.add_part("images", "p", image_rows(["a"]))
    with pytest.raises(ConfigError, match="refs.parquet: not a table of references"):
        curate.run(curate_config(workspace, references=str(refs)), workspace)


def test_each_crop_is_clustered_once_when_images_have_embeddings_of_two_models(workspace):
    """With cluster_model "" ("any"), an image embedded by two CCIP models had each crop in
    cluster_crops twice, and the windows' join on (key, crop) made it four rows of clusters: 8
    crops gave 32 rows. Each image takes the first model by name, as the duplicates step does."""
    vectors, truth = _identities(np.random.default_rng(8), n_ids=1, per_id=8, noise=0)
    keys = _write_crops(workspace, vectors)
    workspace.add_part("embeddings", "p2", [{**embedding_row(k, -v, crop=0), "model": "ccip_b"}
                                            for k, v in zip(keys, vectors, strict=True)])
    curate.run(curate_config(workspace, cluster_method="dbscan", cluster_eps=0.1, cluster_min_samples=3), workspace)
    rows = workspace.read_table("clusters").to_pylist()
    assert sorted((r["key"], r["crop"]) for r in rows) == [(k, 0) for k in keys]
    assert len({r["cluster"] for r in rows}) == 1 and rows[0]["cluster"] >= 0


def test_a_cluster_model_no_embedding_has_is_said_in_the_summary(workspace):
    """A misspelt curate.cluster_model left every crop out of the clusters without a word."""
    vectors, _ = _identities(np.random.default_rng(8), n_ids=1, per_id=8, noise=0)
    _write_crops(workspace, vectors)
    options = {"cluster_method": "dbscan", "cluster_eps": 0.1, "cluster_min_samples": 3}
    summary = curate.run(curate_config(workspace, cluster_model="ccpi", **options), workspace)
    assert workspace.read_table("clusters").num_rows == 0
    assert any("curate.cluster_model 'ccpi' names no model of the embeddings (ccip)" in n for n in summary.notes)
    summary = curate.run(curate_config(workspace, cluster_model="ccip", **options), workspace)
    assert workspace.read_table("clusters").num_rows == 8
    assert not any("cluster_model" in n for n in summary.notes)


def test_reference_matches_are_the_smallest_mean_difference_to_each_characters_references(workspace, tmp_path):
    """sql/071 compares each crop with one mean per character (the join of every crop with every
    reference took 28 s of 35 for 20,000 crops and 200 references); the match must stay the
    character whose references have the smallest mean 1 - cosine, as the per-reference join gave."""
    rng = np.random.default_rng(11)
    centres = [unit_vector(rng) for _ in range(3)]
    crops = np.stack([unit_vector(rng, centres[i % 3], 0.015) * (1 + i % 5) for i in range(30)] + [unit_vector(rng)])
    keys = _write_crops(workspace, crops)
    characters = ["alice", "alice", "alice", "bob", "carol", "carol"]
    refs = np.stack([unit_vector(rng, centres[c], 0.015) * 2.5 for c in (0, 0, 0, 1, 2, 2)])
    path = tmp_path / "refs.parquet"
    vectors = pa.array(refs.tolist(), pa.list_(pa.float32(), CCIP_DIM))
    pq.write_table(pa.table({"character": characters, "vector": vectors}), path)
    threshold = 0.3
    curate.run(curate_config(workspace, references=str(path), ccip_threshold=threshold), workspace)
    con = duckdb.connect()
    con.register("clusters", workspace.read_table("clusters"))
    got = dict(con.execute("select key, character from clusters").fetchall())
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    names = sorted(set(characters))
    for key, crop in zip(keys, crops, strict=True):
        means = [np.mean([1 - unit(crop) @ unit(r) for r, c in zip(refs, characters, strict=True) if c == name])
                 for name in names]
        expected = names[int(np.argmin(means))] if min(means) <= threshold else None
        assert got[key] == expected, (key, means)
    assert {got[k] for k in keys[:30]} == set(names) and got[keys[30]] is None


@pytest.mark.parametrize(("broken", "message"), [
    ({"vector": [0.0] * CCIP_DIM}, r"reference 2 \('alice'\): its vector is zero or not finite"),
    ({"vector": [float("nan")] * CCIP_DIM}, r"reference 2 \('alice'\): its vector is zero or not finite"),
    ({"character": None}, "reference 2 has no character"),
])
def test_a_broken_reference_is_a_config_error(workspace, tmp_path, broken, message):
    """One zero or NaN vector among a character's references made the mean difference of every
    crop to that character NaN: the character matched nothing, and curate said nothing."""
    from jobs.config import ConfigError

    rng = np.random.default_rng(4)
    vectors, truth = _identities(rng, n_ids=2, per_id=8, noise=0)
    _write_crops(workspace, vectors)
    rows = [{"character": "alice", "vector": vectors[0].tolist()}, {"character": "bob", "vector": vectors[8].tolist()},
            {"character": "alice", "vector": vectors[1].tolist(), **broken}]
    refs = tmp_path / "refs.parquet"
    pq.write_table(pa.table({"character": pa.array([r["character"] for r in rows], pa.string()),
                             "vector": pa.array([r["vector"] for r in rows], pa.list_(pa.float32(), CCIP_DIM))}), refs)
    with pytest.raises(ConfigError, match=message):
        curate.run(curate_config(workspace, references=str(refs), ccip_threshold=0.1), workspace)


def test_merge_close_clusters_joins_halves_of_one_identity():
    from udfs.curate import ccip_cluster

    vectors, truth = _identities(np.random.default_rng(6), n_ids=2, per_id=6, noise=0)
    halves = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])  # each identity cut in two clusters
    settings = ccip_cluster.ClusterSettings(method="dbscan", eps=0.1, min_samples=3, threshold=0.1)
    merged = ccip_cluster.merge_close_clusters(vectors, halves, settings, ccip_cluster.Differences())
    assert _same_partition(list(merged), list(truth))


@pytest.mark.parametrize("method", ["optics", "dbscan"])
def test_a_crop_with_a_broken_embedding_is_noise_and_the_others_cluster_as_without_it(method):
    from udfs.curate import ccip_cluster

    vectors, _ = _identities(np.random.default_rng(7), n_ids=2, per_id=6, noise=0)
    settings = ccip_cluster.ClusterSettings(method=method, eps=0.1, min_samples=3, threshold=0.1)
    clean = ccip_cluster.cluster_vectors(vectors, settings, ccip_cluster.Differences())
    broken = vectors.copy()
    broken[4, 7], broken[9, 0] = np.nan, np.inf
    labels = ccip_cluster.cluster_vectors(broken, settings, ccip_cluster.Differences())
    assert labels[4] == -1 and labels[9] == -1
    rest = [i for i in range(len(vectors)) if i not in (4, 9)]
    assert _same_partition(list(labels[rest]), list(clean[rest])) and len(set(clean) - {-1}) == 2
    with pytest.raises(ValueError, match="not finite"):  # the last guard, sklearn being told not to look
        ccip_cluster.cluster_matrix(ccip_cluster.Differences()(broken), settings)


def test_reference_folder_embedded_with_annotates_ccip_model(workspace, tmp_path):
    """References as a folder of images: embedded by annotate's CCIP UDF (here a tiny ONNX model
    with CCIP's feature contract, since the real one is on the Hub), then matched in SQL."""
    from onnx_fakes import CCIP_FILE, CCIP_REPO, ccip_model
    from PIL import Image

    from udfs.annotate.ccip import CcipFeatures
    from udfs.annotate.images import ccip_input

    models = tmp_path / "models"
    ccip_model(models / CCIP_REPO / CCIP_FILE)
    colours = {"alice": (250, 20, 20), "bob": (20, 20, 250)}
    for name, colour in colours.items():
        (tmp_path / "refs" / name).mkdir(parents=True)
        Image.new("RGB", (64, 96), colour).save(tmp_path / "refs" / name / "1.png")
    cfg = curate_config(workspace, references=str(tmp_path / "refs"), ccip_threshold=0.05)
    cfg["annotate"]["models_dir"] = str(models)
    spec = {**cfg["annotate"]["ccip"], "models_dir": str(models)}
    crops = {f"{name}_crop": Image.new("RGB", (80, 80), colour) for name, colour in colours.items()}
    size = int(spec["size"])
    vectors = CcipFeatures(spec, input="image", output="ccip").features(
        np.stack([ccip_input(img, size) for img in crops.values()]))
    workspace.add_part("images", "p", image_rows(list(crops)))
    workspace.add_part("embeddings", "p", [embedding_row(k, v, crop=0)
                                             for k, v in zip(crops, vectors, strict=True)])
    curate.run(cfg, workspace)
    rows = {r["key"]: r["character"] for r in workspace.read_table("clusters").to_pylist()}
    assert rows == {"alice_crop": "alice", "bob_crop": "bob"}


def test_hidden_files_and_folders_of_a_reference_folder_are_left_out(tmp_path):
    """A folder copied from a Mac holds `._1.png` (AppleDouble, no picture): curate stopped on it as
    a reference image that does not decode; and `.thumbnails/` became a character of that name."""
    from onnx_fakes import CCIP_FILE, CCIP_REPO, ccip_model
    from PIL import Image

    from udfs.curate import ccip_cluster

    ccip_model(tmp_path / "models" / CCIP_REPO / CCIP_FILE)
    for folder in ("alice", ".thumbnails"):
        (tmp_path / "refs" / folder).mkdir(parents=True)
        Image.new("RGB", (64, 96), (250, 20, 20)).save(tmp_path / "refs" / folder / "1.png")
    (tmp_path / "refs" / "alice" / "._1.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    spec = {**curate_config_ccip(), "models_dir": str(tmp_path / "models")}
    assert ccip_cluster.references(str(tmp_path / "refs"), spec)["character"].to_pylist() == ["alice"]


def test_reference_characters_are_named_as_ingest_writes_tags(tmp_path):
    """Tags are in Danbooru form (lower case, underscores, NFC: ingest's normalize_tag); a folder
    `Alice (Genshin)` or a macOS folder name in NFD (`pokémon` as e + a combining accent) named a
    character no tag equals, so its crops never met the image's character tag (person_tags)."""
    import unicodedata

    from onnx_fakes import CCIP_FILE, CCIP_REPO, ccip_model
    from PIL import Image

    from udfs.curate import ccip_cluster

    ccip_model(tmp_path / "models" / CCIP_REPO / CCIP_FILE)
    for folder in ("Alice (Genshin)", unicodedata.normalize("NFD", "pokémon_trainer")):
        (tmp_path / "refs" / folder).mkdir(parents=True)
        Image.new("RGB", (64, 96), (250, 20, 20)).save(tmp_path / "refs" / folder / "1.png")
    spec = {**curate_config_ccip(), "models_dir": str(tmp_path / "models")}
    assert ccip_cluster.references(str(tmp_path / "refs"), spec)["character"].to_pylist() == [
        "alice_(genshin)", unicodedata.normalize("NFC", "pokémon_trainer")]
    table = tmp_path / "refs.parquet"
    vectors = pa.array([[0.5] * CCIP_DIM], pa.list_(pa.float32(), CCIP_DIM))
    pq.write_table(pa.table({"character": [" Bob  Smith "], "vector": vectors}), table)
    assert ccip_cluster.references(str(table))["character"].to_pylist() == ["bob_smith"]


def test_reference_characters_are_read_through_the_aliases(workspace, tmp_path):
    """The images' character tags are read through the aliases (Danbooru's list makes
    reimu_hakurei an alias of hakurei_reimu), so a reference folder `Reimu Hakurei` named a
    character no tag equals: its crops were clustered as reimu_hakurei and never met the image's
    hakurei_reimu (person_tags), as the blacklist and count rules did before they were read so."""
    rng = np.random.default_rng(6)
    vectors, _ = _identities(rng, n_ids=1, per_id=4, noise=0)
    keys = _write_crops(workspace, vectors, characters=["reimu_hakurei"] * 4)
    tag_list = tmp_path / "danbooru.csv"
    tag_list.write_text('hakurei_reimu,4,1,"reimu_hakurei,/hr"\n', encoding="utf-8")
    refs = tmp_path / "refs.parquet"
    pq.write_table(pa.table({"character": ["reimu_hakurei"],
                             "vector": pa.array([vectors[0].tolist()], pa.list_(pa.float32(), CCIP_DIM))}), refs)
    curate.run(curate_config(workspace, tag_list=str(tag_list), references=str(refs), ccip_threshold=0.3), workspace)
    assert {r["tag"] for r in workspace.read_table("tags").to_pylist()} == {"hakurei_reimu"}
    assert {(r["key"], r["character"]) for r in workspace.read_table("clusters").to_pylist()} == {
        (k, "hakurei_reimu") for k in keys}


def curate_config_ccip() -> dict:
    from jobs.config import load_config

    return load_config(None, [])["annotate"]["ccip"]


def test_a_reference_image_that_does_not_decode_is_named(tmp_path):
    """A damaged PNG among the references stops curate with its name, before any model loads:
    it was embedded as noise (Pillow's EXIF lookup decoded it and the error was swallowed)."""
    import io

    from PIL import Image

    from udfs.curate import ccip_cluster

    (tmp_path / "refs" / "alice").mkdir(parents=True)
    out = io.BytesIO()
    Image.effect_noise((64, 96), 40).convert("RGB").save(out, "PNG")
    data = out.getvalue()
    start = data.index(b"IDAT") + 4 + 40  # inside the compressed pixels: every chunk still there
    (tmp_path / "refs" / "alice" / "1.png").write_bytes(data[:start] + bytes(200) + data[start + 200:])
    with pytest.raises(ValueError, match=r"reference image .*alice/1\.png does not decode"):
        ccip_cluster.references(str(tmp_path / "refs"), {"size": 384, "models_dir": str(tmp_path / "none")})


# ---- bounds on similar pictures ---------------------------------------------------------------
def _embedding_vectors(con, vectors, tables, bits):
    """near_duplicates.EmbeddingVectors over `vectors` (ids 0..n-1) as the job's SQL gives them."""
    from udfs.curate import near_duplicates

    con.register("vectors_arrow", pa.table({"id": np.arange(len(vectors)),
                                            "vector": pa.array(list(vectors), pa.list_(pa.float32(), CCIP_DIM))}))
    con.execute("create table vectors as select * from vectors_arrow")
    con.execute("create table embedding_ids as select id from vectors")
    return near_duplicates.EmbeddingVectors(con, "select id, vector from vectors", {}, tables, bits)


def test_lsh_candidates_stay_linear_on_one_huge_bucket_and_keep_near_copies():
    """3,000 all but identical vectors (one bucket in every table): at most `window` candidates per
    vector and table instead of 4.5 million pairs; planted near copies among random vectors are all found."""
    import duckdb

    rng = np.random.default_rng(8)
    base = unit_vector(rng)
    similar = [unit_vector(rng, base, 0.001) for _ in range(3000)]
    randoms = [unit_vector(rng) for _ in range(400)]
    copies = [unit_vector(rng, v, 0.002) for v in randoms[:40]]  # ids 3400.. are copies of 3000..
    con = duckdb.connect()
    with _embedding_vectors(con, similar + randoms + copies, tables=8, bits=16) as vectors:
        pairs = pa.concat_tables(vectors.candidates(window=5))
    assert pairs.num_rows <= 3440 * 5 * 8
    found = set(zip(pairs["id_a"].to_pylist(), pairs["id_b"].to_pylist(), strict=True))
    assert {(3000 + i, 3400 + i) for i in range(40)} <= found
    linked = {i for pair in found for i in pair if i < 3000}
    assert len(linked) == 3000  # every similar vector is compared with some neighbour


def test_whole_image_embeddings_that_outgrow_duckdbs_memory_limit_are_paired(workspace, tmp_path, monkeypatch):
    # DuckDB 2.0 cannot spill a sort, aggregate or hash table whose rows carry 3 KB vectors: the
    # old SQL (vectors grouped by key, numbered by a window, joined to the candidate pairs) ran
    # Out of Memory. 80,000 images, 246 MB of vectors in parts of 2,000 rows (as annotate writes
    # them) under a 128 MB limit (DuckDB's own parallel reads need about 60 MB); every 10th image
    # has a near copy, the rest are unrelated
    from udfs.curate import near_duplicates

    monkeypatch.setattr(near_duplicates, "READ_ROWS", 1000)  # what a read holds in DuckDB: 3 MB
    rng = np.random.default_rng(15)
    n = 80_000
    vectors = rng.standard_normal((n, CCIP_DIM)).astype(np.float32)
    vectors[1::10] = vectors[::10] + 0.05 * rng.standard_normal((n // 10, CCIP_DIM)).astype(np.float32)
    keys = [f"k{i:06d}" for i in range(n)]
    workspace.add_part("images", "p", image_rows(keys))
    for start in range(0, n, 2000):
        rows = slice(start, start + 2000)
        workspace.add_part("embeddings", f"p{start}", embedding_table(keys[rows], np.full(2000, -1), vectors[rows]))
    opts = curate_config(workspace)["curate"]
    con = curate.open_database(tmp_path / "work.duckdb", {**opts, "memory_limit": "128MB"})
    curate.attach_inputs(con, workspace)
    curate.build_embedding_pairs(con, curate.sql_params(opts), opts)
    got = set(con.execute("select key_a, key_b from embedding_pairs").fetchall())
    assert got == {(keys[i], keys[i + 1]) for i in range(0, n, 10)}


def test_crops_to_cluster_are_chosen_when_their_vectors_outgrow_duckdbs_memory_limit(workspace, tmp_path):
    # sql/070's `not exists` over embeddings made DuckDB keep every row, vectors included, for its
    # delim join: Out of Memory. 40,000 images (whole-image vectors; every other one has two
    # person crops too), 80,000 rows, 246 MB of vectors in parts of 2,000 images, a 128 MB
    # limit (the old SQL: Out of Memory there; DuckDB's own reads and writes need about 100 MB)
    n = 40_000
    rng = np.random.default_rng(16)
    keys = np.array([f"k{i:06d}" for i in range(n)])
    for start in range(0, n, 2000):
        part = keys[start:start + 2000]
        crop_keys = part[::2]
        rows_keys = np.concatenate([part, crop_keys, crop_keys])
        crops = np.concatenate([np.full(len(part), -1), np.zeros(len(crop_keys)), np.ones(len(crop_keys))])
        workspace.add_part("embeddings", f"p{start}", embedding_table(
            rows_keys, crops, rng.standard_normal((len(rows_keys), CCIP_DIM))))
    opts = curate_config(workspace)["curate"]
    con = curate.open_database(tmp_path / "work.duckdb", {**opts, "memory_limit": "128MB"})
    curate.attach_inputs(con, workspace)
    con.execute("create table image_meta as select key, ['c' || (i % 7)] as characters, 1 as n_characters "
                "from (select key, row_number() over (order by key) as i from (select distinct key from embeddings))")
    curate.build_cluster_crops(con, curate.sql_params(opts))
    got = con.execute("select crop, count(*), count(distinct key), min(block), max(block) from cluster_crops "
                      "group by crop order by crop").fetchall()
    assert got == [(-1, n // 2, n // 2, "c0", "c6"), (0, n // 2, n // 2, "c0", "c6"), (1, n // 2, n // 2, "c0", "c6")]
    whole = {k for (k,) in con.execute("select key from cluster_crops where crop = -1").fetchall()}
    assert whole == set(keys[1::2].tolist())  # the images without person crops


@pytest.mark.parametrize("kmeans_sample", [100_000, 500])  # all rows; or k-means fitted on a sample of them
def test_cells_are_bounded_even_for_identical_vectors(monkeypatch, kmeans_sample):
    from udfs.curate import ccip_cluster

    monkeypatch.setattr(ccip_cluster, "KMEANS_SAMPLE", kmeans_sample)
    monkeypatch.setattr(ccip_cluster, "ROW_CHUNK", 700)  # rows assigned to cells in several chunks
    rng = np.random.default_rng(9)
    lumpy = np.stack([unit_vector(rng, unit_vector(rng), 0.01) for _ in range(50)] * 60)  # 3,000 rows, 50 distinct
    same = np.repeat(unit_vector(rng)[None, :], 2500, axis=0)
    for vectors in (lumpy, same):
        cells = ccip_cluster.bounded_cells(vectors.astype(np.float32), 400)
        assert max(len(c) for c in cells) <= 400
        assert sorted(np.concatenate(cells).tolist()) == list(range(len(vectors)))


def test_cluster_means_in_one_pass_equal_the_mean_of_each_cluster(monkeypatch):
    from udfs.curate import ccip_cluster

    monkeypatch.setattr(ccip_cluster, "ROW_CHUNK", 7)  # clusters that straddle the passes' chunks
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((40, CCIP_DIM)).astype(np.float32) * rng.uniform(0.5, 3, (40, 1)).astype(np.float32)
    labels = rng.integers(-1, 5, 40)
    ids = np.unique(labels[labels >= 0])
    means, lengths = ccip_cluster.cluster_means(vectors, labels, ids)
    for i, cluster in enumerate(ids):
        members = vectors[labels == cluster]
        np.testing.assert_allclose(means[i], ccip_cluster.normalized(members).mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lengths[i], np.linalg.norm(members, axis=1).mean(), rtol=1e-6)


def test_cross_differences_equal_the_slice_of_the_whole_matrix(tmp_path):
    from udfs.curate import ccip_cluster

    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((5, CCIP_DIM)).astype(np.float32), rng.standard_normal((9, CCIP_DIM)).astype(np.float32)
    for differences in (ccip_cluster.Differences(), ccip_cluster.Differences(_metric_model(tmp_path / "m.onnx"))):
        whole = differences(np.concatenate([a, b]))[:5, 5:]
        np.testing.assert_allclose(differences.cross(a, b), whole, atol=1e-5)


def test_sets_clustered_in_ray_tasks_label_as_in_one_process(ray_local):
    from udfs.curate import ccip_cluster

    settings = ccip_cluster.ClusterSettings(method="dbscan", eps=0.1, min_samples=3)
    rng = np.random.default_rng(10)
    # 3 sets of 1,500 crops: more than one task's SET_TASK_ROWS, so two tasks run them
    sets = [_identities(rng, n_ids=30, per_id=49, noise=30)[0] for _ in range(3)]
    assert sum(map(len, sets)) > ccip_cluster.SET_TASK_ROWS
    in_tasks = ccip_cluster.cluster_sets([(s, np.arange(len(s))) for s in sets], settings)
    here = ccip_cluster.cluster_set_group(sets, settings)
    assert all(np.array_equal(x, y) for x, y in zip(in_tasks, here, strict=True))
    assert all(len(set(labels) - {-1}) == 30 for labels in here)


def test_blocks_clustered_in_several_windows_label_as_in_one(monkeypatch):
    import duckdb

    from udfs.curate import ccip_cluster

    rng = np.random.default_rng(11)
    vectors, _ = _identities(rng, n_ids=4, per_id=8, noise=2)
    blocks = [["", "alice", "bob"][i % 3] for i in range(len(vectors))]
    crops = pa.table({"key": [f"k{i:03d}" for i in range(len(vectors))],
                      "crop": pa.array([0] * len(vectors), pa.int32()),
                      "block": blocks, "block_characters": pa.array([int(b != "") for b in blocks], pa.int32()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), CCIP_DIM)})
    con = duckdb.connect()
    con.register("crops", crops)
    settings = ccip_cluster.ClusterSettings(method="dbscan", eps=0.1, min_samples=2, max_block=10, threshold=0.1)

    reported: list[int] = []

    def labels() -> dict[str, tuple[str, int]]:
        reported.clear()
        out = ccip_cluster.cluster_blocks(con, "crops", settings, reported.append)
        return {k: (b, c) for k, b, c in zip(out["key"].to_pylist(), out["block"].to_pylist(),
                                             out["cluster"].to_pylist(), strict=True)}

    one_window = labels()
    assert reported == [len(vectors)]
    # windows of fewer blocks, none larger than a window: '' (12 crops) fills one, alice and bob (11 each) the next
    monkeypatch.setattr(ccip_cluster, "WINDOW_ROWS", 12)
    monkeypatch.setattr(ccip_cluster, "READ_ROWS", 4)  # each block read in several batches
    per_block = labels()
    assert one_window == per_block
    # whole blocks in each window, however the reads cut them; progress after each window
    assert reported == [12, len(vectors)]
    clusters = {c for _, c in one_window.values()} - {-1}
    assert len(clusters) > 3
    for cluster in clusters:  # a cluster never spans two blocks
        assert len({b for b, c in one_window.values() if c == cluster}) == 1


def test_crops_stored_out_of_block_order_are_clustered_by_whole_blocks(tmp_path, monkeypatch):
    # the work database does not keep insertion order, and a parallel scan of a large table
    # interleaves its row groups: cluster_blocks must put the crops in block order itself
    from udfs.curate import ccip_cluster

    rng = np.random.default_rng(12)
    vectors, _ = _identities(rng, n_ids=4, per_id=8, noise=2)
    blocks = [["", "alice", "bob"][i % 3] for i in range(len(vectors))]  # stored interleaved
    crops = pa.table({"key": [f"k{i:03d}" for i in range(len(vectors))],
                      "crop": pa.array([0] * len(vectors), pa.int32()),
                      "block": blocks, "block_characters": pa.array([int(b != "") for b in blocks], pa.int32()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), CCIP_DIM)})
    con = curate.open_database(tmp_path / "work.duckdb", {"memory_limit": "1GB", "threads": 1})
    con.register("crops_arrow", crops)
    con.execute("create table cluster_crops as select * from crops_arrow")
    settings = ccip_cluster.ClusterSettings(method="dbscan", eps=0.1, min_samples=2, max_block=10, threshold=0.1)
    con.execute("create table ordered as select * from crops_arrow order by block, key")
    whole = ccip_cluster.cluster_blocks(con, "ordered", settings)
    monkeypatch.setattr(ccip_cluster, "WINDOW_ROWS", 15)  # two windows: a block cut in pieces would show
    got = curate.crop_clusters(con, settings)
    assert got.sort_by("key").to_pylist() == whole.sort_by("key").to_pylist()
    assert len(set(whole["cluster"].to_pylist()) - {-1}) > 3


@pytest.mark.parametrize("in_tasks", [False, True])
def test_a_block_larger_than_a_window_clusters_as_a_block_cut_in_memory(monkeypatch, request, in_tasks):
    import duckdb

    from udfs.curate import ccip_cluster

    if in_tasks:
        request.getfixturevalue("ray_local")
        monkeypatch.setattr(ccip_cluster, "PARALLEL_MIN_ROWS", 0)
    rng = np.random.default_rng(13)
    vectors, truth = _identities(rng, n_ids=4, per_id=12, noise=3)
    vectors[5] = np.nan  # a broken embedding: noise
    truth[5] = -1
    order = rng.permutation(len(vectors))
    vectors, truth = vectors[order], truth[order]
    crops = pa.table({"key": [f"k{i:03d}" for i in range(len(vectors))],
                      "crop": pa.array([0] * len(vectors), pa.int32()),
                      "block": [""] * len(vectors), "block_characters": pa.array([0] * len(vectors), pa.int32()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), CCIP_DIM)})
    con = duckdb.connect()
    con.register("crops", crops)
    settings = ccip_cluster.ClusterSettings(method="dbscan", eps=0.1, min_samples=3, max_block=10, threshold=0.1)
    in_memory = ccip_cluster.cluster_blocks(con, "crops", settings).sort_by("key")["cluster"].to_pylist()
    reported: list[int] = []
    monkeypatch.setattr(ccip_cluster, "WINDOW_ROWS", 12)  # the block of 51 crops: several windows of its cells
    monkeypatch.setattr(ccip_cluster, "READ_ROWS", 5)
    streamed = ccip_cluster.cluster_blocks(con, "crops", settings, reported.append).sort_by("key")
    assert _same_partition(streamed["cluster"].to_pylist(), list(truth))
    assert _same_partition(in_memory, list(truth))
    assert len(reported) > 2 and reported[-1] == len(vectors) and reported == sorted(reported)


def test_crops_whose_vectors_outgrow_duckdbs_memory_limit_are_clustered(tmp_path, monkeypatch):
    # DuckDB 2.0 cannot sort rows of 3 KB vectors once they outgrow memory_limit (Out of Memory,
    # it does not spill them): the vectors are never sorted in DuckDB. 20,000 crops, 61 MB of
    # vectors, under a 32 MB limit; blocks of 20 crops of two identities each
    from udfs.curate import ccip_cluster

    rng = np.random.default_rng(14)
    n, per_block = 20_000, 20
    centres = rng.standard_normal((n // 10, CCIP_DIM)).astype(np.float32)
    vectors = np.repeat(centres, 10, axis=0) + 0.01 * rng.standard_normal((n, CCIP_DIM)).astype(np.float32)
    crops = pa.table({"key": [f"k{i:06d}" for i in range(n)], "crop": pa.array(np.zeros(n), pa.int32()),
                      "block": [f"b{i // per_block:05d}" for i in range(n)],
                      "block_characters": pa.array(np.ones(n), pa.int32()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), CCIP_DIM)})
    con = curate.open_database(tmp_path / "work.duckdb", {"memory_limit": "1GB", "threads": 2})
    con.register("crops_arrow", crops)
    con.execute("create table cluster_crops as select * from crops_arrow")
    con.unregister("crops_arrow")
    con.execute("set memory_limit = '32MB'")
    monkeypatch.setattr(ccip_cluster, "WINDOW_ROWS", 5000)
    monkeypatch.setattr(ccip_cluster, "READ_ROWS", 1000)
    settings = ccip_cluster.ClusterSettings(method="dbscan", eps=0.1, min_samples=2)
    got = curate.crop_clusters(con, settings).sort_by("key")
    assert got["key"].to_pylist() == crops["key"].to_pylist()
    assert _same_partition(got["cluster"].to_pylist(), np.arange(n) // 10)


def staged_keys(ws, drop_flagged: bool = True) -> set[str]:
    """The keys export's selection stages (export.stage_selection, run here, not in a worker)."""
    from jobs import export
    from jobs.config import default_config

    opts = {**default_config()["export"], "drop_flagged": drop_flagged}
    _, _, units, _ = export.stage_selection(ws, opts, 1000, 2)  # key ranges of 2: a group spans ranges
    files = sorted({f for u in units for f in u["files"]})
    return set(pq.read_table(files, columns=["key"]).column("key").to_pylist()) if files else set()


@pytest.mark.parametrize("left_out", ["flagged", "excluded", "gone"])
def test_the_export_keeps_the_next_copy_when_it_leaves_out_the_representative(workspace, left_out):
    """Curate picks a group's representative before captions exist and before a person excludes
    in review; the export left out every other copy as a near duplicate, so a representative whose
    accepted caption was flagged (drop_flagged, the default), that was excluded after curate, or
    whose file an ingest removed took the whole picture out of the training set."""
    rows = image_rows(["a_big", "b_mid", "c_small", "other"], phash=None)
    rows[0]["width"], rows[1]["width"] = 3000, 2000
    workspace.add_part("images", "p", [{**r, "sha256": "other" if r["key"] == "other" else "same bytes"}
                                       for r in rows])
    curate.run(curate_config(workspace), workspace)
    dups = {r["key"]: r["is_representative"] for r in workspace.read_table("duplicates").to_pylist()}
    assert dups == {"a_big": True, "b_mid": False, "c_small": False}
    assert staged_keys(workspace) == {"a_big", "other"}
    if left_out == "flagged":
        workspace.add_part("captions", "c", [{"key": k, "attempt": 0, "backend": "openai:joy", "seed": 0,
                                              "caption": "a girl", "accuracy": 0.9, "accepted": True,
                                              "flagged": k == "a_big"} for k in ("a_big", "b_mid", "c_small")])
    elif left_out == "excluded":
        now = datetime.datetime.now(datetime.UTC)
        workspace.add_part("edits", "e", [{"key": "a_big", "field": "exclude", "old": None, "new": "true",
                                           "time": now, "seq": 0, "batch": "b"}])
    else:
        workspace.add_part("images", "p", [{**r, "sha256": "other" if r["key"] == "other" else "same bytes"}
                                           for r in rows if r["key"] != "a_big"])  # an ingest removed it
    assert staged_keys(workspace) == {"b_mid", "other"}  # the next largest copy, not none of them
    if left_out == "flagged":
        assert staged_keys(workspace, drop_flagged=False) == {"a_big", "other"}


def test_the_images_of_an_input_no_longer_there_leave_the_export_to_their_copies(workspace, tmp_path):
    """A collection moved to a new path is a new input; the old input's rows stay. Curate made
    the old, unreadable copies the representatives (their keys sort first), so the export wrote
    neither copy of those pictures (a missing_member row each, exit 0). The old input's images are
    now left out, counted, and their groups keep the copies that are there."""
    from jobs import export
    from jobs.config import default_config

    (tmp_path / "col_moved").mkdir()
    workspace.write_json("state/inputs.json", {str(tmp_path / "col"): "col", str(tmp_path / "col_moved"): "col_moved",
                                               "s3://bucket/shards": "shards"})
    rows = image_rows(["col/x", "col/y", "col_moved/x", "col_moved/y", "col_moved/z"], phash=None)
    workspace.add_part("images", "p", [{**r, "sha256": r["key"].rsplit("/", 1)[1]} for r in rows])
    curate.run(curate_config(workspace), workspace)
    kept = {r["key"] for r in workspace.read_table("duplicates").to_pylist() if r["is_representative"]}
    assert kept == {"col_moved/x", "col_moved/y"}  # curate's choice too: the copies that are there
    assert staged_keys(workspace) == {"col_moved/x", "col_moved/y", "col_moved/z"}
    left_out = export.stage_selection(workspace, default_config()["export"], 1000, 2)[3]
    assert left_out == {"gone with their input": 2}


def test_the_exports_duplicates_are_not_held_in_python_memory(workspace, monkeypatch):
    """The selection runs a key range at a time so that its memory is bounded by a range, not the
    workspace; the duplicates table the export keeps (a row per image of a group, millions in a
    large collection) was one Arrow table the staging loop held for the whole selection, outside
    DuckDB's memory limit. Checked here: no Arrow table of more rows than a range in the frames
    that stage a range."""
    from jobs import export
    from jobs.config import default_config

    n, chunk = 2000, 500
    keys = [f"k{i:05d}" for i in range(n)]
    workspace.add_part("images", "p", image_rows(keys))
    workspace.add_part("duplicates", "d", [{"key": k, "dup_group": keys[i - i % 2], "is_representative": i % 2 == 0,
                                            "reason": "identical"} for i, k in enumerate(keys)])
    held = []
    stage_chunk = export.stage_chunk

    def measured(*args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None:
            held.extend(v.num_rows for v in frame.f_locals.values() if isinstance(v, pa.Table))
            frame = frame.f_back
        return stage_chunk(*args, **kwargs)

    monkeypatch.setattr(export, "stage_chunk", measured)
    total, _, _, left_out = export.stage_selection(workspace, default_config()["export"], 10_000, chunk)
    assert (total, left_out) == (n, {"near duplicates": n // 2})
    assert max(held, default=0) <= chunk, f"an Arrow table of {max(held)} rows held while staging a range"
