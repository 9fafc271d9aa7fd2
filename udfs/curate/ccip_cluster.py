"""Identity clustering of CCIP crops with the semantics of imgutils' `ccip_clustering`.

imgutils runs sklearn's OPTICS (max_eps, min_samples) or DBSCAN (eps, min_samples) on the
matrix of CCIP differences of all images at once. Here the same sklearn estimators run on a
precomputed difference matrix (identical neighbourhoods), block by block:

- a block is the set of crops whose images have the same character tags (sql/070), so pairwise
  differences are computed inside blocks only;
- a block larger than `max_block` is cut into k-means cells of about that size (scikit-learn
  MiniBatchKMeans on the normalised vectors), each cell is clustered, and clusters of different
  cells whose mean vectors (imgutils' ccip_merge) are within the same-character threshold are
  merged. Cost: O(sum of cell sizes squared) instead of O(n squared);
- the sets (blocks, cells) of a window of crops are clustered in parallel Ray tasks when Ray is
  up, and nothing per cluster pair or per (crop, cluster) pair is held whole;
- a block larger than a window (WINDOW_ROWS crops) is read from DuckDB a window of its cells at
  a time (LargeBlock): memory is bounded by the window, not by the largest block.

The difference is 1 - cosine similarity, or the CCIP metric model (model_metrics.onnx, the
model imgutils' ccip_batch_differences runs) when one is configured.
"""

from __future__ import annotations

import functools
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import schemas
from udfs.curate.optics import optics_labels
from udfs.curate.work_database import joins_as_written, spill_dir

OUTPUT_SCHEMA = pa.schema([("key", pa.string()), ("crop", pa.int32()), ("cluster", pa.int32()),
                           ("block", pa.string()), ("block_characters", pa.int32())])
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
REFERENCES_SCHEMA = pa.schema([("character", pa.string()), ("vector", pa.list_(pa.float32(), schemas.CCIP_DIM))])


@dataclass
class ClusterSettings:
    method: str = "optics"
    eps: float = 0.5
    min_samples: int = 5
    threshold: float = 0.17847511429108218
    metric_model: str = ""
    max_block: int = 2000

    @classmethod
    def from_config(cls, opts: dict) -> ClusterSettings:
        method = str(opts["cluster_method"])
        if method not in ("optics", "dbscan"):
            raise ValueError("curate.cluster_method must be optics or dbscan")
        threshold = float(opts["ccip_threshold"])
        # imgutils' ccip_default_clustering_params: optics (0.5, 5), dbscan (threshold, 2)
        default_eps, default_min = (0.5, 5) if method == "optics" else (threshold, 2)
        settings = cls(method=method, eps=float(opts["cluster_eps"]) or default_eps,
                       min_samples=int(opts["cluster_min_samples"]) or default_min, threshold=threshold,
                       metric_model=str(opts["ccip_metric_model"]), max_block=int(opts["max_block"]))
        # both left every crop noise without a word: sklearn's OPTICS refuses min_samples 1, and
        # a k-means cell of a large block is at most max_block crops
        if method == "optics" and settings.min_samples < 2:
            raise ValueError("curate.cluster_min_samples must be at least 2 for optics (0: its default, 5)")
        if settings.max_block < settings.min_samples:
            raise ValueError(f"curate.max_block must be at least the clusters' min_samples ({settings.min_samples}): "
                             "a smaller k-means cell holds no cluster")
        return settings


