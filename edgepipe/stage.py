"""The contract between the pipeline engine and a stage.

A stage owns one transformation: it takes the previous stage's artifact, the hardware profile and an
output folder, and returns a new artifact plus its own records (loss history, pruning plan, export
checks). It never measures accuracy/latency itself and never writes metrics.json or the manifest:
the engine (``edgepipe.pipeline``) does that, the same way for every stage.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgepipe.artifacts import Artifact
from edgepipe.config import PipelineConfig
from edgepipe.profiles import HardwareProfile
from edgepipe.types import ArtifactKind

if TYPE_CHECKING:
    from edgepipe.data import DataBundle

STAGE_ORDER = ("teacher", "distill", "prune", "qat", "export", "compile")


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

    @cached_property
    def data(self) -> DataBundle:
        from edgepipe.data import load_data

        return load_data(self.config.data, seed=self.config.seed)

    def soft_targets(self, teacher: Any) -> Any:
        """The teacher's logits as configured in ``soft_targets`` (edgepipe.distillation.SoftTargets)."""
        from edgepipe.distillation import soft_targets_for

        key = self.teacher.content_hash() if self.teacher is not None else ""
        return soft_targets_for(teacher, self.config.soft_targets, key, self.data.input_shape)

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
    NAME: str
    INPUT_KINDS: tuple[ArtifactKind, ...]
    """Artifact kinds this stage accepts; anything else is refused before it runs."""

    def run(self, ctx: StageContext) -> StageResult: ...
