"""The contract between the pipeline engine and a stage, and the stage order.

A stage owns one transformation: it takes the previous stage's artifact, the hardware profile and an
output folder, and returns a new artifact plus its own records (loss history, pruning plan, export
checks). It never measures accuracy/latency itself and never writes metrics.json or the manifest:
the engine (``edgepipe.engine.pipeline``) does that, the same way for every stage.

A stage is one module ``stages/<name>.py`` that declares what the engine needs to cache it (see
``Stage``): the config sections that decide its output, whether it trains against the teacher, and
what of the target shapes its output. ``load_stage`` imports a stage and checks it against the
protocol, so a stage that forgets a declaration fails at import with one line, not mid-run. Adding a
stage is that one file plus its name in ``STAGE_ORDER`` (or in ``EXTRA_STAGES`` for a stage that only
derived runs use, like the baselines' NNCF post-training quantization).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from edgepipe.engine.artifacts import Artifact
from edgepipe.engine.measurement import Measurement
from edgepipe.config import PipelineConfig
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.types import ArtifactKind

if TYPE_CHECKING:
    from edgepipe.device import Device
    from edgepipe.tasks.base import Task
    from edgepipe.data.batches import Batches

STAGE_ORDER = ("teacher", "distill", "prune", "qat", "export", "compile")
"""The pipeline, in order: what ``edgepipe run`` executes."""
EXTRA_STAGES = ("finetune", "ptq", "train_timing")
"""Stages outside the pipeline that derived runs (edgepipe.engine.baselines) put in their own order."""


@dataclass
class StageContext:
    """Everything a stage may use."""

    name: str
    config: PipelineConfig
    profile: HardwareProfile
    out_dir: Path
    """The stage folder; write the artifact's files here (atomically, see edgepipe.io)."""
    input: Artifact | None
    """The artifact of the nearest earlier stage that produced one (None for the teacher)."""
    teacher: Artifact | None = None
    """The teacher stage's artifact, for stages that train against the teacher."""
    progress: Callable[[str, int, int, dict[str, float]], None] = lambda *a: None
    """progress(task, done, total, values): epochs, batches, iterations. The CLI renders it."""
    extra: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    """Where reusable intermediate results live (the teacher's logits): the top run's ``cache/``, shared by its
    derived runs; safe to delete."""
    measure: Measurement | None = None
    """The engine's measurement service (edgepipe.engine.measurement): a stage that decides by a latency asks it,
    never edgepipe.measure. Left out, it is bound to ``profile`` and ``config.measure``."""

    def __post_init__(self) -> None:
        if self.measure is None:
            self.measure = Measurement(self.profile, self.config.measure)

    @cached_property
    def task(self) -> Task:
        """The config's task (edgepipe.tasks): the loss, metric, outputs and checks of this kind of model."""
        from edgepipe.tasks import task_of

        return task_of(self.config)

    @cached_property
    def device(self) -> Device:
        """Where this stage runs PyTorch (the config's ``device``, resolved on this machine; under torchrun the GPU of
        this process's LOCAL_RANK): models, batches and the teacher go there (edgepipe.device)."""
        from edgepipe.device import resolve
        from edgepipe.training import distributed

        launch = distributed.launch()
        if launch is None:
            return resolve(self.config.device)
        return resolve(self.config.device, local_rank=launch.local_rank, local_world=launch.local_world_size)

    @cached_property
    def data(self) -> Batches:
        from edgepipe.tasks import task_data

        return task_data(self.task, self.config)

    def model_meta(self) -> dict[str, Any]:
        """What the task's I/O is derived from (``Task.inputs``/``outputs``): the data's input shape and classes."""
        return {"input_shape": list(self.data.input_shape), "num_classes": self.data.num_classes, **self.task_meta()}

    def task_meta(self) -> dict[str, Any]:
        """What a stage records in an artifact's meta about its task (``edgepipe.tasks.task_of_artifact`` reads it):
        nothing for classification, the task every artifact made before tasks existed was made for (so those
        artifacts, and the ones made now, read the same), ``{"task": name}`` for any other."""
        from edgepipe.tasks import DEFAULT

        return {} if self.task.name == DEFAULT else {"task": self.task.name}

    def soft_targets(self, teacher: Any) -> Any:
        """The teacher's logits as configured in ``soft_targets`` (edgepipe.training.distillation.SoftTargets)."""
        from edgepipe.training.distillation import soft_targets_for

        key = self.teacher.content_hash() if self.teacher is not None else ""
        return soft_targets_for(teacher, self.config.soft_targets, key, self.data.input_shape, self.cache_dir,
                                device=self.device)

    @property
    def checkpoint_dir(self) -> Path:
        """Per-epoch checkpoints live here, so an interrupted stage resumes mid-training."""
        return self.out_dir / "checkpoints"


