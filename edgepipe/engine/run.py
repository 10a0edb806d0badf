"""A run folder: ``Run`` (its resolved config, target profile and manifest, one folder per stage) and how it is read,
written and derived. The engine that executes stages into it is edgepipe.engine.pipeline; what a command proves
before it writes one is edgepipe.engine.prepare.

A run folder gets ``config.yaml`` (resolved), ``profile.yaml`` and ``manifest.json`` (order, status, times, hashes,
library versions, git revision, host), each written atomically.

A run may be derived from another (``Run.derive``): another target, another order of stages (the
baselines' ``teacher -> export -> ptq``), other config values, reusing the parent's finished stages
by reference. Baselines and per-target builds are such runs, executed and cached by the same engine.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from edgepipe.config import PipelineConfig, load_config
from edgepipe.engine import signals
from edgepipe.engine.artifacts import Artifact
from edgepipe.engine import stage as stages
from edgepipe.engine.stage import load_stage
from edgepipe.errors import EdgepipeError
from edgepipe.host import git_revision, host_cpu, host_isa, library_versions
from edgepipe.io import atomic_write_json, atomic_write_text, is_main_process
from edgepipe.profiles import HardwareProfile, get_profile, load_profile_file


def now() -> str:
    """The current UTC time as the manifest records it (ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        from edgepipe.tasks import task_of

        config = config.model_copy(update={"task": task_of(config).name})  # resolved, as config.yaml records it
        manifest_path = root / "manifest.json"
        manifest = read_manifest(manifest_path) if manifest_path.exists() else None
        if manifest is None:
            manifest = {"run": root.name, "target": profile.name, "created": now(), "stages": []}
        manifest["target"] = profile.name
        if order is not None:
            manifest["order"] = list(order)
        if measured is not None:
            manifest["measured"] = list(measured)
        manifest["task"] = config.task
        run = cls(root, config, profile, manifest)
        from edgepipe.models.trust import trust_config

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
                                f"`edgepipe run --config CONFIG --target TARGET --run {root}` or pass --config and "
                                "--target")
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
            profile = (load_profile_file(saved, require_stem=False) if saved.exists()
                       else get_profile(manifest["target"]))
        except EdgepipeError as e:
            raise EdgepipeError(f"{e}; this is the run's own copy of its profile: restore it, or give the target again "
                                f"with --target {manifest['target']}") from None
        return cls(root, config, profile, manifest)

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("order") or stages.STAGE_ORDER)

    def derive(self, root: Path, shared: tuple[str, ...], *, target: str | None = None,
               config: PipelineConfig | None = None, order: tuple[str, ...] | None = None,
               measured: tuple[str, ...] | None = None, as_teacher: str | None = None) -> Run:
        """A run in ``root`` that reuses this run's finished ``shared`` stages and executes the rest itself.

        The child's manifest points at this run's artifacts (with their hashes, marked ``shared_from``)
        and gets a copy of their metrics.json, so its own stages key on them and count from them. The
        target, config and order default to this run's. With ``as_teacher`` the child's ``teacher`` stage is this
        run's stage of that name (a teacher-assistant chain: the assistant this run distilled teaches the next)."""
        root = Path(root)
        child = Run.create(root, config or self.config, target or self.profile.name, order=order or self.order,
                           measured=measured)
        child.cache_root = self.cache_dir
        for name in shared:
            source = as_teacher if name == "teacher" and as_teacher else name
            parent = self.find(source)
            if parent is None or parent.get("status") not in ("done", "skipped") or not parent.get("artifact_dir"):
                raise EdgepipeError(f"{self.root}: stage {source} has not run; run it before deriving {root}")
            entry = child.entry(name)
            entry.clear()
            entry.update({k: v for k, v in parent.items() if k != "shared_from"}, name=name,
                         artifact_dir=os.path.relpath(self.root / parent["artifact_dir"], root),
                         shared_from=os.path.relpath(self.root, root))
            metrics = self.root / source / "metrics.json"
            if metrics.exists() and is_main_process():  # counts for the stages after it
                atomic_write_text(root / name / "metrics.json", metrics.read_text())
        child.save()
        return child

    def for_target(self, target: str, shared: tuple[str, ...] = ("teacher", "distill", "prune")) -> Run:
        """This run for another target (``<run>/targets/<name>``), reusing the target-independent stages:
        e.g. a TensorRT-form QAT model, its export and engine beside the OpenVINO ones."""
        return self.derive(self.root / "targets" / get_profile(target).name, shared, target=target)

    def save(self) -> None:
        """Write the manifest as it is in memory. A Ctrl-C or SIGTERM during the save takes effect once it is
        written: the signal could otherwise land in the metadata lookups before the write (``git`` is a
        subprocess) and stop a stage already marked done in memory with "running" left on disk."""
        if is_main_process():
            with signals.deferred():
                self.manifest.update(git_revision=git_revision(), versions=library_versions(),
                                     host={"cpu": host_cpu(), "isa": list(host_isa())})
                atomic_write_json(self.root / "manifest.json", self.manifest)

    def find(self, name: str) -> dict[str, Any] | None:
        """The manifest entry of stage ``name`` (None: not recorded)."""
        return next((e for e in self.manifest["stages"] if e["name"] == name), None)

    def entry(self, name: str) -> dict[str, Any]:
        e = self.find(name)
        if e is None:
            e = {"name": name, "status": "pending"}
            self.manifest["stages"].append(e)
            rank = {s: i for i, s in enumerate(self.order)}
            self.manifest["stages"].sort(key=lambda x: rank.get(x["name"], len(rank)))
        return e

    def artifact_of(self, name: str) -> Artifact | None:
        e = self.find(name)
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
        return [s for s in self.order if not (self.find(s) or {}).get("shared_from")]

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
            from edgepipe.data.loading import data_fingerprint

            self._data_fingerprint = data_fingerprint(self.config.data)
        return self._data_fingerprint

    def is_measured(self, name: str) -> bool:
        chosen = self.manifest.get("measured")
        return load_stage(name).MEASURED and (chosen is None or name in chosen)


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
