"""Stage 2, distill: train a smaller student from the teacher's soft targets.

loss = the task's distillation loss [+ beta * feature hints] (edgepipe.training.distillation); for classification
alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(student, labels). Every epoch records the soft, hard and feature components and the
validation accuracy; checkpoints after every epoch let an interrupted run resume. With ``alpha: 0`` and
no feature hints the loss is plain cross-entropy on the labels and the teacher is never run (the
``scratch`` baseline is this stage with ``init: random, alpha: 0``).
"""
from __future__ import annotations

from edgepipe.training.distillation import FeatureHints, init_from_teacher, kd_step
from edgepipe.models.loading import build_from_spec, check_fits, load_torch_artifact, save_torch_artifact
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.training.loop import fit, seed_everything
from edgepipe.types import ArtifactKind

NAME = "distill"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("distill", "soft_targets", "data", "seed")
USES_TEACHER = True
MEASURED = True
DISTRIBUTED = True  # under torchrun: DDP over the ranks' shards
target_key = None  # the float student does not depend on the target


def run(ctx: StageContext) -> StageResult:
    cfg, dcfg = ctx.config, ctx.config.distill
    seed_everything(cfg.seed + 1)
    teacher = load_torch_artifact(ctx.teacher or ctx.input)
    data, task, device = ctx.data, ctx.task, ctx.device
    student = build_from_spec(dcfg.student, data.num_classes)
    check_fits(student, "distill.student", task, ctx.model_meta())
    init = init_from_teacher(student, teacher) if dcfg.init == "teacher" else {"init": "random"}
    hints = None
    if dcfg.alpha > 0 or dcfg.beta > 0:
        device.module(teacher), device.module(student)
        hints = task.distiller(teacher, student, dcfg.temperature, dcfg.alpha, dcfg.beta,
                               device.batch(data.calibration_batches(1, 8)[0]))
    own = hints is not None  # the task distils its own way (detectors): its step, its adapters
    if not own and dcfg.feature_pairs and dcfg.beta > 0:
        hints = FeatureHints(teacher, student, dcfg.feature_pairs, device.batch(data.calibration_batches(1, 8)[0]))
    if dcfg.alpha == 0 and hints is None:  # labels only (the scratch baseline): no teacher forward at all
        targets, loss = None, task.train_loss
    elif own:
        targets, loss = None, hints.step
    else:
        targets = ctx.soft_targets(teacher)
        loss = kd_step(targets, dcfg.temperature, dcfg.alpha, dcfg.beta, hints, task=task, method=dcfg.loss,
                       weights=(dcfg.dkd_alpha, dcfg.dkd_beta) if dcfg.loss == "dkd" else (),
                       pseudo_threshold=dcfg.pseudo_label_threshold)
    # data.unlabeled: the images without labels train against the teacher's soft targets (never labels alone)
    unlabeled = data.unlabeled_size if targets is not None else 0
    if unlabeled:
        data = data.with_unlabeled()
    history = fit(student, data, dcfg.optim, loss,
                  batch_size=cfg.data.batch_size, checkpoint_dir=ctx.checkpoint_dir, task="distill",
                  extra_modules=hints, progress=ctx.progress, eval_batch_size=cfg.data.eval_batch_size,
                  evaluator=task, device=device)
    if hints is not None:
        hints.remove()
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in student.parameters())
    build = dcfg.student.model_dump(exclude_none=True, exclude={"weights"})
    artifact = save_torch_artifact(student, build, ctx.out_dir, data.input_shape, data.num_classes,
                                   meta=ctx.task_meta())
    return StageResult(artifact, records={
        "history": history, "init": init, "soft_targets": targets.record() if targets else None,
        "loss": ("DKD" if dcfg.loss == "dkd" else "KD") if targets else hints.record() if own else
        "the task's loss on labels only (alpha 0, no feature hints)", "temperature": dcfg.temperature, "alpha": dcfg.alpha, "beta": dcfg.beta,
        **({"dkd_alpha": dcfg.dkd_alpha, "dkd_beta": dcfg.dkd_beta} if dcfg.loss == "dkd" else {}),
        "feature_pairs": [p.model_dump() for p in dcfg.feature_pairs],
        "teacher_params": teacher_params, "student_params": student_params,
        **({"assistants": [a.model_dump(exclude_none=True) for a in dcfg.assistants],
            "taught_by": f"assistant {len(dcfg.assistants)} of {len(dcfg.assistants)} (RUN/assistants/"
                         f"{len(dcfg.assistants) - 1})"} if dcfg.assistants else {}),
        "unlabeled": {"images": unlabeled, "labelled_images": data.train_size - unlabeled,
                      "how": "teacher soft targets" + (f" + hard pseudo-labels where the teacher's top-class probability "
                                                       f">= {dcfg.pseudo_label_threshold}"
                                                       if dcfg.pseudo_label_threshold is not None else " only")}
        if unlabeled else None,
        "params_ratio": student_params / teacher_params})
