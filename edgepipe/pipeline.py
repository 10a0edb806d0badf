"""The engine: runs stages in order, caches by content hash, measures and records every stage.

Lineage is owned here, not by the stages (see STYLE.md): for each stage the engine computes a key
from the stage's config section, the data/seed, the target profile and the content hashes of its
input (and teacher) artifacts. A stage whose key and output are unchanged is skipped; ``force``
reruns from a stage on. Each stage folder gets ``metrics.json``; the run folder gets ``config.yaml``
(resolved) and ``manifest.json`` (order, status, times, hashes, library versions, git revision).
Every file is written atomically; a stage interrupted mid-training resumes from its last epoch.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from edgepipe.artifacts import Artifact
from edgepipe.config import PipelineConfig, validate_config
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write_json, atomic_write_text, is_main_process
from edgepipe.profiles import HardwareProfile, get_profile, load_profile_file
from edgepipe.host import git_revision, host_cpu, host_isa, library_versions
from edgepipe.stage import STAGE_ORDER, StageContext, StageResult

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, dict[str, float]], None]

# Which parts of the config decide each stage's output (besides its inputs' content and the target).
_STAGE_SECTIONS = {"teacher": ("teacher", "data", "seed"), "distill": ("distill", "soft_targets", "data", "seed"),
                   "prune": ("prune", "soft_targets", "data", "seed"), "qat": ("qat", "soft_targets", "data", "seed"),
                   "export": ("export", "data"), "compile": ("export", "compile", "data")}
_USES_TEACHER = ("distill", "prune", "qat")


def stage_module(name: str) -> ModuleType:
    if name not in STAGE_ORDER:
        raise EdgepipeError(f"unknown stage '{name}' (stages: {', '.join(STAGE_ORDER)})")
    return importlib.import_module(f"stages.{name}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Run:
    """A run folder: resolved config, target profile, manifest, one folder per stage."""

    root: Path
    config: PipelineConfig
    profile: HardwareProfile
    manifest: dict[str, Any]

    @classmethod
    def create(cls, root: Path, config: PipelineConfig, target: str) -> Run:
        """Open ``root`` for ``config`` and ``target``; an existing run keeps its manifest (so caching works)."""
        root = Path(root)
        profile = get_profile(target)
        manifest_path = root / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if manifest is None:
            manifest = {"run": root.name, "target": profile.name, "created": _now(), "stages": []}
        manifest["target"] = profile.name
        run = cls(root, config, profile, manifest)
        if is_main_process():
            atomic_write_text(root / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            atomic_write_text(root / "profile.yaml", yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
        run.save()
        return run

    @classmethod
    def open(cls, root: Path) -> Run:
        """Open an existing run folder (its resolved config and target)."""
        root = Path(root)
        cfg_path, manifest_path = root / "config.yaml", root / "manifest.json"
        if not manifest_path.exists() or not cfg_path.exists():
            raise EdgepipeError(f"{root}: not a run folder (no manifest.json/config.yaml); start it with "
                                f"`edgepipe run --config CONFIG --target TARGET --run {root}` or pass --config and --target")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise EdgepipeError(f"{manifest_path}: corrupt manifest; remove the run folder and start again") from None
        config = validate_config(yaml.safe_load(cfg_path.read_text()), cfg_path)
        # The run's own copy of its profile: a target given as a YAML path may not exist any more.
        saved = root / "profile.yaml"
        profile = load_profile_file(saved, require_stem=False) if saved.exists() else get_profile(manifest["target"])
        return cls(root, config, profile, manifest)

    def for_target(self, target: str, shared: tuple[str, ...] = ("teacher", "distill", "prune")) -> Run:
        """A run for another target inside this one (``<run>/targets/<name>``), reusing ``shared`` stages.

        The shared stages do not depend on the target; the new run's manifest points at this run's
        artifacts (with their hashes), so its qat/export/compile run and cache per target, e.g. a
        TensorRT-form QAT model beside the OpenVINO one of the same pruned student.
        """
        profile = get_profile(target)
        root = self.root / "targets" / profile.name
        child = Run.create(root, self.config, target)
        for name in shared:
            parent = self.entry(name)
            if parent.get("status") not in ("done", "skipped") or not parent.get("artifact_dir"):
                raise EdgepipeError(f"{self.root}: stage {name} has not run; run the pipeline before deriving "
                                    f"a run for {profile.name}")
            entry = child.entry(name)
            entry.update({k: v for k, v in parent.items() if k != "name"},
                         artifact_dir=os.path.relpath(self.root / parent["artifact_dir"], root))
            metrics = self.root / name / "metrics.json"
            if metrics.exists() and is_main_process():  # counts for the stages after it
                atomic_write_text(root / name / "metrics.json", metrics.read_text())
        child.save()
        return child

    def save(self) -> None:
        if is_main_process():
            self.manifest.update(git_revision=git_revision(), versions=library_versions(),
                                 host={"cpu": host_cpu(), "isa": list(host_isa())})
            atomic_write_json(self.root / "manifest.json", self.manifest)

    def entry(self, name: str) -> dict[str, Any]:
        for e in self.manifest["stages"]:
            if e["name"] == name:
                return e
        e = {"name": name, "status": "pending"}
        self.manifest["stages"].append(e)
        self.manifest["stages"].sort(key=lambda x: STAGE_ORDER.index(x["name"]))
        return e

    def artifact_of(self, name: str) -> Artifact | None:
        e = self.entry(name)
        if e.get("status") not in ("done", "skipped") or not e.get("artifact_dir"):
            return None
        return Artifact.load(self.root / e["artifact_dir"])

    def input_of(self, name: str) -> tuple[str, Artifact] | None:
        """The artifact of the stage right before ``name`` (a skipped stage passes its input through)."""
        i = STAGE_ORDER.index(name)
        if i == 0:
            return None
        prev = STAGE_ORDER[i - 1]
        art = self.artifact_of(prev)
        if art is None:
            raise EdgepipeError(f"stage {name} needs the output of {prev}, which has not run in {self.root}; "
                                f"run `edgepipe {prev} --run {self.root}` first (or `edgepipe run`)")
        return prev, art


def stage_key(run: Run, name: str, input_hash: str | None, teacher: Artifact | None) -> str:
    cfg = run.config.model_dump(mode="json")
    parts = {s: cfg[s] for s in _STAGE_SECTIONS[name]}
    # Only qat (does the target run int8, and in which form on this host) and compile depend on the
    # target; a new --target on an existing run reuses the trained teacher, student and pruned model,
    # and the QAT model whenever both targets need the same INT8 form (edgepipe.quant_form).
    profile = (_qat_target_key(run) if name == "qat"
               else run.profile.model_dump(mode="json") if name == "compile" else None)
    return _hash({"stage": name, "config": parts, "profile": profile,
                  "input": input_hash,
                  "teacher": teacher.content_hash() if teacher and name in _USES_TEACHER else None})


def _qat_target_key(run: Run) -> dict[str, Any]:
    if not run.profile.supports_int8 or not run.config.qat.enabled:
        return {"supports_int8": run.profile.supports_int8}
    from edgepipe.quant_form import form_key, resolve_form

    q = run.config.qat
    return {"supports_int8": True, "form": form_key(resolve_form(run.profile, q.activations, q.weight_bits))}


def run_stage(run: Run, name: str, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or reuse) one stage, measure its artifact, write metrics.json and the manifest entry."""
    progress = progress or (lambda *a: None)
    module = stage_module(name)
    found = run.input_of(name)
    inp = found[1] if found else None
    if inp is not None and inp.kind not in module.INPUT_KINDS:
        raise EdgepipeError(f"stage {name} cannot take a {inp.kind.value} artifact (from {found[0]}); "
                            f"it takes {', '.join(k.value for k in module.INPUT_KINDS)}")
    teacher = run.artifact_of("teacher") if name != "teacher" else None
    input_hash = inp.content_hash() if inp else None  # hashed once: it reads every byte of the model
    key = stage_key(run, name, input_hash, teacher)
    entry = run.entry(name)
    out_dir = run.root / name
    metrics_path = out_dir / "metrics.json"
    if not force and entry.get("key") == key and entry.get("status") in ("done", "skipped") and metrics_path.exists():
        art = run.artifact_of(name)
        if art is not None and art.content_hash() == entry.get("output_hash"):
            log.info("%s: unchanged (key %s), reusing %s", name, key, entry["artifact_dir"])
            return json.loads(metrics_path.read_text())
    entry.update(status="running", started=_now(), key=key, input_hash=input_hash,
                 ended=None, skipped_reason=None)
    run.save()
    ctx = StageContext(name=name, config=run.config, profile=run.profile, out_dir=out_dir, input=inp,
                       teacher=teacher, progress=progress)
    t0 = time.perf_counter()
    try:
        result: StageResult = module.run(ctx)
    except BaseException:
        entry.update(status="failed", ended=_now())
        run.save()
        raise
    wall = time.perf_counter() - t0
    metrics = _metrics(run, name, result, ctx, wall, progress)
    atomic_write_json(metrics_path, metrics)
    art = result.artifact
    entry.update(status="skipped" if result.skipped else "done", ended=_now(), wall_time_s=wall,
                 output_hash=art.content_hash(), artifact_dir=str(art.root.relative_to(run.root)),
                 skipped_reason=result.skipped)
    run.save()
    return metrics


