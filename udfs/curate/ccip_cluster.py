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
  up, and nothing per cluster pair or per (crop, cluster) pair is held whole.

The difference is 1 - cosine similarity, or the CCIP metric model (model_metrics.onnx, the
model imgutils' ccip_batch_differences runs) when one is configured.
"""

from __future__ import annotations

import functools
import math
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
        return cls(method=method, eps=float(opts["cluster_eps"]) or default_eps,
                   min_samples=int(opts["cluster_min_samples"]) or default_min, threshold=threshold,
                   metric_model=str(opts["ccip_metric_model"]), max_block=int(opts["max_block"]))


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
    from sklearn.cluster import DBSCAN, OPTICS

    n = len(diff)
    if n < max(settings.min_samples, 2):
        return np.full(n, -1, dtype=np.int64)
    if not np.isfinite(diff).all():  # checked once here, so sklearn need not (see below)
        raise ValueError("CCIP differences hold NaN or infinity (a crop's embedding is not finite)")
    if settings.method == "dbscan":
        estimator = DBSCAN(eps=settings.eps, min_samples=settings.min_samples, metric="precomputed")
    else:
        estimator = OPTICS(max_eps=settings.eps, min_samples=settings.min_samples, metric="precomputed")
    # OPTICS looks up each point's neighbours in its own call, and sklearn would check the whole
    # row for NaN again in each (assume_finite: about a third of the clustering time) and bind
    # the arguments of each call to check them (skip_parameter_validation: half of what remained,
    # 1.03 s -> 0.53 s for a cell of 1,729 crops); the labels are the same
    with warnings.catch_warnings(), np.errstate(divide="ignore"), sklearn.config_context(
            assume_finite=True, skip_parameter_validation=True):
        # a cell whose crops are all noise, or all identical, is a normal result here, not a
        # problem to report once per cell ("All reachability values are inf", divide by zero)
        warnings.simplefilter("ignore", UserWarning)
        return estimator.fit(diff).labels_.astype(np.int64)


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

    def labels(self, set_labels: list[np.ndarray], differences: Differences) -> np.ndarray:
        """The block's labels (-1: noise) from each set's labels, in the order of sets()."""
        usable = np.full(len(self.usable), -1, dtype=np.int64)
        next_label = 0
        for members, found in zip(self.members, set_labels, strict=True):
            kept = found >= 0
            usable[members[kept]] = found[kept] + next_label
            next_label += int(found.max()) + 1 if kept.any() else 0
        if self.split:
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
    and OPTICS is a Python loop per crop, ~0.4 ms, that one process cannot share across cores):
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


@functools.lru_cache(maxsize=2)
def differences_for(metric_model: str) -> Differences:
    """One Differences per process and model: a clustering task's worker loads the metric model once."""
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
    from sklearn.cluster import MiniBatchKMeans

    sample = members
    if len(members) > max(KMEANS_SAMPLE, 64 * cells):
        picked = np.random.default_rng(0).choice(len(members), max(KMEANS_SAMPLE, 64 * cells), replace=False)
        sample = members[np.sort(picked)]
    model = MiniBatchKMeans(n_clusters=cells, random_state=0, n_init=3, batch_size=4096)
    model.fit(normalized(vectors[sample]))
    return np.concatenate([model.predict(normalized(vectors[members[i:i + ROW_CHUNK]]))
                           for i in range(0, len(members), ROW_CHUNK)])


def cluster_means(vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean of the normalised vectors, mean vector length) of each cluster in `ids`.

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
    return (sums / counts[:, None]).astype(np.float32), lengths / counts


ROW_CHUNK = 16_384  # crops per step of the passes over a whole block
PAIR_CHUNK = 2048  # rows per difference matrix of the cross-cluster passes (2048 x clusters)


def merge_close_clusters(vectors: np.ndarray, labels: np.ndarray, settings: ClusterSettings,
                         differences: Differences) -> np.ndarray:
    """Merge clusters whose mean vectors (imgutils' ccip_merge) differ by <= the threshold."""
    ids = np.unique(labels[labels >= 0])
    if len(ids) < 2:
        return labels
    unit_means, lengths = cluster_means(vectors, labels, ids)
    means = normalized(unit_means) * lengths[:, None].astype(np.float32)
    pairs = []
    for start in range(0, len(ids), PAIR_CHUNK):  # the clusters' pairs a chunk at a time: never clusters^2 floats
        a, b = np.nonzero(differences.cross(means[start:start + PAIR_CHUNK], means) <= settings.threshold)
        pairs.append((a + start, b))
    a, b = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    _, merged = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(ids), len(ids))),
                                     directed=False)
    clustered = labels >= 0
    labels = labels.copy()
    labels[clustered] = merged[np.searchsorted(ids, labels[clustered])]
    return attach_noise(vectors, labels, settings, differences)


