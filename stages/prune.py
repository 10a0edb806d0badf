"""Stage 3, prune: structured channel pruning with Torch-Pruning (DepGraph), then fine-tuning with the teacher.

Torch-Pruning's dependency graph removes whole channels together with every layer coupled to them
(residual adds, BatchNorms, the next layer's inputs), so the result is a genuinely smaller dense
model. The target is a MACs (or params) ratio. Following Torch-Pruning's own progressive pruning
(benchmarks/main.py, ``progressive_pruning``), the pruner takes many small steps (pruning_ratio=1.0
over ``SMALL_STEPS``) and stops as soon as the count reaches the target, which lands on the ratio
far more precisely than a single channel ratio can. ``prune.steps`` rounds do this towards a
geometric schedule of targets, with optional fine-tuning between rounds, then a final distillation
fine-tune from the teacher. The model is saved as a plain state dict and reloaded by resizing the
original architecture (edgepipe.models.restore_shapes).
"""
from __future__ import annotations

import json
import logging

import torch
import torch_pruning as tp
from torch import nn

from edgepipe.config import PruneConfig
from edgepipe.distillation import kd_step
from edgepipe.errors import EdgepipeError
from edgepipe.models import load_torch_artifact, save_torch_artifact
from edgepipe.stage import StageContext, StageResult
from edgepipe.training import clear_checkpoints, cross_entropy_step, evaluate, fit, seed_everything
from edgepipe.types import ArtifactKind, Importance

NAME = "prune"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("prune", "soft_targets", "data", "seed")
USES_TEACHER = True
MEASURED = True
target_key = None  # MACs/params targets; the same pruned model serves every target
SMALL_STEPS = 200
log = logging.getLogger(__name__)


def importance(kind: Importance) -> tp.importance.Importance:
    return {Importance.MAGNITUDE: lambda: tp.importance.MagnitudeImportance(p=2),
            Importance.TAYLOR: lambda: tp.importance.TaylorImportance(),
            Importance.BN_SCALE: lambda: tp.importance.BNScaleImportance()}[kind]()


def ignored_layers(model: nn.Module, num_classes: int, names: list[str]) -> list[nn.Module]:
    """The classifier (any Linear/Conv producing num_classes outputs) and configured modules."""
    ignored = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == num_classes)
               or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    for name in names:
        try:
            ignored.append(model.get_submodule(name))
        except AttributeError:
            raise EdgepipeError(f"prune.ignore: the model has no module '{name}'") from None
    return ignored


def channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) as Torch-Pruning counts them."""
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def run(ctx: StageContext) -> StageResult:
    cfg, pcfg = ctx.config, ctx.config.prune
    if not pcfg.enabled:
        return StageResult(ctx.input, skipped="disabled in config (prune.enabled: false)")
    seed_everything(cfg.seed + 2)
    data = ctx.data
    student = load_torch_artifact(ctx.input)
    teacher = ctx.soft_targets(load_torch_artifact(ctx.teacher)) if ctx.teacher else None
    example = torch.zeros(1, *data.input_shape)
    base_macs, base_params = count(student, example)
    before = channels(student)
    pruner = tp.pruner.MetaPruner(
        student, example, importance=importance(pcfg.importance), pruning_ratio=1.0,
        iterative_steps=SMALL_STEPS, max_pruning_ratio=pcfg.max_layer_ratio, global_pruning=pcfg.global_pruning,
        ignored_layers=ignored_layers(student, data.num_classes, pcfg.ignore), round_to=pcfg.round_to)
    step_log, histories = [], []
    for step in range(1, pcfg.steps + 1):
        goal = pcfg.ratio ** (step / pcfg.steps)
        reached = _prune_to(pruner, student, example, goal, base_macs, base_params, pcfg, data)
        macs, params = count(student, example)
        step_log.append({"step": step, "goal_ratio": goal, "macs": macs, "params": params,
                         "macs_ratio": macs / base_macs, "params_ratio": params / base_params, "reached": reached})
        ctx.progress("prune steps", step, pcfg.steps, {"macs_ratio": macs / base_macs})
        log.info("prune step %d/%d: MACs %.1f%% params %.1f%% of the student", step, pcfg.steps,
                 100 * macs / base_macs, 100 * params / base_params)
        if step < pcfg.steps and pcfg.finetune_per_step and teacher is not None:
            histories += fit(student, data, pcfg.optim.model_copy(update={"epochs": pcfg.finetune_per_step}),
                             kd_step(teacher, pcfg.temperature, pcfg.alpha), batch_size=cfg.data.batch_size,
                             checkpoint_dir=ctx.checkpoint_dir, task=f"prune step {step} fine-tune",
                             progress=ctx.progress, tag=f"step{step}")
    if not step_log[-1]["reached"]:
        raise EdgepipeError(f"prune.ratio: reached only {step_log[-1][f'{pcfg.target}_ratio']:.2f} of the {pcfg.target} "
                            f"(target {pcfg.ratio}); raise prune.max_layer_ratio or the ratio")
    pruned_top1 = evaluate(student, data, cfg.data.eval_batch_size)
    loss = kd_step(teacher, pcfg.temperature, pcfg.alpha) if teacher is not None else cross_entropy_step
    histories += fit(student, data, pcfg.optim, loss, batch_size=cfg.data.batch_size,
                     checkpoint_dir=ctx.checkpoint_dir, task="prune fine-tune", progress=ctx.progress,
                     eval_batch_size=cfg.data.eval_batch_size, tag="final")
    after = channels(student)
    build = json.loads(ctx.input.path("build").read_text())["build"]
    artifact = save_torch_artifact(student, build, ctx.out_dir, data.input_shape, data.num_classes)
    clear_checkpoints(ctx.checkpoint_dir)
    macs, params = count(student, example)
    return StageResult(artifact, records={
        "history": histories, "importance": pcfg.importance.value, "target": pcfg.target, "ratio": pcfg.ratio,
        "macs_before": base_macs, "params_before": base_params, "macs_after": macs, "params_after": params,
        "macs_ratio": macs / base_macs, "params_ratio": params / base_params, "top1_after_pruning": pruned_top1,
        "steps": step_log, "channels": {n: [before[n], after.get(n, before[n])] for n in before},
        "soft_targets": teacher.record() if teacher is not None else None})


def _prune_to(pruner: tp.pruner.MetaPruner, model: nn.Module, example: torch.Tensor, goal: float, base_macs: int,
              base_params: int, pcfg: PruneConfig, data) -> bool:
    """Take small pruner steps until MACs (or params) <= goal x the unpruned count; False if it cannot."""
    base = base_macs if pcfg.target == "macs" else base_params
    while True:
        macs, params = count(model, example)
        if (macs if pcfg.target == "macs" else params) <= goal * base:
            return True
        if pruner.current_step >= pruner.iterative_steps:
            return False
        if pcfg.importance is Importance.TAYLOR:
            _accumulate_gradients(model, data, pcfg.taylor_batches)
        pruner.step()


def _accumulate_gradients(model: nn.Module, data, batches: int) -> None:
    """Taylor importance needs dL/dw: one backward pass over a few training batches."""
    model.eval()
    model.zero_grad()
    for i, (x, y) in enumerate(data.train_batches(64, epoch=10_000, augment=False)):
        if i >= batches:
            break
        nn.functional.cross_entropy(model(x), y).backward()

