"""YOLO detectors (anime face, head, person: the models behind imgutils' detect_* functions).

Batched: the actor stacks the batch's preprocessed images into one NCHW tensor and makes one
session.run; model files that fix the batch at 1 (most YOLO exports) are looped inside the
actor, same interface. Post-processing is imgutils' own function (thresholds, NMS, rounding
back to pixels), so boxes match `yolo_predict` exactly for the same model file and image.
"""

from __future__ import annotations

import ast
import json

import numpy as np

from udfs.annotate.images import yolo_tensor
from udfs.annotate.model_actor import ModelActor
from udfs.annotate.model_files import model_file, optional_file
from udfs.annotate.onnx_session import fixed_batch, onnx_header, open_session, run_batched


def detector_meta(path: str) -> tuple[tuple[int, int], list[str]]:
    """(input size (w, h), labels) from the metadata ultralytics writes into the ONNX file."""
    meta = onnx_header(path)[2]
    # imgutils reads "imgsz" as given and uses it as (width, height); 640 when absent
    size = tuple(json.loads(meta["imgsz"])) if "imgsz" in meta else (640, 640)
    names = ast.literal_eval(meta["names"])
    return (int(size[0]), int(size[1])), [names[i] for i in range(len(names))]


def model_type(spec: dict) -> str:
    """"yolo" or "rtdetr", from the repository's <model>/model_type.json as imgutils reads it."""
    folder = spec["file"].rsplit("/", 1)[0] if "/" in spec["file"] else ""
    path = optional_file(spec["repo"], f"{folder}/model_type.json" if folder else "model_type.json",
                         spec.get("models_dir", ""), spec.get("revision", "main"))
    if path is None:
        return "yolo"
    with open(path) as f:
        return json.load(f)["model_type"]


class YoloDetector(ModelActor):
    """map_batches callable: column `input` (uint8 NHWC) -> column `output` (JSON boxes per image)."""

    def __init__(self, spec: dict, input: str, output: str, device: str = "auto",
                 drop_input: bool = True) -> None:
        super().__init__(output, drop=(input,) * drop_input)
        path = model_file(spec["repo"], spec["file"], spec.get("models_dir", ""), spec.get("revision", "main"))
        self.session, self.provider = open_session(path, device, spec.get("threads", 0))
        self.size, self.labels = detector_meta(path)
        self.kind = model_type(spec)
        self.max_batch = fixed_batch(self.session)
        self.conf, self.iou = float(spec["conf_threshold"]), float(spec["iou_threshold"])
        self.input = input

    def predict(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> list[str]:
        outputs = self.infer(batch[self.input][rows])
        return [json.dumps(self.boxes(out, (int(batch["width"][i]), int(batch["height"][i]))))
                for out, i in zip(outputs, rows, strict=True)]
    def infer(self, images: np.ndarray) -> np.ndarray:
        """Raw model output for a stack of preprocessed images: one run (or a loop at fixed batch 1)."""
        name = self.session.get_inputs()[0].name
        out_name = self.session.get_outputs()[0].name
        (output,) = run_batched(self.session, [out_name], name, yolo_tensor(images), self.max_batch)
        return output

    def boxes(self, output: np.ndarray, image_size: tuple[int, int]) -> list[list]:
        """[x0, y0, x1, y1, label, score] in pixels of the decoded image, as imgutils returns them."""
        # imgutils' post-processing itself (private, pinned by dghs-imgutils<0.20): exact parity
        from imgutils.generic.yolo import _rtdetr_postprocess, _yolo_postprocess

        post = _rtdetr_postprocess if self.kind == "rtdetr" else _yolo_postprocess
        found = post(output=output, conf_threshold=self.conf, iou_threshold=self.iou,
                     old_size=image_size, new_size=self.size, labels=self.labels)
        return [[*box, label, score] for box, label, score in found]
