"""OpenCV cascade face detector (lbpcascade_animeface): offline, CPU only, no model download.

A cascade has no batch axis: the actor loops over the batch. It has no score either, so its
boxes get score 1.0. Parameters default to the upstream example's (scaleFactor 1.1,
minNeighbors 5, minSize 24) after grey conversion and histogram equalisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from udfs.annotate.model_actor import ModelActor
from udfs.opencv import cv2

BUNDLED_CASCADE = Path(__file__).resolve().parent.parent / "data" / "lbpcascade_animeface.xml"


def cascade_path(spec: dict) -> str:
    path = Path(spec.get("path") or BUNDLED_CASCADE)
    if not path.is_file():
        from udfs.annotate.model_files import ModelUnavailable

        raise ModelUnavailable(f"cascade file {path} not found; set annotate.cascade_face.path")
    return str(path)


def load_cascade(path: str) -> cv2.CascadeClassifier:
    """The OpenCV cascade at `path`; ValueError when the file is none (OpenCV raises a
    SystemError for some files and returns an empty classifier for others)."""
    try:
        cascade = cv2.CascadeClassifier(path)
    except Exception as exc:  # noqa: BLE001 - any failure to load it says it is no cascade
        raise ValueError(f"{path} cannot be read as an OpenCV cascade ({type(exc).__name__})") from None
    if cascade.empty():
        raise ValueError(f"{path} cannot be read as an OpenCV cascade (it loads empty)")
    return cascade


class CascadeFaceDetector(ModelActor):
    """map_batches callable: grey canvas column `input` + `gray_w`/`gray_h` -> JSON relative boxes."""

    def __init__(self, spec: dict, input: str, output: str, device: str = "cpu",
                 drop_input: bool = True) -> None:
        super().__init__(output, drop=(input,) * drop_input + ("gray_w", "gray_h"))
        self.cascade = load_cascade(cascade_path(spec))
        self.scale, self.neighbors = float(spec["scale_factor"]), int(spec["min_neighbors"])
        self.min_size = int(spec["min_size"])
        self.input = input
        self.provider = "opencv"

    def predict(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> list[str]:
        out = []
        for i in rows:
            w, h = int(batch["gray_w"][i]), int(batch["gray_h"][i])
            out.append(json.dumps(self.detect(batch[self.input][i][:h, :w])))
        return out

    def detect(self, gray: np.ndarray) -> list[list]:
        """[x0, y0, x1, y1, "face", 1.0] relative to the image (0..1)."""
        h, w = gray.shape
        found = self.cascade.detectMultiScale(cv2.equalizeHist(np.ascontiguousarray(gray)),
                                              scaleFactor=self.scale, minNeighbors=self.neighbors,
                                              minSize=(self.min_size, self.min_size))
        rects = np.asarray(found).reshape(-1, 4).tolist()
        return [[x / w, y / h, (x + bw) / w, (y + bh) / h, "face", 1.0] for x, y, bw, bh in rects]
