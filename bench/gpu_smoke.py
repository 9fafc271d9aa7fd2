"""GPU smoke run: annotate N images on CUDA, print images/s and GPU utilisation, and set the
rate against each model's model-only ceiling on the same GPU.

Ceiling: the same ONNX file the job loads, at the job's batch size (1 where the file fixes it),
input and outputs bound on the GPU (I/O binding: no host copies, no decoding), and again in fp16
where the model converts (onnxruntime's float16 converter, float32 I/O kept). The models share
one GPU in the job, so the pipeline's ceiling is 1 / sum(1 / ceiling) over the models; the
printed ratio is the job's images/s over that, with the provider each session really got.

On a machine without CUDA (no GPU, or onnxruntime without its CUDA provider) or without the
models, it says what is missing and exits 0.

    python bench/gpu_smoke.py [--images 256] [--input SHARDS] [--models-dir DIR] [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def missing(models_dir: str) -> list[str]:
    """What this machine lacks for a GPU run, in words."""
    import onnxruntime as ort

    from jobs.annotate import available_models
    from jobs.config import load_config

    problems = []
    if not shutil.which("nvidia-smi"):
        problems.append("no nvidia-smi: no NVIDIA GPU or driver here")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        problems.append(f"onnxruntime has no CUDA provider ({ort.get_available_providers()}): "
                        "pip install onnxruntime-gpu (the [gpu] extra)")
    cfg = load_config(None, [f'annotate.models_dir="{models_dir}"'] if models_dir else [])
    specs, skipped = available_models(cfg)
    problems += skipped
    if not set(specs) - {"cascade_face"}:
        problems.append("no ONNX model is available")
    return problems


def images_per_second(session, batch: int, runs: int) -> float:
    """Model-only images/s of a session: random input of the model's shape, bound on the GPU."""
    import numpy as np
    import onnxruntime as ort

    first = session.get_inputs()[0]
    shape = [batch, *(d if isinstance(d, int) else 1 for d in first.shape[1:])]
    data = np.random.default_rng(0).random(shape, dtype=np.float32) * (255 if shape[-1] == 3 else 1)
    binding = session.io_binding()
    binding.bind_ortvalue_input(first.name, ort.OrtValue.ortvalue_from_numpy(data, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")
    session.run_with_iobinding(binding)  # warm: cuDNN algorithm search, allocations
    started = time.perf_counter()
    for _ in range(runs):
        session.run_with_iobinding(binding)  # returns once the GPU has finished (synchronised)
    return runs * batch / (time.perf_counter() - started)


def ceilings(specs: dict[str, dict], runs: int) -> dict[str, float]:
    """Each ONNX model's model-only images/s (fp32, the file as the job loads it); prints fp16 too."""
    import onnx
    import onnxruntime as ort

    from udfs.annotate.model_files import model_file
    from udfs.annotate.onnx_session import fixed_batch, open_session

    rates = {}
    for name, spec in specs.items():
        if name == "cascade_face":  # OpenCV on the CPU: no ONNX, no GPU ceiling
            continue
        path = model_file(spec["repo"], spec["file"], spec.get("models_dir", ""))
        session, provider = open_session(path, "cuda")
        batch = fixed_batch(session) or int(spec["batch_size"])
        rates[name] = images_per_second(session, batch, runs)
        line = f"gpu_smoke: {name}: model only {rates[name]:.1f} images/s fp32 (batch {batch}, {provider}"
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            half = convert_float_to_float16(onnx.load(path), keep_io_types=True).SerializeToString()
            session16 = ort.InferenceSession(half, providers=["CUDAExecutionProvider"])
            line += f"); fp16 {images_per_second(session16, batch, runs):.1f} images/s ({session16.get_providers()[0]})"
        except Exception as exc:  # noqa: BLE001 - an op without fp16 kernels: the fp32 figure stands
            line += f"); fp16 not measured: {type(exc).__name__}: {str(exc)[:200]}"
        print(line)
    return rates


def sample_gpu(samples: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            samples.append(int(out.stdout.split()[0]))
        stop.wait(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--input", default=str(REPO / "sample" / "shards"))
    parser.add_argument("--models-dir", default="")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model for the model-only ceiling")
    args = parser.parse_args()
    problems = missing(args.models_dir)
    if problems:
        print("gpu_smoke: not run; missing:\n  " + "\n  ".join(problems))
        return 0
    from jobs import annotate, ingest
    from jobs.annotate import available_models
    from jobs.config import load_config
    from store.workspace import Workspace

    ws_path = tempfile.mkdtemp(prefix="gpu-smoke-")
    overrides = [f'workspace.path="{ws_path}"', f'ingest.inputs=["{args.input}"]',
                 f'annotate.models_dir="{args.models_dir}"', 'annotate.device="cuda"']
    cfg = load_config(None, overrides)
    ws = Workspace(ws_path)
    ingest.run(cfg, ws).print()
    n = ws.read_table("images").num_rows
    if n < args.images:
        print(f"gpu_smoke: input has {n} images; measuring on those (pass --input with >= {args.images})")
    samples: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=sample_gpu, args=(samples, stop), daemon=True)
    watcher.start()
    started = time.perf_counter()
    summary = annotate.run(cfg, ws)
    seconds = time.perf_counter() - started
    stop.set()
    summary.print()
    rate = summary.rows_in / seconds
    print(f"gpu_smoke: {summary.rows_in} images in {seconds:.1f} s = {rate:.1f} images/s end to end")
    if samples:
        print(f"gpu_smoke: GPU utilisation mean {sum(samples) / len(samples):.0f}%, max {max(samples)}% "
              f"({len(samples)} samples)")
    rates = ceilings(available_models(cfg)[0], args.runs)
    if rates:
        # the person crops and regions the tagger also reads make its real work per image larger
        together = 1 / sum(1 / r for r in rates.values())
        print(f"gpu_smoke: models one after the other on this GPU: at most {together:.1f} images/s; "
              f"the job reached {rate / together:.2f} of that")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(main())
