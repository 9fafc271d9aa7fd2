"""Tiny random-weight ONNX models with the production models' input/output contracts.

Each fake has the real model's input and output names, layout, dtype and shapes (dynamic or
fixed batch axis as the real export has it; ultralytics' YOLO metadata `imgsz` and `names`;
the real WD v3 label file), so that imgutils' own functions run on them unchanged. They are
written where imgutils looks for models: a Hugging Face cache (used with HF_HUB_OFFLINE=1),
and the same files in the hub layout of `annotate.models_dir` for Ray actors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COMMIT = "0" * 40

TAGGER_REPO, TAGGER_FILE = "deepghs/wd14_tagger_with_embeddings", "SmilingWolf/wd-swinv2-tagger-v3/model.onnx"
LABELS_REPO, LABELS_FILE = "SmilingWolf/wd-swinv2-tagger-v3", "selected_tags.csv"
CCIP_REPO, CCIP_FILE = "deepghs/ccip_onnx", "ccip-caformer-24-randaug-pruned/model_feat.onnx"
DETECTORS = {  # name: (repo, model folder, label, fixed batch of the export)
    "face": ("deepghs/anime_face_detection", "face_detect_v1.4_s", "face", 1),
    "head": ("deepghs/anime_head_detection", "head_detect_v2.0_s", "head", None),
    "person": ("deepghs/anime_person_detection", "person_detect_v1.1_m", "person", None),
}


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _save(graph: onnx.GraphProto, path: Path, metadata: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tagger_model(path: Path, n_labels: int, size: int = 448, embedding: int = 1024, seed: int = 0,
                 width: int = 0) -> Path:
    """WD v3 tagger contract: input [batch, size, size, 3] float32 BGR 0..255 (NHWC) ->
    "output" [batch, n_labels] sigmoid scores, "embedding" [batch, embedding].

    `width` > 0 adds two 3x3 convolutions of that many channels at full resolution: a model of
    realistic compute for benchmarks (the scores stay random either way).
    """
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Mul", ["nchw", "scale"], ["x0"])]
    inits = [_init("scale", np.array(1 / 255.0))]
    channels, x = 3, "x0"
    if width:
        for k in range(2):
            inits.append(_init(f"w{k}", rng.normal(0, 0.2, (width, channels, 3, 3))))
            nodes += [helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"], pads=[1, 1, 1, 1], strides=[2, 2]),
                      helper.make_node("Relu", [f"c{k}"], [f"r{k}"])]
            channels, x = width, f"r{k}"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gp"]),
              helper.make_node("AveragePool", ["x0"], ["pool"], kernel_shape=[64, 64], strides=[64, 64]),
              helper.make_node("Flatten", ["pool"], ["flat0"]),
              helper.make_node("Flatten", ["gp"], ["flat1"]),
              helper.make_node("Concat", ["flat0", "flat1"], ["flat"], axis=1),
              helper.make_node("MatMul", ["flat", "we"], ["embedding"]),
              helper.make_node("MatMul", ["flat", "wl"], ["logits"]),
              helper.make_node("Add", ["logits", "bias"], ["biased"]),
              helper.make_node("Sigmoid", ["biased"], ["output"])]
    features = 3 * (size // 64) ** 2 + channels
    inits += [_init("we", rng.normal(0, 1, (features, embedding))),
              _init("wl", rng.normal(0, 0.3, (features, n_labels))),
              _init("bias", np.full(n_labels, -8.0))]
    graph = helper.make_graph(
        nodes, "wd_tagger_fake",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", n_labels]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch_size", embedding])],
        inits)
    return _save(graph, path)


def yolo_model(path: Path, label: str, batch: int | None, size: int = 640, seed: int = 0) -> Path:
    """ultralytics YOLOv8 export contract: "images" [batch, 3, size, size] float32 RGB 0..1 ->
    "output0" [batch, 4 + classes, anchors] (cx, cy, w, h in input pixels, class scores),
    metadata imgsz and names."""
    rng = np.random.default_rng(seed)
    nodes, inits, heads = [], [], []
    for k, stride in enumerate((8, 16, 32)):
        weights = rng.normal(0, 40, (5, 3, 1, 1))
        # score logits centred a little below 0 on mid-grey, spread wide: some anchors pass any threshold
        bias = [0, 0, 0, 0, -0.5 * weights[4].sum() - 3]
        inits += [_init(f"w{k}", weights), _init(f"b{k}", bias)]
        nodes += [helper.make_node("AveragePool", ["images"], [f"p{k}"], kernel_shape=[stride, stride],
                                   strides=[stride, stride]),
                  helper.make_node("Conv", [f"p{k}", f"w{k}", f"b{k}"], [f"c{k}"]),
                  helper.make_node("Reshape", [f"c{k}", "shape"], [f"h{k}"])]
        heads.append(f"h{k}")
    inits += [numpy_helper.from_array(np.array([0, 5, -1], np.int64), "shape"),
              _init("box_scale", np.array([size, size, size / 2, size / 2, 1.0]).reshape(1, 5, 1))]
    nodes += [helper.make_node("Concat", heads, ["cat"], axis=2),
              helper.make_node("Sigmoid", ["cat"], ["sig"]),
              helper.make_node("Mul", ["sig", "box_scale"], ["output0"])]
    anchors = sum((size // s) ** 2 for s in (8, 16, 32))
    dim = batch if batch else "batch"
    graph = helper.make_graph(
        nodes, "yolo_fake",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [dim, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [dim, 5, anchors])], inits)
    return _save(graph, path, {"imgsz": json.dumps([size, size]), "names": repr({0: label}),
                               "task": "detect", "stride": "32"})


def ccip_model(path: Path, size: int = 384, dim: int = 768, seed: int = 0) -> Path:
    """CCIP feature contract: "input" [batch, 3, size, size] float32 (CLIP-normalised) -> "output" [batch, dim]."""
    rng = np.random.default_rng(seed)
    features = 3 * (size // 32) ** 2
    nodes = [helper.make_node("AveragePool", ["input"], ["pool"], kernel_shape=[32, 32], strides=[32, 32]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["output"])]
    graph = helper.make_graph(
        nodes, "ccip_fake",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", dim])],
        [_init("w", rng.normal(0, 1, (features, dim)))])
    return _save(graph, path)


def build_models_dir(root: Path, labels_csv: Path) -> Path:
    """Every fake model in the hub layout <root>/<repo>/<file> (annotate.models_dir)."""
    n_labels = sum(1 for _ in labels_csv.open(encoding="utf-8")) - 1
    tagger_model(root / TAGGER_REPO / TAGGER_FILE, n_labels)
    (root / LABELS_REPO).mkdir(parents=True, exist_ok=True)
    shutil.copy(labels_csv, root / LABELS_REPO / LABELS_FILE)
    ccip_model(root / CCIP_REPO / CCIP_FILE)
    for seed, (repo, folder, label, batch) in enumerate(DETECTORS.values()):
        yolo_model(root / repo / folder / "model.onnx", label, batch, seed=seed)
        (root / repo / folder / "model_type.json").write_text(json.dumps({"model_type": "yolo"}))
        (root / repo / folder / "threshold.json").write_text(json.dumps({"threshold": 0.3}))
    return root


def build_hf_cache(cache: Path, models_dir: Path) -> Path:
    """The same files as a Hugging Face hub cache (refs/main -> one snapshot) for offline hf_hub_download."""
    for repo_dir in sorted(p for p in models_dir.glob("*/*") if p.is_dir()):
        repo = f"{repo_dir.parent.name}/{repo_dir.name}"
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        shutil.copytree(repo_dir, folder / "snapshots" / COMMIT, dirs_exist_ok=True)
    return cache


def face_model_dir(root: Path) -> Path:
    """A models_dir (hub layout) with the face YOLO fake and its two JSON files."""
    repo, folder, label, batch = DETECTORS["face"]
    yolo_model(root / repo / folder / "model.onnx", label, batch)
    (root / repo / folder / "model_type.json").write_text(json.dumps({"model_type": "yolo"}))
    (root / repo / folder / "threshold.json").write_text(json.dumps({"threshold": 0.3}))
    return root


def fixed_boxes_yolo(path: Path, label: str, boxes: list[tuple[float, float, float, float, float]],
                     size: int = 640) -> Path:
    """YOLO contract (as yolo_model) whose output is the same for any picture: `boxes`
    (cx, cy, w, h in input pixels, score), one anchor each: a detector arranged to find people
    where a composed test picture has them."""
    table = np.array([[cx, cy, w, h, score] for cx, cy, w, h, score in boxes], np.float32).T[None]  # [1, 5, n]
    nodes = [helper.make_node("ReduceSum", ["images", "axes"], ["total"], keepdims=1),
             helper.make_node("Reshape", ["total", "shape"], ["per_image"]),
             helper.make_node("Mul", ["per_image", "zero"], ["nothing"]),
             helper.make_node("Add", ["nothing", "table"], ["output0"])]  # [batch, 1, 1] + [1, 5, n]
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
             _init("zero", np.array(0.0)), _init("table", table)]
    graph = helper.make_graph(
        nodes, "yolo_fixed_boxes",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 5, len(boxes)])], inits)
    return _save(graph, path, {"imgsz": json.dumps([size, size]), "names": repr({0: label}),
                               "task": "detect", "stride": "32"})


def colour_tagger(path: Path, n_labels: int, rules: dict[int, tuple[np.ndarray, float]], size: int = 448) -> Path:
    """WD v3 tagger contract (as tagger_model) whose scores follow the picture's mean colour:
    label i of `rules` scores sigmoid(direction . mean_bgr + bias) (mean BGR in 0..1), every
    other label ~0. A tagger arranged so that each crop of a composed picture scores its own
    hair colour."""
    weights = np.zeros((3, n_labels), np.float32)
    bias = np.full(n_labels, -20.0, np.float32)
    for label, (direction, offset) in rules.items():
        weights[:, label], bias[label] = direction, offset
    nodes = [helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Mul", ["nchw", "scale"], ["x0"]),
             helper.make_node("GlobalAveragePool", ["x0"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["mean"]),
             helper.make_node("MatMul", ["mean", "wl"], ["logits"]),
             helper.make_node("Add", ["logits", "bias"], ["biased"]),
             helper.make_node("Sigmoid", ["biased"], ["output"]),
             helper.make_node("MatMul", ["mean", "we"], ["embedding"])]
    inits = [_init("scale", np.array(1 / 255.0)), _init("wl", weights), _init("bias", bias),
             _init("we", np.ones((3, 8)))]
    graph = helper.make_graph(
        nodes, "wd_tagger_colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", n_labels]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch_size", 8])], inits)
    return _save(graph, path)
