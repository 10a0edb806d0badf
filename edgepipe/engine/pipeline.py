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

A run folder gets ``config.yaml`` (resolved), ``profile.yaml`` and ``manifest.json`` (order, status,
times, hashes, library versions, git revision, host); each stage folder gets ``metrics.json``. Every
file is written atomically; a stage interrupted mid-training resumes from its last epoch.

A run may be derived from another (``Run.derive``): another target, another order of stages (the
baselines' ``teacher -> export -> ptq``), other config values, reusing the parent's finished stages
by reference. Baselines and per-target builds are such runs, executed and cached by this same engine.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from edgepipe.training import distributed

from edgepipe.engine import signals
from edgepipe.engine import stage as stages
from edgepipe.engine.artifacts import Artifact
from edgepipe.config import PipelineConfig, load_config
from edgepipe.errors import EdgepipeError
from edgepipe.host import git_revision, host_cpu, host_isa, library_versions
from edgepipe.io import atomic_write_json, atomic_write_text, is_main_process
from edgepipe.profiles import HardwareProfile, get_profile, load_profile_file
from edgepipe.engine.stage import StageContext, StageResult, load_stage

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, dict[str, float]], None]
MEASURE_VERSION = 3  # 2: per-class top-1; 3: the gain check
"""Bump when the engine measures differently, so stored figures are re-measured."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict[str, Any]:
    """A run's manifest.json, checked for the shape the engine relies on; anything else is one clear error."""
    recover = (f"restore it from a copy, or move {path.parent} aside and start the run again (a new run folder "
               "retrains every stage)")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError (random bytes)
        raise EdgepipeError(f"{path}: damaged manifest, not readable JSON ({type(e).__name__}); {recover}") from None
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("target"), str) or not isinstance(stages, list)
            or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in stages)):
        raise EdgepipeError(f"{path}: damaged manifest (expected an object with 'target' and a list of 'stages'); "
                            f"{recover}")
    return manifest


def check_run_trusted(run: Run) -> None:
    """Refuse, before anything is built or written, a factory or trust_pickle that a file in ``run``'s folder names
    and this command's own config does not (edgepipe.models.check_trusted): the folder's config.yaml when the run was
    opened without --config, and the model.json of every torch artifact the command would load. Opened without
    --config, that is every recorded one; with --config, those of the stages it would reuse (recorded key equal to
    the key under the new config): a stage the new config changes is redone, so its old model.json is never loaded."""
    from edgepipe.models import check_artifact_trusted, check_trusted

    specs = (run.config.teacher.model, run.config.distill.student)
    for spec in specs:
        check_trusted(spec)
    from_folder = any(spec._origin is not None for spec in specs)
    for entry in run.manifest["stages"]:
        if entry.get("status") not in ("done", "skipped") or not isinstance(entry.get("artifact_dir"), str):
            continue
        if not from_folder and not _reused(run, entry):
            continue
        try:
            art = Artifact.load(run.root / entry["artifact_dir"])
        except EdgepipeError:
            continue  # damaged: the engine redoes the stage
        check_artifact_trusted(art)


def _reused(run: Run, entry: dict[str, Any]) -> bool:
    """Whether the recorded stage ``entry`` keeps its key under ``run``'s config (its recorded input and teacher)."""
    try:
        load_stage(entry["name"])
    except EdgepipeError:
        return False
    teacher = _Recorded((run._find("teacher") or {}).get("output_hash"))
    return stage_key(run, entry["name"], entry.get("input_hash"), teacher) == entry.get("key")


