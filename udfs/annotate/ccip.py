"""CCIP character features (imgutils.metrics.ccip) for whole images and person crops, batched;
and the person crops themselves, which the tagger also reads (udfs/annotate/annotate_rows.py).

The whole-image inputs and every person crop of a batch go through the feature model
together, `batch_size` images per session.run. Output per row: float32 bytes of shape
(1 + crops, dim): the whole image first, then the crops in `crop_boxes` order.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

import schemas
from udfs.annotate.images import ccip_input, ccip_tensor, crop_box, decode, to_rgb_on_white
from udfs.annotate.model_actor import ModelActor
from udfs.annotate.model_files import model_file
from udfs.annotate.onnx_session import open_session, rows_per_run, run_batched


def person_crops(data: bytes, draft_size: int, persons: list[list], padding: float,
                 max_crops: int) -> tuple[list[Image.Image], list[list[int]]]:
    """Crops of the best-scoring person boxes (at most max_crops, in detector order) and their
    boxes [person index, x0, y0, x1, y1] (padded, in pixels of the decoded image)."""
    image = decode(data, draft_size)
    best = sorted(range(len(persons)), key=lambda i: -persons[i][5])[:max_crops]
    crops, boxes = [], []
    for index in sorted(best):
        box = crop_box(image.width, image.height, tuple(persons[index][:4]), padding)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        crops.append(image.crop(box))
        boxes.append([index, *box])
    return crops, boxes


def crop_input(crop: Image.Image, size: int) -> np.ndarray:
    """What ccip_extract_feature(image.crop(box)) feeds its model (before the float conversion)."""
    return ccip_input(to_rgb_on_white(crop), size)


class CcipFeatures(ModelActor):
    """map_batches callable: `input` (uint8 NHWC) + `ccip_crops` bytes -> `output` float32 bytes."""

    empty = b""

    def __init__(self, spec: dict, input: str, output: str, device: str = "auto",
                 drop_input: bool = True) -> None:
        super().__init__(output, drop=(input,) * drop_input + ("ccip_crops",))
        path = model_file(spec["repo"], spec["file"], spec.get("models_dir", ""), spec.get("revision", "main"))
        self.session, self.provider = open_session(path, device, spec.get("threads", 0))
        self.max_batch = rows_per_run(self.session, self.provider, spec)
        self.size = int(spec["size"])
        self.input = input

    def predict(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> list[bytes]:
        stacks, counts = [], []
        for i in rows:
            crops = np.frombuffer(batch["ccip_crops"][i], np.uint8).reshape(-1, self.size, self.size, 3) \
                if "ccip_crops" in batch else np.zeros((0, self.size, self.size, 3), np.uint8)
            stacks.append(np.concatenate([batch[self.input][i][None], crops]))  # crops in crop_boxes order
            counts.append(len(stacks[-1]))
        features = self.features(np.concatenate(stacks))
        bounds = np.cumsum([0, *counts])
        return [features[a:b].astype(np.float32).tobytes() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def features(self, images: np.ndarray) -> np.ndarray:
        """CCIP features (N, dim) of preprocessed uint8 images, max_batch images per run."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        (out,) = run_batched(self.session, [outputs[0].name], inputs[0].name, images, self.max_batch,
                             prepare=ccip_tensor)
        if out.ndim != 2 or out.shape[1] != schemas.CCIP_DIM:
            # embeddings.vector is a fixed-size list: another width failed the writer task, and the
            # job with it (a file whose feature axis is dynamic passes the start's model check)
            raise ValueError(f"the CCIP model gives {out.shape[1] if out.ndim == 2 else list(out.shape[1:])} "
                             f"features, not {schemas.CCIP_DIM}: set annotate.ccip.repo / file to a CCIP "
                             "feature model")
        return out


