"""Stage 6, compile: build the deployable model for the target with the profile's backend, and check it.

The precision comes from the profile: INT8 when the device lists it and the model went through QAT,
otherwise the most preferred float dtype it supports. The backend (edgepipe.backends: openvino,
tensorrt, onnxruntime) writes the artifact and reports what the runtime actually does: the precision
each Convolution, MatMul/FullyConnected and residual Add runs in, or why a TensorRT engine could not
be built here.

Then the fidelity check (the task's paired test, ``Task.fidelity``; for classification as follows): the compiled
model's top-1 on the validation set against the exported ONNX's top-1 in ONNX Runtime with graph optimizations off,
on the same images: every Q/DQ computed as
the ONNX spec defines it, the reference every backend is held to (the export stage checked it against
the QAT model). More than ``compile.max_top1_drop`` points lower, and lower beyond chance, fails the
stage with one line: a runtime that saturates, clips or reorders what QAT trained must not pass silently.

"Beyond chance": two correct runtimes still round differently (another accumulation order, float parts
in the profile's bf16), which flips the predictions of images near a decision boundary both ways. Only
the images on which exactly one of the two is right carry the difference (McNemar's test); under "the
runtime is as accurate as the reference" the compiled model loses each of them with probability 1/2. A
drop fails when it exceeds the limit and the one-sided binomial p-value of its losses is below
``FIDELITY_ALPHA``. Measured on a weakly trained MobileNetV3 (42% top-1, 1,000 images), OpenVINO
disagreed with the reference on 1.2% of the images in f32 and 1.7% in bf16, giving +0.2 and -0.4
points: noise, not a fault. A saturating runtime loses points on one side only and fails. Compute ops that run in float in an INT8
model are named in a warning and in the records. A TensorRT deploy bundle without an engine has no
compiled model on this host; the records say so instead of comparing the reference with itself.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgepipe.engine.artifacts import DESCRIPTOR
from edgepipe.backends import check_dtype, get_backend, runner_for
from edgepipe.config import PipelineConfig
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.types import ArtifactKind, DType

NAME = "compile"
INPUT_KINDS = (ArtifactKind.ONNX,)
SECTIONS = ("export", "compile", "data")
USES_TEACHER = False
MEASURED = True
DISTRIBUTED = False  # under torchrun: rank 0 alone
log = logging.getLogger(__name__)


def target_key(profile: HardwareProfile, config: PipelineConfig) -> dict[str, Any]:
    """The whole profile: backend, device, dtypes and options all shape the compiled model."""
    return profile.model_dump(mode="json")


def run(ctx: StageContext) -> StageResult:
    profile = ctx.profile
    dtype = compile_dtype(ctx.config, profile, ctx.input.quantized)
    check_dtype(profile.backend, dtype)
    backend = get_backend(profile.backend)
    fallback = ctx.input.meta.get("fallback_dtype")  # qat.fallback_dtype, resolved for this host by the qat stage
    float_dtype = DType(fallback) if dtype is DType.INT8 and fallback else None
    remove_previous(ctx.out_dir)
    extra = {"dynamic_dims": ctx.task.dynamic_dims(ctx.model_meta())} if backend.SHAPE_RANGES else {}
    if backend.TIMING_FEEDS:
        extra["timing_feeds"] = ctx.task.timing_inputs(ctx.model_meta(), 1)
    artifact, records = backend.compile(ctx.input.path("onnx"), profile, dtype, ctx.out_dir, progress=ctx.progress,
                                        float_dtype=float_dtype, **extra)
    artifact.meta.setdefault("input_shape", ctx.input.meta.get("input_shape"))
    artifact.meta.setdefault("num_classes", ctx.input.meta.get("num_classes"))
    artifact.meta.update(ctx.task_meta())
    float_ops = records.get("float_compute_ops") or []
    if dtype is DType.INT8 and float_ops:
        log.warning("compile: %d compute op(s) run in float in the INT8 model: %s", len(float_ops),
                    ", ".join(f"{o['op']} {o['name']} ({o['precision']})" for o in float_ops[:8]))
    fidelity = check_fidelity(ctx, artifact)
    if artifact.kind is ArtifactKind.TENSORRT_BUNDLE:
        records["device_validation"] = (add_validation_set(ctx, artifact) if ctx.task.device_metric else
                                        {"skipped": f"the device script evaluates no {ctx.task.name} metric"})
    artifact.save()
    return StageResult(artifact, records={"backend": profile.backend.value, "target": profile.name,
                                          "requested_dtype": dtype.value, **records, "fidelity": fidelity})


def remove_previous(out_dir: Path) -> list[str]:
    """Delete the files the folder's previous artifact lists (and its artifact.json) before compiling again, so a
    stage folder never keeps another backend's files (an OpenVINO model.xml beside a TensorRT bundle after the
    profile changed backend, or after --force). Only files inside the folder; metrics.json is the engine's.
    Returns the names removed."""
    desc = out_dir / DESCRIPTOR
    try:
        files = json.loads(desc.read_bytes()).get("files")
    except (OSError, ValueError, AttributeError):  # none yet, or damaged: nothing listed to remove
        files = None
    names = [n for n in (files.values() if isinstance(files, dict) else ()) if isinstance(n, str)]
    root, removed = out_dir.resolve(), []
    for name in [*names, DESCRIPTOR]:
        path = out_dir / name
        parent = path.parent.resolve()
        if path.name in ("metrics.json", "") or not (parent == root or root in parent.parents):
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(name)
    if removed:
        log.info("compile: removed the previous artifact's files before compiling: %s", ", ".join(removed))
    return removed


def compile_dtype(config: PipelineConfig, profile: HardwareProfile, quantized: bool) -> DType:
    """``compile.dtype``, or with ``auto`` the profile's choice for a quantized or float model."""
    want = config.compile.dtype
    if want == "auto":
        return profile.compile_dtype(quantized)
    dtype = DType(want)
    if dtype not in profile.dtypes:
        raise EdgepipeError(f"compile.dtype: target {profile.name} lists {', '.join(d.value for d in profile.dtypes)}, "
                            f"not {dtype.value}; use auto or one of those")
    if (dtype is DType.INT8) != quantized:
        raise EdgepipeError(f"compile.dtype: {dtype.value} for a {'QDQ INT8' if quantized else 'float'} ONNX model; "
                            f"{'an INT8 model compiles to int8' if quantized else 'int8 needs the qat stage'} "
                            "(or use auto)")
    return dtype