def preflight(run: Run) -> None:
    """Prove what a command on ``run`` needs before anything in its folder changes: the profile's dtypes against
    its backend, the data (every image decoded, so a damaged file fails here and not mid-run), and the models a
    stage will build (teacher unless its stage is recorded with this very key, student), checked against the
    data's image shape and class count."""
    from edgepipe.backends import get_backend
    from edgepipe.data import run_data
    from edgepipe.models import build_from_spec, check_fits

    profile, config = run.profile, run.config
    check_run_trusted(run)
    allowed = get_backend(profile.backend).DTYPES
    bad = [d.value for d in profile.dtypes if d not in allowed]
    if bad:
        raise EdgepipeError(f"profile {profile.name}: dtypes lists {', '.join(bad)}, which backend "
                            f"{profile.backend.value} cannot compile (it compiles {', '.join(d.value for d in allowed)});"
                            " remove them from dtypes or choose another backend")
    from edgepipe.engine.checks import check_fields
    from edgepipe.engine.sizes import check_models

    check_models(run)  # sizes that cannot fit in memory, before any model is built (the data's in edgepipe.data)
    check_fields(run)  # what a stage would refuse mid-run: export.opset, compile.dtype, the provider, layer names
    data = run_data(config)
    run.manifest["data"] = data.notes  # written with the manifest's next save, never by a command that fails
    entry = run._find("teacher") or {}
    if "teacher" in run.order and not (entry.get("status") == "done" and
                                       entry.get("key") == stage_key(run, "teacher", None, None)):
        check_fits(build_from_spec(config.teacher.model), "teacher.model", data.input_shape, data.num_classes)
    if "distill" in run.order and config.distill.enabled:
        check_fits(build_from_spec(config.distill.student), "distill.student", data.input_shape, data.num_classes)


