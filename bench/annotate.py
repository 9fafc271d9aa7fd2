"""Benchmark: annotate's tagger path against imgutils on the CPU, two figures.

preprocess: image bytes -> the tagger's float input as the job makes it (decode_images, then
  WdTagger.float_input per session.run: annotate.tagger.cpu_batch_size rows on the CPU) against
  imgutils' own _prepare_image_for_tagging on Image.open of the same bytes (what get_wd14_tags
  runs before its model). One thread each.
tagger: decode_images + the batched WdTagger against a loop of get_wd14_tags, on one model
  file of real size: the WD v3 ViT tagger's architecture (ViT-B/16 at 448) with random weights,
  exported once and cached (bench/real_models.py), read by both sides from one offline Hugging
  Face cache; onnxruntime on os.cpu_count() intra-op threads on both sides (imgutils' setting).

Same images (the bundled sample's: wide JPEGs, tall transparent PNGs), same score floor. The
sides alternate --rounds times; medians. Per core: images per CPU second of this process
(all its threads), so a side that spreads over more cores pays for them.

    python bench/annotate.py [--quick] [--images N] [--prep-images N] [--batch B] [--rounds R]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.real_models import CACHE, VERSION, wd_vit_tagger  # noqa: E402
from bench.results import alternated, result  # noqa: E402
from jobs.config import load_config  # noqa: E402
from tests.onnx_fakes import COMMIT, TAGGER_REPO  # noqa: E402
from udfs.annotate.annotate_rows import decode_images  # noqa: E402
from udfs.ingest.sources import IMAGE_EXTENSIONS, discover_units, read_unit  # noqa: E402

VIT = "SmilingWolf/wd-vit-tagger-v3"  # imgutils' model_name "ViT_v3"


def sample_images(n: int) -> list[bytes]:
    images = []
    for unit in discover_units([str(REPO / "sample" / "shards")], 1000):
        for sample in read_unit(unit, 1 << 30):
            if not isinstance(sample, tuple):
                images += [sample.members[e] for e in IMAGE_EXTENSIONS if e in sample.members][:1]
    return [images[i % len(images)] for i in range(n)]


def batch_of(images: list[bytes], size: int = 448) -> dict[str, np.ndarray]:
    n = len(images)
    raw = {c: np.array([c] * n, dtype=object) for c in ("unit", "key", "source", "member")}
    raw["data"] = np.array(images, dtype=object)
    return decode_images(raw, {"in_tagger": ["tagger", size]}, draft_size=1024, keep_data=False)


def hf_cache(cache: Path, models_dir: Path) -> Path:
    """tests.onnx_fakes.build_hf_cache with links instead of copies (the model is 360 MB)."""
    for file in sorted(p for p in models_dir.rglob("*") if p.is_file()):
        repo_dir = models_dir / file.relative_to(models_dir).parts[0] / file.relative_to(models_dir).parts[1]
        folder = cache / f"models--{repo_dir.parent.name}--{repo_dir.name}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        target = folder / "snapshots" / COMMIT / file.relative_to(repo_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(file)
    return cache


def timed(side: Callable[[], object], cpu: list[float]) -> Callable[[], object]:
    """The side, recording the CPU seconds of the whole process (every thread) it took."""
    def run() -> object:
        started = time.process_time()
        out = side()
        cpu.append(time.process_time() - started)
        return out
    return run


def report(name: str, goal: float, n: int, wall: dict[str, float], cpu: dict[str, list[float]],
           ours: str, theirs: str) -> str:
    rate = {k: n / v for k, v in wall.items()}
    per_core = {k: n / statistics.median(v) for k, v in cpu.items()}
    for side in (theirs, ours):
        print(f"  {side}: {rate[side]:.2f} images/s wall, {per_core[side]:.2f} images per CPU second")
    print(f"  ratio: {rate[ours] / rate[theirs]:.2f}x wall, {per_core[ours] / per_core[theirs]:.2f}x per core "
          "(the RESULT line's)")
    return result(name, per_core[ours] / per_core[theirs], goal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 tagger images, 3 rounds: 2 minutes on 2 cores")
    parser.add_argument("--images", type=int, help="images through the tagger per side and round")
    parser.add_argument("--prep-images", type=int, help="images through preprocessing per side and round")
    parser.add_argument("--batch", type=int, default=32, help="our tagger batch (annotate.tagger.batch_size)")
    parser.add_argument("--cpu-batch", type=int, help="images per session.run on the CPU (default: "
                                                        "annotate.tagger.cpu_batch_size)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--labels", default=str(REPO.parent / "shared" / "tagdata" / "wd_v3_selected_tags.csv"))
    args = parser.parse_args()
    n_tag = args.images or (12 if args.quick else 24)
    n_prep = args.prep_images or (48 if args.quick else 192)
    rounds = args.rounds or (3 if args.quick else 5)
    if not Path(args.labels).is_file():
        print(f"label file {args.labels} not found (needs ../shared/tagdata); nothing measured")
        return
    import huggingface_hub.constants as hf_constants
    import onnxruntime as ort
    from imgutils.tagging import get_wd14_tags
    from imgutils.tagging.wd14 import _get_wd14_model, _prepare_image_for_tagging

    from udfs.annotate.wd_tagger import WdTagger

    n_labels = sum(1 for _ in open(args.labels, encoding="utf-8")) - 1
    models = CACHE / f"wd-vit-v3-random-v{VERSION}-{n_labels}"
    started = time.perf_counter()
    model = wd_vit_tagger(models / TAGGER_REPO / VIT / "model.onnx", n_labels)
    labels = models / VIT / "selected_tags.csv"
    if not labels.is_file():
        labels.parent.mkdir(parents=True, exist_ok=True)
        labels.write_bytes(Path(args.labels).read_bytes())
    print(f"model: {model} ({model.stat().st_size / 2**20:.0f} MB, {n_labels} labels; "
          f"ready in {time.perf_counter() - started:.0f} s)")
    hf_constants.HF_HUB_CACHE = str(hf_cache(Path(tempfile.mkdtemp(prefix="bench-annotate-")), models))
    hf_constants.HF_HUB_OFFLINE = True
    floor, threads = 0.05, os.cpu_count() or 1
    cpu_batch = args.cpu_batch or int(load_config()["annotate"]["tagger"]["cpu_batch_size"])
    spec = {"repo": TAGGER_REPO, "file": f"{VIT}/model.onnx", "labels_repo": VIT, "labels_file": "selected_tags.csv",
            "score_floor": floor, "models_dir": str(models), "threads": threads, "batch_size": args.batch,
            "cpu_batch_size": cpu_batch}
    tagger = WdTagger(spec, "in_tagger", "out", device="cpu")
    theirs_session = _get_wd14_model("ViT_v3")
    from huggingface_hub import hf_hub_download

    theirs_file = os.path.realpath(hf_hub_download(TAGGER_REPO, f"{VIT}/model.onnx"))
    assert theirs_file == str(model.resolve()), (theirs_file, model)  # one file, both sides
    ours_threads = tagger.session.get_session_options().intra_op_num_threads
    print(f"onnxruntime {ort.__version__}: intra-op threads ours {ours_threads}, imgutils "
          f"{theirs_session.get_session_options().intra_op_num_threads}; {os.cpu_count()} CPUs here")

    print(f"\npreprocess: {n_prep} images x {rounds} rounds, bytes -> float32 448x448 BGR, one thread each")
    images = sample_images(n_prep)

    def prep_ours() -> None:
        for start in range(0, len(images), args.batch):
            batch = batch_of(images[start : start + args.batch])["in_tagger"]
            for row in range(0, len(batch), cpu_batch):  # per session.run, as the job's WdTagger on a CPU
                tagger.float_input(batch[row : row + cpu_batch])

    def prep_theirs() -> None:
        for data in images:
            _prepare_image_for_tagging(Image.open(io.BytesIO(data)), 448)

    cpu: dict[str, list[float]] = {"ours": [], "imgutils": []}
    prep_ours(), prep_theirs()  # first-touch allocations and imports outside the timings
    wall = alternated({"ours": timed(prep_ours, cpu["ours"]), "imgutils": timed(prep_theirs, cpu["imgutils"])}, rounds)
    lines = [report("annotate_preprocess_vs_imgutils", 1.1, n_prep, wall, cpu, "ours", "imgutils")]

    print(f"\ntagger: {n_tag} images x {rounds} rounds, ViT-B/16 448 (random weights), batch {args.batch}, "
          f"{tagger.max_batch} per session.run on the CPU")
    images = sample_images(n_tag)
    split: dict[str, list[float]] = {"decode": [], "model": []}

    def tag_ours() -> None:
        for start in range(0, len(images), args.batch):
            began = time.perf_counter()
            batch = batch_of(images[start : start + args.batch])
            split["decode"].append(time.perf_counter() - began)
            out = tagger(batch)
            split["model"].append(time.perf_counter() - began - split["decode"][-1])
            assert not any(out["out_error"]), out["out_error"]

    def tag_theirs() -> None:
        for data in images:
            get_wd14_tags(Image.open(io.BytesIO(data)), model_name="ViT_v3", general_threshold=floor,
                          character_threshold=floor)

    tagger(batch_of(images[:1]))  # warm both sessions (first-run allocations) outside the timings
    rating, general, character = get_wd14_tags(Image.open(io.BytesIO(images[0])), model_name="ViT_v3",
                                               general_threshold=floor, character_threshold=floor)
    print(f"  tags above the floor on the first image: {len(general) + len(character)}")
    cpu = {"ours": [], "imgutils": []}
    wall = alternated({"ours": timed(tag_ours, cpu["ours"]), "imgutils": timed(tag_theirs, cpu["imgutils"])}, rounds)
    decode, infer = sum(split["decode"]), sum(split["model"])
    print(f"  ours: decode+preprocess {100 * decode / (decode + infer):.0f}% of the time, WdTagger (float "
          f"conversion, onnxruntime, tags) {100 * infer / (decode + infer):.0f}%")
    lines.append(report("annotate_tagger_vs_imgutils_loop", 1.0, n_tag, wall, cpu, "ours", "imgutils"))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
