"""The baselines a user would otherwise pick, as runs the engine executes and caches like any other.

Each baseline is a run derived from the pipeline's run (``Run.derive``, in ``<run>/baselines/<row>``):
the stages it shares by reference, its own order of stages and the config values it changes. The engine
keys, caches, resumes and measures them exactly as it does the pipeline's stages, so a second
``compare`` reuses every row and an interrupted one resumes; nothing here trains, converts or times a
model itself.

- teacher-fp32 / teacher-bf16: teacher -> export -> compile with ``compile.dtype`` fp32 / bf16 (OpenVINO
  precision hint); the row shows the precision the CPU plugin actually ran.
- teacher-int8: teacher -> export -> ptq (NNCF ``nncf.quantize``, OpenVINO INT8).
- scratch: the distill stage with ``init: random, alpha: 0`` (labels only, same optimizer, epochs, seed):
  what a user trains alone.
- scratch-same-init: the distill stage with ``alpha: 0`` only: the distilled student's initialisation,
  labels only; ``distilled - scratch-same-init`` is the KD gain and nothing else.
- distilled / pruned: the pipeline's float models -> export -> compile fp32.
- ptq: the pruned student -> finetune (the qat stage's epochs, loss and batches, without fake quantization)
  -> export -> ptq: ``final - ptq`` is the QAT gain at equal training epochs.
- train-timing: teacher -> train_timing (edgepipe's training loop next to a plain PyTorch loop).

Only a baseline's last stage is measured (its row); its compile fidelity limit is lifted, since a
baseline's accuracy is what the row reports, not a gate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgepipe.config import PipelineConfig, validate_config
from edgepipe.engine.pipeline import Progress, run_pipeline
from edgepipe.engine.run import Run
from edgepipe.types import DType

FLOAT_TO_IR = ("export", "compile")


@dataclass(frozen=True)
class Baseline:
    row: str
    parent: str
    """"pipeline" or the row of an earlier baseline whose stages it shares."""
    shared: tuple[str, ...]
    own: tuple[str, ...]
    """The stages it runs itself, after the shared ones."""
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys and their values, e.g. {"compile.dtype": "fp32"}."""
    requires_dtype: DType | None = None
    """Built only when the target profile lists this dtype."""

    @property
    def order(self) -> tuple[str, ...]:
        return (*self.shared, *self.own)


BASELINES = (
    Baseline("teacher-fp32", "pipeline", ("teacher",), FLOAT_TO_IR, "teacher, OpenVINO fp32 precision hint",
             {"compile.dtype": "fp32"}),
    Baseline("teacher-bf16", "teacher-fp32", ("teacher", "export"), ("compile",),
             "teacher, OpenVINO bf16 precision hint", {"compile.dtype": "bf16"}, requires_dtype=DType.BF16),
    Baseline("teacher-int8", "teacher-fp32", ("teacher", "export"), ("ptq",), "teacher, {ptq}, OpenVINO"),
    Baseline("scratch", "pipeline", ("teacher",), ("distill", *FLOAT_TO_IR),
             "same student ({student}, random init), labels only (cross-entropy), {epochs}, same optimizer, "
             "OpenVINO fp32", {"distill.init": "random", "distill.alpha": 0.0, "distill.beta": 0.0,
                               "compile.dtype": "fp32"}),
    Baseline("scratch-same-init", "pipeline", ("teacher",), ("distill", *FLOAT_TO_IR),
             "same student and initialisation as distilled (init {init}), labels only (cross-entropy), {epochs}, "
             "same optimizer, OpenVINO fp32", {"distill.alpha": 0.0, "distill.beta": 0.0,
                                                       "compile.dtype": "fp32"}),
    Baseline("distilled", "pipeline", ("teacher", "distill"), FLOAT_TO_IR, "pipeline distill stage, OpenVINO fp32",
             {"compile.dtype": "fp32"}),
    Baseline("pruned", "pipeline", ("teacher", "distill", "prune"), FLOAT_TO_IR,
             "{prune_stage}, OpenVINO fp32", {"compile.dtype": "fp32"}),
    Baseline("ptq", "pruned", ("teacher", "distill", "prune"), ("finetune", "export", "ptq"),
             "{pruned_student} fine-tuned {qat_epochs} as QAT is (float), then {ptq} (instead of QAT), OpenVINO"),
)
TRAIN_TIMING = Baseline("train-timing", "pipeline", ("teacher",), ("train_timing",),
                        "edgepipe's training loop next to a plain PyTorch loop")


def prune_wording(config: PipelineConfig) -> dict[str, str]:
    """How the method strings name the prune stage's output: with ``prune.enabled: false`` the ``pruned`` row is the
    distilled student passed through, and the rows after it start from that student, not a pruned one."""
    if config.prune.enabled:
        return {"prune_stage": "pipeline prune stage", "pruned_student": "pruned student", "prune_arrow": "prune -> "}
    return {"prune_stage": "prune stage disabled (prune.enabled: false): the distilled student passed through",
            "pruned_student": "distilled student (pruning disabled)", "prune_arrow": ""}


def derived_config(config: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    data = config.model_dump(mode="json")
    # A baseline's accuracy is what its row reports; it is not gated like the pipeline's compile.
    for dotted, value in {"compile.max_top1_drop": 100.0, **overrides}.items():
        *path, last = dotted.split(".")
        node = data
        for key in path:
            node = node[key]
        node[last] = value
    return validate_config(data, f"baseline of {config.name}")


def baseline_run(runs: dict[str, Run], b: Baseline, progress: Progress, folder: str = "baselines") -> Run:
    """Derive ``b``'s run from its parent (in ``<pipeline run>/<folder>/<row>``) and let the engine execute (or reuse)
    its own stages."""
    parent = runs[b.parent]
    child = parent.derive(runs["pipeline"].root / folder / b.row, b.shared,
                          config=derived_config(runs["pipeline"].config, b.overrides), order=b.order,
                          measured=(b.order[-1],))
    run_pipeline(child, progress=progress)
    runs[b.row] = child
    return child


def run_baselines(pipeline: Run, progress: Progress) -> tuple[dict[str, Run], list[Baseline]]:
    """Every baseline the target allows, executed in order (a parent before the rows sharing its stages)."""
    runs = {"pipeline": pipeline}
    built = [b for b in BASELINES if b.requires_dtype is None or b.requires_dtype in pipeline.profile.dtypes]
    for b in built:
        baseline_run(runs, b, progress)
    return runs, built


def own_seconds(run: Run) -> float:
    """Stage and measurement time of the stages a run executed itself (shared ones count in their own run), in its
    order (a derived run whose order was shortened keeps its other stages' entries, which no longer count)."""
    return sum((e.get("wall_time_s") or 0.0) + (e.get("measure_time_s") or 0.0)
               for e in run.manifest["stages"] if not e.get("shared_from") and e.get("name") in run.order)
