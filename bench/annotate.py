"""Benchmark: the batched WD tagger UDF against a loop over imgutils' get_wd14_tags, on the CPU.

Same model file (a random-weight ONNX model with the WD v3 tagger's contract and the real
label file, with convolutions at full input resolution for realistic compute), same images
(the bundled sample's, repeated), same score floor. Both sides include decoding and
preprocessing. Prints images/s of both and the ratio.

    python bench/annotate.py [--images 96] [--batch 16] [--width 48]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tests.onnx_fakes import LABELS_FILE, LABELS_REPO, TAGGER_FILE, TAGGER_REPO, build_hf_cache, tagger_model  # noqa: E402
from udfs.annotate.annotate_rows import decode_images  # noqa: E402
from udfs.ingest.sources import IMAGE_EXTENSIONS, discover_units, read_unit  # noqa: E402


def sample_images(n: int) -> list[bytes]:
    images = []
    for unit in discover_units([str(REPO / "sample" / "shards")], 1000):
        for sample in read_unit(unit, 1 << 30):
            if not isinstance(sample, tuple):
                images += [sample.members[e] for e in IMAGE_EXTENSIONS if e in sample.members][:1]
    return [images[i % len(images)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=48, help="channels of the fake's full-resolution convolutions")
    parser.add_argument("--labels", default=str(REPO.parent / "shared" / "tagdata" / "wd_v3_selected_tags.csv"))
    args = parser.parse_args()
    if not Path(args.labels).is_file():
        print(f"label file {args.labels} not found (needs ../shared/tagdata); nothing measured")
        return
    import huggingface_hub.constants as hf_constants
    from imgutils.tagging import get_wd14_tags

    from udfs.annotate.wd_tagger import WdTagger

    tmp = Path(tempfile.mkdtemp(prefix="bench-annotate-"))
    models = tmp / "models"
    n_labels = sum(1 for _ in open(args.labels, encoding="utf-8")) - 1
    tagger_model(models / TAGGER_REPO / TAGGER_FILE, n_labels, width=args.width)
    (models / LABELS_REPO).mkdir(parents=True)
    (models / LABELS_REPO / LABELS_FILE).write_bytes(Path(args.labels).read_bytes())
    hf_constants.HF_HUB_CACHE = str(build_hf_cache(tmp / "hf", models))
    hf_constants.HF_HUB_OFFLINE = True
    size_mb = (models / TAGGER_REPO / TAGGER_FILE).stat().st_size / 2**20
    images = sample_images(args.images)
    floor = 0.05
    print(f"model: WD v3 tagger contract, {size_mb:.0f} MB, {n_labels} labels; {len(images)} images; "
          f"{os.cpu_count()} CPUs")

    # warm both sides (session creation, first-run allocations) outside the timings
    get_wd14_tags(Image.open(io.BytesIO(images[0])), general_threshold=floor, character_threshold=floor)
    spec = {"repo": TAGGER_REPO, "file": TAGGER_FILE, "labels_repo": LABELS_REPO, "labels_file": LABELS_FILE,
            "score_floor": floor, "models_dir": ""}
    tagger = WdTagger(spec, "in_tagger", "out")
    tagger(batch_of(images[:2]))

    started = time.perf_counter()
    for data in images:
        get_wd14_tags(Image.open(io.BytesIO(data)), general_threshold=floor, character_threshold=floor)
    baseline = len(images) / (time.perf_counter() - started)

    started = time.perf_counter()
    for start in range(0, len(images), args.batch):
        tagger(batch_of(images[start : start + args.batch]))
    ours = len(images) / (time.perf_counter() - started)

    print(f"baseline imgutils get_wd14_tags loop: {baseline:.2f} images/s")
    print(f"ours batched WdTagger (batch {args.batch}): {ours:.2f} images/s")
    print(f"ratio: {ours / baseline:.2f}x")


def batch_of(images: list[bytes]) -> dict[str, np.ndarray]:
    n = len(images)
    raw = {c: np.array([c] * n, dtype=object) for c in ("unit", "key", "source", "member")}
    raw["data"] = np.array(images, dtype=object)
    return decode_images(raw, {"in_tagger": ["tagger", 448]}, draft_size=1024, keep_data=False)


if __name__ == "__main__":
    main()
