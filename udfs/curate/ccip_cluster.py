"""Identity clustering of CCIP crops with the semantics of imgutils' `ccip_clustering`.

imgutils runs sklearn's OPTICS (max_eps, min_samples) or DBSCAN (eps, min_samples) on the
matrix of CCIP differences of all images at once. Here the same sklearn estimators run on a
precomputed difference matrix (identical neighbourhoods), block by block:

- a block is the set of crops whose images have the same character tags (sql/070), so pairwise
  differences are computed inside blocks only;
- a block larger than `max_block` is cut into k-means cells of about that size (scikit-learn
  MiniBatchKMeans on the normalised vectors), each cell is clustered, and clusters of different
  cells whose mean vectors (imgutils' ccip_merge) are within the same-character threshold are
  merged. Cost: O(sum of cell sizes squared) instead of O(n squared).

The difference is 1 - cosine similarity, or the CCIP metric model (model_metrics.onnx, the
model imgutils' ccip_batch_differences runs) when one is configured.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
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
    # assume_finite: OPTICS looks up each point's neighbours in its own call, and sklearn would
    # check the whole row for NaN again in each (about a third of the clustering time)
    with warnings.catch_warnings(), np.errstate(divide="ignore"), sklearn.config_context(assume_finite=True):
        # a cell whose crops are all noise, or all identical, is a normal result here, not a
        # problem to report once per cell ("All reachability values are inf", divide by zero)
        warnings.simplefilter("ignore", UserWarning)
        return estimator.fit(diff).labels_.astype(np.int64)


def cluster_vectors(vectors: np.ndarray, settings: ClusterSettings, differences: Differences) -> np.ndarray:
    """Labels of one block: directly when small, else k-means cells + merge across cells.
    A crop whose embedding is not finite (a broken model output) is noise."""
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        labels = np.full(len(vectors), -1, dtype=np.int64)
        labels[finite] = cluster_vectors(vectors[finite], settings, differences)
        return labels
    n = len(vectors)
    if n <= settings.max_block:
        return cluster_matrix(differences(vectors), settings)
    labels = np.full(n, -1, dtype=np.int64)
    next_label = 0
    for members in bounded_cells(normalized(vectors), settings.max_block):
        cell_labels = cluster_matrix(differences(vectors[members]), settings)
        found = cell_labels >= 0
        labels[members[found]] = cell_labels[found] + next_label
        next_label += int(cell_labels.max()) + 1 if found.any() else 0
    return merge_close_clusters(vectors, labels, settings, differences)


def bounded_cells(unit: np.ndarray, max_block: int) -> list[np.ndarray]:
    """Row indices of k-means cells of at most max_block rows each.

    k-means cells are not equal: on similar pictures one cell can take most of a block, and the
    difference matrix (and OPTICS's time) grows with the square of a cell. A cell that is still
    too large is cut again by k-means, and by position when k-means cannot split it (vectors
    that are all but identical), so the cost per crop stays bounded by max_block.
    """
    from sklearn.cluster import MiniBatchKMeans

    pending, cells = [np.arange(len(unit))], []
    while pending:
        members = pending.pop()
        if len(members) <= max_block:
            cells.append(members)
            continue
        assigned = MiniBatchKMeans(n_clusters=math.ceil(len(members) / max_block), random_state=0,
                                   n_init=3, batch_size=4096).fit_predict(unit[members])
        parts = [members[assigned == cell] for cell in np.unique(assigned)]
        if len(parts) == 1:
            parts = np.array_split(members, math.ceil(len(members) / max_block))
        pending.extend(parts)
    return cells


def merge_close_clusters(vectors: np.ndarray, labels: np.ndarray, settings: ClusterSettings,
                         differences: Differences) -> np.ndarray:
    """Merge clusters whose mean vectors (imgutils' ccip_merge) differ by <= the threshold."""
    ids = np.unique(labels[labels >= 0])
    if len(ids) < 2:
        return labels
    lengths = np.linalg.norm(vectors, axis=1)
    means = []
    for i in ids:
        unit = normalized(vectors[labels == i]).mean(axis=0)
        means.append(unit / max(np.linalg.norm(unit), 1e-12) * lengths[labels == i].mean())
    close = differences(np.stack(means).astype(np.float32)) <= settings.threshold
    a, b = np.nonzero(close)
    _, merged = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(ids), len(ids))),
                                     directed=False)
    relabel = dict(zip(ids.tolist(), merged.tolist(), strict=True))
    labels = np.array([relabel.get(int(x), -1) for x in labels], dtype=np.int64)
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
    means = np.stack([normalized(vectors[labels == i]).mean(axis=0) for i in ids]).astype(np.float32)
    for start in range(0, len(noise), 2048):
        chunk = noise[start:start + 2048]
        diff = differences(np.concatenate([vectors[chunk], means]))[: len(chunk), len(chunk):]
        best = diff.argmin(axis=1)
        close = diff[np.arange(len(chunk)), best] <= settings.threshold
        labels[chunk[close]] = ids[best[close]]
    return labels


def cluster_blocks(cursor, settings: ClusterSettings) -> pa.Table:
    """Cluster the rows of `cursor` (key, crop, block, block_characters, vector), block by block.

    Rows arrive ordered by block, so one block is in memory at a time. Cluster ids are unique
    across blocks; -1 is noise.
    """
    differences = Differences(settings.metric_model)
    out: list[pa.Table] = []
    pending: list[pa.RecordBatch] = []
    offset = 0

    def flush() -> None:
        nonlocal offset
        if not pending:
            return
        block = pa.Table.from_batches(pending).combine_chunks()
        vectors = block["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        labels = cluster_vectors(vectors.reshape(-1, schemas.CCIP_DIM).astype(np.float32), settings, differences)
        shifted = np.where(labels >= 0, labels + offset, -1)
        offset += int(labels.max()) + 1 if (labels >= 0).any() else 0
        out.append(pa.table({"key": block["key"], "crop": block["crop"].cast(pa.int32()),
                             "cluster": pa.array(shifted.astype(np.int32)), "block": block["block"],
                             "block_characters": block["block_characters"].cast(pa.int32())},
                            schema=OUTPUT_SCHEMA))
        pending.clear()

    for batch in cursor.to_arrow_reader(50_000):
        names = batch.column("block").to_numpy(zero_copy_only=False)
        cuts = [0, *(np.flatnonzero(names[1:] != names[:-1]) + 1).tolist(), batch.num_rows]
        for start, stop in zip(cuts, cuts[1:], strict=False):
            if pending and pending[-1].column("block")[0].as_py() != names[start]:
                flush()
            pending.append(batch.slice(start, stop - start))
    flush()
    return pa.concat_tables(out) if out else OUTPUT_SCHEMA.empty_table()


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
