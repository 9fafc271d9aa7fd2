"""The non-SQL parts of near-duplicate detection: LSH candidates of embeddings, connected components.

Pairs come from SQL (sql/060_phash_pairs.sql, 061_embedding_pairs.sql, 062_exact_pairs.sql); grouping the pairs
into near-duplicate groups is a connected-components problem, which scipy solves in linear
time (SQL would need an iterative label propagation).
"""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import schemas

LSH_SEED = 20240601  # fixed: the same embeddings always fall in the same buckets
SORT_BITS = 12  # extra hyperplanes past lsh_bits: they order a bucket so that close vectors sit side by side
CANDIDATES_SCHEMA = pa.schema([("id_a", pa.int64()), ("id_b", pa.int64())])


def embedding_candidates(con: duckdb.DuckDBPyConnection, tables: int, bits: int, window: int) -> Iterator[pa.Table]:
    """(id_a, id_b) pairs of `embedding_vectors` ids worth comparing, one Arrow table per LSH table.

    Random-hyperplane LSH: vectors with high cosine similarity fall on the same side of most
    hyperplanes, so near duplicates share the first `bits` sign bits of a table's code in at least one of
    `tables` tables with high probability. Within a table the vectors are sorted by their code and
    each is paired only with the next `window` vectors that share those bits. A bucket of up to
    window + 1 vectors yields all its pairs; a larger one (many similar pictures, e.g. the frames of
    one scene) yields at most `window` pairs per vector, the closest by the longer code, instead
    of its square: the candidates stay linear in the number of images whatever the data.
    """
    if not 1 <= bits <= 62 - SORT_BITS:
        raise ValueError(f"curate.lsh_bits must be between 1 and {62 - SORT_BITS}")
    codes = table_codes(con, tables, bits + SORT_BITS)
    for table_codes_ in codes:
        order = np.argsort(table_codes_, kind="stable")
        bucket = table_codes_[order] >> SORT_BITS
        for step in range(1, window + 1):
            same = bucket[:-step] == bucket[step:]
            a, b = order[:-step][same], order[step:][same]
            yield pa.table({"id_a": np.minimum(a, b), "id_b": np.maximum(a, b)}, schema=CANDIDATES_SCHEMA)


def table_codes(con: duckdb.DuckDBPyConnection, tables: int, code_bits: int) -> np.ndarray:
    """(tables, n) int64 sign codes of the vectors in `embedding_vectors`, indexed by id (0..n-1)."""
    planes = np.random.default_rng(LSH_SEED).standard_normal((tables, code_bits, schemas.CCIP_DIM)).astype(np.float32)
    powers = 1 << np.arange(code_bits - 1, -1, -1, dtype=np.int64)  # first hyperplane = highest bit
    with con.cursor() as cursor:  # its own cursor: no result is left open on the job's connection
        codes = np.zeros((tables, cursor.sql("select count(*) from embedding_vectors").fetchall()[0][0]), np.int64)
        for batch in cursor.sql("select id, vector from embedding_vectors order by id").to_arrow_reader(50_000):
            ids = batch.column("id").to_numpy()
            vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, schemas.CCIP_DIM)
            for t in range(tables):
                codes[t, ids] = ((vectors @ planes[t].T) > 0).astype(np.int64) @ powers
    return codes


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