class Differences:
    """CCIP differences of a set of vectors: 1 - cosine, or the CCIP metric ONNX model."""

    def __init__(self, metric_model: str = "") -> None:
        self.session = None
        if metric_model:
            import onnxruntime

            self.session = onnxruntime.InferenceSession(metric_model, providers=["CPUExecutionProvider"])

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        if self.session is not None:
            (output,) = self.session.run(["output"], {"input": vectors.astype(np.float32)})
            diff = np.array(output, dtype=np.float64)
        else:
            unit = normalized(vectors)
            diff = 1.0 - (unit @ unit.T).astype(np.float64)
        # float rounding gives ~-1e-7 on the diagonal; sklearn's precomputed metric refuses
        # negatives, and clipping them cannot change a neighbourhood of radius eps > 0
        np.fill_diagonal(diff, 0.0)
        return np.clip(diff, 0.0, None)

    def cross(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Differences of each row of `a` to each row of `b` (len(a) x len(b)), without the
        (len(a) + len(b))^2 matrix of __call__: the metric model sees `a` with a slice of `b`."""
        if self.session is None:
            return np.clip(1.0 - (normalized(a) @ normalized(b).T).astype(np.float64), 0.0, None)
        return np.concatenate([self(np.concatenate([a, b[i:i + PAIR_CHUNK]]))[: len(a), len(a):]
                               for i in range(0, len(b), PAIR_CHUNK)], axis=1)


def normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def cluster_matrix(diff: np.ndarray, settings: ClusterSettings) -> np.ndarray:
    """Labels of one set of crops from its difference matrix (-1: noise), as ccip_clustering."""
    import sklearn
    from sklearn.cluster import DBSCAN

    n = len(diff)
    if n < max(settings.min_samples, 2):
        return np.full(n, -1, dtype=np.int64)
    if not np.isfinite(diff).all():  # checked once here, so sklearn need not (see below)
        raise ValueError("CCIP differences hold NaN or infinity (a crop's embedding is not finite)")
    # sklearn would check the whole matrix for NaN again (assume_finite) and bind the arguments
    # of each call to check them (skip_parameter_validation); the labels are the same
    with warnings.catch_warnings(), np.errstate(divide="ignore"), sklearn.config_context(
            assume_finite=True, skip_parameter_validation=True):
        # a cell whose crops are all noise, or all identical, is a normal result here, not a
        # problem to report once per cell ("All reachability values are inf", divide by zero)
        warnings.simplefilter("ignore", UserWarning)
        if settings.method == "dbscan":
            estimator = DBSCAN(eps=settings.eps, min_samples=settings.min_samples, metric="precomputed")
            return estimator.fit(diff).labels_.astype(np.int64)
        # sklearn's OPTICS, less its per-crop neighbour query (udfs/curate/optics.py): a cell of
        # 2,000 crops 0.08 s instead of several seconds, the same labels
        return optics_labels(diff, settings.min_samples, settings.eps).astype(np.int64)


def cluster_vectors(vectors: np.ndarray, settings: ClusterSettings, differences: Differences) -> np.ndarray:
    """Labels of one block: directly when small, else k-means cells + merge across cells.
    A crop whose embedding is not finite (a broken model output) is noise."""
    plan = BlockPlan(vectors, settings)
    plan.cut()
    return plan.labels(cluster_sets(plan.sets(), settings), differences)


# A vector set to cluster: rows of an array, copied out only when it is clustered or sent
Selection = tuple[np.ndarray, np.ndarray]


class BlockPlan:
    """One block's vector sets to cluster (the block, or its k-means cells when it is larger
    than max_block: cut() finds them), and how their labels make the block's labels."""

    def __init__(self, vectors: np.ndarray, settings: ClusterSettings) -> None:
        self.settings = settings
        self.size = len(vectors)
        finite = np.isfinite(vectors).all(axis=1)  # the others are noise
        self.finite = None if finite.all() else np.flatnonzero(finite)
        self.usable = vectors if self.finite is None else vectors[self.finite]
        self.split = len(self.usable) > settings.max_block
        self.members = [np.arange(len(self.usable))]

    def cut(self) -> None:
        """The k-means cells of a block larger than max_block (the costly part of a plan)."""
        if self.split:
            self.members = bounded_cells(self.usable, self.settings.max_block)

    def sets(self) -> list[Selection]:
        return [(self.usable, members) for members in self.members]

    def labels(self, set_labels: list[np.ndarray], differences: Differences, merge: bool = True) -> np.ndarray:
        """The block's labels (-1: noise) from each set's labels, in the order of sets(); the
        clusters of its cells merged unless `merge` is false (a large block's cell: the block
        merges them all at its end)."""
        usable = np.full(len(self.usable), -1, dtype=np.int64)
        next_label = 0
        for members, found in zip(self.members, set_labels, strict=True):
            kept = found >= 0
            usable[members[kept]] = found[kept] + next_label
            next_label += int(found.max()) + 1 if kept.any() else 0
        if self.split and merge:
            usable = merge_close_clusters(self.usable, usable, self.settings, differences)
        if self.finite is None:
            return usable
        labels = np.full(self.size, -1, dtype=np.int64)
        labels[self.finite] = usable
        return labels


SET_TASK_ROWS = 4000  # crops per clustering task: small sets travel together
# A window of fewer crops is clustered in the process: a Ray worker's first clustering task
# starts the process and imports scikit-learn (~2 s), more than tasks save on 10,000 crops
# (curate with 10,000 crops: 7.0 s in tasks on a fresh local Ray, 3.5 s in the process)
PARALLEL_MIN_ROWS = 40_000


