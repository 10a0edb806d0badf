"""Runners and measurement: one way to time and evaluate any model, whatever runs it.

A runner wraps a loaded model in some runtime (PyTorch, ONNX Runtime, OpenVINO, TensorRT) behind
``infer(batch) -> logits`` on NumPy arrays plus a description of *where* it runs. Latency and
accuracy are measured here, identically for all of them, and every figure carries its conditions.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np


class Runner(Protocol):
    backend: str
    """pytorch, onnxruntime, openvino or tensorrt."""
    device: str
    """Where it runs, e.g. 'cpu: AMD EPYC (2 cores)' or 'cuda:0 Orin'."""
    dtype: str
    """Precision it actually runs in (as reported by the runtime where it can say)."""
    threads: int | None

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class Latency:
    """One timed measurement, with the conditions that make it reproducible."""

    backend: str
    device: str
    dtype: str
    batch: int
    threads: int | None
    warmup: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_runner(runner: Runner, input_shape: tuple[int, ...], batch: int, warmup: int, iterations: int,
                progress: Callable[[int, int], None] | None = None, seed: int = 0) -> Latency:
    """Time ``runner.infer`` on a fixed random batch: ``warmup`` untimed calls, then ``iterations`` timed."""
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape)).astype(np.float32)
    for _ in range(warmup):
        runner.infer(x)
    times = []
    for i in range(iterations):
        t0 = time.perf_counter()
        runner.infer(x)
        times.append((time.perf_counter() - t0) * 1e3)
        if progress:
            progress(i + 1, iterations)
    t = np.asarray(times)
    mean = float(t.mean())
    return Latency(backend=runner.backend, device=runner.device, dtype=runner.dtype, batch=batch,
                   threads=runner.threads, warmup=warmup, iterations=iterations,
                   p50_ms=float(np.percentile(t, 50)), p90_ms=float(np.percentile(t, 90)),
                   p99_ms=float(np.percentile(t, 99)), mean_ms=mean, images_per_s=batch * 1e3 / mean)


def predict(runner: Runner, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Run every batch; return (logits, labels) stacked."""
    outs, labels = [], []
    for x, y in batches:
        outs.append(np.asarray(runner.infer(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32))
        labels.append(np.asarray(y))
    return np.concatenate(outs), np.concatenate(labels)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def accuracy_record(logits: np.ndarray, labels: np.ndarray, runner: Runner,
                    class_names: list[str] | None = None) -> dict[str, Any]:
    """top-1 (and top-5 when there are more than 5 classes) with the runtime that produced them, and with
    ``class_names`` the top-1 of each class (``per_class``: name -> fraction, None for a class with no images)."""
    rec: dict[str, Any] = {"top1": topk_accuracy(logits, labels, 1), "samples": int(len(labels)),
                           "backend": runner.backend, "dtype": runner.dtype}
    if logits.shape[1] > 5:
        rec["top5"] = topk_accuracy(logits, labels, 5)
    if class_names is not None:
        hit = logits.argmax(1) == labels
        rec["per_class"] = {name: (float(hit[labels == i].mean()) if (labels == i).any() else None)
                            for i, name in enumerate(class_names)}
    return rec
