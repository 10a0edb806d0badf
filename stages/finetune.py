"""Stage finetune (a baseline, outside the pipeline order): the QAT stage's fine-tuning without fake quantization.

Same schedule (``qat.optim``), loss (KD from the teacher at ``qat.temperature`` / ``qat.alpha``), seed and
batches as the qat stage, on the float model. Put before ``ptq`` it gives post-training quantization the
same extra epochs QAT gets, so "QAT vs PTQ" compares the quantization method, not the training budget
(edgepipe.engine.baselines' ``ptq`` row).
"""
from __future__ import annotations

import json

from edgepipe.training.distillation import kd_step
from edgepipe.models.loading import load_torch_artifact, save_torch_artifact
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.training.loop import fit, seed_everything
from edgepipe.types import ArtifactKind

NAME = "finetune"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("qat", "soft_targets", "data", "seed")
USES_TEACHER = True
MEASURED = True
DISTRIBUTED = True  # under torchrun: DDP over the ranks' shards
target_key = None  # a float model: the same for every target


def run(ctx: StageContext) -> StageResult:
    cfg, qcfg = ctx.config, ctx.config.qat
    seed_everything(cfg.seed + 3)  # the qat stage's seed: the same batches in the same order
    data, desc = ctx.data, json.loads(ctx.input.path("build").read_text())
    model = ctx.device.module(load_torch_artifact(ctx.input))
    before = ctx.task.val_score(model, data.choice_split(), cfg.data.eval_batch_size)
    teacher = load_torch_artifact(ctx.teacher)
    # a detector distils its own way (Task.distiller: prediction distillation, as in its qat stage)
    distiller = ctx.task.distiller(ctx.device.module(teacher), model, qcfg.temperature, qcfg.alpha, 0.0,
                                   ctx.device.batch(data.calibration_batches(1, 8)[0]))
    targets = None if distiller is not None else ctx.soft_targets(teacher)
    history = fit(model, data, qcfg.optim,
                  distiller.step if distiller is not None else kd_step(targets, qcfg.temperature, qcfg.alpha,
                                                                       task=ctx.task),
                  batch_size=cfg.data.batch_size, checkpoint_dir=ctx.checkpoint_dir, task="finetune",
                  progress=ctx.progress, eval_batch_size=cfg.data.eval_batch_size, evaluator=ctx.task,
                  device=ctx.device)
    if distiller is not None:
        distiller.remove()
    artifact = save_torch_artifact(model, desc["build"], ctx.out_dir, tuple(desc["input_shape"]), desc["num_classes"],
                                   meta=ctx.task_meta())
    return StageResult(artifact, records={"history": history, "top1_before": before, "epochs": qcfg.optim.epochs,
                                          "soft_targets": targets.record() if targets is not None else None,
                                          "distillation": distiller.record() if distiller is not None else None})
