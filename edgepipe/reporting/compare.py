"""`edgepipe compare`: the pipeline's model against the one-line alternatives, measured side by side.

The command builds the runs, lets the engine execute them, then tabulates:

1. the pipeline's run (stages already done are reused);
2. the baselines (edgepipe.engine.baselines): teacher-fp32/bf16/int8, scratch, distilled, pruned, PTQ, and the
   training-loop timing, each a run derived from the pipeline's and cached by the engine;
3. with ``--device``, the pipeline for the device target (``Run.for_target``: QAT in the device's own
   INT8 form, export, compile; an engine, or a deploy bundle where TensorRT cannot run); its latency is
   a roofline *estimate* from the profile, labelled so;
4. one row per run from the metrics the engine recorded for its last stage, then BENCHMARKS.md/.json/.png
   (edgepipe.reporting.benchmarks).

Every OpenVINO row: top-1 on the whole validation split, params, MACs, size on disk, latency p50/p90
at batch 1 and throughput at batch 64, measured by the engine with the config's ``measure`` settings
(threads, warm-up, iterations), the same for every row.
"""
from __future__ import annotations

import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.engine.baselines import BASELINES, TRAIN_TIMING, Baseline, baseline_run, own_seconds, prune_wording, run_baselines
from edgepipe.reporting.benchmarks import LATENCY_BATCH, THROUGHPUT_BATCH, acceptance, recipe, write_benchmarks
from edgepipe.reporting.seeds import seed_baselines, seed_rows
from edgepipe.config import PipelineConfig
from edgepipe.errors import EdgepipeError
from edgepipe.host import host_cpu, host_has_native_bf16, host_isa, library_versions
from edgepipe.engine.pipeline import Progress, run_pipeline
from edgepipe.engine.run import Run
from edgepipe.profiles import HardwareProfile, get_profile
from edgepipe.backends import get_backend
from edgepipe.types import DType

log = logging.getLogger(__name__)
FINAL_METHOD = "pipeline: distill -> {prune_arrow}QAT INT8 -> ONNX QDQ -> OpenVINO (compile stage IR)"


def preconditions(config: PipelineConfig, target: str, device_target: str | None
                  ) -> tuple[HardwareProfile, HardwareProfile | None]:
    """What every benchmark needs before its first stage: a task it is written for, an OpenVINO target (every row is
    measured there on this host) and NNCF (the post-training baselines come after the whole pipeline)."""
    from edgepipe.tasks import task_of

    task = task_of(config)
    if task.name not in ("classification", "detection", "text"):
        raise EdgepipeError(f"task: compare's baselines and claims are written for classification, detection and text, "
                            f"not task {task.name}; run `edgepipe run` and `edgepipe report`, which compare its stages "
                            f"in its own metric ({task.headline.label})")
    profile = get_profile(target)
    if not get_backend(profile.backend).POST_TRAINING_QUANTIZATION:  # OpenVINO: NNCF's PTQ baselines
        raise EdgepipeError(f"--target {target}: compare measures every row in OpenVINO on this host; "
                            f"give an OpenVINO profile (e.g. intel-xeon-amx) and the device with --device")
    device = get_profile(device_target) if device_target else None
    try:  # checked first: the PTQ baselines come after the whole pipeline
        import nncf  # noqa: F401
    except ImportError:
        raise EdgepipeError("compare needs NNCF for its post-training quantization baselines: "
                            "pip install -e '.[bench]' (or make bench)") from None
    return profile, device