def attach_noise(vectors: np.ndarray, labels: np.ndarray, settings: ClusterSettings,
                 differences: Differences) -> np.ndarray:
    """Give a noise crop of a split block the closest cluster whose mean is within the threshold.

    A cell boundary can leave a few crops of an identity with fewer than min_samples
    neighbours in their cell; on the whole block they would have been border points.
    """
    ids = np.unique(labels[labels >= 0])
    noise = np.flatnonzero(labels < 0)
    if len(ids) == 0 or len(noise) == 0:
        return labels
    means, _ = cluster_means(vectors, labels, ids)
    for start in range(0, len(noise), PAIR_CHUNK):
        chunk = noise[start:start + PAIR_CHUNK]
        diff = differences.cross(vectors[chunk], means)
        best = diff.argmin(axis=1)
        close = diff[np.arange(len(chunk)), best] <= settings.threshold
        labels[chunk[close]] = ids[best[close]]
    return labels


WINDOW_ROWS = 200_000  # crops whose blocks are planned and clustered together (~600 MB of vectors)
READ_ROWS = 50_000  # crops per batch read from DuckDB


def cluster_blocks(cursor, settings: ClusterSettings, progress: Callable[[int], None] | None = None) -> pa.Table:
    """Cluster the rows of `cursor` (key, crop, block, block_characters, vector), block by block.

    Rows must arrive ordered by block (a block seen again after others is an error: its pieces
    would be clustered apart). They are cut into windows of whole blocks of about
    WINDOW_ROWS crops (one larger block is a window alone), and all the sets of a window are
    clustered at once, in parallel (SetRunner); `progress` is told the crops done after each
    window. Cluster ids are unique across blocks; -1 is noise.
    """
    differences = differences_for(settings.metric_model)  # the one the clustering here uses too
    out: list[pa.Table] = []
    offset = done = 0
    last_block = None
    for window, vectors in _windows(cursor):
        last_block = _check_order(window["block"], last_block)
        offset = _cluster_window(window, vectors, settings, differences, offset, out)
        done += window.num_rows
        if progress:
            progress(done)
    return pa.concat_tables(out) if out else OUTPUT_SCHEMA.empty_table()


def _windows(cursor) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(the rows but their vectors, the vectors) of windows of whole blocks, each of at least
    WINDOW_ROWS rows but the last. Only the vectors of the window at work and of the batch
    being read are in memory: the read batches are let go before a window is handed out."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in cursor.to_arrow_reader(READ_ROWS):
        pending.append(batch)
        rows += batch.num_rows
        if rows < WINDOW_ROWS:
            continue
        table = pa.Table.from_batches(pending)
        # the last block may go on in the next batch: it waits for the next window
        last = table.num_rows - pc.sum(pc.equal(table["block"], table["block"][-1])).as_py()
        if last > 0:
            window = _without_vectors(table.slice(0, last))
            pending, rows = table.slice(last).to_batches(), table.num_rows - last
            del table
            yield window
    if rows:
        yield _without_vectors(pa.Table.from_batches(pending))


