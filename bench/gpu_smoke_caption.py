"""GPU smoke test of the vllm caption backend: caption the bundled sample with ray.data.llm + vLLM.

    python bench/gpu_smoke_caption.py [--model fancyfeast/llama-joycaption-beta-one-hf-llava] [--workspace DIR]

Needs CUDA and the model (hub access or a local path), and vLLM: this environment's where it has
one (caption.vllm_environment = "node"), else the one Ray builds for the engines from PyPI
("isolated", the default). Where CUDA is missing it says so and exits 0, so it can run anywhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile


def missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def engine_environment() -> str:
    """ "node" where this Python has vLLM, else "isolated" (Ray installs it for the engines)."""
    return "node" if importlib.util.find_spec("vllm") is not None else "isolated"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="fancyfeast/llama-joycaption-beta-one-hf-llava")
    parser.add_argument("--workspace", default="")
    args = parser.parse_args()
    reason = missing()
    if reason:
        print(f"gpu_smoke_caption: skipped: {reason}")
        return 0
    from jobs import caption, ingest
    from jobs.config import load_config
    from store.workspace import Workspace

    root = args.workspace or tempfile.mkdtemp(prefix="booruset-caption-smoke-")
    cfg = load_config(None, [f'workspace.path="{root}"', 'caption.backend="vllm"', f'caption.vllm_model="{args.model}"',
                             "caption.max_attempts=2", f'caption.vllm_environment="{engine_environment()}"'])
    ws = Workspace(root)
    ingest.run(cfg, ws).print()
    summary = caption.run(cfg, ws)
    summary.print()
    rows = ws.read_table("captions").to_pylist()
    for row in [r for r in rows if r["accepted"]][:5]:
        print(f"{row['key']}: {row['accuracy']:.2f} {row['caption'][:200]}")
    ok = summary.rows_out.get("captions", 0) > 0 and summary.errors == 0
    print("gpu_smoke_caption:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