def compare(config: PipelineConfig, run_dir: Path, target: str, device_target: str | None, out_dir: Path,
            command: str, progress: Progress | None = None, recipe_notes: str = "", seeds: int = 1) -> dict[str, Any]:
    """Run the pipeline and every baseline; write BENCHMARKS.{md,json,png} into ``out_dir``. With ``seeds`` > 1 the
    KD gain is also stated over that many seeds (edgepipe.reporting.seeds: the distill stage with and without the
    teacher at each further seed, two derived runs each).

    ``recipe_notes`` (the config file's leading comment: what the student is and why) is quoted in
    BENCHMARKS.md beside the recipe's settings. (A detection config: edgepipe.reporting.detection_bench.)"""
    started = time.perf_counter()
    progress = progress or (lambda *a: None)
    profile, device = preconditions(config, target, device_target)
    if config.measure.throughput_batch != THROUGHPUT_BATCH:
        log.info("compare: throughput at batch %d (measure.throughput_batch %d in the config)", THROUGHPUT_BATCH,
                 config.measure.throughput_batch)
        config = config.model_copy(update={"measure": config.measure.model_copy(
            update={"throughput_batch": THROUGHPUT_BATCH})})
    run = Run.create(Path(run_dir), config, target)
    stages = run_pipeline(run, progress=progress)
    if stages["compile"].get("artifact", {}).get("dtype") != DType.INT8.value:
        raise EdgepipeError(f"{run.root}: the compiled model is not INT8 (target {profile.name} lists "
                            f"{', '.join(d.value for d in profile.dtypes)}); compare needs an INT8 final model")
    runs, built = run_baselines(run, progress)
    extra = seed_baselines(config, seeds)
    for b in extra:
        baseline_run(runs, b, progress)
    rows = [row_of(runs[b.row], b.row, _method(b, runs, config)) for b in built]
    rows.append(row_of(run, "final", FINAL_METHOD.format(**prune_wording(config)), stage="compile",
                       seconds=run.entry("compile").get("measure_time_s")))
    device_run = run.for_target(device.name) if device else None
    if device_run is not None:
        run_pipeline(device_run, progress=progress)
    timing = baseline_run(runs, TRAIN_TIMING, progress)
    training = _training(timing, run)
    all_runs = [run, *(runs[b.row] for b in [*built, *extra]), timing, *([device_run] if device_run else [])]
    run_of = {**{b.row: runs[b.row] for b in built}, "final": run}
    stage_of = {**{b.row: runs[b.row].order[-1] for b in built}, "final": "compile"}
    earlier = earlier_invocation_seconds(all_runs)
    measure = config.measure
    result = {
        "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe(config, recipe_notes),
        "host": {"cpu": host_cpu(), "isa_flags": [f for f in host_isa() if f.startswith(("avx", "amx"))],
                 "cores_used": rows[-1]["threads"], "native_bf16": host_has_native_bf16(), "os": platform.platform(),
                 "python": platform.python_version()},
        "versions": library_versions(), "config": config.name, "run": str(run.root), "target": profile.name,
        "device_target": device.name if device else None,
        "conditions": {"threads": rows[-1]["threads"], "warmup": measure.warmup, "iterations": measure.iterations,
                       "latency_batch": LATENCY_BATCH, "throughput_batch": THROUGHPUT_BATCH,
                       "accuracy_samples": (run.metrics_of("compile").get("accuracy") or {}).get("samples")},
        "rows": rows, "device_row": _device_row(device_run, device) if device_run else None,
        "training_throughput": training,
        "seeds": seed_rows(config, runs, seeds, "top1") if seeds > 1 else [],
        "held_out": config.data.val_from_train is not None,
        "per_class": {r: (run_of[r].metrics_of(stage_of[r]).get("accuracy") or {}).get("per_class")
                      for r in ("teacher-fp32", "distilled", "final")},
        "stage_seconds": {e["name"]: e.get("wall_time_s") for e in run.manifest["stages"]},
        "compute_seconds": sum(own_seconds(r) for r in all_runs) + earlier,
        "this_invocation_seconds": time.perf_counter() - started,
        "earlier_invocation_epoch_seconds": earlier,
    }
    result["paired"] = paired(run_of, stage_of, run, config.measure, progress)
    result["checks"] = acceptance(result)
    write_benchmarks(Path(out_dir), result)
    return result