class SetRunner:
    """Clusters vector sets alone (cluster_matrix of their differences) as they are added.

    In Ray tasks when Ray is up (curate's steps run in a Ray worker; each set is independent,
    and its differences and OPTICS's loop, ~0.04 ms a crop in a cell of 2,000, run on one core):
    sets are sent a few to a task, up to SET_TASK_ROWS crops, each task submitted as soon as it
    is full, so that tasks run while the caller plans the next blocks. Sets that never fill
    one task are clustered here; so are all of them when Ray is not up or in_tasks is false."""

    def __init__(self, settings: ClusterSettings, in_tasks: bool = True) -> None:
        import ray

        self.settings = settings
        self.task = ray.remote(num_cpus=1)(cluster_set_group) if in_tasks and ray.is_initialized() else None
        self.group: list[Selection] = []
        self.group_rows = 0  # crops in self.group
        self.submitted: list = []  # per group: an ObjectRef, or the labels when clustered here

    def add(self, sets: list[Selection]) -> None:
        for selection in sets:
            if self.group and self.group_rows + len(selection[1]) > SET_TASK_ROWS:
                self._submit()
            self.group.append(selection)
            self.group_rows += len(selection[1])

    def _submit(self, here: bool = False) -> None:
        # each set's rows are copied out as its task is submitted (into the object store)
        sets = [vectors[rows] for vectors, rows in self.group]
        self.group, self.group_rows = [], 0
        if here or self.task is None:
            self.submitted.append(cluster_set_group(sets, self.settings))
        else:
            self.submitted.append(self.task.remote(sets, self.settings))

    def labels(self) -> list[np.ndarray]:
        """The labels of every set added, in the order added."""
        import ray

        if self.group:
            self._submit(here=not self.submitted)  # too few crops for a task: clustered here
        done = [ray.get(part) if isinstance(part, ray.ObjectRef) else part for part in self.submitted]
        self.submitted = []
        return [labels for part in done for labels in part]


def cluster_sets(sets: list[Selection], settings: ClusterSettings) -> list[np.ndarray]:
    """The labels of each vector set, clustered alone (SetRunner)."""
    runner = SetRunner(settings)
    runner.add(sets)
    return runner.labels()


def cluster_set_group(sets: list[np.ndarray], settings: ClusterSettings) -> list[np.ndarray]:
    differences = differences_for(settings.metric_model)
    return [cluster_matrix(differences(vectors), settings) for vectors in sets]


def differences_for(metric_model: str) -> Differences:
    """One Differences per process and model: a clustering task's worker loads the metric model once,
    and again when the file is replaced (by its size and time, as curate's fingerprint sees it): a
    pooled worker kept clustering with the old one."""
    stat = Path(metric_model).stat() if metric_model and Path(metric_model).is_file() else None
    return _differences(metric_model, (stat.st_size, stat.st_mtime_ns) if stat else None)


@functools.lru_cache(maxsize=2)
def _differences(metric_model: str, _stamp: tuple[int, int] | None) -> Differences:
    return Differences(metric_model)


KMEANS_SAMPLE = 100_000  # crops k-means is fitted on; a larger cell is then assigned a chunk at a time


def bounded_cells(vectors: np.ndarray, max_block: int) -> list[np.ndarray]:
    """Row indices of k-means cells (on the normalised vectors) of at most max_block rows each.

    k-means cells are not equal: on similar pictures one cell can take most of a block, and the
    difference matrix (and OPTICS's time) grows with the square of a cell. A cell that is still
    too large is cut again by k-means, and by position when k-means cannot split it (vectors
    that are all but identical), so the cost per crop stays bounded by max_block.
    """
    pending, cells = [np.arange(len(vectors))], []
    while pending:
        members = pending.pop()
        if len(members) <= max_block:
            cells.append(members)
            continue
        assigned = kmeans_cells(vectors, members, math.ceil(len(members) / max_block))
        parts = [members[assigned == cell] for cell in np.unique(assigned)]
        if len(parts) == 1:
            parts = np.array_split(members, math.ceil(len(members) / max_block))
        pending.extend(parts)
    return cells


def kmeans_cells(vectors: np.ndarray, members: np.ndarray, cells: int) -> np.ndarray:
    """The k-means cell of each member row. Fitted on at most KMEANS_SAMPLE of them (or 64 per
    cell): a block of a million crops then needs neither a normalised copy of itself (3 GB) nor
    k-means passes over all of it; each row is assigned its nearest centre, a chunk at a time."""
    sample = members
    if len(members) > max(KMEANS_SAMPLE, 64 * cells):
        picked = np.random.default_rng(0).choice(len(members), max(KMEANS_SAMPLE, 64 * cells), replace=False)
        sample = members[np.sort(picked)]
    model = fitted_kmeans(vectors[sample], cells)
    return np.concatenate([model.predict(normalized(vectors[members[i:i + ROW_CHUNK]]))
                           for i in range(0, len(members), ROW_CHUNK)])


def fitted_kmeans(sample: np.ndarray, cells: int):
    """MiniBatchKMeans with `cells` centres, fitted on the sample vectors once normalised. The
    sample is normalised in place (callers hand over a copy of their rows): a copy of a sample
    of KMEANS_SAMPLE crops would be 300 MB more."""
    from sklearn.cluster import MiniBatchKMeans

    norms = np.linalg.norm(sample, axis=1, keepdims=True)
    sample /= np.where(norms > 0, norms, 1.0)
    return MiniBatchKMeans(n_clusters=cells, random_state=0, n_init=3, batch_size=4096).fit(sample)


