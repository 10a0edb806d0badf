"""What a command proves about a run before it writes anything there: the trust its files need
(``check_run_trusted``), its data, models and fields (``preflight``), and what a build for another target shares
with its parent (``shareable_stages``, ``target_run``). Here and not in edgepipe.engine.run because it computes
stage keys (edgepipe.engine.pipeline.stage_key), and the pipeline itself imports edgepipe.engine.run.
"""
from __future__ import annotations

import os
from typing import Any

from edgepipe.config import PipelineConfig
from edgepipe.engine.artifacts import Artifact
from edgepipe.engine.pipeline import stage_key
from edgepipe.engine.run import Run
from edgepipe.engine.stage import load_stage
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile, get_profile


def check_run_trusted(run: Run) -> None:
    """Refuse, before anything is built or written, a factory or trust_pickle that a file in ``run``'s folder names
    and this command's own config does not (edgepipe.models.trust.check_trusted): the folder's config.yaml when the run
    was opened without --config, and the model.json of every torch artifact the command would load. Opened without
    --config, that is every recorded one; with --config, those of the stages it would reuse (recorded key equal to
    the key under the new config): a stage the new config changes is redone, so its old model.json is never loaded."""
    from edgepipe.models.loading import check_artifact_trusted
    from edgepipe.models.trust import check_trusted

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
    teacher = _Recorded((run.find("teacher") or {}).get("output_hash"))
    return stage_key(run, entry["name"], entry.get("input_hash"), teacher) == entry.get("key")


def check_device(setting: str) -> None:
    """The ``device`` this process would train on exists here (under torchrun: one GPU per local process), or one
    clear line (edgepipe.device.resolve)."""
    from edgepipe.device import resolve
    from edgepipe.training import distributed

    launch = distributed.launch()
    if launch is None:
        resolve(setting)
    else:
        resolve(setting, local_rank=launch.local_rank, local_world=launch.local_world_size)


def preflight(run: Run) -> None:
    """Prove what a command on ``run`` needs before anything in its folder changes: the profile's dtypes against
    its backend, the data (every image decoded, so a damaged file fails here and not mid-run), and the models a
    stage will build (teacher unless its stage is recorded with this very key, student), checked against the
    data's image shape and class count."""
    from edgepipe.backends import get_backend
    from edgepipe.models.loading import build_from_spec, check_fits
    from edgepipe.tasks import task_data, task_of

    profile, config = run.profile, run.config
    check_run_trusted(run)
    check_device(config.device)
    allowed = get_backend(profile.backend).DTYPES
    bad = [d.value for d in profile.dtypes if d not in allowed]
    if bad:
        raise EdgepipeError(f"profile {profile.name}: dtypes lists {', '.join(bad)}, which backend "
                            f"{profile.backend.value} cannot compile (it compiles "
                            f"{', '.join(d.value for d in allowed)});"
                            " remove them from dtypes or choose another backend")
    from edgepipe.engine.checks import check_fields
    from edgepipe.engine.sizes import check_models

    check_models(run)  # sizes that cannot fit in memory, before any model is built (the data's in edgepipe.data)
    check_fields(run)  # what a stage would refuse mid-run: export.opset, compile.dtype, the provider, layer names
    task = task_of(config)  # the config named a registered task (checked when it was read)
    data = task_data(task, config)
    meta = {"input_shape": list(data.input_shape), "num_classes": data.num_classes, "task": task.name}
    run.manifest["data"] = data.notes  # written with the manifest's next save, never by a command that fails
    entry = run.find("teacher") or {}
    if "teacher" in run.order and not (entry.get("status") == "done" and
                                       entry.get("key") == stage_key(run, "teacher", None, None)):
        check_fits(build_from_spec(config.teacher.model, data.num_classes), "teacher.model", task, meta)
    if "distill" in run.order and config.distill.enabled:
        check_fits(build_from_spec(config.distill.student, data.num_classes), "distill.student", task, meta)


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
        entry = parent.find(name) or {}
        if entry.get("status") not in ("done", "skipped") or not entry.get("artifact_dir"):
            break
        module = load_stage(name)
        teacher = None
        if module.USES_TEACHER and "teacher" in shared:
            teacher = _Recorded((parent.find("teacher") or {}).get("output_hash"))
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
        entry = parent.find(name) or {}
        view.entry(name).update({k: v for k, v in entry.items() if k != "name"},
                                artifact_dir=os.path.relpath(parent.root / entry["artifact_dir"], root),
                                shared_from=os.path.relpath(parent.root, root))
    return view, shared
