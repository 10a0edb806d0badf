"""`edgepipe compare`: the pipeline's model against the one-line alternatives, measured side by side.

One command runs the pipeline (stages already done are reused) and then the baselines a user would
otherwise pick, all measured the same way on this host, and writes BENCHMARKS.md, BENCHMARKS.json
and BENCHMARKS.png:

- teacher-fp32 / teacher-bf16: the teacher compiled by OpenVINO with an f32 / bf16 precision hint;
  the row records the precision the CPU plugin actually ran (a CPU without native bf16 runs f32).
- teacher-int8: the teacher quantized post-training by NNCF (``nncf.quantize``), OpenVINO INT8.
- scratch: the same student architecture trained on labels alone, same optimizer and epochs.
- distilled / pruned: the pipeline's float models, compiled by OpenVINO FP32.
- PTQ: the pruned student quantized post-training by NNCF instead of QAT, OpenVINO INT8.
- final: the pipeline's QAT INT8 model as the compile stage built it for the target.
- the device target (e.g. jetson): the pruned student through QAT, export and compile in the device's own
  INT8 form (a run in ``<run>/targets/<device>``; an engine, or a deploy bundle where TensorRT cannot
  run); its latency is a roofline *estimate* from the profile, labelled so.

Every OpenVINO row: top-1 on the whole validation split, params, MACs, size on disk (model.xml +
model.bin), latency p50 at batch 1 and throughput at batch 64, with the same threads, warm-up and
iterations. Training throughput: the distill stage's own images/s (teacher forward included) next to
a plain PyTorch loop of the same student, teacher, loss and batch size, timed here.

Each row is written to ``<run>/compare/<row>.json`` when done (with a fingerprint of its inputs), so
an interrupted benchmark resumes where it stopped; stages resume from their per-epoch checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepipe.artifacts import Artifact
from edgepipe.config import PipelineConfig
from edgepipe.data import DataBundle, load_data
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write, atomic_write_json, atomic_write_text
from edgepipe.pipeline import Run, run_pipeline
from edgepipe.profiles import HardwareProfile, get_profile
from edgepipe.runtime import accuracy_record, predict, time_runner
from edgepipe.host import host_cpu, host_has_native_bf16, host_isa, library_versions
from edgepipe.types import Backend, DType

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, dict[str, float]], None]
VERSION = 1  # bump when a row's method changes, so cached rows are recomputed
LATENCY_BATCH, THROUGHPUT_BATCH = 1, 64
PTQ_SUBSET = 300  # NNCF's default calibration subset size
TRAIN_TIMED_BATCHES = 40  # batches each training loop is timed over

ROW_KEYS = ("row", "method", "top1", "params", "macs", "size_bytes", "backend", "device", "requested_dtype",
            "runtime_dtype", "threads", "warmup", "iterations", "latency_b1_p50_ms", "latency_b1_p90_ms",
            "throughput_b64_images_per_s", "estimate", "note", "seconds")


# --- the command ------------------------------------------------------------------------------------
def compare(config: PipelineConfig, run_dir: Path, target: str, device_target: str | None, out_dir: Path,
            command: str, progress: Progress | None = None, recipe_notes: str = "") -> dict[str, Any]:
    """Run the pipeline and every baseline; write BENCHMARKS.{md,json,png} into ``out_dir``.

    ``recipe_notes`` (the config file's leading comment: what the student is and why) is quoted in
    BENCHMARKS.md beside the recipe's settings."""
    started = time.perf_counter()
    progress = progress or (lambda *a: None)
    profile = get_profile(target)
    if profile.backend is not Backend.OPENVINO:
        raise EdgepipeError(f"--target {target}: compare measures every row in OpenVINO on this host; "
                            f"give an OpenVINO profile (e.g. intel-xeon-amx) and the device with --device")
    device = get_profile(device_target) if device_target else None
    try:  # checked first: the PTQ baselines come after the whole pipeline
        import nncf  # noqa: F401
    except ImportError:
        raise EdgepipeError("compare needs NNCF for its post-training quantization baselines: "
                            "pip install -e '.[bench]' (or make bench)") from None
    run = Run.create(Path(run_dir), config, target)
    stages = run_pipeline(run, progress=progress)
    if stages["compile"].get("artifact", {}).get("dtype") != DType.INT8.value:
        raise EdgepipeError(f"{run.root}: the compiled model is not INT8 (target {profile.name} lists "
                            f"{', '.join(d.value for d in profile.dtypes)}); compare needs an INT8 final model")
    work = run.root / "compare"
    data = load_data(config.data, seed=config.seed)
    threads = config.measure.threads or torch.get_num_threads()
    bench = _Bench(data, profile, threads, config.bench.warmup, config.bench.iterations, config.data.eval_batch_size)
    ctx = _Context(run, config, data, work, bench, progress)

    rows = [ctx.teacher_row(DType.FP32), ctx.teacher_row(DType.BF16), ctx.teacher_int8_row(),
            ctx.scratch_row(), ctx.stage_float_row("distill", "distilled"), ctx.stage_float_row("prune", "pruned"),
            ctx.ptq_row(), ctx.final_row()]
    device_row = ctx.device_row(device) if device is not None else None
    training = ctx.training_throughput()
    pipeline_seconds = sum(e.get("wall_time_s") or 0.0 for e in run.manifest["stages"])
    earlier = _earlier_invocation_seconds(run, rows)
    result = {
        "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe(config, recipe_notes),
        "host": {"cpu": host_cpu(), "isa_flags": [f for f in host_isa() if f.startswith(("avx", "amx"))],
                 "cores_used": threads, "native_bf16": host_has_native_bf16(), "os": platform.platform(),
                 "python": platform.python_version()},
        "versions": library_versions(), "config": config.name, "run": str(run.root), "target": profile.name,
        "device_target": device.name if device else None,
        "conditions": {"threads": threads, "warmup": bench.warmup, "iterations": bench.iterations,
                       "latency_batch": LATENCY_BATCH, "throughput_batch": THROUGHPUT_BATCH,
                       "accuracy_samples": int(len(data.val_labels))},
        "rows": rows, "device_row": device_row, "training_throughput": training,
        "stage_seconds": {e["name"]: e.get("wall_time_s") for e in run.manifest["stages"]},
        "compute_seconds": pipeline_seconds + sum(r.get("seconds") or 0.0 for r in rows)
        + (device_row or {}).get("seconds", 0.0) + training.get("seconds", 0.0) + earlier,
        "this_invocation_seconds": time.perf_counter() - started,
        "earlier_invocation_epoch_seconds": earlier,
    }
    result["checks"] = acceptance(result)
    write_benchmarks(Path(out_dir), result)
    return result


def _earlier_invocation_seconds(run: Run, rows: list[dict[str, Any]]) -> float:
    """Training time of epochs that ran before an interruption: a resumed stage's wall time covers only
    the epochs after it, so these are added to the benchmark's compute time."""
    histories = [r.get("history") or [] for r in rows]
    for name in ("teacher", "distill", "prune", "qat"):
        path = run.root / name / "metrics.json"
        if path.exists():
            histories.append((json.loads(path.read_text()).get("records") or {}).get("history") or [])
    return float(sum(h.get("seconds", 0.0) for hist in histories for h in hist if h.get("earlier_invocation")))


class _Bench:
    """Accuracy, latency and throughput of one OpenVINO model, the same way for every row."""

    def __init__(self, data: DataBundle, profile: HardwareProfile, threads: int, warmup: int, iterations: int,
                 eval_batch: int) -> None:
        self.data, self.profile, self.threads = data, profile, threads
        self.warmup, self.iterations, self.eval_batch = warmup, iterations, eval_batch

    def measure(self, xml: Path, dtype: DType, progress: Progress, label: str) -> dict[str, Any]:
        from edgepipe.backends.openvino import OvRunner, _config

        runner = OvRunner(xml, "CPU", _config(self.profile, dtype), self.threads)
        logits, labels = predict(runner, self.data.val_numpy(self.eval_batch))
        acc = accuracy_record(logits, labels, runner)
        shape = tuple(self.data.input_shape)
        b1 = time_runner(runner, shape, LATENCY_BATCH, self.warmup, self.iterations,
                         progress=lambda i, n: progress(f"{label}: latency (batch 1)", i, n, {}))
        b64 = time_runner(runner, shape, THROUGHPUT_BATCH, self.warmup, self.iterations,
                          progress=lambda i, n: progress(f"{label}: throughput (batch 64)", i, n, {}))
        size = sum(p.stat().st_size for p in (xml, xml.with_suffix(".bin")))
        return {"top1": acc["top1"], "size_bytes": size, "backend": "openvino", "device": runner.device,
                "requested_dtype": dtype.value, "runtime_dtype": runner.dtype, "threads": self.threads,
                "warmup": self.warmup, "iterations": self.iterations,
                "latency_b1_p50_ms": b1.p50_ms, "latency_b1_p90_ms": b1.p90_ms,
                "throughput_b64_images_per_s": b64.images_per_s,
                "conv_precisions": runner.precisions}


class _Context:
    def __init__(self, run: Run, config: PipelineConfig, data: DataBundle, work: Path, bench: _Bench,
                 progress: Progress) -> None:
        self.run, self.config, self.data, self.work, self.bench, self.progress = run, config, data, work, bench, progress

    # -- caching ------------------------------------------------------------------------------------
    def _cached(self, name: str, inputs: dict[str, Any], make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The row in ``compare/<name>.json`` if its inputs are unchanged, else ``make()`` (timed, saved)."""
        fingerprint = hashlib.sha256(json.dumps({"v": VERSION, "bench": [self.bench.threads, self.bench.warmup,
                                                                         self.bench.iterations], **inputs},
                                                sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = self.work / f"{name}.json"
        if path.exists():
            try:
                row = json.loads(path.read_text())
                if row.get("fingerprint") == fingerprint:
                    log.info("compare: %s unchanged, reusing %s", name, path)
                    return row
            except json.JSONDecodeError:
                pass
        log.info("compare: %s ...", name)
        t0 = time.perf_counter()
        row = make()
        row.update(row=name, fingerprint=fingerprint, seconds=time.perf_counter() - t0)
        atomic_write_json(path, row)
        return row

    def _stage(self, name: str) -> tuple[Artifact, dict[str, Any]]:
        art = self.run.artifact_of(name)
        if art is None:
            raise EdgepipeError(f"{self.run.root}: stage {name} has no artifact; rerun the pipeline")
        return art, json.loads((self.run.root / name / "metrics.json").read_text())

    def _float_ir(self, art: Artifact, folder: Path) -> Path:
        """The float torch artifact exported to ONNX (the export stage's exporter) and converted to IR."""
        import onnx
        import openvino as ov

        from edgepipe.backends.openvino import _save_ir
        from edgepipe.models import load_torch_artifact
        from edgepipe.onnx_export import export_onnx

        source, xml = folder / "source.txt", folder / "ir" / "model.xml"
        if xml.exists() and source.exists() and source.read_text() == art.content_hash():
            return xml  # converted earlier from this very artifact
        folder.mkdir(parents=True, exist_ok=True)
        onnx_path = folder / "model.onnx"
        proto = export_onnx(load_torch_artifact(art), tuple(self.data.input_shape), self.config.export.opset)
        atomic_write(onnx_path, lambda p: onnx.save(proto, str(p)))
        xml = _save_ir(ov.convert_model(str(onnx_path)), folder / "ir")
        atomic_write_text(source, art.content_hash())
        return xml

    def _counts(self, metrics: dict[str, Any]) -> dict[str, Any]:
        c = metrics.get("counts") or {}
        return {"params": c.get("params", metrics.get("params")), "macs": c.get("macs", metrics.get("macs"))}

    # -- rows ---------------------------------------------------------------------------------------
    def teacher_row(self, dtype: DType) -> dict[str, Any]:
        art, metrics = self._stage("teacher")
        name = f"teacher-{dtype.value}"

        def make() -> dict[str, Any]:
            row = self.bench.measure(self._float_ir(art, self.work / "teacher-ir"), dtype, self.progress, name)
            note = ""
            if row["runtime_dtype"] != dtype.value:
                note = (f"OpenVINO was asked for {dtype.value} and ran {row['runtime_dtype']}: this CPU has no native "
                        f"{dtype.value} ({host_cpu()})")
            return {"method": f"teacher, OpenVINO {dtype.value} precision hint", **self._counts(metrics), **row,
                    "note": note}
        return self._cached(name, {"teacher": art.content_hash(), "dtype": dtype.value}, make)

    def teacher_int8_row(self) -> dict[str, Any]:
        return self._ptq_row("teacher", "teacher-ir", "teacher-int8", "teacher, NNCF post-training INT8 ({info}), OpenVINO")

    def _ptq_row(self, stage: str, float_folder: str, name: str, method: str) -> dict[str, Any]:
        art, metrics = self._stage(stage)

        def make() -> dict[str, Any]:
            q_xml, info = self._nncf_ptq(self._float_ir(art, self.work / float_folder), self.work / name)
            row = self.bench.measure(q_xml, DType.INT8, self.progress, name)
            return {"method": method.format(info=info), **self._counts(metrics), **row, "note": ""}
        return self._cached(name, {"artifact": art.content_hash()}, make)

    def _nncf_ptq(self, xml: Path, out: Path) -> tuple[Path, str]:
        """NNCF post-training quantization of an IR, calibrated on un-augmented training images."""
        import nncf
        import openvino as ov

        from edgepipe.backends.openvino import _save_ir

        images = torch.cat(self.data.calibration_batches(1, PTQ_SUBSET)).numpy()
        dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
        quantized = nncf.quantize(ov.Core().read_model(str(xml)), dataset, subset_size=len(images),
                                  preset=nncf.QuantizationPreset.PERFORMANCE, target_device=nncf.TargetDevice.CPU)
        return _save_ir(quantized, out / "ir"), (f"nncf {nncf.__version__} nncf.quantize, {len(images)} "
                                                 f"un-augmented training images, performance preset")

    def scratch_row(self) -> dict[str, Any]:
        from edgepipe.models import build_from_spec, save_torch_artifact
        from edgepipe.training import clear_checkpoints, cross_entropy_step, fit, seed_everything

        dcfg, cfg = self.config.distill, self.config
        _, metrics = self._stage("distill")
        inputs = {"student": dcfg.student.model_dump(mode="json"), "optim": dcfg.optim.model_dump(mode="json"),
                  "data": cfg.data.model_dump(mode="json"), "seed": cfg.seed}

        def make() -> dict[str, Any]:
            folder = self.work / "scratch"
            seed_everything(cfg.seed + 1)  # the distill stage's seed: same initial weights and batches
            model = build_from_spec(dcfg.student)
            history = fit(model, self.data, dcfg.optim, cross_entropy_step, batch_size=cfg.data.batch_size,
                          checkpoint_dir=folder / "checkpoints", task="scratch", progress=self.progress,
                          eval_batch_size=cfg.data.eval_batch_size)
            build = dcfg.student.model_dump(exclude_none=True, exclude={"weights"})
            art = save_torch_artifact(model, build, folder / "model", self.data.input_shape, self.data.num_classes)
            clear_checkpoints(folder / "checkpoints")
            row = self.bench.measure(self._float_ir(art, folder), DType.FP32, self.progress, "scratch")
            return {"method": f"same student ({dcfg.student.arch}, random init), labels only (cross-entropy), "
                              f"{dcfg.optim.epochs} epochs, same optimizer, OpenVINO fp32",
                    **self._counts(metrics), **row, "note": "", "history": history}
        return self._cached("scratch", inputs, make)

    def stage_float_row(self, stage: str, name: str) -> dict[str, Any]:
        art, metrics = self._stage(stage)

        def make() -> dict[str, Any]:
            row = self.bench.measure(self._float_ir(art, self.work / name), DType.FP32, self.progress, name)
            return {"method": f"pipeline {stage} stage, OpenVINO fp32", **self._counts(metrics), **row, "note": ""}
        return self._cached(name, {"artifact": art.content_hash()}, make)

    def ptq_row(self) -> dict[str, Any]:
        return self._ptq_row("prune", "pruned", "ptq", "pruned student, {info} (instead of QAT), OpenVINO")

    def final_row(self) -> dict[str, Any]:
        art, _ = self._stage("compile")
        _, qat = self._stage("qat")

        def make() -> dict[str, Any]:
            row = self.bench.measure(art.path("xml"), DType.INT8, self.progress, "final")
            return {"method": "pipeline: distill -> prune -> QAT INT8 -> ONNX QDQ -> OpenVINO (compile stage IR)",
                    **self._counts(qat), **row, "note": ""}
        return self._cached("final", {"artifact": art.content_hash()}, make)

    def device_row(self, device: HardwareProfile) -> dict[str, Any]:
        """The pruned student through QAT, export and compile for the device target, in its own run
        (``<run>/targets/<device>``): the device gets the INT8 form it needs (edgepipe.quant_form), not
        this host's. Accuracy is its QDQ ONNX in ONNX Runtime; latency is the profile's estimate."""
        from edgepipe.estimate import roofline_estimate

        child = self.run.for_target(device.name)
        run_pipeline(child, stages=["qat", "export", "compile"], progress=self.progress)
        compiled = child.artifact_of("compile")
        qat = json.loads((child.root / "qat" / "metrics.json").read_text())
        export = json.loads((child.root / "export" / "metrics.json").read_text())
        records = json.loads((child.root / "compile" / "metrics.json").read_text()).get("records", {})

        def make() -> dict[str, Any]:
            dtype = device.compile_dtype(compiled.quantized)
            c = qat.get("counts") or {}
            est = {f"batch_{b}": roofline_estimate(device, dtype, c["macs"], c["params"] * dtype.bytes,
                                                   c["activation_elements"] * 2 * dtype.bytes, batch=b)
                   for b in (LATENCY_BATCH, THROUGHPUT_BATCH)}
            form = (qat.get("records") or {}).get("form") or {}
            return {"method": f"pruned student, QAT in the {device.name} form ({form.get('activations')} activations, "
                              f"{form.get('weight_bits')}-bit weights) -> {device.backend.value} ({dtype.value})",
                    "params": c.get("params"), "macs": c.get("macs"), "size_bytes": compiled.size_bytes(),
                    "backend": device.backend.value, "device": device.description, "requested_dtype": dtype.value,
                    "artifact_kind": compiled.kind.value, "artifact_dir": str(compiled.root),
                    "compile_records": {k: v for k, v in records.items() if k != "settings"},
                    "estimate": est, "top1": (export.get("accuracy") or {}).get("top1"),
                    "note": "latency is a roofline ESTIMATE from the profile's peak figures, not a measurement; top-1 is "
                            "the device-form QDQ ONNX in ONNX Runtime on this host"}
        return self._cached(f"device-{device.name}", {"compile": compiled.content_hash(), "profile": device.name}, make)

    def training_throughput(self) -> dict[str, Any]:
        """The pipeline's distillation loop next to a plain PyTorch loop: same student, teacher, loss, batch
        size and batches, timed back to back in this process (so both see the same machine load). The
        distill stage's own per-epoch figures are reported beside them."""
        _, metrics = self._stage("distill")
        history = (metrics.get("records") or {}).get("history") or []
        teacher_art, _ = self._stage("teacher")
        cfg = self.config
        inputs = {"teacher": teacher_art.content_hash(), "distill": cfg.distill.model_dump(mode="json"),
                  "soft_targets": cfg.soft_targets.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json")}

        def make() -> dict[str, Any]:
            n = TRAIN_TIMED_BATCHES * cfg.data.batch_size
            subset = replace(self.data, train_images=self.data.train_images[:n],
                             train_labels=self.data.train_labels[:n], val_images=self.data.val_images[:500],
                             val_labels=self.data.val_labels[:500])
            pipeline = pipeline_kd_loop_throughput(cfg, subset, teacher_art, self.work / "train-timing",
                                                   self.progress)
            plain = plain_kd_loop_throughput(cfg, subset, teacher_art, self.progress)
            rates = [h["images_per_s"] for h in history]
            return {**pipeline, **plain, "ratio": pipeline["pipeline_images_per_s"] / plain["plain_images_per_s"],
                    "distill_stage_epochs_images_per_s": rates,
                    "distill_stage_median_images_per_s": float(np.median(rates)) if rates else None}
        return self._cached("training-throughput", inputs, make)


def pipeline_kd_loop_throughput(config: PipelineConfig, data: DataBundle, teacher_art: Artifact, folder: Path,
                                progress: Progress) -> dict[str, Any]:
    """One epoch of edgepipe's own training loop (edgepipe.training.fit) over ``data``, configured as the
    distill stage is (channels-last, autocast, soft-target runtime; the logits cache off, so every batch
    pays for its teacher forward)."""
    from edgepipe.distillation import SoftTargets, kd_step
    from edgepipe.models import build_from_spec, load_torch_artifact
    from edgepipe.training import clear_checkpoints, fit

    dcfg = config.distill
    torch.manual_seed(config.seed)
    student = build_from_spec(dcfg.student)
    targets = SoftTargets(load_torch_artifact(teacher_art), config.soft_targets.runtime, cache=False,
                          example=torch.randn(2, *data.input_shape))
    optim = dcfg.optim.model_copy(update={"epochs": 1})
    history = fit(student, data, optim, kd_step(targets, dcfg.temperature, dcfg.alpha),
                  batch_size=config.data.batch_size, checkpoint_dir=folder, task="edgepipe loop (timing)",
                  progress=progress, eval_batch_size=config.data.eval_batch_size, tag="timing")
    clear_checkpoints(folder)
    return {"pipeline_images_per_s": history[0]["images_per_s"], "pipeline_batches_timed": len(data.train_labels)
            // config.data.batch_size,
            "pipeline_setup": (f"edgepipe.training.fit as in the distill stage: channels_last={dcfg.optim.channels_last}, "
                               f"autocast {dcfg.optim.autocast} (ran {history[0]['autocast']}), teacher logits from "
                               f"{config.soft_targets.runtime}, augmentation included; one epoch of "
                               f"{len(data.train_labels) // config.data.batch_size} batches of {config.data.batch_size}")}


def plain_kd_loop_throughput(config: PipelineConfig, data: DataBundle, teacher_art: Artifact,
                             progress: Progress) -> dict[str, Any]:
    """A textbook PyTorch distillation loop (what a user writes by hand) over the same batches, all timed
    as the pipeline's are: eager student in NCHW float32, the teacher module under no_grad, KL + CE, SGD."""
    from edgepipe.distillation import kd_terms
    from edgepipe.models import build_from_spec, load_torch_artifact

    dcfg = config.distill
    torch.manual_seed(config.seed)
    student = build_from_spec(dcfg.student).train()
    teacher = load_torch_artifact(teacher_art).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total, seen = data.steps_per_epoch(config.data.batch_size), 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(data.train_batches(config.data.batch_size, 0)):
        with torch.no_grad():
            t_logits = teacher(x)
        loss = kd_terms(student(x), t_logits, y, dcfg.temperature, dcfg.alpha)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        progress("plain PyTorch loop (timing)", i + 1, total, {})
    return {"plain_images_per_s": seen / (time.perf_counter() - t0), "plain_batches_timed": total,
            "plain_setup": "eager student, NCHW, float32, teacher module forward under no_grad, KL+CE, SGD "
                           f"Nesterov; the same {total} augmented batches of {config.data.batch_size}, all timed"}


def recipe(config: PipelineConfig, notes: str = "") -> dict[str, Any]:
    """The settings that decide the result, for the benchmark document."""
    d, p, q = config.distill, config.prune, config.qat
    return {
        "notes": notes,
        "teacher": config.teacher.model.model_dump(exclude_none=True, exclude_defaults=True),
        "student": d.student.model_dump(exclude_none=True, exclude_defaults=True),
        "distill": f"init {d.init}, T={d.temperature}, alpha={d.alpha}, {d.optim.epochs} epochs, peak lr {d.optim.lr}, "
                   f"batch {config.data.batch_size}, channels_last {d.optim.channels_last}, autocast {d.optim.autocast}",
        "prune": f"Torch-Pruning {p.importance.value} importance to <= {p.ratio:.0%} of the {p.target}, "
                 f"{p.steps} step(s), round_to {p.round_to}, {p.optim.epochs} fine-tuning epochs from the teacher",
        "qat": f"activations {q.activations}, weight bits {q.weight_bits} (auto: from target and host, see the "
               f"qat stage's form record), {q.calibration} calibration on {q.calibration_batches} batches, "
               f"{q.optim.epochs} epochs at lr {q.optim.lr}",
        "soft_targets": f"teacher logits from {config.soft_targets.runtime}, cache {config.soft_targets.cache}",
    }


def leading_comment(path: Path) -> str:
    """The comment block at the top of a YAML file, without the ``#`` marks."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines).strip()


# --- acceptance -------------------------------------------------------------------------------------
def _by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["row"]: r for r in result["rows"]}


def acceptance(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's claims, each computed from the measured rows: (claim, measured, required, pass)."""
    r = _by_name(result)
    final, t32, t8, tbf = r["final"], r["teacher-fp32"], r["teacher-int8"], r["teacher-bf16"]
    thr = "throughput_b64_images_per_s"
    train = result["training_throughput"]
    checks = [
        ("final INT8 top-1 >= teacher-fp32 - 2.0 points", final["top1"] - t32["top1"], ">= -0.020"),
        ("final INT8 throughput (b64) >= 8x teacher-fp32", final[thr] / t32[thr], ">= 8"),
        ("final INT8 latency (b1 p50) >= 3x lower than teacher-fp32",
         t32["latency_b1_p50_ms"] / final["latency_b1_p50_ms"], ">= 3"),
        ("final INT8 top-1 >= teacher-int8 - 1.5 points", final["top1"] - t8["top1"], ">= -0.015"),
        ("final INT8 throughput (b64) >= 2.5x teacher-int8", final[thr] / t8[thr], ">= 2.5"),
        ("final INT8 throughput (b64) >= 2x teacher-bf16", final[thr] / tbf[thr], ">= 2"),
        ("distilled top-1 >= scratch + 0.5 points", r["distilled"]["top1"] - r["scratch"]["top1"], ">= 0.005"),
        ("QAT (final) top-1 >= PTQ top-1", final["top1"] - r["ptq"]["top1"], ">= 0"),
        ("distill training throughput >= 0.9x plain PyTorch loop", train.get("ratio") or 0.0, ">= 0.9"),
        ("stretch: final top-1 within 1.0 point of teacher-fp32", final["top1"] - t32["top1"], ">= -0.010"),
        ("stretch: final throughput (b64) >= 12x teacher-fp32", final[thr] / t32[thr], ">= 12"),
    ]
    return [{"claim": c, "measured": m, "required": req, "pass": bool(m >= float(req.split()[-1]) - 1e-12)}
            for c, m, req in checks]


# --- writing ----------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _count(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K"


def _size(b: float | None) -> str:
    return "—" if b is None else (f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB")


def _measured_of(check: dict[str, Any], value: float | None = None) -> str:
    m = check["measured"] if value is None else value
    return f"{100 * m:+.2f} pts" if "top-1" in check["claim"] else f"{m:.2f}x"


def _required_of(check: dict[str, Any]) -> str:
    op, value = check["required"].split()
    return f"{op} {_measured_of(check, float(value))}"


def markdown(result: dict[str, Any]) -> str:
    c, h = result["conditions"], result["host"]
    lines = [
        "# Benchmarks", "",
        f"CIFAR-10 benchmark of the `{result['config']}` recipe against the one-line alternatives, all measured "
        "in one run on this machine. Produced by:", "",
        "```", result["command"], "```", "",
        f"- Date: {result['date']}",
        f"- Machine: {h['cpu']}, {c['threads']} threads, ISA: {', '.join(h['isa_flags']) or 'none listed'}; "
        f"native bf16: {'yes' if h['native_bf16'] else 'no'}; {h['os']}, Python {h['python']}",
        f"- Libraries: {', '.join(f'{k} {v}' for k, v in sorted(result['versions'].items()))}",
        f"- Every row below: OpenVINO CPU plugin, {c['threads']} inference threads, latency = p50 of "
        f"{c['iterations']} timed runs at batch {c['latency_batch']} after {c['warmup']} warm-up runs, throughput = "
        f"batch {c['throughput_batch']} over {c['iterations']} timed runs after {c['warmup']} warm-up runs; "
        f"top-1 on all {c['accuracy_samples']:,} test images, computed by the same compiled model.",
        f"- Run folder: `{result['run']}`; target profile `{result['target']}`. Compute time of the whole benchmark "
        f"(pipeline stages + baselines + timing): {result['compute_seconds'] / 60:.1f} min"
        f" (this invocation: {result['this_invocation_seconds'] / 60:.1f} min; training epochs of earlier, "
        f"interrupted invocations: {result.get('earlier_invocation_epoch_seconds', 0.0) / 60:.1f} min; stages and "
        "rows finished earlier are reused, not redone).", "",
        *_recipe_lines(result.get("recipe") or {}),
        "## Results", "",
        "| row | top-1 | params | MACs | size on disk | runtime dtype | latency b1 p50 | throughput b64 | how |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in result["rows"]:
        dtype = r["runtime_dtype"] + ("" if r["runtime_dtype"] == r["requested_dtype"] else
                                      f" (asked {r['requested_dtype']})")
        lines.append(f"| {r['row']} | {_pct(r['top1'])} | {_count(r['params'])} | {_count(r['macs'])} | "
                     f"{_size(r['size_bytes'])} | {dtype} | {r['latency_b1_p50_ms']:.3f} ms | "
                     f"{r['throughput_b64_images_per_s']:,.0f} img/s | {r['method']} |")
    notes = [f"- {r['row']}: {r['note']}" for r in result["rows"] if r.get("note")]
    if notes:
        lines += ["", *notes]
    d = result.get("device_row")
    if d:
        e1, e64 = d["estimate"][f"batch_{LATENCY_BATCH}"], d["estimate"][f"batch_{THROUGHPUT_BATCH}"]
        lines += ["", f"## {result['device_target']} (estimate only)", "",
                  f"{d['method']}: `{d['artifact_kind']}` in `{d['artifact_dir']}` "
                  f"({_size(d['size_bytes'])}). {d['compile_records'].get('reason', '')}".rstrip(), "",
                  "| batch | ESTIMATED latency | ESTIMATED throughput | bound |", "|---:|---:|---:|---|"]
        for b, est in ((LATENCY_BATCH, e1), (THROUGHPUT_BATCH, e64)):
            lines.append(f"| {b} | {est['latency_ms']:.3f} ms (estimate) | {est['images_per_s']:,.0f} img/s "
                         f"(estimate) | {est.get('bound', '')} |")
        top1 = f"{d['top1']:.2%}" if d.get("top1") is not None else "n/a"
        lines += ["", f"{d['note']}: {top1}. Measure it on the device with `edgepipe bench --artifact` after "
                  "building the engine."]
    t = result["training_throughput"]
    stage_rates = ", ".join(f"{r:,.0f}" for r in t.get("distill_stage_epochs_images_per_s") or [])
    lines += ["", "## Training throughput (distillation, teacher forward included)", "",
              "Both loops timed back to back in this run on the same batches (same student, teacher, loss, "
              "batch size).", "",
              "| loop | images/s | setup |", "|---|---:|---|",
              f"| edgepipe training loop | {t['pipeline_images_per_s']:,.0f} | {t['pipeline_setup']} |",
              f"| plain PyTorch loop | {t['plain_images_per_s']:,.0f} | {t['plain_setup']} |",
              "", f"Ratio edgepipe / plain: **{t['ratio']:.2f}x**. The distill stage itself ran at {stage_rates} "
              "images/s per epoch (whole epochs, while the machine may have been doing other work)."]
    lines += ["", "## Claims, checked against the rows above", "", "| claim | measured | required | |",
              "|---|---:|---:|---|"]
    for ch in result["checks"]:
        lines.append(f"| {ch['claim']} | {_measured_of(ch)} | {_required_of(ch)} | "
                     f"{'pass' if ch['pass'] else '**MISS**'} |")
    lines += ["", "## Accuracy vs latency", "", "![accuracy vs batch-1 latency](BENCHMARKS.png)", "",
              "Every row at its measured batch-1 p50 latency; the line joins the Pareto-optimal rows "
              "(no other row is both faster and more accurate).", "",
              "## Stage wall times", "", "| stage | seconds |", "|---|---:|"]
    for name, secs in result["stage_seconds"].items():
        lines.append(f"| {name} | {secs:.0f} |" if secs is not None else f"| {name} | — |")
    for r in result["rows"]:
        lines.append(f"| baseline/measure: {r['row']} | {r.get('seconds') or 0:.0f} |")
    return "\n".join(lines) + "\n"


def _recipe_lines(r: dict[str, Any]) -> list[str]:
    if not r:
        return []
    lines = ["## Recipe", ""]
    if r.get("notes"):
        lines += ["> " + line if line else ">" for line in r["notes"].splitlines()] + [""]
    lines += [f"- Teacher: `{json.dumps(r['teacher'])}`", f"- Student: `{json.dumps(r['student'])}`",
              f"- Distill: {r['distill']}", f"- Prune: {r['prune']}", f"- QAT: {r['qat']}",
              f"- Soft targets: {r['soft_targets']}", ""]
    return lines


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (latency, accuracy) not dominated by a faster-and-at-least-as-accurate one."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best, keep = -1.0, []
    for i in order:
        if points[i][1] > best:
            keep.append(i)
            best = points[i][1]
    return keep


def plot(result: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("top1") is not None]
    pts = [(r["latency_b1_p50_ms"], 100 * r["top1"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for r, (x, y) in zip(rows, pts):
        int8 = r["runtime_dtype"] == "int8"
        ax.scatter([x], [y], s=60, marker="s" if int8 else "o", color="tab:red" if r["row"] == "final" else
                   ("tab:blue" if int8 else "tab:gray"), zorder=3)
        ax.annotate(r["row"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = sorted(pareto(pts), key=lambda i: pts[i][0])
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:red", lw=1, zorder=2,
            label="Pareto front")
    c = result["conditions"]
    ax.set_xlabel(f"OpenVINO latency, batch 1, p50 (ms) — {c['threads']} threads, {result['host']['cpu']}")
    ax.set_ylabel(f"top-1 on {c['accuracy_samples']:,} test images (%)")
    ax.set_title("Accuracy vs latency (squares: INT8, circles: float)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_benchmarks(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{k: r.get(k) for k in ROW_KEYS} for r in result["rows"]]
    if result.get("device_row"):
        rows.append({k: result["device_row"].get(k) for k in ROW_KEYS})
    doc = {k: v for k, v in result.items() if k != "rows" and k != "device_row"}
    atomic_write_json(out_dir / "BENCHMARKS.json", {**doc, "rows": rows})
    png = plot(result)
    atomic_write(out_dir / "BENCHMARKS.png", lambda p: p.write_bytes(png))
    atomic_write_text(out_dir / "BENCHMARKS.md", markdown(result))