def cluster_sums(vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """(sum of the normalised vectors, sum of the vector lengths, crops) of each cluster in `ids`.

    One pass over the crops (a one-hot sparse matrix times the vectors, a chunk of rows at a
    time): a mask per cluster would read every crop once per cluster, and a block of a million
    crops has ~20,000 clusters."""
    sums = np.zeros((len(ids), vectors.shape[1]), dtype=np.float64)
    lengths = np.zeros(len(ids), dtype=np.float64)
    counts = np.zeros(len(ids), dtype=np.float64)
    for start in range(0, len(vectors), ROW_CHUNK):
        chunk, found = vectors[start:start + ROW_CHUNK], labels[start:start + ROW_CHUNK]
        rows = np.flatnonzero(found >= 0)
        cluster = np.searchsorted(ids, found[rows])
        one_hot = coo_matrix((np.ones(len(rows), dtype=np.float32), (cluster, rows)),
                             shape=(len(ids), len(chunk))).tocsr()
        sums += one_hot @ normalized(chunk)
        lengths += one_hot @ np.linalg.norm(chunk, axis=1)
        counts += np.bincount(cluster, minlength=len(ids))
    return sums, lengths, counts


def cluster_means(vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean of the normalised vectors, mean vector length) of each cluster in `ids`."""
    sums, lengths, counts = cluster_sums(vectors, labels, ids)
    return (sums / counts[:, None]).astype(np.float32), lengths / counts


ROW_CHUNK = 16_384  # crops per step of the passes over a whole block
PAIR_CHUNK = 2048  # rows per difference matrix of the cross-cluster passes (2048 x clusters)


def merge_close_clusters(vectors: np.ndarray, labels: np.ndarray, settings: ClusterSettings,
                         differences: Differences) -> np.ndarray:
    """The labels of a block cut in cells, its clusters merged (merged_clusters) and its noise
    attached to the merged clusters (attached)."""
    ids = np.unique(labels[labels >= 0])
    if len(ids) < 2:
        return labels
    sums, lengths, counts = cluster_sums(vectors, labels, ids)
    merged = merged_clusters(sums, lengths, counts, settings, differences)
    clustered = labels >= 0
    labels = labels.copy()
    labels[clustered] = merged[np.searchsorted(ids, labels[clustered])]
    noise = np.flatnonzero(~clustered)
    labels[noise] = attached(vectors, noise, merged_means(sums, counts, merged), settings, differences)
    return labels


def merged_clusters(sums: np.ndarray, lengths: np.ndarray, counts: np.ndarray, settings: ClusterSettings,
                    differences: Differences) -> np.ndarray:
    """The merged cluster (0..m-1) of each cluster, from their cluster_sums: clusters whose mean
    vectors (imgutils' ccip_merge) differ by <= the threshold, transitively, become one."""
    unit_means, mean_lengths = (sums / counts[:, None]).astype(np.float32), lengths / counts
    means = normalized(unit_means) * mean_lengths[:, None].astype(np.float32)
    pairs = []
    for start in range(0, len(means), PAIR_CHUNK):  # the clusters' pairs a chunk at a time: never clusters^2 floats
        a, b = np.nonzero(differences.cross(means[start:start + PAIR_CHUNK], means) <= settings.threshold)
        pairs.append((a + start, b))
    a, b = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    _, merged = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(means), len(means))),
                                     directed=False)
    return merged


def merged_means(sums: np.ndarray, counts: np.ndarray, merged: np.ndarray) -> np.ndarray:
    """The mean normalised vector of each merged cluster, from its clusters' sums."""
    one_hot = coo_matrix((np.ones(len(merged)), (merged, np.arange(len(merged)))),
                         shape=(int(merged.max()) + 1, len(merged))).tocsr()
    return ((one_hot @ sums) / (one_hot @ counts)[:, None]).astype(np.float32)


def attached(vectors: np.ndarray, noise: np.ndarray, means: np.ndarray, settings: ClusterSettings,
             differences: Differences) -> np.ndarray:
    """The merged cluster of each noise crop (rows `noise` of `vectors`): the one whose mean is
    closest, when within the threshold; else -1.

    A cell boundary can leave a few crops of an identity with fewer than min_samples
    neighbours in their cell; on the whole block they would have been border points.
    """
    found = np.full(len(noise), -1, dtype=np.int64)
    for start in range(0, len(noise), PAIR_CHUNK):
        diff = differences.cross(vectors[noise[start:start + PAIR_CHUNK]], means)
        best = diff.argmin(axis=1)
        close = diff[np.arange(len(best)), best] <= settings.threshold
        found[start:start + PAIR_CHUNK][close] = best[close]
    return found


WINDOW_ROWS = 200_000  # crops whose blocks are planned and clustered together (~600 MB of vectors)
READ_ROWS = 50_000  # crops per batch read from DuckDB


