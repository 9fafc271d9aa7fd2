"""The WD tagger's model-only ceiling on one GPU, and the CPU cores it takes to feed it.

bench/gpu_smoke.py runs the whole annotate job on a GPU and needs the project installed (Ray,
DuckDB, imgutils). This one needs only torch, onnx, onnxruntime, Pillow and OpenCV, so that it runs
on a GPU machine where the pipeline cannot be installed. It times the WD v3 ViT tagger of real
size (bench/real_models.py: ViT-B/16 at 448, random weights):
  - in onnxruntime on CUDA, input and outputs bound on the GPU (the job's path), fp32 and fp16,
    when this onnxruntime has its CUDA provider (else it says so);
  - in torch on the GPU, fp32, TF32 and bf16 autocast: what the architecture costs on this chip,
    whichever runtime serves it;
and the job's CPU preprocessing for it (udfs/annotate/images.py: decode, tagger_input) of the
bundled sample, one process per core. Ends with the cores of preprocessing one GPU needs:

    python bench/gpu_tagger_ceiling.py [--batch 64] [--runs 20] [--labels N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gpu_smoke import images_per_second  # noqa: E402
from bench.real_models import wd_vit_module, wd_vit_tagger  # noqa: E402

SIDE = 448  # the WD v3 taggers' input side
DRAFT = 1024  # the job's JPEG draft size when the detectors run too (the bench/annotate.py setting)


def onnx_rates(n_labels: int, batch: int, runs: int) -> dict[str, float]:
    """images/s of the exported tagger on onnxruntime's CUDA provider, fp32 and fp16 (float32 I/O)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"gpu_tagger: onnxruntime {ort.__version__} has no CUDA provider ({ort.get_available_providers()}): "
              "no onnxruntime figure", flush=True)
        return {}
    started = time.perf_counter()
    path = wd_vit_tagger(Path(tempfile.mkdtemp(prefix="gpu-tagger-")) / "model.onnx", n_labels)
    print(f"gpu_tagger: exported {path.stat().st_size / 2**20:.0f} MB in {time.perf_counter() - started:.0f} s",
          flush=True)
    rates = {}
    for name, model in (("fp32", str(path)),
                        ("fp16", convert_float_to_float16(onnx.load(path), keep_io_types=True).SerializeToString())):
        session = ort.InferenceSession(model, providers=["CUDAExecutionProvider"])
        rates[f"onnxruntime {name}"] = images_per_second(session, batch, runs)
        print(f"gpu_tagger: onnxruntime {ort.__version__} {session.get_providers()[0]} {name}, batch {batch}: "
              f"{rates[f'onnxruntime {name}']:.0f} images/s", flush=True)
    return rates


def torch_rates(n_labels: int, batch: int, runs: int) -> dict[str, float]:
    """images/s of the same architecture in torch on the GPU: fp32, TF32, bf16 autocast."""
    import torch

    model = wd_vit_module(n_labels, SIDE, fused_attention=True).cuda()
    data = torch.rand(batch, SIDE, SIDE, 3, device="cuda") * 255
    rates = {}
    for mode in ("fp32", "tf32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
            for _ in range(3):  # warm: kernels chosen, memory allocated
                model(data)
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(runs):
                model(data)
            torch.cuda.synchronize()
        rates[f"torch {mode}"] = runs * batch / (time.perf_counter() - started)
        print(f"gpu_tagger: torch {torch.__version__} on {torch.cuda.get_device_name()} {mode}, batch {batch}: "
              f"{rates[f'torch {mode}']:.0f} images/s", flush=True)
    return rates


def sample_images() -> list[bytes]:
    """The image members of the bundled sample's shards."""
    images = []
    for shard in sorted((REPO / "sample" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            images += [tar.extractfile(m).read() for m in tar
                       if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp")]
    return images


def preprocess_rate(rounds: int) -> float:
    """images/s of one process making the tagger's input from the sample's bytes (median round)."""
    from udfs.annotate.images import decode, tagger_input

    images = sample_images()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for data in images:
            tagger_input(decode(data, DRAFT), SIDE)
        times.append(time.perf_counter() - started)
    return len(images) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--labels", type=int, default=10861, help="labels of the tagger (WD v3: 10861)")
    args = parser.parse_args()
    import torch

    cores = os.cpu_count() or 1
    with Pool(cores) as pool:  # every core at once, as a node's preprocessing tasks run
        per_core = statistics.median(pool.map(preprocess_rate, [3] * cores))
    print(f"gpu_tagger: preprocessing (decode + tagger_input), {cores} processes: {per_core:.1f} images/s per core",
          flush=True)
    if not torch.cuda.is_available():
        print("gpu_tagger: no CUDA device for torch: no GPU figure")
        return
    rates = onnx_rates(args.labels, args.batch, args.runs)
    rates |= torch_rates(args.labels, args.batch, args.runs)
    for name, rate in rates.items():
        print(f"gpu_tagger: {name}: one GPU needs {rate / per_core:.0f} cores of preprocessing")


if __name__ == "__main__":
    main()