PAIRED_AGAINST = ("teacher-fp32", "teacher-bf16", "teacher-int8")


def pipeline_and_rows(config: PipelineConfig, run_dir: Path, target: str, wanted: tuple[str, ...], seeds: int,
                      progress: Progress) -> tuple[Run, dict[str, Run], list[Baseline], list[Baseline]]:
    """The pipeline's run (its compiled model must be INT8), then the baselines among ``wanted`` the target allows
    and the KD gain's further seeds (edgepipe.reporting.seeds), each executed or reused: (run, runs by row, the
    baselines built, the seed baselines)."""
    run = Run.create(run_dir, config, target)
    stages = run_pipeline(run, progress=progress)
    if stages["compile"].get("artifact", {}).get("dtype") != DType.INT8.value:
        raise EdgepipeError(f"{run.root}: the compiled model is not INT8 (target {run.profile.name}); compare needs an "
                            "INT8 final model")
    runs: dict[str, Run] = {"pipeline": run}
    built = [b for b in BASELINES if b.row in wanted and (b.requires_dtype is None
                                                          or b.requires_dtype in run.profile.dtypes)]
    extra = seed_baselines(config, seeds)
    for b in [*built, *extra]:
        baseline_run(runs, b, progress)
    return run, runs, built, extra


def where_rows_are(run: Run, runs: dict[str, Run], built: list[Baseline]) -> tuple[dict[str, Run], dict[str, str]]:
    """Each row's run and the stage whose artifact is its model (``final``: the pipeline's compile stage)."""
    return ({**{b.row: runs[b.row] for b in built}, "final": run},
            {**{b.row: runs[b.row].order[-1] for b in built}, "final": "compile"})


def paired(run_of: dict[str, Run], stage_of: dict[str, str], run: Run, measure: Any,
            progress: Progress, batches: tuple[int, ...] = (LATENCY_BATCH, THROUGHPUT_BATCH)) -> dict[str, Any]:
    """The final model against each teacher row, timed back to back in alternating rounds
    (edgepipe.measure.figures.paired_speedup): what the speed-up claims are computed from."""
    from edgepipe.measure.figures import paired_speedup

    final = run.artifact_of("compile")
    shape = tuple(final.meta["input_shape"])
    return {row: paired_speedup(run_of[row].artifact_of(stage_of[row]), final, shape, measure, batches,
                                progress=progress)
            for row in PAIRED_AGAINST if row in run_of}


def _method(b: Baseline, runs: dict[str, Run], config: PipelineConfig) -> str:
    ptq = (runs[b.row].metrics_of("ptq").get("records") or {}).get("method", "")
    def n_epochs(n: int) -> str:
        return f"{n} epoch{'' if n == 1 else 's'}"

    return b.method.format(ptq=ptq, student=config.distill.student.arch, epochs=n_epochs(config.distill.optim.epochs),
                           init=config.distill.init, qat_epochs=n_epochs(config.qat.optim.epochs),
                           **prune_wording(config))


def row_of(run: Run, name: str, method: str, stage: str | None = None, seconds: float | None = None) -> dict[str, Any]:
    """One benchmark row from the metrics the engine recorded for the run's last stage (or ``stage``)."""
    stage = stage or run.order[-1]
    m = run.metrics_of(stage)
    if not m.get("latency"):
        raise EdgepipeError(f"{run.root / stage}: no measured figures; rerun `edgepipe compare`")
    lat, records = m["latency"], m.get("records") or {}
    requested = run.artifact_of(stage).meta.get("requested_dtype", lat["dtype"])
    note = ""
    if lat["dtype"] != requested:
        note = (f"OpenVINO was asked for {requested} and ran {lat['dtype']}: this CPU has no native {requested} "
                f"({host_cpu()})")
    scores = {k: v for k, v in m["accuracy"].items() if isinstance(v, (int, float)) or k == "per_class"}
    return {"row": name, "method": method, "top1": m["accuracy"].get("top1"), "scores": scores,
            "params": m.get("params"),
            "macs": m.get("macs"), "size_bytes": m.get("size_bytes"), "backend": lat["backend"],
            "device": lat["device"], "requested_dtype": requested, "runtime_dtype": lat["dtype"],
            "threads": lat["threads"], "warmup": lat["warmup"], "iterations": lat["iterations"],
            "latency_b1_p50_ms": lat["p50_ms"], "latency_b1_p90_ms": lat["p90_ms"],
            "throughput_b64_images_per_s": m["throughput"]["images_per_s"], "throughput_batch": m["throughput"].get("batch"),
            "estimate": None, "note": note,
            "seconds": own_seconds(run) if seconds is None else seconds, "fingerprint": run.entry(stage)["metrics_key"],
            "conv_precisions": records.get("conv_precisions")}


