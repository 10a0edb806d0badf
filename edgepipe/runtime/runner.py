"""Runners: one way to run and time any model, whatever runtime holds it.

A runner wraps a loaded model in some runtime (PyTorch, ONNX Runtime, OpenVINO, TensorRT) behind
``run(feeds) -> outputs`` on named NumPy arrays (``dict[str, ndarray]``: a classifier takes ``input`` and
returns ``logits``, a detector returns ``boxes``/``scores``/``labels``, a text model takes ``input_ids`` and
``attention_mask``), plus a description of *where* it runs. What the names mean, and what inputs a model is timed
on, is the task's (``edgepipe.tasks``); timing is done here, identically for every runtime, and every figure
carries its conditions, input shapes and dtypes included.

``bind(feeds)`` returns a zero-argument call that runs the model on inputs already handed to the runtime: the
timed loop measures the model, not Python copies of the batch in and the outputs out (the OpenVINO runner binds
its input tensors to the arrays' memory once, as OpenVINO's own ``benchmark_app`` does).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One named model input or output: its dtype (a NumPy name) and shape, a ``str`` naming a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


class Runner(Protocol):
    backend: str
    """pytorch, onnxruntime, openvino or tensorrt."""
    device: str
    """Where it runs, e.g. 'cpu: AMD EPYC (2 cores)' or 'cuda:0 Orin'."""
    dtype: str
    """Precision it actually runs in (as reported by the runtime where it can say)."""
    threads: int | None
    input_names: tuple[str, ...]
    """The model's inputs, in its order."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output, by name, for named inputs (arrays the caller may reuse: the runner keeps no view)."""

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """A call that runs the model on ``feeds`` handed over once (for timing; its result is not read)."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """A one-input model's first output: ``run({only input: batch})``, for a quick look."""


class RunnerBase(ABC):
    """What every runner shares: ``infer`` over ``run``, and a ``bind`` that simply calls ``run`` (a runtime that can
    hand its inputs over once, or skip copying outputs, overrides it)."""

    input_names: tuple[str, ...] = ("input",)

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output, by name (see ``Runner.run``)."""

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        feeds = dict(feeds)
        return lambda: self.run(feeds)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return next(iter(self.run({self.input_names[0]: batch}).values()))


def describe_inputs(feeds: Mapping[str, np.ndarray]) -> dict[str, str]:
    """``{"input": "float32[64,3,32,32]"}``: what a latency was measured on."""
    return {name: f"{a.dtype}[{','.join(str(d) for d in a.shape)}]" for name, a in feeds.items()}


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
    """Samples per second (images for a vision task, sequences for text): batch / mean latency."""
    inputs: dict[str, str] | None = None
    """Each input's dtype and shape (``describe_inputs``)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_runner(runner: Runner, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int,
                progress: Callable[[int, int], None] | None = None) -> Latency:
    """Time ``runner`` on ``feeds`` (the task's timing inputs, ``Task.timing_inputs``): ``warmup`` untimed calls,
    then ``iterations`` timed ones of the bound model (``Runner.bind``). The batch is the first input's first axis."""
    call = runner.bind(feeds)
    for _ in range(warmup):
        call()
    times = []
    for i in range(iterations):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        if progress:
            progress(i + 1, iterations)
    t = np.asarray(times)
    mean = float(t.mean())
    batch = int(next(iter(feeds.values())).shape[0])
    return Latency(backend=runner.backend, device=runner.device, dtype=runner.dtype, batch=batch,
                   threads=runner.threads, warmup=warmup, iterations=iterations,
                   p50_ms=float(np.percentile(t, 50)), p90_ms=float(np.percentile(t, 90)),
                   p99_ms=float(np.percentile(t, 99)), mean_ms=mean, images_per_s=batch * 1e3 / mean,
                   inputs=describe_inputs(feeds))


def run_batches(runner: Runner, batches: Any) -> tuple[dict[str, np.ndarray], list[Any]]:
    """Run every ``(feeds, targets)`` batch; return each output concatenated over the batches (first axis) and the
    batches' targets as a list, for the task to score (``Task.metrics``)."""
    outs: dict[str, list[np.ndarray]] = {}
    targets: list[Any] = []
    for feeds, target in batches:
        for name, value in runner.run(feeds).items():
            outs.setdefault(name, []).append(np.asarray(value))
        targets.append(target)
    return {name: np.concatenate(parts) for name, parts in outs.items()}, targets


def example_feeds(specs: tuple[TensorSpec, ...], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a model known only by its graph (a backend's own timing at compile time): the first axis is the
    batch, every other axis must have a size; float inputs are standard normal from ``seed``, integer ones zeros
    (a valid token id, class or index). A task's ``timing_inputs`` is the better source wherever there is a task."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        rest = spec.shape[1:]
        if any(isinstance(d, str) or d < 1 for d in rest):
            raise ValueError(f"input '{spec.name}' has dynamic dims {list(spec.shape)} after the batch dim: "
                             "give the model static sizes, or time it through its task")
        shape = (batch, *rest)
        kind = np.dtype(spec.dtype)
        feeds[spec.name] = (rng.standard_normal(shape).astype(kind) if kind.kind == "f"
                            else np.zeros(shape, dtype=kind))
    return feeds