@dataclass
class Run:
    """A run folder: resolved config, target profile, manifest, one folder per stage."""

    root: Path
    config: PipelineConfig
    profile: HardwareProfile
    manifest: dict[str, Any]
    cache_root: Path | None = None
    """The top run's cache folder, for a derived run (baselines, other targets); None: ``root / "cache"``."""

    @property
    def cache_dir(self) -> Path:
        return self.cache_root or self.root / "cache"

    @classmethod
    def create(cls, root: Path, config: PipelineConfig, target: str, order: tuple[str, ...] | None = None,
               measured: tuple[str, ...] | None = None, write: bool = True) -> Run:
        """Open ``root`` for ``config`` and ``target``; an existing run keeps its manifest (so caching works).

        ``order`` is the stages this run executes (default: the pipeline, ``STAGE_ORDER``); ``measured``
        the stages whose artifacts the engine measures (default: all that declare MEASURED). With
        ``write=False`` nothing is written yet: the caller proves the inputs (``preflight``) and then calls
        ``write_files``, so a command that fails its checks leaves an existing run as it was."""
        root = Path(root)
        profile = get_profile(target)
        for name in order or ():
            load_stage(name)
        manifest_path = root / "manifest.json"
        manifest = read_manifest(manifest_path) if manifest_path.exists() else None
        if manifest is None:
            manifest = {"run": root.name, "target": profile.name, "created": _now(), "stages": []}
        manifest["target"] = profile.name
        if order is not None:
            manifest["order"] = list(order)
        if measured is not None:
            manifest["measured"] = list(measured)
        run = cls(root, config, profile, manifest)
        from edgepipe.models import trust_config

        trust_config(config)  # a config given here is the caller's own: its factory may build (not one from Run.open)
        if write:
            run.write_files()
        return run

    def write_files(self) -> None:
        """Write the resolved config, the profile and the manifest (only once the command's inputs are proven)."""
        if is_main_process():
            atomic_write_text(self.root / "config.yaml", yaml.safe_dump(self.config.model_dump(mode="json"),
                                                                        sort_keys=False))
            atomic_write_text(self.root / "profile.yaml", yaml.safe_dump(self.profile.model_dump(mode="json"),
                                                                         sort_keys=False))
        self.save()

    @classmethod
    def open(cls, root: Path) -> Run:
        """Open an existing run folder (its resolved config and target)."""
        root = Path(root)
        cfg_path, manifest_path = root / "config.yaml", root / "manifest.json"
        if not manifest_path.exists() or not cfg_path.exists():
            raise EdgepipeError(f"{root}: not a run folder (no manifest.json/config.yaml); start it with "
                                f"`edgepipe run --config CONFIG --target TARGET --run {root}` or pass --config and --target")
        manifest = read_manifest(manifest_path)
        try:
            config = load_config(cfg_path)
        except EdgepipeError as e:
            raise EdgepipeError(f"{e}; this is the run's own copy of its config: restore it, or give the run a config "
                                f"again with --config FILE --target {manifest['target']} (unchanged stages are reused)"
                                ) from None
        for spec in (config.teacher.model, config.distill.student):  # data, not code: a factory or trust_pickle
            spec._origin = str(cfg_path)  # named here runs only if this command's own config names it too
        # The run's own copy of its profile: a target given as a YAML path may not exist any more.
        saved = root / "profile.yaml"
        try:
            profile = load_profile_file(saved, require_stem=False) if saved.exists() else get_profile(manifest["target"])
        except EdgepipeError as e:
            raise EdgepipeError(f"{e}; this is the run's own copy of its profile: restore it, or give the target again "
                                f"with --target {manifest['target']}") from None
        return cls(root, config, profile, manifest)

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("order") or stages.STAGE_ORDER)

    def derive(self, root: Path, shared: tuple[str, ...], *, target: str | None = None,
               config: PipelineConfig | None = None, order: tuple[str, ...] | None = None,
               measured: tuple[str, ...] | None = None) -> Run:
        """A run in ``root`` that reuses this run's finished ``shared`` stages and executes the rest itself.

        The child's manifest points at this run's artifacts (with their hashes, marked ``shared_from``)
        and gets a copy of their metrics.json, so its own stages key on them and count from them. The
        target, config and order default to this run's."""
        root = Path(root)
        child = Run.create(root, config or self.config, target or self.profile.name, order=order or self.order,
                           measured=measured)
        child.cache_root = self.cache_dir
        for name in shared:
            parent = self._find(name)
            if parent is None or parent.get("status") not in ("done", "skipped") or not parent.get("artifact_dir"):
                raise EdgepipeError(f"{self.root}: stage {name} has not run; run it before deriving {root}")
            entry = child.entry(name)
            entry.clear()
            entry.update({k: v for k, v in parent.items() if k != "shared_from"}, name=name,
                         artifact_dir=os.path.relpath(self.root / parent["artifact_dir"], root),
                         shared_from=os.path.relpath(self.root, root))
            metrics = self.root / name / "metrics.json"
            if metrics.exists() and is_main_process():  # counts for the stages after it
                atomic_write_text(root / name / "metrics.json", metrics.read_text())
        child.save()
        return child

    def for_target(self, target: str, shared: tuple[str, ...] = ("teacher", "distill", "prune")) -> Run:
        """This run for another target (``<run>/targets/<name>``), reusing the target-independent stages:
        e.g. a TensorRT-form QAT model, its export and engine beside the OpenVINO ones."""
        return self.derive(self.root / "targets" / get_profile(target).name, shared, target=target)

    def save(self) -> None:
        if is_main_process():
            self.manifest.update(git_revision=git_revision(), versions=library_versions(),
                                 host={"cpu": host_cpu(), "isa": list(host_isa())})
            atomic_write_json(self.root / "manifest.json", self.manifest)

    def _find(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.manifest["stages"] if e["name"] == name), None)

    def entry(self, name: str) -> dict[str, Any]:
        e = self._find(name)
        if e is None:
            e = {"name": name, "status": "pending"}
            self.manifest["stages"].append(e)
            rank = {s: i for i, s in enumerate(self.order)}
            self.manifest["stages"].sort(key=lambda x: rank.get(x["name"], len(rank)))
        return e

    def artifact_of(self, name: str) -> Artifact | None:
        e = self._find(name)
        if e is None or e.get("status") not in ("done", "skipped") or not e.get("artifact_dir"):
            return None
        return Artifact.load(self.root / e["artifact_dir"])

    def metrics_of(self, name: str) -> dict[str, Any]:
        """The stage's metrics.json ({} when it has none)."""
        path = self.root / name / "metrics.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_bytes())
        except ValueError:
            raise EdgepipeError(f"{path}: damaged (not readable JSON); `edgepipe run --run {self.root}` redoes the "
                                f"{name} stage") from None

    def own_stages(self) -> list[str]:
        """The stages this run executes itself (its order without the ones it shares from a parent)."""
        return [s for s in self.order if not (self._find(s) or {}).get("shared_from")]

    def input_of(self, name: str) -> tuple[str, Artifact] | None:
        """The artifact of the stage right before ``name`` (a skipped stage passes its input through)."""
        order = self.order
        if name not in order:
            raise EdgepipeError(f"stage {name} is not in the order of {self.root} ({', '.join(order)})")
        i = order.index(name)
        if i == 0:
            return None
        prev = order[i - 1]
        art = self.artifact_of(prev)
        if art is None:
            raise EdgepipeError(f"stage {name} needs the output of {prev}, which has not run in {self.root}; "
                                f"run `edgepipe {prev} --run {self.root}` first (or `edgepipe run`)")
        return prev, art

    def data_fingerprint(self) -> str:
        """edgepipe.data.data_fingerprint of this run's data, computed once per command."""
        if getattr(self, "_data_fingerprint", None) is None:
            from edgepipe.data import data_fingerprint

            self._data_fingerprint = data_fingerprint(self.config.data)
        return self._data_fingerprint

    def is_measured(self, name: str) -> bool:
        chosen = self.manifest.get("measured")
        return load_stage(name).MEASURED and (chosen is None or name in chosen)


