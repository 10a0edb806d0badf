"""Stage 1, teacher: load the user's teacher, or train one when the config asks.

Sources (config ``teacher.model``): a registered architecture name plus a state-dict file, a
``torch.export`` program (.pt2), or an explicit ``module:function`` factory. With
``teacher.train.epochs > 0`` the teacher is (further) trained on the configured data with its task's loss on the
labels first (cross-entropy for classification); the embedded ``digits`` recipe trains its teacher this way.
"""
from __future__ import annotations

import logging
import shutil

from edgepipe.io import atomic_write
from edgepipe.models.loading import build_from_spec, check_fits, save_torch_artifact
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.training.loop import fit, seed_everything

NAME = "teacher"
PROGRAM_FILE = "teacher.pt2"
INPUT_KINDS = ()
SECTIONS = ("teacher", "data", "seed")
USES_TEACHER = False
MEASURED = True
DISTRIBUTED = True  # under torchrun: trains the teacher under DDP when teacher.train.epochs > 0
target_key = None  # a teacher is the same for every target
log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config
    spec = cfg.teacher.model
    seed_everything(cfg.seed)
    data, task = ctx.data, ctx.task
    model = build_from_spec(spec, data.num_classes)
    check_fits(model, "teacher.model", task, ctx.model_meta())
    history = []
    if cfg.teacher.train.epochs > 0:
        history = fit(model, data, cfg.teacher.train, task.train_loss,
                      batch_size=cfg.data.batch_size, checkpoint_dir=ctx.checkpoint_dir, task="teacher",
                      progress=ctx.progress, eval_batch_size=cfg.data.eval_batch_size, evaluator=task,
                      device=ctx.device)
    build = spec.model_dump(exclude_none=True, exclude={"weights"})
    files = {}
    if spec.program:  # keep the run folder self-contained: the program travels with the artifact
        atomic_write(ctx.out_dir / PROGRAM_FILE, lambda p: shutil.copyfile(spec.program, p))
        build["program"], files = PROGRAM_FILE, {"program": PROGRAM_FILE}
    artifact = save_torch_artifact(model, build, ctx.out_dir, data.input_shape, data.num_classes,
                                   meta={"source": _source(spec), **ctx.task_meta()}, extra_files=files)
    return StageResult(artifact, records={"history": history, "source": _source(spec)})


def _source(spec) -> str:
    if spec.program:
        return f"torch.export program {spec.program}"
    if spec.factory:
        return f"factory {spec.factory}"
    return f"architecture {spec.arch}" + (f" + weights {spec.weights}" if spec.weights else " (initialised here)")