def cluster_blocks(con, table: str, settings: ClusterSettings,
                   progress: Callable[[int], None] | None = None) -> pa.Table:
    """Cluster the crops of the DuckDB table `table` (key, crop, block, block_characters,
    vector), block by block. Cluster ids are unique across blocks; -1 is noise.

    Blocks of up to WINDOW_ROWS crops are read in windows of whole blocks of about WINDOW_ROWS
    crops, and all the sets of a window are clustered at once, in parallel (SetRunner). A larger
    block is clustered by LargeBlock, a window of its k-means cells at a time: no more than about
    a window's vectors are in memory, whatever the size of a block. `progress` is told the crops
    done after each window.
    """
    differences = differences_for(settings.metric_model)  # the one the clustering here uses too
    large = f'select block from "{table}" group by block having count(*) > $rows'
    small = f'select key, crop, block, block_characters, vector from "{table}" where block not in ({large})'
    out: list[pa.Table] = []
    offset = done = 0
    for window, vectors in ordered_windows(con, small, {"rows": WINDOW_ROWS}, "block, key, crop", "block"):
        labels = _unit_labels(window["block"].to_numpy(zero_copy_only=False), vectors, settings, differences, offset)
        out.append(_output(window, labels))
        offset = _next_id(labels, offset)
        done += window.num_rows
        if progress:
            progress(done)
    for (block,) in con.execute(large + " order by block", {"rows": WINDOW_ROWS}).fetchall():
        rows, labels = LargeBlock(con, table, block, settings, differences).labels(progress, done)
        labels = np.where(labels >= 0, labels + offset, -1)
        out.append(_output(rows, labels))
        offset = _next_id(labels, offset)
        done += rows.num_rows
    return pa.concat_tables(out) if out else OUTPUT_SCHEMA.empty_table()


def ordered_windows(con, source: str, params: dict, order_by: str, unit: str) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(the rows but their vectors, the vectors) of the rows of the query `source` (with key,
    crop and vector columns) in `order_by` order, a window of whole units (blocks, or cells of a
    large block) at a time, each window of at least WINDOW_ROWS rows but the last.

    DuckDB does not sort the vectors: an ORDER BY with 3 KB of vector a row does not spill well
    (DuckDB 2.0: Out of Memory once the vectors outgrow memory_limit). Only the keys are sorted,
    which gives each row its window and place; the vectors are read once, in storage order, into
    a file per window (Arrow IPC, under DuckDB's temp directory), and each window is put in order
    in memory when it is read back."""
    con.execute(f"create or replace temp table window_rows as "
                f"select key, crop, row_number() over (order by {order_by}) as place, "
                f"dense_rank() over (order by {unit}) as unit_number from ({source})", params)
    sizes = con.execute("select unit_number, count(*) as n from window_rows group by unit_number "
                        "order by unit_number").fetchnumpy()
    con.register("unit_windows", pa.table({"unit_number": sizes["unit_number"],
                                           "window": _windows_of_units(sizes["n"])}))
    con.execute("create or replace temp table row_windows as select r.key, r.crop, w.window, r.place "
                "from window_rows r join unit_windows w using (unit_number)")
    try:
        with tempfile.TemporaryDirectory(prefix="booruset-windows-", dir=spill_dir(con)) as folder:
            with joins_as_written(con):
                files = _scatter(con.sql(f"select r.window, r.place, s.* from ({source}) s "
                                         f"join row_windows r on r.key = s.key and r.crop = s.crop",
                                         params=params).to_arrow_reader(READ_ROWS), Path(folder))
            for path in files:
                with pa.ipc.open_stream(path) as stream:
                    rows = stream.read_all()
                path.unlink()
                yield _window_rows(rows)
    finally:
        con.unregister("unit_windows")
        con.execute("drop table if exists window_rows; drop table if exists row_windows")


def _windows_of_units(sizes: np.ndarray) -> np.ndarray:
    """The window of each unit, in order: a window closes once it holds WINDOW_ROWS rows."""
    windows = np.empty(len(sizes), dtype=np.int64)
    window = rows = 0
    for i, size in enumerate(sizes.tolist()):
        windows[i] = window
        rows += size
        if rows >= WINDOW_ROWS:
            window, rows = window + 1, 0
    return windows


def _scatter(reader: pa.RecordBatchReader, folder: Path) -> list[Path]:
    """Each batch's rows appended to the file of their window; the files in window order."""
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    try:
        for batch in reader:
            window = batch["window"].to_numpy()
            order = np.argsort(window, kind="stable")
            batch, window = _taken(batch, order), window[order]
            starts = [0, *(np.flatnonzero(window[1:] != window[:-1]) + 1).tolist(), len(window)]
            for a, b in zip(starts, starts[1:], strict=False):
                if int(window[a]) not in writers:
                    writers[int(window[a])] = pa.ipc.new_stream(folder / f"{int(window[a]):06d}.arrow", batch.schema)
                writers[int(window[a])].write_batch(batch.slice(a, b - a))
    finally:
        for writer in writers.values():
            writer.close()
    return [folder / f"{w:06d}.arrow" for w in sorted(writers)]


def _taken(batch: pa.RecordBatch, order: np.ndarray) -> pa.RecordBatch:
    """The batch's rows in `order`, the vectors moved in numpy (a fixed-size list after): Arrow's
    take on the variable-size list DuckDB returns for them took 1.27 s for 50,000 rows, numpy 0.05 s."""
    rest = batch.drop_columns(["vector"]).take(pa.array(order))
    vectors = _vector_array(pa.chunked_array([batch["vector"]]))[order]
    return rest.append_column("vector", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)),
                                                                          schemas.CCIP_DIM))