def _keyed_config(config: PipelineConfig) -> dict[str, Any]:
    """The config as the keys see it: without data.workers, which changes no pixel and no batch order (every
    sample's augmentation is seeded by seed, epoch and index; tests/test_streaming.py checks 0 against 2)."""
    cfg = config.model_dump(mode="json")
    cfg["data"].pop("workers", None)
    return cfg


def stage_key(run: Run, name: str, input_hash: str | None, teacher: Artifact | None) -> str:
    """What decides the stage's output, as its module declares it (edgepipe.engine.stage.Stage)."""
    from edgepipe.types import ArtifactKind

    module = load_stage(name)
    cfg = _keyed_config(run.config)
    target = module.target_key(run.profile, run.config) if module.target_key else None
    key = {"stage": name, "config": {s: cfg[s] for s in module.SECTIONS}, "profile": target,
           "input": input_hash, "teacher": teacher.content_hash() if teacher and module.USES_TEACHER else None}
    if "data" in module.SECTIONS:  # the files themselves, not only the data settings
        key["data_files"] = run.data_fingerprint()
    if run.config.on_no_gain == "skip" and ArtifactKind.TORCH in module.INPUT_KINDS:
        # Whether the stage passes its own output or its input on depends on measurements on this target.
        key["on_no_gain"] = {"profile": run.profile.model_dump(mode="json"), "host": [host_cpu(), list(host_isa())],
                             "measure": cfg["measure"]}
    return _hash(key)