def _device_row(child: Run, device: HardwareProfile) -> dict[str, Any]:
    """The device target's compiled model: accuracy of its QDQ ONNX in ONNX Runtime on this host (the export
    stage's figure) and a calibrated estimate of its latency (edgepipe.measure.roofline), labelled as such."""
    from edgepipe.measure.layers import artifact_layers
    from edgepipe.measure.roofline import target_estimate

    compiled = child.artifact_of("compile")
    qat, export = child.metrics_of("qat"), child.metrics_of("export")
    records = child.metrics_of("compile").get("records") or {}
    dtype = device.compile_dtype(compiled.quantized)
    c = qat.get("counts") or {}
    layers = artifact_layers(compiled)  # the deployed ONNX's layers: the estimate is calibrated where published
    est = {f"batch_{b}": target_estimate(device, dtype, c, batch=b, layers=layers)  # results exist for the device
           for b in (LATENCY_BATCH, THROUGHPUT_BATCH)}
    form = (qat.get("records") or {}).get("form") or {}
    return {"row": f"device-{device.name}",
            "method": f"pruned student, QAT in the {device.name} form ({form.get('activations')} activations, "
                      f"{form.get('weight_bits')}-bit weights) -> {device.backend.value} ({dtype.value})",
            "params": c.get("params"), "macs": c.get("macs"), "size_bytes": compiled.size_bytes(),
            "backend": device.backend.value, "device": device.description, "requested_dtype": dtype.value,
            "artifact_kind": compiled.kind.value, "artifact_dir": str(compiled.root),
            "compile_records": {k: v for k, v in records.items() if k != "settings"},
            "estimate": est, "top1": (export.get("accuracy") or {}).get("top1"), "seconds": own_seconds(child),
            "note": "latency is an ESTIMATE (roofline with efficiency factors and launch overheads calibrated on "
                    "published MLPerf results, see `edgepipe estimate`), not a measurement; top-1 is the device-form "
                    "QDQ ONNX in ONNX Runtime on this host"}


def _training(timing: Run, run: Run) -> dict[str, Any]:
    """The train_timing stage's loops, with the distill stage's own per-epoch images/s beside them."""
    rates = [h["images_per_s"] for h in (run.metrics_of("distill").get("records") or {}).get("history") or []]
    return {**(timing.metrics_of("train_timing").get("records") or {}), "seconds": own_seconds(timing),
            "distill_stage_epochs_images_per_s": rates,
            "distill_stage_median_images_per_s": float(np.median(rates)) if rates else None}


def earlier_invocation_seconds(runs: list[Run]) -> float:
    """Training time of epochs that ran before an interruption: a resumed stage's wall time covers only
    the epochs after it, so these are added to the benchmark's compute time."""
    total = 0.0
    for run in runs:
        for e in run.manifest["stages"]:
            if not e.get("shared_from"):
                history = (run.metrics_of(e["name"]).get("records") or {}).get("history") or []
                total += sum(h.get("seconds", 0.0) for h in history if h.get("earlier_invocation"))
    return float(total)
