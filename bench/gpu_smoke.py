"""GPU smoke run: annotate N images on CUDA and print images/s per model and GPU utilisation.

On a machine without CUDA (no GPU, or onnxruntime without its CUDA provider) or without the
models, it says what is missing and exits 0.

    python bench/gpu_smoke.py [--images 256] [--input SHARDS] [--models-dir DIR]
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
    args = parser.parse_args()
    problems = missing(args.models_dir)
    if problems:
        print("gpu_smoke: not run; missing:\n  " + "\n  ".join(problems))
        return 0
    from jobs import annotate, ingest
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
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(main())