def metrics_key(run: Run, name: str, key: str) -> str:
    """What decides the stage's figures: its output (``key``), the measure settings, the data, the target
    (estimates, the gain check) and this host."""
    cfg = run.config
    measure = cfg.measure.model_dump(mode="json") if run.is_measured(name) else None
    return _hash({"stage_key": key, "measure": measure, "data": _keyed_config(cfg)["data"],
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
    together = distributed.collective_active()
    found = run.input_of(name)
    inp = found[1] if found else None
    if inp is not None and inp.kind not in module.INPUT_KINDS:
        raise EdgepipeError(f"stage {name} cannot take a {inp.kind.value} artifact (from {found[0]}); "
                            f"it takes {', '.join(k.value for k in module.INPUT_KINDS)}")
    teacher = run.artifact_of("teacher") if module.USES_TEACHER else None
    input_hash = inp.content_hash() if inp else None  # hashed once: it reads every byte of the model
    if found is not None:
        recorded = (run._find(found[0]) or {}).get("output_hash")
        if recorded and input_hash != recorded:
            raise EdgepipeError(f"{inp.root}: the {found[0]} stage's output changed or was damaged after it was "
                                f"recorded; run `edgepipe run --run {run.root}` (it redoes {found[0]} first) or "
                                f"`edgepipe {found[0]} --run {run.root}`")
    key = stage_key(run, name, input_hash, teacher)
    mkey = metrics_key(run, name, key)
    entry = run.entry(name)
    out_dir = run.root / name
    metrics_path = out_dir / "metrics.json"
    ctx = StageContext(name=name, config=run.config, profile=run.profile, out_dir=out_dir, input=inp,
                       teacher=teacher, progress=progress, cache_dir=run.cache_dir)
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
    entry.update(status="running", started=_now(), key=key, metrics_key=None, input_hash=input_hash,
                 ended=None, skipped_reason=None, launch=distributed.describe())
    signals.set_stage(name, run.root)
    try:  # from the first save to the last: a Ctrl-C anywhere in between is recorded (measuring included)
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
        if entry.get("status") in ("done", "skipped"):  # recorded already; only clearing its checkpoints was cut
            raise
        # SIGINT/SIGTERM (edgepipe.engine.signals raises a KeyboardInterrupt; native code may turn it into another error, e.g.
        # a C extension's import into "ImportError: initialization failed"): "interrupted", resumed like "failed".
        # Under torchrun the launcher's SIGTERM (distributed.Stopped) means another rank failed: "failed".
        stopped = isinstance(e, KeyboardInterrupt) or (signals.received() is not None
                                                       and not isinstance(e, distributed.Stopped))
        entry.update(status="interrupted" if stopped else "failed", ended=_now(),
                     error=f"interrupted by {signals.name()}" if stopped else f"{type(e).__name__}: {str(e)[:300]}")
        try:
            run.save()
        except OSError as save_error:  # e.g. the disk is still full: the error that stopped the stage matters more
            log.warning("%s: could not record the failure in %s (%s)", name, run.root / "manifest.json",
                        save_error.strerror)
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
    run.entry(name).update(status="skipped" if result.skipped else "done", ended=_now(), wall_time_s=wall,
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
                               progress=lambda t, i, n, v: progress(f"{name}: {t}", i, n, v))
    return {**base, **figures, "counts": counts, "gain": _gain(run, name, ctx, art, figures), "records": result.records}


def _gain(run: Run, name: str, ctx: StageContext, art: Artifact, figures: dict[str, Any]) -> dict[str, Any] | None:
    """A model-transforming stage (torch in, torch out) against its input on the target (edgepipe.measure.figures.stage_gain)."""
    from edgepipe.measure.figures import stage_gain
    from edgepipe.types import ArtifactKind

    found = run.input_of(name)
    if found is None or found[1].kind is not ArtifactKind.TORCH or art.kind is not ArtifactKind.TORCH:
        return None
    order = run.order
    i = order.index(found[0])
    while i > 0 and run.metrics_of(order[i]).get("status") == "skipped":  # a skipped stage passed this model on
        i -= 1
    before = (run.metrics_of(order[i]).get("accuracy") or {}).get("top1")
    if before is None:  # the input stage was not measured (e.g. a derived run measuring only its last stage)
        return None
    gain = stage_gain(found[1], art, before, figures["accuracy"]["top1"], run.profile, run.config.measure,
                      tuple(ctx.data.input_shape), order[i])
    (log.info if gain["earned"] else log.warning)("%s: %s", name, gain["verdict"])
    return gain


def _counts(run: Run, name: str, art: Artifact, ctx: StageContext) -> dict[str, Any]:
    """MACs/params/activations of the torch model behind ``art``: counted for a torch artifact, else
    taken from the nearest earlier stage that counted them (export and compile don't change them)."""
    from edgepipe.measure.figures import model_counts
    from edgepipe.models import load_torch_artifact
    from edgepipe.types import ArtifactKind

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


class _Recorded:
    """An artifact's recorded content hash where ``stage_key`` wants an Artifact (nothing is read from disk)."""

    def __init__(self, digest: str | None) -> None:
        self.digest = digest

    def content_hash(self) -> str | None:
        return self.digest


def shareable_stages(parent: Run, config: PipelineConfig, profile: HardwareProfile) -> tuple[str, ...]:
    """The leading finished stages of ``parent`` whose key would be the same for ``config`` on ``profile``: what a
    build for that target can share instead of redoing. Computed from the keys (each stage's sections, target_key,
    input and teacher hashes; with ``on_no_gain: skip`` the key holds the profile), not from a list of names."""
    view = Run(parent.root, config, profile, parent.manifest)
    shared: list[str] = []
    previous: str | None = None
    for name in parent.order:
        entry = parent._find(name) or {}
        if entry.get("status") not in ("done", "skipped") or not entry.get("artifact_dir"):
            break
        module = load_stage(name)
        teacher = None
        if module.USES_TEACHER and "teacher" in shared:
            teacher = _Recorded((parent._find("teacher") or {}).get("output_hash"))
        if stage_key(view, name, previous, teacher) != entry.get("key"):
            break
        shared.append(name)
        previous = entry.get("output_hash")
    return tuple(shared)


def target_run(parent: Run, config: PipelineConfig, target: str, config_file: str | None = None,
               force: str | None = None) -> tuple[Run, tuple[str, ...]]:
    """``parent`` built for another ``target``: a run in ``<parent>/targets/<profile name>`` (not written yet; prove
    it with ``preflight``, then ``write_target_run``) and the stages it shares with ``parent``. Nothing of
    ``parent`` changes, so a new config (``config_file``, given with the command) that would change a shared stage
    is refused, as is forcing one."""
    profile = get_profile(target)
    shared = shareable_stages(parent, config, profile)
    where = f"{parent.root} (target {parent.profile.name})"
    if config_file:
        before = shareable_stages(parent, parent.config, profile)
        if len(shared) < len(before):
            stage = before[len(shared)]
            raise EdgepipeError(f"--config {config_file}: changes the {stage} stage, which the {profile.name} build "
                                f"would share with {where}; run the new config on that run's own target first "
                                f"(`edgepipe run --config {config_file} --target {parent.profile.name} --run "
                                f"{parent.root}`), or give a new --run")
    if force in shared:
        raise EdgepipeError(f"--force {force}: the {force} stage does not depend on the target, so the {profile.name} "
                            f"build shares it with {where}; force it there (`edgepipe run --run {parent.root} --force "
                            f"{force}`), then give --target {target} again")
    root = parent.root / "targets" / profile.name
    view = Run.create(root, config, target, order=parent.order, write=False)
    for name in shared:  # as Run.derive will record them (preflight reads their entries and artifacts)
        entry = parent._find(name) or {}
        view.entry(name).update({k: v for k, v in entry.items() if k != "name"},
                                artifact_dir=os.path.relpath(parent.root / entry["artifact_dir"], root),
                                shared_from=os.path.relpath(parent.root, root))
    return view, shared


def write_target_run(parent: Run, view: Run, shared: tuple[str, ...], target: str) -> Run:
    """Write the proven ``target_run``: its own config, profile and manifest, the shared stages by reference."""
    child = parent.derive(view.root, shared, target=target, config=view.config)
    for entry in child.manifest["stages"]:
        if entry.get("shared_from") and entry["name"] not in shared:  # shared before, its own stage now
            name = entry["name"]
            entry.clear()
            entry.update(name=name, status="pending")
    if "data" in view.manifest:
        child.manifest["data"] = view.manifest["data"]
    child.save()
    return child