def _finite(vectors: np.ndarray) -> np.ndarray:
    finite = np.isfinite(vectors).all(axis=1)
    return vectors if finite.all() else vectors[finite]


def _window_rows(window: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """(the other columns, copied, the vectors) of a window file, in `place` order, the vectors
    moved in numpy (see _taken). Copied: slices of what was read would keep the whole read
    buffer, its vectors included, alive as long as the keys are kept (to the end)."""
    order = pc.sort_indices(window["place"]).to_numpy()
    rest = window.drop_columns(["window", "place", "vector"]).take(order)
    return (pa.table([pa.concat_arrays(column.chunks) for column in rest.columns], names=rest.column_names),
            _vector_array(window["vector"])[order])


def _vector_array(column: pa.ChunkedArray) -> np.ndarray:
    vectors = np.concatenate([chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks])
    return vectors.reshape(-1, schemas.CCIP_DIM).astype(np.float32, copy=False)


def _unit_labels(units: np.ndarray, vectors: np.ndarray, settings: ClusterSettings, differences: Differences,
                 first_id: int, merge: bool = True) -> np.ndarray:
    """Labels (-1: noise) of a window's units, the runs of equal `units` (blocks, or a large
    block's cells), each clustered alone, cluster ids from first_id; the cells a unit is cut in
    merged unless `merge` is false (BlockPlan.labels).

    The sets of units that need no k-means are sent first, so that their tasks run while the
    large units are cut into cells."""
    cuts = [0, *(np.flatnonzero(units[1:] != units[:-1]) + 1).tolist(), len(units)]
    plans = [BlockPlan(vectors[a:b], settings) for a, b in zip(cuts, cuts[1:], strict=False)]
    runner = SetRunner(settings, in_tasks=len(vectors) >= PARALLEL_MIN_ROWS)
    order = [p for p in plans if not p.split] + [p for p in plans if p.split]
    for plan in order:
        plan.cut()
        runner.add(plan.sets())
    found = iter(runner.labels())
    set_labels = {id(plan): [next(found) for _ in plan.members] for plan in order}
    labels, next_id = [], first_id
    for plan in plans:
        unit = plan.labels(set_labels[id(plan)], differences, merge)
        labels.append(np.where(unit >= 0, unit + next_id, -1))
        next_id = _next_id(labels[-1], next_id)
    return np.concatenate(labels)


def _next_id(labels: np.ndarray, first_id: int) -> int:
    """The first cluster id after those of `labels` (first_id when all are noise)."""
    return int(labels.max()) + 1 if (labels >= 0).any() else first_id


def _output(rows: pa.Table, labels: np.ndarray) -> pa.Table:
    return pa.table({"key": rows["key"], "crop": rows["crop"].cast(pa.int32()),
                     "cluster": pa.array(labels.astype(np.int32)), "block": rows["block"],
                     "block_characters": rows["block_characters"].cast(pa.int32())}, schema=OUTPUT_SCHEMA)


class LargeBlock:
    """A block of more than WINDOW_ROWS crops, clustered as BlockPlan clusters a block cut in
    k-means cells, without ever holding all its vectors: they are read from DuckDB four times.

    1. a sample of the block (about KMEANS_SAMPLE crops, by a hash of key and crop) fits k-means;
    2. each crop is assigned its cell (a batch at a time; only keys and cells are kept);
    3. the crops are read ordered by cell, a window of whole cells at a time: each cell is
       clustered alone (cut again if still larger than max_block), the sums of its clusters
       (cluster_sums) are kept and its vectors let go;
    4. the clusters are merged from their sums (merged_clusters), and the noise crops are read
       once more to be attached to the merged clusters (attached).
    """

    def __init__(self, con, table: str, block: str, settings: ClusterSettings, differences: Differences) -> None:
        self.con, self.table, self.block = con, table, block
        self.settings, self.differences = settings, differences

    def labels(self, progress: Callable[[int], None] | None = None,
               done_before: int = 0) -> tuple[pa.Table, np.ndarray]:
        """(the block's rows but their vectors, their labels: cluster ids from 0, -1 noise);
        `progress` is told done_before + the block's crops done after each window."""
        self.con.register("large_block_cells", self._cells())
        try:
            rows, labels, ids, sums = self._cluster_cells(progress, done_before)
        finally:
            self.con.unregister("large_block_cells")
        if len(ids) >= 2:
            merged = merged_clusters(*sums, self.settings, self.differences)
            clustered = labels >= 0
            labels[clustered] = merged[np.searchsorted(ids, labels[clustered])]
            self._attach_noise(rows, labels, merged_means(sums[0], sums[2], merged))
        return rows, labels

    def _read(self, query: str) -> pa.RecordBatchReader:
        return self.con.sql(query, params={"block": self.block}).to_arrow_reader(READ_ROWS)

    def _cells(self) -> pa.Table:
        """(key, crop, cell) of every crop; a crop whose embedding is not finite: cell 0."""
        n = self.con.execute(f'select count(*) from "{self.table}" where block = $block',
                             {"block": self.block}).fetchall()[0][0]
        cells = math.ceil(n / self.settings.max_block)
        # about KMEANS_SAMPLE crops, picked by a hash of where they are (the same on a rerun),
        # read as a stream: an ORDER BY ... LIMIT would hold the sample in DuckDB as well
        share = min(1.0, max(KMEANS_SAMPLE, 64 * cells) / n)
        reader = self.con.sql(f'select vector from "{self.table}" where block = $block and hash(key, crop) <= $cut',
                              params={"block": self.block, "cut": int(share * (2**64 - 1))}).to_arrow_reader(READ_ROWS)
        sample = [_finite(_vector_array(pa.chunked_array([batch["vector"]]))) for batch in reader]
        sample = np.concatenate(sample) if sample else np.empty((0, schemas.CCIP_DIM), np.float32)
        model = fitted_kmeans(sample, min(cells, len(sample))) if len(sample) else None
        del sample
        parts = []
        for batch in self._read(f'select key, crop, vector from "{self.table}" where block = $block'):
            vectors = _vector_array(pa.chunked_array([batch["vector"]]))
            finite = np.isfinite(vectors).all(axis=1)
            cell = np.zeros(len(vectors), dtype=np.int32)
            if model is not None and finite.any():
                cell[finite] = model.predict(normalized(vectors[finite]))
            # copies of the keys (see _window_rows)
            parts.append(pa.table({"key": pa.concat_arrays([batch["key"]]), "crop": pa.concat_arrays([batch["crop"]]),
                                   "cell": cell}))
        return pa.concat_tables(parts)

    def _cluster_cells(self, progress, done: int) -> tuple[pa.Table, np.ndarray, np.ndarray, tuple]:
        """(the rows but their vectors, their labels, the cluster ids, the clusters' sums)."""
        source = (f'select t.key, t.crop, t.block, t.block_characters, c.cell, t.vector '
                  f'from "{self.table}" t join large_block_cells c using (key, crop) where t.block = $block')
        rows, labels, ids, sums = [], [], [], []
        next_id = 0
        for window, vectors in ordered_windows(self.con, source, {"block": self.block}, "cell, key, crop", "cell"):
            found = _unit_labels(window["cell"].to_numpy(), vectors, self.settings, self.differences, next_id,
                                 merge=False)  # the block merges the clusters of all its cells at its end
            next_id = _next_id(found, next_id)
            ids.append(np.unique(found[found >= 0]))
            sums.append(cluster_sums(vectors, found, ids[-1]))
            rows.append(window.drop_columns(["cell"]))
            labels.append(found)
            done += window.num_rows
            if progress:
                progress(done)
        return (pa.concat_tables(rows), np.concatenate(labels), np.concatenate(ids),
                tuple(np.concatenate(part) for part in zip(*sums, strict=True)))

    def _attach_noise(self, rows: pa.Table, labels: np.ndarray, means: np.ndarray) -> None:
        noise = np.flatnonzero(labels < 0)
        self.con.register("large_block_noise", pa.table({"key": rows["key"].take(noise),
                                                         "crop": rows["crop"].take(noise), "row": noise}))
        query = (f'select n.row, t.vector from "{self.table}" t '
                 f"join large_block_noise n using (key, crop) where t.block = $block")
        try:
            with joins_as_written(self.con):
                for batch in self._read(query):
                    vectors = _vector_array(pa.chunked_array([batch["vector"]]))
                    finite = np.flatnonzero(np.isfinite(vectors).all(axis=1))
                    row = batch["row"].to_numpy()[finite]
                    labels[row] = attached(vectors, finite, means, self.settings, self.differences)
        finally:
            self.con.unregister("large_block_noise")


def references(path: str, ccip_spec: dict | None = None) -> pa.Table:
    """Reference embeddings per character, or an empty table.

    `path` is a Parquet table (columns character, vector), or a folder with one sub-folder of
    reference images per character, embedded here with annotate's CCIP feature model
    (`ccip_spec`: the [annotate.ccip] options plus models_dir), preprocessed as imgutils does.
    """
    if not path:
        return REFERENCES_SCHEMA.empty_table()
    if Path(path).is_dir():
        return checked_references(reference_folder(Path(path), ccip_spec or {}), path)
    try:
        table = pq.read_table(path, columns=["character", "vector"]).cast(REFERENCES_SCHEMA)
    except pa.ArrowException as exc:  # not only ArrowInvalid: a text vector is ArrowNotImplementedError
        if isinstance(exc, OSError):  # a file that cannot be read says so itself
            raise
        raise ValueError(f"{path}: not a table of references (character, vector of {schemas.CCIP_DIM} "
                         f"floats): {exc}") from None
    return checked_references(table, path)


def checked_references(table: pa.Table, path: str) -> pa.Table:
    """The table with its characters named as ingest writes tags (normalize_tag: `Alice (Genshin)`
    is alice_(genshin), a macOS folder name's NFD is NFC), so that they equal the images' character
    tags; or ValueError naming its first reference (from 0) with no character or with a zero,
    missing or not finite vector: the SQL averages a crop's differences to each character's
    references, and one NaN among them made the character match nothing, silently."""
    from udfs.ingest.sidecars import normalize_tag

    characters = [normalize_tag(c) if c is not None else None for c in table["character"].to_pylist()]
    vectors = table["vector"].combine_chunks()
    for row in range(table.num_rows):
        if not characters[row]:
            raise ValueError(f"{path}: reference {row} has no character")
        vector = vectors[row].values.to_numpy(zero_copy_only=False) if vectors[row].is_valid else None
        if vector is None or not np.isfinite(vector).all() or not vector.any():
            raise ValueError(f"{path}: reference {row} ({characters[row]!r}): its vector is zero or not finite")
    return table.set_column(0, "character", pa.array(characters, pa.string()))


REFERENCE_MEANS_SCHEMA = pa.schema([("character", pa.string()), ("length", pa.float64()),
                                    ("direction", pa.list_(pa.float32(), schemas.CCIP_DIM))])


def reference_means(table: pa.Table) -> pa.Table:
    """(character, length, direction) per character of a references table: the mean of its unit
    reference vectors as a length and a unit vector. A crop's mean difference to a character's
    references, mean(1 - cos(crop, r)), is 1 - length * cos(crop, direction), so sql/071 makes one
    product per crop and character instead of one per crop and reference (20,000 crops and 200
    references of 40 characters: 28 s of the clusters step went in that join)."""
    if not table.num_rows:
        return REFERENCE_MEANS_SCHEMA.empty_table()
    names, index = np.unique(np.array(table["character"].to_pylist(), dtype=object), return_inverse=True)
    sums = np.zeros((len(names), schemas.CCIP_DIM))
    np.add.at(sums, index, normalized(_vector_array(table["vector"]).astype(np.float64)))
    means = sums / np.bincount(index)[:, None]
    lengths = np.linalg.norm(means, axis=1)
    # references that cancel out: length 0, a mean difference of 1 whatever the direction
    directions = np.where(lengths[:, None] > 0, means / np.where(lengths > 0, lengths, 1.0)[:, None], 1.0)
    return pa.table({"character": names.tolist(), "length": lengths,
                     "direction": pa.FixedSizeListArray.from_arrays(pa.array(directions.astype(np.float32).reshape(-1)),
                                                                    schemas.CCIP_DIM)}, schema=REFERENCE_MEANS_SCHEMA)


def reference_folder(root: Path, ccip_spec: dict) -> pa.Table:
    from PIL import Image

    from udfs.annotate.ccip import CcipFeatures
    from udfs.annotate.images import ccip_input, to_rgb_on_white
    from udfs.eight_bit import eight_bit
    from udfs.orientation import upright

    # hidden entries are no references: a Mac's `._1.png` (no picture), a viewer's `.thumbnails/`
    files = sorted((d.name, f) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                   for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
    if not files:
        raise ValueError(f"{root}: no <character>/<image> reference files")
    size = int(ccip_spec["size"])
    images = []
    for _character, file in files:
        try:
            with Image.open(file) as image:
                # decoded before its orientation is asked: Pillow decodes a PNG to look for its
                # EXIF and our reader swallows errors, so a broken file became a noise embedding
                image.load()
                images.append(ccip_input(to_rgb_on_white(eight_bit(upright(image))), size))
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ValueError(f"reference image {file} does not decode: {type(exc).__name__}: {exc}") from exc
    model = CcipFeatures(ccip_spec, input="image", output="ccip")
    vectors = model.features(np.stack(images)).astype(np.float32)
    return pa.table({"character": [c for c, _ in files],
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])},
                    ).cast(REFERENCES_SCHEMA)