def _check_order(blocks: pa.ChunkedArray, after: str | None) -> str:
    """The window's last block; raises unless its blocks are in order and follow `after`."""
    names = blocks.to_numpy(zero_copy_only=False)
    if (after is not None and names[0] <= after) or not (names[1:] >= names[:-1]).all():
        raise ValueError("cluster_blocks: crops must come ordered by block (ORDER BY block)")
    return names[-1]


def _without_vectors(window: pa.Table) -> tuple[pa.Table, np.ndarray]:
    vectors = np.concatenate([chunk.flatten().to_numpy(zero_copy_only=False) for chunk in window["vector"].chunks])
    return window.drop_columns(["vector"]), vectors.reshape(-1, schemas.CCIP_DIM).astype(np.float32, copy=False)


def _cluster_window(window: pa.Table, vectors: np.ndarray, settings: ClusterSettings, differences: Differences,
                    offset: int, out: list[pa.Table]) -> int:
    """Cluster a window's blocks into `out`, their cluster ids from `offset`; the next offset.

    The sets of blocks that need no k-means are sent first, so that their tasks run while the
    large blocks are cut into cells."""
    names = window["block"].to_numpy(zero_copy_only=False)
    cuts = [0, *(np.flatnonzero(names[1:] != names[:-1]) + 1).tolist(), window.num_rows]
    plans = [BlockPlan(vectors[a:b], settings) for a, b in zip(cuts, cuts[1:], strict=False)]
    runner = SetRunner(settings, in_tasks=len(vectors) >= PARALLEL_MIN_ROWS)
    order = [p for p in plans if not p.split] + [p for p in plans if p.split]
    for plan in order:
        plan.cut()
        runner.add(plan.sets())
    found = iter(runner.labels())
    set_labels = {id(plan): [next(found) for _ in plan.members] for plan in order}
    labels = []
    for plan in plans:
        block = plan.labels(set_labels[id(plan)], differences)
        labels.append(np.where(block >= 0, block + offset, -1))
        offset += int(block.max()) + 1 if (block >= 0).any() else 0
    out.append(pa.table({"key": window["key"], "crop": window["crop"].cast(pa.int32()),
                         "cluster": pa.array(np.concatenate(labels).astype(np.int32)), "block": window["block"],
                         "block_characters": window["block_characters"].cast(pa.int32())}, schema=OUTPUT_SCHEMA))
    return offset


def references(path: str, ccip_spec: dict | None = None) -> pa.Table:
    """Reference embeddings per character, or an empty table.

    `path` is a Parquet table (columns character, vector), or a folder with one sub-folder of
    reference images per character, embedded here with annotate's CCIP feature model
    (`ccip_spec`: the [annotate.ccip] options plus models_dir), preprocessed as imgutils does.
    """
    if not path:
        return REFERENCES_SCHEMA.empty_table()
    if Path(path).is_dir():
        return reference_folder(Path(path), ccip_spec or {})
    table = pq.read_table(path, columns=["character", "vector"])
    return table.cast(REFERENCES_SCHEMA)


def reference_folder(root: Path, ccip_spec: dict) -> pa.Table:
    from PIL import Image

    from udfs.annotate.ccip import CcipFeatures
    from udfs.annotate.images import ccip_input, to_rgb_on_white
    from udfs.orientation import upright

    files = sorted((d.name, f) for d in root.iterdir() if d.is_dir() for f in sorted(d.iterdir())
                   if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no <character>/<image> reference files")
    model = CcipFeatures(ccip_spec, input="image", output="ccip")
    size = int(ccip_spec["size"])
    images = []
    for _character, file in files:
        with Image.open(file) as image:
            images.append(ccip_input(to_rgb_on_white(upright(image)), size))
    vectors = model.features(np.stack(images)).astype(np.float32)
    return pa.table({"character": [c for c, _ in files],
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])},
                    ).cast(REFERENCES_SCHEMA)
