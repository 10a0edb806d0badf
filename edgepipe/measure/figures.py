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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepipe.engine.artifacts import Artifact
from edgepipe.config import MeasureConfig
from edgepipe.data.batches import Batches
from edgepipe.errors import EdgepipeError
from edgepipe.measure.layers import activation_bytes, artifact_layers, model_layers
from edgepipe.measure.roofline import target_estimate
from edgepipe.profiles import HardwareProfile
from edgepipe.backends import runner_for
from edgepipe.runtime.runner import Runner, run_batches, time_runner
from edgepipe.tasks import task_of_artifact
from edgepipe.types import ArtifactKind, DType

log = logging.getLogger(__name__)


def model_counts(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """MACs and params (Torch-Pruning's counter) and activation elements of one image, for the estimate."""
    import torch_pruning as tp

    from edgepipe.quantization.layers import dequantized_copy, quant_layers

    from edgepipe.models.loading import ExportedProgramModel

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


def measure_artifact(artifact: Artifact, data: Batches, cfg: MeasureConfig, profile: HardwareProfile,
                     counts: dict[str, Any], eval_batch_size: int = 256,
                     progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
                     device: Any = None) -> dict[str, Any]:
    """All figures of one artifact; ``counts`` are the MACs/params/activations of its torch source.

    The task's metrics (``Task.metrics``, under ``accuracy``; with data.val_from_train also the headline on the
    held-out split, ``accuracy.choice``, which the gain check and sweeps read) come from the artifact's own runtime (PyTorch for a
    torch model, so a QAT model scores as trained). Latency and throughput come from the target's runtime on this
    host for every stage, so the stage table compares like with like: a torch model is exported (an ONNX model taken
    as it is) and compiled by the profile's backend first (float stages in the profile's best float dtype, a QAT model in int8), as the gain check
    and ``compare`` time them; a TensorRT target without an engine here times the ONNX in ONNX Runtime as a labelled
    host reference, as its compile stage is measured. A torch model's eager PyTorch batch-1 latency is kept beside
    it (``pytorch_latency``), on ``device`` (an edgepipe.device.Device: the run's; None: the CPU) where PyTorch
    evaluates. Timing inputs are the task's (``Task.timing_inputs``)."""
    import tempfile

    progress = progress or (lambda *a: None)
    task = task_of_artifact(artifact)
    # One explicit thread count for every runtime, so stages measured in different runtimes compare.
    threads = cfg.threads or torch.get_num_threads()
    runner, note = runner_for(artifact, threads, device)
    outputs, targets = run_batches(runner, task.val_feeds(data, eval_batch_size))
    try:
        scores = task.metrics(outputs, targets, data.class_names)
    except EdgepipeError as e:
        raise EdgepipeError(f"{artifact.root}: {e}") from None
    scores.update(backend=runner.backend, dtype=runner.dtype)
    held_out = data.choice_split()
    if held_out is not data:  # data.val_from_train: the headline on the held-out images, which choices read
        outputs, targets = run_batches(runner, task.val_feeds(held_out, eval_batch_size))
        scores["choice"] = {task.headline.name: task.metrics(outputs, targets, data.class_names)[task.headline.name],
                            "images": held_out.val_size, "split": "held out from training (data.val_from_train)"}
    shape = tuple(artifact.meta.get("input_shape") or data.input_shape)
    meta = {"input_shape": list(shape), "num_classes": artifact.meta.get("num_classes") or data.num_classes}
    pytorch = None
    with tempfile.TemporaryDirectory(prefix="edgepipe-measure-") as tmp:
        if artifact.kind is ArtifactKind.TORCH:
            pytorch = time_runner(runner, task.timing_inputs(meta, 1), cfg.warmup, cfg.iterations,
                                  progress=lambda i, n: progress("PyTorch latency (batch 1)", i, n, {})).as_dict()
        exported = artifact.kind is not ArtifactKind.TORCH or task.exports(runner.model)
        if not exported:  # measured in PyTorch alone: its latency is the eager model's on the host
            note = (f"this {task.name} model does not export to ONNX (its post-processing is not a graph): latency and "
                    f"throughput are eager PyTorch on {runner.device}, not the target's runtime")
        elif artifact.kind in (ArtifactKind.TORCH, ArtifactKind.ONNX):
            runner, note = target_runner(artifact, profile, threads, Path(tmp), task, meta)
        latency = time_runner(runner, task.timing_inputs(meta, 1), cfg.warmup, cfg.iterations,
                              progress=lambda i, n: progress("latency (batch 1)", i, n, {}))
        throughput = time_runner(runner, task.timing_inputs(meta, cfg.throughput_batch), cfg.warmup, cfg.iterations,
                                 progress=lambda i, n: progress(f"throughput (batch {cfg.throughput_batch})", i, n, {}))
    dtype = artifact.dtype if artifact.dtype in profile.dtypes else profile.compile_dtype(artifact.quantized)
    estimate = None
    if dtype in profile.peak_tops:
        # calibrated on published results where the profile has them (per-layer counts of this artifact)
        estimate = target_estimate(profile, dtype, counts, batch=1, layers=lambda: artifact_layers(artifact, shape))
    return {"task": task.name, "metric": task.headline.as_dict(), "accuracy": scores,
            "params": counts["params"], "macs": counts["macs"],
            # a torch artifact's size is its weights file (a teacher may also carry a copy of its .pt2)
            "size_bytes": artifact.path("model").stat().st_size if artifact.kind is ArtifactKind.TORCH
            else artifact.size_bytes(), "latency": latency.as_dict(), "throughput": throughput.as_dict(),
            "pytorch_latency": pytorch, "estimate": estimate, "measure_note": note, "on_target": exported}


def target_runner(artifact: Artifact, profile: HardwareProfile, threads: int, workdir: Path, task: Any,
                  meta: dict[str, Any]) -> tuple[Runner, str | None]:
    """A torch artifact exported (the task's I/O), or an ONNX artifact as it is, compiled for the target's runtime on
    this host to be timed there; with a note when that is a stand-in (a TensorRT target without an engine: the ONNX
    in ONNX Runtime)."""
    import onnx

    from edgepipe.backends import HOST_REFERENCE_NOTE, get_backend
    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.export.onnx_export import export_onnx, fold_weight_quantizers
    from edgepipe.models.loading import load_torch_artifact

    backend = get_backend(profile.backend)
    ok, _ = backend.available()
    if artifact.kind is ArtifactKind.ONNX:  # the export stage's graph, as the compile stage will take it
        onnx_path = artifact.path("onnx")
    else:
        proto = export_onnx(load_torch_artifact(artifact), tuple(meta["input_shape"]), 17, task, meta["num_classes"])
        if artifact.quantized:
            fold_weight_quantizers(proto)  # int8 weight initializers, as the export stage ships them
        onnx_path = workdir / "model.onnx"
        onnx.save(proto, str(onnx_path))
    if backend.BUILDS_ON_DEVICE and not ok:
        return OrtRunner(onnx_path, threads), HOST_REFERENCE_NOTE
    dtype = profile.compile_dtype(artifact.quantized)
    fallback = artifact.meta.get("fallback_dtype")
    float_dtype = DType(fallback) if dtype is DType.INT8 and fallback else None
    return backend.timing_runner(onnx_path, profile, dtype, workdir / "compiled", threads, float_dtype), None


def candidate_latency(model: torch.nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile,
                      cfg: MeasureConfig, workdir: Path, rounds: int = 3, quantized: bool = False,
                      float_dtype: DType | None = None) -> dict[str, Any]:
    """Batch-1 latency of a float torch model on the target's own backend, for latency-constrained pruning.

    The model is exported (edgepipe.export.onnx_export) and compiled by the profile's backend in its best float
    dtype, then timed like every stage (``cfg``: warm-up, iterations, threads), ``rounds`` times: the
    figure is the lowest round's p50, so a pruning decision does not follow a moment when the machine was
    busy. A TensorRT target that cannot build here gets the profile's roofline estimate instead, marked
    ``kind: estimate``. ``float_dtype``: the precision of the layers a quantized model keeps in float (the
    fallback of ``qat.fallback_dtype``), or of the whole float model; default the profile's best float dtype.
    """
    return candidate_latencies([(model, quantized, float_dtype)], input_shape, profile, cfg, workdir, rounds)[0]


def candidate_latencies(candidates: list[tuple[torch.nn.Module, bool, DType | None]], input_shape: tuple[int, ...],
                        profile: HardwareProfile, cfg: MeasureConfig, workdir: Path, rounds: int = 3,
                        task: Any = None) -> list[dict[str, Any]]:
    """``candidate_latency`` of several models (each ``(model, quantized, float_dtype)``) that are to be compared:
    all are compiled first, then timed in alternating rounds (A, B, C, A, B, C, ...), each figure the lowest
    round's p50. Timed one after the other instead, each model met a different machine state: on a shared
    2-core host the same sub-millisecond float model measured 0.31 and 0.49 ms minutes apart in one run."""
    import onnx

    from edgepipe.backends import get_backend
    from edgepipe.export.onnx_export import export_onnx, fold_weight_quantizers
    from edgepipe.tasks import DEFAULT, get_task

    backend = get_backend(profile.backend)
    ok, reason = backend.available()
    threads = cfg.threads or torch.get_num_threads()
    prepared: list[tuple[Any, DType, DType | None] | dict[str, Any]] = []
    for i, (model, quantized, float_dtype) in enumerate(candidates):
        dtype = profile.compile_dtype(quantized)  # a QAT model compiles to int8 where the target has it
        if float_dtype is not None and dtype is not DType.INT8:
            dtype = float_dtype
        if backend.BUILDS_ON_DEVICE and not ok:  # no engine can be built here (TensorRT): the roofline estimate
            counts = model_counts(model, input_shape)
            est = target_estimate(profile, dtype, counts, batch=1, layers=lambda m=model: model_layers(m, input_shape))
            prepared.append({"kind": "estimate", "p50_ms": est["latency_ms"], "backend": profile.backend.value,
                             "dtype": dtype.value, "float_dtype": (float_dtype or profile.best_float).value,
                             "device": profile.name, "label": est.get("label"), "why": reason})
            continue
        folder = workdir / str(i) if len(candidates) > 1 else workdir
        folder.mkdir(parents=True, exist_ok=True)
        onnx_path = folder / "candidate.onnx"
        proto = export_onnx(model, input_shape, 17, task)
        if quantized:
            fold_weight_quantizers(proto)  # int8 weight initializers, as the export stage ships them
        onnx.save(proto, str(onnx_path))
        runner = backend.timing_runner(onnx_path, profile, dtype, folder / "compiled", threads, float_dtype)
        prepared.append((runner, dtype, float_dtype))
    best: list[Any] = [None] * len(prepared)
    feeds = (task or get_task(DEFAULT)).timing_inputs({"input_shape": list(input_shape)}, 1)
    for _ in range(rounds):
        for i, p in enumerate(prepared):
            if isinstance(p, dict):
                continue
            lat = time_runner(p[0], feeds, cfg.warmup, cfg.iterations)
            if best[i] is None or lat.p50_ms < best[i].p50_ms:
                best[i] = lat
    return [p if isinstance(p, dict) else
            {"kind": "measured", **best[i].as_dict(), "rounds": rounds,
             **({"interleaved_with": len(prepared) - 1} if len(prepared) > 1 else {}),
             "float_dtype": (p[2] or profile.best_float).value}
            for i, p in enumerate(prepared)]


def stage_gain(before: Artifact, after: Artifact, before_top1: float, after_top1: float, profile: HardwareProfile,
               cfg: MeasureConfig, input_shape: tuple[int, ...], before_stage: str) -> dict[str, Any]:
    """Does a stage earn its place? Its output against its input, both compiled for the target and timed
    at batch 1 the same way, in alternating rounds (``candidate_latencies``), with the task's headline metric from the
    engine's measurements (``before_top1``/``after_top1``: that metric, whichever it is; its direction decides what
    "less accurate" means). A stage whose output is less accurate and not faster by ``profile.min_speedup`` is
    flagged. The input is timed again rather than reusing the previous stage's figure: back to back, one machine
    state decides the ratio (sub-millisecond figures moved by ±30% between minutes on a shared 2-core host)."""
    import tempfile

    from edgepipe.models.loading import load_torch_artifact

    task = task_of_artifact(after)
    metric = task.headline
    with tempfile.TemporaryDirectory(prefix="edgepipe-gain-") as tmp:
        lat = candidate_latencies([(load_torch_artifact(a), a.quantized, None) for a in (before, after)],
                                  input_shape, profile, cfg, Path(tmp), task=task)
    speedup = lat[0]["p50_ms"] / lat[1]["p50_ms"]
    delta = metric.gain_points(before_top1, after_top1)
    faster = speedup >= profile.min_speedup
    earned = delta >= 0 or faster
    where = f"{lat[1]['backend']} {lat[1]['dtype']}" + (" (roofline ESTIMATE)" if lat[1]["kind"] == "estimate" else "")
    verdict = (f"{'kept' if earned else 'flagged'}: {delta:+.2f} pts {metric.label} and {speedup:.2f}x batch-1 speed "
               f"against {before_stage} on {where} (faster counts from {profile.min_speedup}x)"
               + ("" if earned else "; less accurate and not faster: it does not earn its place"))
    return {"against": before_stage, "metric": metric.name, "delta_points": delta, f"{metric.name}_delta_points": delta,
            "before_ms": lat[0]["p50_ms"], "before_dtype": lat[0]["dtype"], "after_ms": lat[1]["p50_ms"],
            "after_dtype": lat[1]["dtype"], "speedup": speedup, "min_speedup": profile.min_speedup,
            "kind": lat[1]["kind"], "timing": "alternating rounds", "measured_on": where, "earned": earned,
            "verdict": verdict}


def paired_speedup(reference: Artifact, candidate: Artifact, input_shape: tuple[int, ...], cfg: MeasureConfig,
                   batches: tuple[int, ...], rounds: int = 5,
                   progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
                   timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """How many times faster ``candidate`` runs than ``reference``, timed back to back in alternating rounds.

    A claim such as "8x the teacher's throughput" is a ratio of two measurements; taken minutes apart on a
    shared VM, each moved by up to ±30% with the machine's state, so the ratio did too. Here each round times
    the reference, then the candidate (``cfg`` warm-up and iterations, the same threads and backend as every
    row), at each batch size; the ratio per round is reference mean latency / candidate mean latency (= the
    images/s ratio), and the figure is the median over ``rounds``, with every round recorded. ``timing``: what the
    task's timing inputs take besides the shape (a text model's ``timing_sequence``).
    """
    progress = progress or (lambda *a: None)
    threads = cfg.threads or torch.get_num_threads()
    runners = [runner_for(a, threads)[0] for a in (reference, candidate)]
    out: dict[str, Any] = {"rounds": rounds, "warmup": cfg.warmup, "iterations": cfg.iterations, "threads": threads,
                           "backend": runners[1].backend, "dtypes": [r.dtype for r in runners], "by_batch": {}}
    for batch in batches:
        per_round = []
        for i in range(rounds):
            feeds = task_of_artifact(candidate).timing_inputs({"input_shape": list(input_shape), **(timing or {})},
                                                              batch)
            ref, cand = (time_runner(r, feeds, cfg.warmup, cfg.iterations) for r in runners)
            per_round.append({"reference_images_per_s": ref.images_per_s, "candidate_images_per_s": cand.images_per_s,
                              "reference_p50_ms": ref.p50_ms, "candidate_p50_ms": cand.p50_ms,
                              "ratio": cand.images_per_s / ref.images_per_s})
            progress(f"paired timing (batch {batch})", i + 1, rounds, {})
        out["by_batch"][str(batch)] = {"ratio": float(np.median([r["ratio"] for r in per_round])),
                                       "p50_ratio": float(np.median([r["reference_p50_ms"] / r["candidate_p50_ms"]
                                                                     for r in per_round])),
                                       "per_round": per_round}
    return out