def _metrics(run: Run, name: str, result: StageResult, ctx: StageContext, wall: float,
             progress: Progress) -> dict[str, Any]:
    art = result.artifact
    base: dict[str, Any] = {"stage": name, "status": "skipped" if result.skipped else "done",
                            "skipped_reason": result.skipped, "wall_time_s": wall,
                            "artifact": {"kind": art.kind.value, "dtype": art.dtype.value, "quantized": art.quantized,
                                         "dir": str(art.root.relative_to(run.root)), "files": art.files}}
    if result.skipped:
        return {**base, "records": result.records}
    from edgepipe.measure import measure_artifact

    counts = _counts(run, name, art, ctx)
    figures = measure_artifact(art, ctx.data, run.config.measure, run.profile, counts,
                               eval_batch_size=run.config.data.eval_batch_size,
                               progress=lambda t, i, n, v: progress(f"{name}: {t}", i, n, v))
    return {**base, **figures, "counts": counts, "records": result.records}


def _counts(run: Run, name: str, art: Artifact, ctx: StageContext) -> dict[str, Any]:
    """MACs/params/activations of the torch model behind ``art``: counted for a torch artifact, else
    taken from the nearest earlier stage that counted them (export and compile don't change them)."""
    from edgepipe.measure import model_counts
    from edgepipe.models import load_torch_artifact
    from edgepipe.types import ArtifactKind

    if art.kind is ArtifactKind.TORCH:
        return model_counts(load_torch_artifact(art), ctx.data.input_shape)
    for prev in reversed(STAGE_ORDER[: STAGE_ORDER.index(name)]):
        path = run.root / prev / "metrics.json"
        counts = json.loads(path.read_text()).get("counts") if path.exists() else None
        if counts:
            return counts
    raise EdgepipeError(f"{name}: no earlier torch stage in {run.root} to count MACs/params from; rerun the pipeline")


def run_pipeline(run: Run, stages: list[str] | None = None, force_from: str | None = None,
                 progress: Progress | None = None, on_stage: Callable[[str, dict], None] | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (default: all) in order; ``force_from`` reruns that stage and every later one."""
    stages = stages or list(STAGE_ORDER)
    for s in stages:
        stage_module(s)
    if force_from is not None:
        stage_module(force_from)
    results = {}
    for name in STAGE_ORDER:
        if name not in stages:
            continue
        force = force_from is not None and STAGE_ORDER.index(name) >= STAGE_ORDER.index(force_from)
        results[name] = run_stage(run, name, force=force, progress=progress)
        if on_stage:
            on_stage(name, results[name])
    return results
