"""The engine: runs stages in order, caches by content hash, measures and records every stage.

Lineage is owned here, not by the stages (see STYLE.md). Each stage module declares what decides its
output (``edgepipe.engine.stage.Stage``: its config sections, whether it trains against the teacher, what of
the target shapes it); from those the engine computes the stage's key together with the content
hashes of its input (and teacher) artifacts. A stage whose key and output are unchanged is reused;
``force`` reruns from a stage on. Measuring is keyed apart: the metrics key adds the ``measure``
settings, the data, the target and this host, so changing ``measure.iterations`` (or the CPU)
re-measures the stored artifact without retraining it. A stage that transforms a torch model into
another is also checked against its input on the target (``gain`` in metrics.json, see
edgepipe.measure.figures.stage_gain): one less accurate and not faster by the profile's ``min_speedup`` is
flagged in the log and the report, or with ``on_no_gain: skip`` passes its input through instead (its
key then includes the target, host and measure settings that decided it).

The run folder it executes into (``Run``, its manifest, derived runs) is edgepipe.engine.run; each stage folder
gets ``metrics.json`` from here. Every file is written atomically; a stage interrupted mid-training resumes from its
last epoch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.training import distributed

from edgepipe.engine import signals
from edgepipe.engine.artifacts import Artifact
from edgepipe.config import (DETECTION_FIELDS, DETECTION_KINDS, LATER_DEFAULTS, LATER_NESTED_DEFAULTS, TEXT_FIELDS,
                             TEXT_KINDS, PipelineConfig)
from edgepipe.device import Device, is_out_of_memory, out_of_memory_line
from edgepipe.errors import EdgepipeError
from edgepipe.types import ArtifactKind
from edgepipe.host import host_cpu, host_isa
from edgepipe.io import atomic_write_json, atomic_write_text
from edgepipe.engine.run import Run, now, read_manifest
from edgepipe.engine.stage import StageContext, StageResult, load_stage
from edgepipe.tasks import DEFAULT as DEFAULT_TASK
from edgepipe.tasks import default_task, task_of

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, dict[str, float]], None]
MEASURE_VERSION = 4  # 2: per-class top-1; 3: the gain check; 4: the task's metrics, every stage timed on the target
"""Bump when the engine measures differently, so stored figures are re-measured."""


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _keyed_config(config: PipelineConfig) -> dict[str, Any]:
    """The config as the keys see it: without data.workers, which changes no pixel and no batch order (every
    sample's augmentation is seeded by seed, epoch and index; tests/test_streaming.py checks 0 against 2), and with the
    task resolved (named, or implied by the data) and left out when it is classification, the implicit task of every
    run made before tasks existed: their keys hold, and a config that names it keys as one that does not. The data
    fields only detection reads (``DETECTION_FIELDS``) are left out for other kinds, so their keys hold too, and so are
    fields added later (``LATER_DEFAULTS``) while they hold the value that reproduces the earlier runs."""
    cfg = config.model_dump(mode="json")
    cfg["data"].pop("workers", None)
    for section, fields in LATER_DEFAULTS.items():
        for name, default in fields.items():
            if cfg[section].get(name, default) == default:
                cfg[section].pop(name, None)
    if config.distill.loss == "kd":  # the DKD weights decide nothing under KD
        cfg["distill"].pop("dkd_alpha", None), cfg["distill"].pop("dkd_beta", None)
    else:  # under DKD they are keyed whatever they are
        cfg["distill"].update(dkd_alpha=config.distill.dkd_alpha, dkd_beta=config.distill.dkd_beta)
    if config.data.kind not in DETECTION_KINDS:
        for name in DETECTION_FIELDS:
            cfg["data"].pop(name, None)
    if config.data.kind not in TEXT_KINDS:
        for name in TEXT_FIELDS:
            cfg["data"].pop(name, None)
    _drop_nested_defaults(cfg)
    cfg["task"] = config.task or default_task(config.data.kind)
    if cfg["task"] == DEFAULT_TASK:
        cfg.pop("task")
    return cfg


def _drop_nested_defaults(node: Any) -> None:
    """``LATER_NESTED_DEFAULTS`` out of the keyed config wherever they hold their default (fields that came after runs
    were made, in sections found at several places: model specs, optimizers)."""
    if isinstance(node, dict):
        for name, default in LATER_NESTED_DEFAULTS.items():
            if name in node and node[name] == default:
                node.pop(name)
        for value in node.values():
            _drop_nested_defaults(value)
    elif isinstance(node, list):
        for value in node:
            _drop_nested_defaults(value)


def stage_key(run: Run, name: str, input_hash: str | None, teacher: Artifact | None) -> str:
    """What decides the stage's output, as its module declares it (edgepipe.engine.stage.Stage)."""
    module = load_stage(name)
    cfg = _keyed_config(run.config)
    target = module.target_key(run.profile, run.config) if module.target_key else None
    key = {"stage": name, "config": {s: cfg[s] for s in module.SECTIONS}, "profile": target,
           "input": input_hash, "teacher": teacher.content_hash() if teacher and module.USES_TEACHER else None}
    if "task" in cfg:  # every stage's output depends on the task (losses, outputs, metrics)
        key["task"] = cfg["task"]
    if "data" in module.SECTIONS:  # the files themselves, not only the data settings
        key["data_files"] = run.data_fingerprint()
    if run.config.on_no_gain == "skip" and ArtifactKind.TORCH in module.INPUT_KINDS:
        # Whether the stage passes its own output or its input on depends on measurements on this target.
        key["on_no_gain"] = {"profile": run.profile.model_dump(mode="json"), "host": [host_cpu(), list(host_isa())],
                             "measure": cfg["measure"]}
    return _hash(key)


def metrics_key(run: Run, name: str, key: str, device: Device | None = None) -> str:
    """What decides the stage's figures: its output (``key``), the measure settings, the data, the target
    (estimates, the gain check), this host and, when it is a GPU, the device PyTorch evaluates on (its figures are
    re-measured where the device changes; the CPU is implied, as in every run made before devices existed)."""
    cfg, keyed = run.config, _keyed_config(run.config)
    measure = cfg.measure.model_dump(mode="json") if run.is_measured(name) else None
    return _hash({"stage_key": key, "measure": measure, "data": keyed["data"],
                  **({"task": keyed["task"]} if "task" in keyed else {}),
                  **({"torch_device": device.label} if device is not None and device.is_cuda else {}),
                  "profile": run.profile.model_dump(mode="json"),  # estimates and the gain check are per target
                  "host": [host_cpu(), list(host_isa())], "version": MEASURE_VERSION})


def run_stage(run: Run, name: str, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or reuse) one stage, measure its artifact, write metrics.json and the manifest entry.

    Under torchrun (edgepipe.training.distributed) a stage that declares DISTRIBUTED runs on every rank, each training on
    its shard; any other stage runs on rank 0 alone. Measuring and recording are rank 0's in both cases; the other
    ranks wait at a barrier, then read the manifest rank 0 wrote, so every rank goes on from the same state."""
    if distributed.launch() is None:
        return _run_stage(run, name, force, progress)
    distributed.note_stage(name)
    metrics = None
    if load_stage(name).DISTRIBUTED:
        with distributed.collective():
            metrics = _run_stage(run, name, force, progress)
    elif distributed.is_main():
        with distributed.main_only_threads():
            metrics = _run_stage(run, name, force, progress)
    distributed.barrier()
    if not distributed.is_main():
        run.manifest = read_manifest(run.root / "manifest.json")
        metrics = run.metrics_of(name)
    return metrics


def _run_stage(run: Run, name: str, force: bool, progress: Progress | None) -> dict[str, Any] | None:
    """run_stage on this process: every rank of a collective stage gets here, rank 0 alone for the others; only
    rank 0 measures and records (the others return None)."""
    signals.check()  # an interruption a library swallowed stops here, before the next stage starts
    progress = progress or (lambda *a: None)
    module = load_stage(name)
    task_of(run.config).check_stage(run.config, name)  # what this kind of model cannot go through yet: one line
    together = distributed.collective_active()
    found = run.input_of(name)
    inp = found[1] if found else None
    if inp is not None and inp.kind not in module.INPUT_KINDS:
        raise EdgepipeError(f"stage {name} cannot take a {inp.kind.value} artifact (from {found[0]}); "
                            f"it takes {', '.join(k.value for k in module.INPUT_KINDS)}")
    teacher = _teacher_for(run, name, progress) if module.USES_TEACHER else None
    input_hash = inp.content_hash() if inp else None  # hashed once: it reads every byte of the model
    if found is not None:
        recorded = (run.find(found[0]) or {}).get("output_hash")
        if recorded and input_hash != recorded:
            raise EdgepipeError(f"{inp.root}: the {found[0]} stage's output changed or was damaged after it was "
                                f"recorded; run `edgepipe run --run {run.root}` (it redoes {found[0]} first) or "
                                f"`edgepipe {found[0]} --run {run.root}`")
    key = stage_key(run, name, input_hash, teacher)
    entry = run.entry(name)
    out_dir = run.root / name
    metrics_path = out_dir / "metrics.json"
    ctx = StageContext(name=name, config=run.config, profile=run.profile, out_dir=out_dir, input=inp,
                       teacher=teacher, progress=progress, cache_dir=run.cache_dir)
    # Where PyTorch trains and evaluates in a stage that takes a torch model (or builds one: the teacher); a stage
    # that takes an ONNX file (compile) runs no PyTorch.
    torch_device = ctx.device if not module.INPUT_KINDS or ArtifactKind.TORCH in module.INPUT_KINDS else None
    mkey = metrics_key(run, name, key, torch_device)
    reusable = not force and entry.get("key") == key and entry.get("status") in ("done", "skipped")
    damage = _damage(run, name, entry, metrics_path) if reusable and distributed.is_main() else None
    if together:  # rank 0's view of its own files decides for every rank
        reusable, damage = distributed.broadcast((reusable, damage))
    if reusable and damage is None and not distributed.is_main():
        return None  # rank 0 reuses or re-measures the stored artifact
    if reusable:
        if damage is None:
            art = run.artifact_of(name)
            old = json.loads(metrics_path.read_text())
            if entry.get("metrics_key") == mkey:
                log.info("%s: unchanged (key %s), reusing %s", name, key, entry["artifact_dir"])
                return old
            log.info("%s: unchanged (key %s), measurement settings or host changed: re-measuring", name, key)
            result = StageResult(art, records=old.get("records") or {}, skipped=old.get("skipped_reason"))
            return _record(run, name, result, ctx, entry.get("wall_time_s") or 0.0, mkey, progress)
        log.warning("%s: %s; redoing the stage", name, damage)
    signals.set_stage(name, run.root)
    try:  # from the first save to the last: a Ctrl-C anywhere in between is recorded (measuring included)
        # Marked running inside the try: a signal raises at any bytecode, and one landing between marking the
        # entry and entering the try left the stage "running" in the manifest (the next save wrote it) although
        # the command had stopped (seen under `sigterm then ctrl-c` ~0.2 s into a stage).
        entry.update(status="running", started=now(), key=key, metrics_key=None, input_hash=input_hash,
                     ended=None, skipped_reason=None, launch=distributed.describe(),
                     **({"torch_device": torch_device.describe()} if torch_device is not None else {}))
        run.save()
        if distributed.is_main():
            _checkpoints_for(ctx.checkpoint_dir, key, name)
        if together:
            distributed.barrier()  # no rank reads a checkpoint before rank 0 has dropped stale ones
        t0 = time.perf_counter()
        result: StageResult = module.run(ctx)
        if not distributed.is_main():
            signals.set_stage(None)
            return None
        metrics = _record(run, name, result, ctx, time.perf_counter() - t0, mkey, progress)
    except BaseException as e:
        if entry.get("status") in ("done", "skipped"):  # recorded already (only clearing its checkpoints was cut),
            raise  # or stopped before the entry was marked running (a forced rerun of a finished stage: left as it was)
        # SIGINT/SIGTERM (edgepipe.engine.signals raises a KeyboardInterrupt; native code may turn it into another error, e.g.
        # a C extension's import into "ImportError: initialization failed"): "interrupted", resumed like "failed".
        # Under torchrun the launcher's SIGTERM (distributed.Stopped) means another rank failed: "failed".
        stopped = isinstance(e, KeyboardInterrupt) or (signals.received() is not None
                                                       and not isinstance(e, distributed.Stopped))
        if isinstance(e, RuntimeError) and is_out_of_memory(e):  # outside a training loop: evaluation, the teacher
            e = EdgepipeError(out_of_memory_line(name, torch_device, run.config.data.batch_size,
                                                 run.config.data.eval_batch_size))
        entry.update(status="interrupted" if stopped else "failed", ended=now(),
                     error=f"interrupted by {signals.name()}" if stopped else f"{type(e).__name__}: {str(e)[:300]}")
        try:
            run.save()
        except OSError as save_error:  # e.g. the disk is still full: the error that stopped the stage matters more
            log.warning("%s: could not record the failure in %s (%s)", name, run.root / "manifest.json",
                        save_error.strerror)
        if isinstance(e, EdgepipeError):
            raise e from None
        raise
    signals.set_stage(None)
    return metrics


def _damage(run: Run, name: str, entry: dict[str, Any], metrics_path: Path) -> str | None:
    """Why a stage recorded as finished cannot be reused, or None: its metrics.json must be the bytes the
    manifest recorded (sha256) and its artifact must load and hash to the recorded output hash."""
    try:
        raw = metrics_path.read_bytes()
    except FileNotFoundError:
        return f"{metrics_path} is missing"
    recorded = entry.get("metrics_sha256")
    if recorded and hashlib.sha256(raw).hexdigest() != recorded:
        return f"{metrics_path} differs from what was recorded (damaged or edited)"
    try:
        json.loads(raw)
    except ValueError:
        return f"{metrics_path} is not readable JSON"
    try:
        art = run.artifact_of(name)
    except EdgepipeError as e:
        return str(e).split(";")[0]
    if art is None or art.content_hash() != entry.get("output_hash"):
        return f"its artifact in {run.root / (entry.get('artifact_dir') or name)} differs from what was recorded " \
               "(damaged or edited)"
    return None


def _record(run: Run, name: str, result: StageResult, ctx: StageContext, wall: float, mkey: str,
            progress: Progress) -> dict[str, Any]:
    """Measure the stage's artifact, write metrics.json, then mark the stage done in the manifest (rank 0, with all
    of the node's cores while any other ranks wait)."""
    with distributed.main_only_threads():
        return _record_alone(run, name, result, ctx, wall, mkey, progress)


def _record_alone(run: Run, name: str, result: StageResult, ctx: StageContext, wall: float, mkey: str,
                  progress: Progress) -> dict[str, Any]:
    t0 = time.perf_counter()
    metrics = _metrics(run, name, result, ctx, wall, progress)
    gain = metrics.get("gain")
    if gain and not gain["earned"] and run.config.on_no_gain == "skip":
        log.warning("%s: skipped (on_no_gain: skip); %s's model passes through", name, gain["against"])
        result = StageResult(ctx.input, records={**result.records, "gain": gain},
                             skipped=f"on_no_gain: skip: {gain['verdict']}")
        metrics = {**_metrics(run, name, result, ctx, wall, progress), "gain": gain}
    metrics_file = atomic_write_json(run.root / name / "metrics.json", metrics)
    art = result.artifact
    run.entry(name).pop("error", None)
    run.entry(name).update(status="skipped" if result.skipped else "done", ended=now(), wall_time_s=wall,
                           metrics_sha256=hashlib.sha256(metrics_file.read_bytes()).hexdigest(),
                           measure_time_s=time.perf_counter() - t0, metrics_key=mkey,
                           output_hash=art.content_hash(), artifact_dir=os.path.relpath(art.root, run.root),
                           skipped_reason=result.skipped)
    run.save()
    from edgepipe.training.loop import clear_checkpoints

    clear_checkpoints(ctx.checkpoint_dir)  # only now: a kill before this line resumes from the last epoch
    return metrics


CHECKPOINT_KEY = "stage_key"


def _checkpoints_for(folder: Path, key: str, name: str) -> None:
    """Keep a stage's per-epoch checkpoints only if they were written for this very stage key (its config,
    input model, teacher and data files); otherwise drop them, so training never resumes from a model
    trained on other inputs."""
    marker = folder / CHECKPOINT_KEY
    if folder.is_dir():
        try:
            same = marker.read_text().strip() == key
        except OSError:
            same = False
        if not same:
            log.info("%s: discarding checkpoints written for other inputs or settings", name)
            shutil.rmtree(folder)
    if not marker.exists():
        atomic_write_text(marker, key + "\n")


def _metrics(run: Run, name: str, result: StageResult, ctx: StageContext, wall: float,
             progress: Progress) -> dict[str, Any]:
    art = result.artifact
    base: dict[str, Any] = {"stage": name, "status": "skipped" if result.skipped else "done",
                            "skipped_reason": result.skipped, "wall_time_s": wall,
                            "artifact": {"kind": art.kind.value, "dtype": art.dtype.value, "quantized": art.quantized,
                                         "dir": os.path.relpath(art.root, run.root), "files": art.files}}
    if result.skipped:
        return {**base, "records": result.records}
    counts = _counts(run, name, art, ctx)
    if not run.is_measured(name):
        why = ("the stage's output is its records" if not load_stage(name).MEASURED
               else "this run measures only " + ", ".join(run.manifest.get("measured") or []))
        return {**base, "params": counts.get("params"), "macs": counts.get("macs"), "counts": counts,
                "measured": False, "measure_note": f"not measured: {why}", "records": result.records}
    from edgepipe.measure.figures import measure_artifact

    figures = measure_artifact(art, ctx.data, run.config.measure, run.profile, counts,
                               eval_batch_size=run.config.data.eval_batch_size,
                               device=ctx.device if art.kind is ArtifactKind.TORCH else None,
                               progress=lambda t, i, n, v: progress(f"{name}: {t}", i, n, v))
    return {**base, **figures, "counts": counts, "gain": _gain(run, name, ctx, art, figures), "records": result.records}


def _teacher_for(run: Run, name: str, progress: Progress) -> Artifact | None:
    """The teacher a stage learns from: the teacher stage's, except for ``distill`` with ``distill.assistants`` (Mirzadeh
    et al. 2020, "Improved Knowledge Distillation via Teacher Assistant"): there the last assistant of the chain
    teacher -> assistants[0] -> ... Each step is a run derived from the one before (``Run.derive`` with
    ``as_teacher``: the previous step's distilled model is its teacher) in ``<run>/assistants/<i>``, executed, cached
    and measured by this engine like any run, with this run's distill settings and the assistant as student. The
    stages after distill (pruning and QAT fine-tuning) keep learning from the teacher itself."""
    assistants = run.config.distill.assistants
    if name != "distill" or not assistants:
        return run.artifact_of("teacher")
    if distributed.launch() is not None:
        raise EdgepipeError("distill.assistants: the teacher-assistant chain runs in one process; run `edgepipe run "
                            "--run RUN` without torchrun once (the assistants are then cached), or remove "
                            "distill.assistants")
    previous, stage = run, "teacher"
    for i, spec in enumerate(assistants):
        config = run.config.model_copy(update={"distill": run.config.distill.model_copy(
            update={"student": spec, "assistants": []})})
        child = previous.derive(run.root / "assistants" / str(i), ("teacher",), config=config,
                                order=("teacher", "distill"), measured=("distill",),
                                as_teacher=None if stage == "teacher" else stage)
        label = f"assistant {i + 1}/{len(assistants)}"
        run_pipeline(child, progress=lambda what, *a: progress(f"{label}: {what}", *a))
        previous, stage = child, "distill"
    return previous.artifact_of("distill")


def _gain(run: Run, name: str, ctx: StageContext, art: Artifact, figures: dict[str, Any]) -> dict[str, Any] | None:
    """A model-transforming stage (torch in, torch out) against its input on the target (edgepipe.measure.figures.stage_gain)."""
    from edgepipe.measure.figures import stage_gain
    found = run.input_of(name)
    if found is None or found[1].kind is not ArtifactKind.TORCH or art.kind is not ArtifactKind.TORCH \
            or not figures.get("on_target", True):
        return None
    order = run.order
    i = order.index(found[0])
    while i > 0 and run.metrics_of(order[i]).get("status") == "skipped":  # a skipped stage passed this model on
        i -= 1
    metric = ctx.task.headline.name
    # on the held-out split where data.val_from_train carved one (choices are never made on the reported split)
    scores = run.metrics_of(order[i]).get("accuracy") or {}
    after = figures["accuracy"]
    if "choice" in scores and "choice" in after:
        scores, after = scores["choice"], after["choice"]
    before = scores.get(metric)
    if before is None:  # the input stage was not measured (e.g. a derived run measuring only its last stage)
        return None
    if not run.metrics_of(order[i]).get("on_target", True):  # its input was measured in PyTorch alone (a teacher
        return None  # whose post-processing does not export): there is no target figure to compare with
    gain = stage_gain(found[1], art, before, after[metric], run.profile, run.config.measure,
                      tuple(ctx.data.input_shape), order[i])
    (log.info if gain["earned"] else log.warning)("%s: %s", name, gain["verdict"])
    return gain


def _counts(run: Run, name: str, art: Artifact, ctx: StageContext) -> dict[str, Any]:
    """MACs/params/activations of the torch model behind ``art``: counted for a torch artifact, else
    taken from the nearest earlier stage that counted them (export and compile don't change them)."""
    from edgepipe.measure.figures import model_counts
    from edgepipe.models.loading import load_torch_artifact
    if art.kind is ArtifactKind.TORCH:
        return model_counts(load_torch_artifact(art), ctx.data.input_shape)
    order = run.order
    for prev in reversed(order[: order.index(name)]):
        counts = run.metrics_of(prev).get("counts")
        if counts:
            return counts
    raise EdgepipeError(f"{name}: no earlier torch stage in {run.root} to count MACs/params from; rerun the pipeline")


def run_pipeline(run: Run, stages: list[str] | None = None, force_from: str | None = None,
                 progress: Progress | None = None, on_stage: Callable[[str, dict], None] | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (default: every stage the run does not share) in order; ``force_from`` reruns that
    stage and every later one."""
    order = run.order
    stages = stages or run.own_stages()
    for s in [*stages, *([force_from] if force_from else [])]:
        load_stage(s)
        if s not in order:
            raise EdgepipeError(f"stage {s} is not in the order of {run.root} ({', '.join(order)})")
    results = {}
    for name in order:
        if name not in stages:
            continue
        force = force_from is not None and order.index(name) >= order.index(force_from)
        results[name] = run_stage(run, name, force=force, progress=progress)
        if on_stage:
            on_stage(name, results[name])
    return results
