"""The export check of a task that brings no sharper one: every named output of the exported graph against PyTorch's.

``Task.export_check`` returning None (the default) means this check: the validation split through the PyTorch model
(``TorchRunner``, named as the task names its outputs) and through the exported graph in ONNX Runtime with graph
optimizations off (the graph's own semantics), then a float graph must stay within ``export.float_tolerance`` on every
output, and an INT8 one within 1 point of the headline metric. A task whose outputs are sets rather than values (a
detector's padded detections: two boxes of nearly equal score may swap places) checks a float graph by its headline
too (``metric_gap``: the points allowed).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from edgepipe.backends.onnxruntime import OrtRunner
from edgepipe.errors import EdgepipeError
from edgepipe.runtime.runner import run_batches
from edgepipe.runtime.torch_runner import TorchRunner

if TYPE_CHECKING:
    from edgepipe.data.batches import Batches
    from edgepipe.tasks.base import Task


def compare_outputs(task: Task, model: nn.Module, onnx_bytes: bytes, data: Batches, batch_size: int, quantized: bool,
                    tolerance: float, threads: int | None = None, metric_gap: float | None = None) -> dict[str, Any]:
    """PyTorch's outputs against the exported ONNX's on the validation split (see the module docstring); raise
    EdgepipeError when the graph does not compute what the model does."""
    meta = {"input_shape": list(data.input_shape), "num_classes": data.num_classes}
    torch_runner = TorchRunner(model, threads, input_names=tuple(s.name for s in task.inputs(meta)),
                               output_names=tuple(s.name for s in task.outputs(meta)))
    with tempfile.TemporaryDirectory(prefix="edgepipe-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(onnx_bytes)
        ort_runner = OrtRunner(path, threads, reference=True)
    ref, targets = run_batches(torch_runner, task.val_feeds(data, batch_size))
    out, _ = run_batches(ort_runner, task.val_feeds(data, batch_size))
    for name in ref:
        if not (np.isfinite(ref[name]).all() and np.isfinite(out[name]).all()):
            raise EdgepipeError(f"export: output '{name}' holds NaN or inf (PyTorch or ONNX Runtime); the model is "
                                "broken: check the earlier stages' training losses and data.mean/std")
    diffs = {name: float(np.abs(ref[name].astype(np.float64) - out[name]).max()) for name in ref}
    scores = (task.metrics(ref, targets, data.class_names)[task.headline.name],
              task.metrics(out, targets, data.class_names)[task.headline.name])
    checks: dict[str, Any] = {"samples": sum(len(np.asarray(t)) for t in targets), "max_abs_diff": diffs,
                              f"torch_{task.headline.name}": scores[0], f"ort_{task.headline.name}": scores[1]}
    if quantized or metric_gap is not None:
        limit = 1.0 if quantized else metric_gap
        gap = abs(task.headline.drop_points(*scores))
        checks.update(gap_points=gap, max_gap_points=limit)
        if gap > limit:
            kind = "INT8 graph does not compute what the QAT model does" if quantized else \
                "exported graph does not compute what the model does"
            raise EdgepipeError(f"export: {task.headline.label} is {task.headline.shown(scores[1])} in ONNX Runtime "
                                f"and {task.headline.shown(scores[0])} in PyTorch ({gap:.2f} points apart, more than "
                                f"{limit:g}); the {kind}")
    else:
        checks["tolerance"] = tolerance
        worst = max(diffs, key=diffs.get)
        if diffs[worst] > tolerance:
            raise EdgepipeError(f"export: ONNX Runtime's '{worst}' differs from PyTorch's by up to "
                                f"{diffs[worst]:.3g} (> export.float_tolerance {tolerance:g}) on the validation set")
    return checks

