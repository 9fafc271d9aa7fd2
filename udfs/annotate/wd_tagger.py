"""The WD v3 tagger (imgutils' get_wd14_tags; default SwinV2 v3) as a batched actor.

One session.run per batch (NHWC float32 BGR, the tagger's layout). Every general and
character label scoring above `score_floor` is kept, and the rating scores always, so that
thresholds are chosen later in SQL rather than baked in here.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from schemas import REGIONS, WHOLE_IMAGE
from udfs.annotate.model_actor import ModelActor
from udfs.annotate.model_files import model_file
from udfs.annotate.onnx_session import open_session, rows_per_run, run_batched

# selected_tags.csv category codes (imgutils.tagging.wd14._get_wd14_labels)
CATEGORIES = {9: "rating", 0: "general", 4: "character"}


def load_labels(path: str) -> tuple[list[str], list[str]]:
    """(tag names, category names) in the model's output order. Names are read as written: pandas'
    defaults read a tag named `null`, `nan`, `none` or `n/a` as a missing value (NaN)."""
    frame = pd.read_csv(path, keep_default_na=False, dtype={"name": str})
    return frame["name"].tolist(), [CATEGORIES.get(int(c), str(c)) for c in frame["category"]]


class WdTagger(ModelActor):
    """map_batches callable: column `input` (uint8 NHWC BGR), with `tagger_crops` (the person
    crops, preprocessed alike; their person indexes in `crop_boxes`) and `tagger_regions` (the
    2x2 regions) when annotate cuts them -> `output`: JSON [[crop, [[tag, category, score], ...]], ...]
    for the whole image (crop WHOLE_IMAGE), each person crop and each region (schemas.REGIONS)."""

    def __init__(self, spec: dict, input: str, output: str, device: str = "auto",
                 drop_input: bool = True) -> None:
        super().__init__(output, drop=(input,) * drop_input + ("tagger_crops", "tagger_regions"))
        models_dir = spec.get("models_dir", "")
        path = model_file(spec["repo"], spec["file"], models_dir, spec.get("revision", "main"))
        self.names, self.categories = load_labels(model_file(spec["labels_repo"], spec["labels_file"], models_dir,
                                                             spec.get("labels_revision", "main")))
        self.session, self.provider = open_session(path, device, spec.get("threads", 0))
        # crops and regions multiply a batch's images (up to 1 + max_crops + 4 each): run them
        # max_batch at a time (run_batched converts each chunk to float32 as it goes in)
        self.max_batch = rows_per_run(self.session, self.provider, spec)
        self._float_buffer: np.ndarray | None = None  # float_input's
        self.floor = float(spec["score_floor"])
        self.rating = np.array([c == "rating" for c in self.categories])
        self.input = input
        self.size = int(self.session.get_inputs()[0].shape[1])  # NHWC: the side crops are cut to

    def predict(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> list[str]:
        stacks, codes = [], []
        for i in rows:
            parts, names = [batch[self.input][i][None]], [WHOLE_IMAGE]
            if "tagger_crops" in batch and batch["tagger_crops"][i]:
                parts.append(np.frombuffer(batch["tagger_crops"][i], np.uint8).reshape(-1, self.size, self.size, 3))
                names += [box[0] for box in json.loads(batch["crop_boxes"][i])]
            if "tagger_regions" in batch:
                parts.append(batch["tagger_regions"][i])
                names += list(REGIONS)
            stacks.append(np.concatenate(parts))
            codes.append(names)
        scores = self.scores(np.concatenate(stacks))  # whole images, crops and regions together
        bounds = np.cumsum([0, *(len(s) for s in stacks)])
        return [json.dumps([[code, self.tags(p, whole=code == WHOLE_IMAGE)] for code, p in zip(names, scores[a:b],
                                                                                                 strict=True)])
                for names, a, b in zip(codes, bounds[:-1], bounds[1:], strict=True)]

    def scores(self, images: np.ndarray) -> np.ndarray:
        """Label scores (N, labels) for a stack of preprocessed uint8 images, max_batch per run."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        # the tagger's first output is the label scores (the second, with embeddings, is unused)
        (preds,) = run_batched(self.session, [outputs[0].name], inputs[0].name, images, self.max_batch,
                               prepare=self.float_input)
        if preds.ndim != 2 or preds.shape[1] != len(self.names):
            # scores are named by position (the start checks a label axis the file fixes, not a dynamic one)
            raise ValueError(f"the tagger scores {preds.shape[1] if preds.ndim == 2 else list(preds.shape[1:])} "
                             f"labels but its label file has {len(self.names)}: set annotate.tagger.labels_repo / "
                             "labels_file to the model's own selected_tags.csv")
        return preds

    def float_input(self, rows: np.ndarray) -> np.ndarray:
        """uint8 rows -> the model's float32 input, in one buffer kept between runs (session.run
        is done with it before the next call). A fresh array per run page-faults its memory in:
        1.2 ms an image at 448x448x3, against 0.05 ms to copy into a buffer already touched."""
        if self._float_buffer is None or len(self._float_buffer) < len(rows) \
                or self._float_buffer.shape[1:] != rows.shape[1:]:
            self._float_buffer = np.empty(rows.shape, np.float32)
        buffer = self._float_buffer[: len(rows)]
        np.copyto(buffer, rows, casting="unsafe")  # uint8 -> float32 is exact
        return buffer

    def tags(self, pred: np.ndarray, whole: bool = True) -> list[list]:
        """[tag, category, score] of every label above the floor, and of the ratings for a whole
        image (a person crop's rating says nothing the image's does not). A NaN score (a model
        that broke on this picture) is no tag: DuckDB orders NaN above every number, so curate
        would take it as the image's surest rating."""
        # imgutils compares in float64 (pred.astype(float)), so does this
        values = pred.astype(float)
        keep = np.flatnonzero(np.where(self.rating, whole & ~np.isnan(values), values > self.floor))
        return [[self.names[i], self.categories[i], values[i]] for i in keep]
