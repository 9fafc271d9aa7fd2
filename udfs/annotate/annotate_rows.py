"""The CPU steps of annotate around the model actors: read image bytes, decode, crop persons.

read_unit_images: one unit (an `images` part) -> one row per image it lists (and no finished
  batch holds), with its bytes.
DecodeImages: bytes -> the fixed-size uint8 input of every enabled model (draft-mode decode).
crop_persons: bytes + person boxes -> the person crops, preprocessed for CCIP and the tagger.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np

from schemas import REGIONS
from store.workspace import Workspace
from udfs.annotate.annotate_parts import JOB
from udfs.annotate.ccip import crop_input, person_crops
from udfs.annotate.images import (
    ccip_input,
    decode,
    gray_input,
    pad_to,
    region_images,
    tagger_input,
    to_rgb_on_white,
    yolo_input,
)
from udfs.ingest.sources import Unit, member_path, read_unit, source_kind


def read_unit_images(item: dict[str, Any], workspace: str, max_member_bytes: int) -> Iterator[dict]:
    """Rows {unit, key, source, member, data} for the images of one unit (its `images` parts)
    but those of its batches a killed run finished, yielded as they are read: a unit's bytes
    never sit in memory together. A member no longer of the size ingest saw (images.bytes: the
    file or shard was rewritten since) is another picture: it comes with no bytes (missing), as
    export and the review page have it, not annotated under the key of the one it replaced."""
    ws = Workspace(workspace)
    rows = [row for part in item["parts"] for row in ws.read_part("images", part, ["key", "source", "member", "bytes"])]
    finished = {key for marker in ws.done_batches(JOB, item["unit"]).values() for key in marker["keys"]}
    by_source: dict[str, dict[str, str]] = defaultdict(dict)
    sizes: dict[tuple[str, str], int] = {}
    for row in rows:
        if row["key"] not in finished:
            by_source[row["source"]][row["member"]] = row["key"]
            if row["bytes"] is not None:
                sizes[row["source"], row["member"]] = int(row["bytes"])
    for source, wanted in sorted(by_source.items()):
        if source_kind(source) == "tar":
            unit = Unit("tar", source, "")
        else:
            unit = Unit("folder", source, "", [member_path(source, m) for m in sorted(wanted)])
        missing = dict(wanted)
        for sample in read_unit(unit, max_member_bytes):
            if isinstance(sample, tuple):
                continue  # shard-level problems were reported by ingest; missing members show below
            for ext, name in sample.member_names.items():
                if name in missing and sizes.get((source, name), len(sample.members[ext])) == len(sample.members[ext]):
                    yield {"unit": item["unit"], "key": missing.pop(name), "source": source, "member": name,
                           "data": sample.members[ext]}
        for member, key in sorted(missing.items()):
            yield {"unit": item["unit"], "key": key, "source": source, "member": member, "data": b""}


def make_inputs(data: bytes, inputs: dict[str, list], draft_size: int) -> dict[str, Any]:
    """Decode once and build every model's input; raises on undecodable bytes."""
    if not data:
        raise FileNotFoundError("member not found in its source, or not of the size ingest saw "
                                "(moved or rewritten since ingest?)")
    image = decode(data, draft_size)
    # the detectors', CCIP's and the grey inputs start from the picture flattened on white; the
    # tagger's do not (it pastes onto its own white square): flatten only when one is wanted
    rgb = to_rgb_on_white(image) if any(k in ("yolo", "ccip", "gray") for k, _ in inputs.values()) else None
    out: dict[str, Any] = {"width": image.width, "height": image.height}
    for column, (kind, size) in inputs.items():
        if kind == "yolo":
            out[column] = yolo_input(rgb, tuple(size))
        elif kind == "tagger":
            out[column] = tagger_input(image, int(size))
        elif kind == "regions":  # size: [tagger side, overlap]
            out[column] = np.stack([tagger_input(r, int(size[0])) for r in region_images(image, float(size[1]))])
        elif kind == "ccip":
            out[column] = ccip_input(rgb, int(size))
        elif kind == "gray":
            gray = gray_input(rgb, int(size))
            out["gray_h"], out["gray_w"] = gray.shape
            out[column] = pad_to(gray, int(size))
    return out


def input_shape(kind: str, size) -> tuple[int, ...]:
    if kind == "regions":
        return (len(REGIONS), int(size[0]), int(size[0]), 3)
    if kind == "yolo":
        return (size[1], size[0], 3)
    if kind == "gray":
        return (size, size)
    return (size, size, 3)


def decode_images(batch: dict[str, np.ndarray], inputs: dict[str, list], draft_size: int,
                  keep_data: bool) -> dict[str, np.ndarray]:
    """map_batches (CPU task): add ok, decode_error, width, height and one column per model input."""
    n = len(batch["key"])
    columns: dict[str, np.ndarray] = {c: np.zeros((n, *input_shape(k, s)), np.uint8) for c, (k, s) in inputs.items()}
    extra = {name: np.zeros(n, np.int32) for name in ("width", "height", "gray_w", "gray_h")}
    ok, errors = np.zeros(n, bool), np.full(n, "", dtype=object)
    for i in range(n):
        try:
            made = make_inputs(batch["data"][i], inputs, draft_size)
        except Exception as exc:  # any decoder failure: this image becomes an errors row
            kind = "missing_member" if isinstance(exc, FileNotFoundError) else "decode_failed"
            errors[i] = json.dumps([kind, f"{type(exc).__name__}: {exc}"[:2000]])
            continue
        ok[i] = True
        for name, value in made.items():
            (columns if name in columns else extra)[name][i] = value
    out = {k: batch[k] for k in ("unit", "key", "source", "member")}
    if keep_data:
        out["data"] = batch["data"]
    return {**out, "ok": ok, "decode_error": errors, **extra, **columns}


def crop_persons(batch: dict[str, np.ndarray], person_column: str, draft_size: int, padding: float,
                 max_crops: int, inputs: dict[str, list]) -> dict[str, np.ndarray]:
    """map_batches (CPU task): each image's person crops, once, as every model that reads them
    wants them (`inputs`: column -> ["ccip" | "tagger", size]), and their boxes (`crop_boxes`,
    JSON [[person index, x0, y0, x1, y1], ...]) and `crop_error` (the message where cutting them
    failed: an errors row; the image keeps its other rows); drops the image bytes."""
    n = len(batch["key"])
    columns = {c: np.full(n, b"", dtype=object) for c in inputs}
    boxes, failed = np.full(n, "[]", dtype=object), np.full(n, "", dtype=object)
    for i in range(n):
        persons = json.loads(batch[person_column][i]) if batch["ok"][i] else []
        if not persons:
            continue
        try:
            crops, found = person_crops(batch["data"][i], draft_size, persons, padding, max_crops)
        except Exception as exc:  # decoded once already (a changed file, memory): only the crops are lost
            failed[i] = f"person crops not cut: {type(exc).__name__}: {exc}"[:2000]
            continue
        for column, (kind, size) in inputs.items():
            prepare = crop_input if kind == "ccip" else tagger_input
            columns[column][i] = np.stack([prepare(c, int(size)) for c in crops]).tobytes() if crops else b""
        boxes[i] = json.dumps(found)
    batch.pop("data")
    return {**batch, **columns, "crop_boxes": boxes, "crop_error": failed}
