"""Measure any stage artifact the same way: accuracy, params, MACs, size, latency, throughput, estimate.

The runtime fits the artifact (edgepipe.backends.runner_for, the one registry from artifact kind to
runtime): PyTorch for torch models, ONNX Runtime for ONNX, the artifact's backend for compiled ones. A
TensorRT bundle cannot run without a CUDA device, so its ONNX is measured in ONNX Runtime on this host
as a labelled host reference. Every latency carries backend, device,
dtype, batch, threads, warm-up and iterations; for the target device a roofline estimate is added,
labelled as an estimate.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from edgepipe.artifacts import Artifact
from edgepipe.config import MeasureConfig
from edgepipe.data import DataBundle
from edgepipe.errors import EdgepipeError
from edgepipe.estimate import activation_bytes, roofline_estimate
from edgepipe.profiles import HardwareProfile
from edgepipe.backends import runner_for
from edgepipe.runtime import accuracy_record, predict, time_runner
from edgepipe.types import ArtifactKind

log = logging.getLogger(__name__)


def model_counts(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """MACs and params (Torch-Pruning's counter) and activation elements of one image, for the estimate."""
    import torch_pruning as tp

    from edgepipe.quant import dequantized_copy, quant_layers

    from edgepipe.models import ExportedProgramModel

    example = torch.zeros(1, *input_shape)
    if quant_layers(model):  # the counter dispatches on exact module types: count the plain twin
        model = dequantized_copy(model)
    model.eval()
    # activation_bytes counts each output written once and read once at 1 byte per element
    counts = {"activation_elements": activation_bytes(model, example, 1) // 2}
    if isinstance(model, ExportedProgramModel):
        # A torch.export graph calls aten ops, not nn.Conv2d modules, so Torch-Pruning's module-hook
        # counter sees nothing; PyTorch's aten-level counter does (conv/matmul only, ~1% below it).
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model(example)
        return {**counts, "macs": int(flops.get_total_flops() // 2),
                "params": sum(p.numel() for p in model.parameters()),
                "mac_counter": "torch.utils.flop_counter (conv/matmul MACs)"}
    macs, params = tp.utils.count_ops_and_params(model, example)
    return {**counts, "macs": int(macs), "params": int(params), "mac_counter": "torch_pruning.utils.count_ops_and_params"}


def measure_artifact(artifact: Artifact, data: DataBundle, cfg: MeasureConfig, profile: HardwareProfile,
                     counts: dict[str, Any], eval_batch_size: int = 256,
                     progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """All figures of one artifact; ``counts`` are the MACs/params/activations of its torch source."""
    progress = progress or (lambda *a: None)
    # One explicit thread count for every runtime, so stages measured in different runtimes compare.
    threads = cfg.threads or torch.get_num_threads()
    runner, note = runner_for(artifact, threads)
    logits, labels = predict(runner, data.val_numpy(eval_batch_size))
    if logits.ndim != 2 or len(logits) != len(labels):
        raise EdgepipeError(f"{artifact.root}: model output shape {list(logits.shape)} is not [N, classes]")
    shape = tuple(artifact.meta.get("input_shape") or data.input_shape)
    latency = time_runner(runner, shape, 1, cfg.warmup, cfg.iterations,
                          progress=lambda i, n: progress("latency (batch 1)", i, n, {}))
    throughput = time_runner(runner, shape, cfg.throughput_batch, cfg.warmup, cfg.iterations,
                             progress=lambda i, n: progress(f"throughput (batch {cfg.throughput_batch})", i, n, {}))
    dtype = artifact.dtype if artifact.dtype in profile.dtypes else profile.compile_dtype(artifact.quantized)
    estimate = None
    if dtype in profile.peak_tops:
        estimate = roofline_estimate(profile, dtype, counts["macs"], counts["params"] * dtype.bytes,
                                     counts["activation_elements"] * 2 * dtype.bytes, batch=1)
    return {"accuracy": accuracy_record(logits, labels, runner, data.class_names), "params": counts["params"], "macs": counts["macs"],
            # a torch artifact's size is its weights file (a teacher may also carry a copy of its .pt2)
            "size_bytes": artifact.path("model").stat().st_size if artifact.kind is ArtifactKind.TORCH
            else artifact.size_bytes(), "latency": latency.as_dict(), "throughput": throughput.as_dict(),
            "estimate": estimate, "measure_note": note}

