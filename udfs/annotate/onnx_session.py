"""onnxruntime sessions: provider choice, and a record of the provider a session really got.

A silent fall-back to the CPU is the commonest complaint about taggers, so every model actor
reports `session.get_providers()[0]` (what onnxruntime actually uses), not what was asked for.
"""

from __future__ import annotations

import functools
import logging
import os

try:
    import onnxruntime as ort
except ImportError as exc:  # the module comes from an extra, so say which
    raise ImportError("onnxruntime is not installed: pip install 'booruset[cpu]' (or '[gpu]' on CUDA nodes)") from exc

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
SPINNING = "session.intra_op.allow_spinning"
BLOCK_BASE = "session.dynamic_block_base"


def wanted_providers(device: str) -> list[str]:
    """Providers to ask for: device is "auto" (CUDA when onnxruntime has it), "cuda" or "cpu"."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        log.warning("annotate.device is cuda but this onnxruntime has no CUDA provider (%s); "
                    "install onnxruntime-gpu. Running on the CPU.", available)
    return [CPU]


def open_session(path: str, device: str = "auto", threads: int = 0) -> tuple[ort.InferenceSession, str]:
    """An InferenceSession for `path` and the provider it actually runs on."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's intra-op threads spin between runs by default: CPU time the decode tasks and
    # other actors of a Ray node then do not get (under load the WD ViT tagger took ~20% more CPU
    # seconds an image spinning; bench/annotate.py measures it per CPU second)
    options.add_session_config_entry(SPINNING, "0")
    # an operator's work in shrinking blocks rather than one share a thread: where another process
    # preempts one of the threads, the other takes over its blocks instead of waiting for it (the
    # WD ViT tagger, 2 threads beside one busy process: 3-6% fewer CPU seconds an image; idle: the
    # same; the same scores, a block's values not depending on the thread that computes it)
    options.add_session_config_entry(BLOCK_BASE, "4")
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(path, options, providers=wanted_providers(device))
    provider = session.get_providers()[0]
    if device != "cpu" and CUDA in ort.get_available_providers() and provider != CUDA:
        log.warning("%s: asked for CUDA, got %s (CUDA/cuDNN libraries missing?)", path, provider)
    return session, provider


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size a model file fixes (e.g. 1 for most YOLO exports), None when dynamic."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def rows_per_run(session: ort.InferenceSession, provider: str, spec: dict) -> int:
    """Images per session.run: what the model file fixes; else `batch_size` on a GPU and
    `cpu_batch_size` on the CPU. On the CPU a large batch of a vision transformer is slower per
    image, its activations falling out of the caches: the WD ViT tagger at 448 runs 1.01 images/s
    at batch 1 and 0.80 at batch 8 on 2 cores (bench/annotate.py); a GPU wants the whole batch."""
    fixed = fixed_batch(session)
    if fixed:
        return fixed
    if provider == CPU and spec.get("cpu_batch_size"):
        return int(spec["cpu_batch_size"])
    return int(spec.get("batch_size", 32))


def run_batched(session: ort.InferenceSession, outputs: list[str], name: str, data, max_batch: int | None,
                prepare=None):
    """One session.run for the whole batch, or a loop of max_batch rows at a time. `prepare`
    (uint8 rows -> the model's float input) runs per chunk, so the float copy of a large stack
    (an image's person crops and regions multiply a batch) never exists whole. A model file
    that fixes its batch (4, say) gets exactly that many rows per run: a shorter chunk (a batch
    of 2, the last of 5) is padded with blank rows, whose outputs are dropped (onnxruntime
    refused it, and every image of such a model failed)."""
    import numpy as np

    fixed = fixed_batch(session)
    max_batch = fixed or max_batch

    def run(rows):
        n = len(rows)
        if fixed and n < fixed:
            rows = np.concatenate([rows, np.zeros((fixed - n, *rows.shape[1:]), rows.dtype)])
        results = session.run(outputs, {name: prepare(rows) if prepare is not None else rows})
        return [result[:n] for result in results] if fixed else results

    if max_batch is None or len(data) <= max_batch:
        return run(data)
    parts = [run(data[i : i + max_batch]) for i in range(0, len(data), max_batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


def file_input_shape(path: str) -> list[int | str]:
    """The first input's shape as the ONNX file declares it (read without starting a session)."""
    return _file_shape(path, "input")


def file_output_shape(path: str) -> list[int | str]:
    """The first output's shape as the ONNX file declares it."""
    return _file_shape(path, "output")


def _file_shape(path: str, which: str) -> list[int | str]:
    inputs, outputs, _ = onnx_header(path)
    return list((inputs if which == "input" else outputs)[0])


OnnxHeader = tuple[tuple[tuple[int | str, ...], ...], tuple[tuple[int | str, ...], ...], dict[str, str]]


def onnx_header(path: str) -> OnnxHeader:
    """(input shapes, output shapes, metadata) of an ONNX file, each shape ints or the names of
    dynamic axes. Parsing a tagger's file takes seconds, and the model check, the pool's input
    and output shapes and the detector's labels all ask: once per file as it is now."""
    info = os.stat(path)
    return _onnx_header(path, info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=32)
def _onnx_header(path: str, _mtime_ns: int, _size: int) -> OnnxHeader:
    import onnx

    model = onnx.load(path, load_external_data=False)

    def shapes(values) -> tuple[tuple[int | str, ...], ...]:
        return tuple(tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                           for d in v.type.tensor_type.shape.dim) for v in values)

    return shapes(model.graph.input), shapes(model.graph.output), {p.key: p.value for p in model.metadata_props}
