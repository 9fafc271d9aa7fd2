"""What every model actor does around its model: skip undecodable rows, isolate failures, report.

A subclass implements `predict(batch, rows) -> list[str]` (one JSON result per row index);
when it fails for a batch, each row is tried alone, so one bad image becomes one error and
the rest of the batch goes on. Columns added: `<output>` (JSON), `<output>_error` (empty when
fine), `<output>_provider` (the onnxruntime provider actually used), `<output>_node` (the Ray
node the actor runs on) and `<output>_seconds`.
"""

from __future__ import annotations

import time

import numpy as np
import ray


class ModelActor:
    provider = "CPUExecutionProvider"
    empty = "[]"

    def __init__(self, output: str, drop: tuple[str, ...] = ()) -> None:
        self.output = output
        self.drop = drop  # input columns no later stage needs
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def predict(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> list[str]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        n = len(batch["ok"])
        results = np.full(n, self.empty, dtype=object)
        failures = np.full(n, "", dtype=object)
        rows = np.flatnonzero(batch["ok"])
        if len(rows):
            try:
                results[rows] = self.predict(batch, rows)
            except Exception:  # one bad batch: retry image by image to find the culprit
                for i in rows:
                    try:
                        results[i] = self.predict(batch, np.array([i]))[0]
                    except Exception as exc:
                        failures[i] = f"{type(exc).__name__}: {exc}"[:2000]
        batch[self.output] = results
        batch[f"{self.output}_error"] = failures
        batch[f"{self.output}_provider"] = np.full(n, self.provider, dtype=object)
        batch[f"{self.output}_node"] = np.full(n, self.node, dtype=object)
        batch[f"{self.output}_seconds"] = np.full(n, (time.perf_counter() - started) / max(n, 1))
        for name in self.drop:
            batch.pop(name, None)
        return batch
