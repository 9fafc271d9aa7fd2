"""The non-SQL parts of near-duplicate detection: LSH buckets of embeddings, connected components.

Pairs come from SQL (sql/060_phash_pairs.sql, 061_embedding_pairs.sql, 062_exact_pairs.sql); grouping the pairs
into near-duplicate groups is a connected-components problem, which scipy solves in linear
time (SQL would need an iterative label propagation).
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import schemas

LSH_SEED = 20240601  # fixed: the same embeddings always fall in the same buckets
BUCKETS_SCHEMA = pa.schema([("key", pa.string()), ("lsh_table", pa.int32()), ("bucket", pa.int64())])


def embedding_buckets(con: duckdb.DuckDBPyConnection, model: str, tables: int, bits: int,
                      enabled: bool = True) -> pa.Table:
    """(key, lsh_table, bucket): random-hyperplane LSH of the whole-image embeddings.

    Vectors whose cosine similarity is high fall on the same side of most random hyperplanes,
    so near duplicates share a bucket in at least one of `tables` tables with high probability;
    only images in the same bucket are compared in SQL.
    """
    if not enabled:
        return BUCKETS_SCHEMA.empty_table()
    if not 1 <= bits <= 62:
        raise ValueError("curate.lsh_bits must be between 1 and 62")
    planes = np.random.default_rng(LSH_SEED).standard_normal((tables, bits, schemas.CCIP_DIM)).astype(np.float32)
    powers = (1 << np.arange(bits, dtype=np.int64))
    reader = con.sql("select key, vector from embeddings where crop = -1 and ($model = '' or model = $model)",
                     params={"model": model}).to_arrow_reader(100_000)
    parts = []
    for batch in reader:
        vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, schemas.CCIP_DIM)
        keys = batch.column("key")
        for t in range(tables):
            signs = (vectors @ planes[t].T) > 0
            parts.append(pa.table({"key": keys, "lsh_table": pa.array(np.full(len(vectors), t, np.int32)),
                                   "bucket": pa.array(signs.astype(np.int64) @ powers)}, schema=BUCKETS_SCHEMA))
    return pa.concat_tables(parts) if parts else BUCKETS_SCHEMA.empty_table()


def components(con: duckdb.DuckDBPyConnection, pair_tables: list[str]) -> pa.Table:
    """(key, component) for every key in any pair of the given (key_a, key_b) tables."""
    union = " union ".join(f'select key_a, key_b from "{t}"' for t in pair_tables)
    pairs = con.sql(union).to_arrow_table()
    if pairs.num_rows == 0:
        return pa.table({"key": pa.array([], pa.string()), "component": pa.array([], pa.int64())})
    keys, index = np.unique(np.concatenate([pairs["key_a"].to_numpy(zero_copy_only=False),
                                            pairs["key_b"].to_numpy(zero_copy_only=False)]), return_inverse=True)
    a, b = index[: pairs.num_rows], index[pairs.num_rows:]
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(keys), len(keys)))
    _, labels = connected_components(graph, directed=False)
    return pa.table({"key": pa.array(keys, pa.string()), "component": pa.array(labels.astype(np.int64))})