@dataclass
class StageResult:
    artifact: Artifact
    records: dict[str, Any] = field(default_factory=dict)
    """Stage-specific records saved under metrics.json's "records" (history, plan, checks)."""
    skipped: str | None = None
    """Why the stage did nothing and passed its input through (e.g. the target has no int8)."""


class Stage(Protocol):
    """What every ``stages/<name>.py`` module declares (checked by ``load_stage``)."""

    NAME: str
    """The stage's name, equal to its module name."""
    INPUT_KINDS: tuple[ArtifactKind, ...]
    """Artifact kinds this stage accepts; anything else is refused before it runs (() for a first stage)."""
    SECTIONS: tuple[str, ...]
    """The config sections that decide its output (with its inputs' content): part of its cache key."""
    USES_TEACHER: bool
    """It trains against the teacher stage's artifact: the engine passes it in and keys on its hash."""
    MEASURED: bool
    """The engine measures its artifact (accuracy, latency, size); False for a stage whose output is its records."""
    DISTRIBUTED: bool
    """Under torchrun every rank runs it (a training stage: DDP over the ranks' shards, edgepipe.training.distributed);
    False: rank 0 runs it alone while the other ranks wait (export, compile, graph work)."""
    target_key: Callable[[HardwareProfile, PipelineConfig], Any] | None
    """What of the target (and this host) shapes its output, as JSON-able data for the key; None: nothing."""

    def run(self, ctx: StageContext) -> StageResult: ...


_DECLARATIONS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "NAME": (str, "its name, equal to the module name"),
    "INPUT_KINDS": (tuple, "a tuple of edgepipe.types.ArtifactKind it accepts"),
    "SECTIONS": (tuple, "a tuple of the config sections that decide its output"),
    "USES_TEACHER": (bool, "True if it trains against the teacher"),
    "MEASURED": (bool, "True if the engine measures its artifact"),
    "DISTRIBUTED": (bool, "True if every torchrun rank runs it (training), False if rank 0 alone"),
}
_LOADED: dict[str, ModuleType] = {}


def known_stages() -> tuple[str, ...]:
    return (*STAGE_ORDER, *EXTRA_STAGES)


def load_stage(name: str) -> ModuleType:
    """Import ``stages.<name>`` and check it against the ``Stage`` protocol (once per process)."""
    if name in _LOADED:
        return _LOADED[name]
    if name not in known_stages():
        raise EdgepipeError(f"unknown stage '{name}' (stages: {', '.join(known_stages())})")
    module = importlib.import_module(f"stages.{name}")
    check_stage(module)
    _LOADED[name] = module
    return module


def check_stage(module: ModuleType) -> None:
    """Raise EdgepipeError naming the module and the first declaration it lacks or gets wrong."""
    where = getattr(module, "__file__", None) or module.__name__
    sections = set(PipelineConfig.model_fields)
    for attr, (kind, what) in _DECLARATIONS.items():
        if not isinstance(getattr(module, attr, None), kind):
            raise EdgepipeError(f"{where}: a stage must declare {attr} ({what})")
    if module.NAME != module.__name__.rsplit(".", 1)[-1]:
        raise EdgepipeError(f"{where}: NAME is '{module.NAME}', not its module name")
    if not all(isinstance(k, ArtifactKind) for k in module.INPUT_KINDS):
        raise EdgepipeError(f"{where}: INPUT_KINDS must hold edgepipe.types.ArtifactKind members")
    unknown = [s for s in module.SECTIONS if s not in sections]
    if unknown:
        raise EdgepipeError(f"{where}: SECTIONS names {', '.join(unknown)}, not config sections "
                            f"({', '.join(sorted(sections))})")
    if not hasattr(module, "target_key") or not (module.target_key is None or callable(module.target_key)):
        raise EdgepipeError(f"{where}: a stage must declare target_key (None, or a function (profile, config) "
                            "returning what of the target decides its output)")
    if not callable(getattr(module, "run", None)):
        raise EdgepipeError(f"{where}: a stage must define run(ctx) -> StageResult")