def add_validation_set(ctx: StageContext, artifact: Any) -> dict[str, Any]:
    """Put the first validation images into the bundle (``val.npz``, ``Task.device_validation``) with the exported
    ONNX's headline metric on exactly those inputs (ONNX Runtime reference), so the device's figure has a reference
    to be compared with."""
    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.backends.tensorrt_device import validation_inputs
    from edgepipe.backends.tensorrt_plan import VALIDATION_FILE, write_validation_set
    from edgepipe.runtime.runner import run_batches

    arrays, truth = ctx.task.device_validation(ctx.data, ctx.config.compile.device_val_images)
    write_validation_set(artifact.root, arrays)
    artifact.files["validation"] = VALIDATION_FILE
    x, _ = validation_inputs(arrays)
    y = truth
    n = len(y)
    batch = ctx.config.data.eval_batch_size

    def rows(i: int) -> Any:  # an image batch, or a text batch's named token arrays
        return {k: v[i:i + batch] for k, v in x.items()} if isinstance(x, dict) else x[i:i + batch]
    outputs, targets = run_batches(OrtRunner(ctx.input.path("onnx"), ctx.config.measure.threads, reference=True),
                                   [(ctx.task.feeds(rows(i)), y[i:i + batch]) for i in range(0, n, batch)])
    metric = ctx.task.device_metric
    return {"file": VALIDATION_FILE, "images": int(n), f"reference_{metric}": ctx.task.metrics(outputs, targets)[metric],
            "reference": "exported ONNX in ONNX Runtime, graph optimizations off, on the same inputs"}


def check_fidelity(ctx: StageContext, artifact: Any) -> dict[str, Any]:
    """The compiled model vs the exported ONNX in ONNX Runtime on the same validation data, by the task's paired test
    (``Task.fidelity``: for classification the exact McNemar test on top-1); raises when it drops too far."""
    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.runtime.runner import run_batches

    if artifact.kind is ArtifactKind.TENSORRT_BUNDLE:
        return {"checked": False, "reason": "no TensorRT engine on this host: the bundle's build command checks the "
                                            "engine on the device"}
    task, threads = ctx.task, ctx.config.measure.threads
    batches = list(task.val_feeds(ctx.data, ctx.config.data.eval_batch_size))
    reference, targets = run_batches(OrtRunner(ctx.input.path("onnx"), threads, reference=True), batches)
    runner, _ = runner_for(artifact, threads)
    compiled, _ = run_batches(runner, batches)
    limit = ctx.config.compile.max_top1_drop
    verdict = task.fidelity(reference, compiled, targets, limit)
    metric = task.headline
    ref_score = task.metrics(reference, targets)[metric.name]
    out_score = task.metrics(compiled, targets)[metric.name]
    drop = verdict["drop_points"]
    worse = "lower" if metric.higher_is_better else "worse"
    record = {"checked": True, "samples": verdict.get("samples"), "metric": metric.name,
              "reference": "exported ONNX in ONNX Runtime, graph optimizations off (QDQ as specified)",
              f"reference_{metric.name}": ref_score, f"compiled_{metric.name}": out_score,
              "compiled_backend": runner.backend, "compiled_dtype": runner.dtype, **verdict}
    if verdict["fails"]:
        raise EdgepipeError(f"compile: the {runner.backend} model scores {metric.shown(out_score)} {metric.label} "
                            f"against {metric.shown(ref_score)} for the exported ONNX in ONNX Runtime on "
                            f"{verdict.get('samples')} validation samples, {drop:.2f} points {worse} (compile.max_top1_drop "
                            f"{limit}; {verdict.get('detail') or _mcnemar_detail(verdict)}): the runtime does not compute "
                            "what was exported (on a CPU without VNNI, 8-bit weights saturate: set qat.weight_bits: auto "
                            "or 7)")
    if drop > limit:
        log.warning("compile: %s is %.2f points below the reference (compile.max_top1_drop %s), within chance (%s)",
                    runner.backend, drop, limit, verdict.get("detail") or _mcnemar_detail(verdict))
    return record


def _mcnemar_detail(verdict: dict[str, Any]) -> str:
    return f"it loses {verdict['losses']} images and wins {verdict['wins']}, p = {verdict['p_value']:.2g}"
