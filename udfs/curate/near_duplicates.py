"""The non-SQL parts of near-duplicate detection: LSH candidates of embeddings and their
cosine similarity, connected components.

Pairs come from SQL (sql/060_phash_pairs.sql, 061_embedding_pairs.sql, 062_exact_pairs.sql); grouping the pairs
into near-duplicate groups is a connected-components problem, which scipy solves in linear
time (SQL would need an iterative label propagation).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator

import duckdb
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import schemas
from udfs.curate.work_database import joins_as_written, spill_dir

LSH_SEED = 20240601  # fixed: the same embeddings always fall in the same buckets
SORT_BITS = 12  # extra hyperplanes past lsh_bits: they order a bucket so that close vectors sit side by side
CANDIDATES_SCHEMA = pa.schema([("id_a", pa.int64()), ("id_b", pa.int64())])
READ_ROWS = 20_000  # vectors per read: 60 MB
PAIRS_PER_STEP = 8_192  # pairs compared at once: their two vectors are 50 MB
# float32 rounding: a unit vector's cosine with itself comes out anywhere in 1 +- 5e-7, so that
# embedding_similarity = 1 (equal embeddings only) missed most equal pairs without this slack
COSINE_ROUNDING = 1e-6


class EmbeddingVectors:
    """The whole-image vectors of `sql/061_embedding_vectors.sql` (id, vector), read once in
    storage order into the sign codes of the LSH tables and into a file of unit vectors in id
    order (np.memmap under DuckDB's temp folder, deleted on close).

    The pairs are compared here, not in SQL: a join of the candidate pairs to their vectors makes
    DuckDB build hash tables over the vectors, which it cannot spill (Out of Memory once they
    outgrow memory_limit: 150,000 images at 256MB, about 1.3M at curate's 4GB). The file's pages
    are the operating system's cache, not this worker's heap: what the worker holds is the codes,
    8 bytes per image and LSH table, and one batch of pairs.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, query: str, params: dict, tables: int, bits: int) -> None:
        if not 1 <= bits <= 62 - SORT_BITS:
            raise ValueError(f"curate.lsh_bits must be between 1 and {62 - SORT_BITS}")
        n = con.execute("select coalesce(max(id) + 1, 0) from embedding_ids").fetchall()[0][0]
        self.codes = np.zeros((tables, n), np.int64)
        self._file = tempfile.NamedTemporaryFile(prefix="booruset-vectors-", dir=spill_dir(con))
        # zeros where an id got no vector: a cosine of 0, never similar (embedding_similarity > 0)
        self.vectors = (np.memmap(self._file, np.float32, "w+", shape=(n, schemas.CCIP_DIM)) if n
                        else np.zeros((0, schemas.CCIP_DIM), np.float32))
        planes = np.random.default_rng(LSH_SEED).standard_normal(
            (tables, bits + SORT_BITS, schemas.CCIP_DIM)).astype(np.float32)
        with con.cursor() as cursor, joins_as_written(cursor):  # its own cursor: nothing left open on the job's
            for batch in cursor.sql(query, params=params).to_arrow_reader(READ_ROWS):
                ids = batch.column("id").to_numpy()
                vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, schemas.CCIP_DIM)
                self.codes[:, ids] = sign_codes(vectors, planes)
                with np.errstate(invalid="ignore", divide="ignore"):  # a zero or broken vector: NaN, similar to none
                    self.vectors[ids] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def __enter__(self) -> EmbeddingVectors:
        return self

    def __exit__(self, *exc) -> None:
        del self.vectors  # the map first, then the file
        self._file.close()

    def candidates(self, window: int) -> Iterator[pa.Table]:
        """(id_a, id_b) pairs worth comparing, one Arrow table per LSH table and step.

        Random-hyperplane LSH: vectors with high cosine similarity fall on the same side of most
        hyperplanes, so near duplicates share the first `bits` sign bits of a table's code in at
        least one of the tables with high probability. Within a table the vectors are sorted by
        their code and each is paired only with the next `window` vectors that share those bits.
        A bucket of up to window + 1 vectors yields all its pairs; a larger one (many similar
        pictures, e.g. the frames of one scene) yields at most `window` pairs per vector, the
        closest by the longer code, instead of its square: the candidates stay linear in the
        number of images whatever the data.
        """
        for table_codes in self.codes:
            order = np.argsort(table_codes, kind="stable")
            bucket = table_codes[order] >> SORT_BITS
            for step in range(1, window + 1):
                same = bucket[:-step] == bucket[step:]
                a, b = order[:-step][same], order[step:][same]
                yield pa.table({"id_a": np.minimum(a, b), "id_b": np.maximum(a, b)}, schema=CANDIDATES_SCHEMA)

    def similar(self, pairs: Iterable[pa.RecordBatch], similarity: float) -> Iterator[pa.Table]:
        """The (id_a, id_b) pairs whose cosine similarity is >= `similarity`, one table per batch."""
        for batch in pairs:
            ids_a, ids_b = batch.column("id_a").to_numpy(), batch.column("id_b").to_numpy()
            order = np.argsort(ids_a, kind="stable")  # the file read in id order, as far as one side goes
            ids_a, ids_b = ids_a[order], ids_b[order]
            keep = np.zeros(len(ids_a), bool)
            for start in range(0, len(ids_a), PAIRS_PER_STEP):
                a, b = ids_a[start:start + PAIRS_PER_STEP], ids_b[start:start + PAIRS_PER_STEP]
                cosine = np.einsum("ij,ij->i", self.vectors[a], self.vectors[b])
                # NaN (a broken vector) is never similar
                keep[start:start + PAIRS_PER_STEP] = cosine >= similarity - COSINE_ROUNDING
            yield pa.table({"id_a": ids_a[keep], "id_b": ids_b[keep]}, schema=CANDIDATES_SCHEMA)


def sign_codes(vectors: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """(tables, n) int64 codes: bit i (from the highest) of a table's code says on which side of
    that table's hyperplane i a vector lies. One matrix product for all tables (1.6x faster than
    one per table: the product with 32 planes at a time is too thin for BLAS)."""
    tables, code_bits, dim = planes.shape
    sides = (vectors @ planes.reshape(-1, dim).T).reshape(len(vectors), tables, code_bits) > 0
    packed = np.packbits(sides, axis=2)  # first plane in the first byte's highest bit
    words = np.zeros((len(vectors), tables, 8), np.uint8)
    words[:, :, 8 - packed.shape[2]:] = packed
    codes = words.view(">u8")[:, :, 0] >> np.uint64(8 * packed.shape[2] - code_bits)  # drop packbits' padding
    return codes.astype(np.int64).T


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
