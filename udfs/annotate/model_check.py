"""Whether a model file is usable: what `booruset models fetch` checks before it counts a file as
present, and annotate before it starts a pool.

A 0-byte, truncated or foreign file (a failed copy, an HTML error page saved as model.onnx)
otherwise counted as present, and annotate then failed deep in Ray or in the driver with a
traceback that named no file. Each check reads the file as its loader does (the ONNX graph's
inputs and outputs, the detector's ultralytics metadata, the label CSV's columns), without
starting an onnxruntime session.
"""

from __future__ import annotations

import json
from pathlib import Path

import schemas

KINDS = ("detector", "ccip", "tagger", "labels", "model_type")


def kind_of(file: str, model: str) -> str:
    """The check for `file` of annotate model `model` (face, head, person, ccip, tagger)."""
    if file.endswith(".csv"):
        return "labels"
    if file.endswith(".json"):
        return "model_type"
    return model if model in ("ccip", "tagger") else "detector"


def staged_problem(path: str | Path, kind: str, record: dict | None) -> str:
    """problem(), and first for a file `booruset models fetch` staged (its `record`), whether it
    still has the size it was fetched with (a file cut or overwritten since)."""
    if record and record.get("size") is not None:
        try:
            size = Path(path).stat().st_size
        except OSError:
            size = None
        if size is not None and size != record["size"]:
            return f"is {size} bytes, not the {record['size']} it had when `booruset models fetch` staged it"
    return problem(path, kind)


def problem(path: str | Path, kind: str) -> str:
    """Why the file at `path` cannot serve as `kind` (one of KINDS); "" when it can."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
    if size == 0:
        return "is empty (0 bytes)"
    try:
        return CHECKS[kind](str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the reason it is unusable
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        return f"cannot be read as {WHAT[kind]} ({type(exc).__name__}: {detail})"


def _onnx_io(path: str) -> tuple[list[list], list[list]]:
    """Shapes of the graph's inputs and outputs (ints, or the names of dynamic axes)."""
    from udfs.annotate.onnx_session import onnx_header

    inputs, outputs, _ = onnx_header(path)
    return [list(s) for s in inputs], [list(s) for s in outputs]


def _onnx(path: str, channels_last: bool) -> str:
    inputs, outputs = _onnx_io(path)
    if not inputs or not outputs:
        return "is no ONNX model (no graph inputs or outputs)"
    shape = inputs[0]
    if len(shape) != 4:
        return f"has input shape {shape}, not an image batch (4 axes)"
    if channels_last and (shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]):
        return f"has input shape {shape}, not the WD tagger's [batch, size, size, 3]"
    if not channels_last and shape[1] != 3:  # annotate feeds CCIP channels first
        return f"has input shape {shape}, not CCIP's [batch, 3, size, size]"
    if len(outputs[0]) != 2:
        return f"has output shape {outputs[0]}, not [batch, labels]" if channels_last \
            else f"has output shape {outputs[0]}, not [batch, features]"
    if not channels_last and isinstance(outputs[0][1], int) and outputs[0][1] != schemas.CCIP_DIM:
        # embeddings.vector is a fixed-size list: another width failed every writer task
        return f"gives {outputs[0][1]} features, not CCIP's {schemas.CCIP_DIM} (schemas.CCIP_DIM)"
    return ""


def _detector(path: str) -> str:
    from udfs.annotate.yolo_detector import detector_meta

    inputs, outputs = _onnx_io(path)
    if not inputs or not outputs:
        return "is no ONNX model (no graph inputs or outputs)"
    if len(inputs[0]) != 4:
        return f"has input shape {inputs[0]}, not an image batch (4 axes)"
    if inputs[0][1] != 3:  # annotate feeds ultralytics' layout, channels first
        return f"has input shape {inputs[0]}, not a detector's [batch, 3, height, width]"
    if len(outputs[0]) != 3:  # YOLO [batch, 4 + classes, anchors]; RT-DETR [batch, queries, 4 + classes]
        return f"has output shape {outputs[0]}, not a detector's [batch, boxes and scores, anchors] (3 axes)"
    try:
        detector_meta(path)
    except KeyError as exc:
        return f"has no ultralytics metadata {exc} (the detector's labels): not a YOLO export"
    return ""


def _labels(path: str) -> str:
    from udfs.annotate.wd_tagger import load_labels

    names, _ = load_labels(path)
    if not names:
        return "holds no labels"
    # the tagger's scores are named by position: an empty name, or one twice, is a broken file
    empty = [i for i, name in enumerate(names) if not name.strip()]
    if empty:
        return f"has rows with no name (data row {empty[0] + 1}{', ...' if len(empty) > 1 else ''})"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            return f"names {name!r} twice (data rows {seen[name] + 1} and {i + 1})"
        seen[name] = i
    return ""


def _model_type(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        kind = json.load(f).get("model_type")
    return "" if kind in ("yolo", "rtdetr") else f"says model_type {kind!r}, not yolo or rtdetr"


CHECKS = {"detector": _detector, "ccip": lambda p: _onnx(p, False), "tagger": lambda p: _onnx(p, True),
          "labels": _labels, "model_type": _model_type}
WHAT = {"detector": "an ONNX model", "ccip": "an ONNX model", "tagger": "an ONNX model",
        "labels": "a label CSV (tag_id,name,category,count)", "model_type": "JSON"}
