"""Stage 3, prune: structured channel pruning with Torch-Pruning (DepGraph), then fine-tuning with the teacher.

Torch-Pruning's dependency graph removes whole channels together with every layer coupled to them
(residual adds, BatchNorms, the next layer's inputs), so the result is a genuinely smaller dense
model. The target is a MACs (or params) ratio, or a batch-1 latency on the target's own backend
(``prune.target: latency`` with ``latency_ms`` or ``speedup``): candidates are exported, compiled by the
profile's backend in its best float dtype and timed as every stage is (``ctx.measure.candidate_latency``;
a TensorRT target that cannot build here uses the profile's roofline estimate, recorded as such), each
time their MACs drop by ``latency_check`` of the unpruned count, until the budget holds. Following Torch-Pruning's own progressive pruning
(benchmarks/main.py, ``progressive_pruning``), the pruner takes many small steps (pruning_ratio=1.0
over ``SMALL_STEPS``) and stops as soon as the count reaches the target, which lands on the ratio
far more precisely than a single channel ratio can. ``prune.steps`` rounds do this towards a
geometric schedule of targets, with optional fine-tuning between rounds, then a final distillation
fine-tune from the teacher. The model is saved as a plain state dict and reloaded by resizing the
original architecture (edgepipe.models.loading.restore_shapes).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from edgepipe.training import distributed
from edgepipe.config import PipelineConfig, PruneConfig
from edgepipe.training.distillation import kd_step
from edgepipe.errors import EdgepipeError
from edgepipe.host import host_cpu, host_isa
from edgepipe.models.loading import load_torch_artifact, save_torch_artifact
from edgepipe.profiles import HardwareProfile
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.training.loop import fit, seed_everything
from edgepipe.types import ArtifactKind, Importance

if TYPE_CHECKING:
    from edgepipe.tasks.base import Task

NAME = "prune"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("prune", "soft_targets", "data", "seed")
USES_TEACHER = True
MEASURED = True
DISTRIBUTED = True  # under torchrun: graph surgery on rank 0 (edgepipe.training.distributed.share_model), fine-tuning under DDP


def target_key(profile: HardwareProfile, config: PipelineConfig) -> dict[str, Any] | None:
    """A MACs/params target serves every target; a latency target is measured on this target and host."""
    if config.prune.target != "latency":
        return None
    return {"profile": profile.model_dump(mode="json"), "host": [host_cpu(), list(host_isa())],
            "measure": config.measure.model_dump(mode="json")}
SMALL_STEPS = 200
log = logging.getLogger(__name__)


def importance(kind: Importance) -> tp.importance.Importance:
    return {Importance.MAGNITUDE: lambda: tp.importance.MagnitudeImportance(p=2),
            Importance.TAYLOR: lambda: tp.importance.TaylorImportance(),
            Importance.BN_SCALE: lambda: tp.importance.BNScaleImportance()}[kind]()


def ignored_layers(model: nn.Module, task: Task, meta: dict[str, Any], names: list[str]) -> list[nn.Module]:
    """The layers the task's outputs come from (``Task.protected_layers``: a classifier's class layer) and the
    configured modules (``prune.ignore``)."""
    ignored = task.protected_layers(model, meta)
    for name in names:
        try:
            ignored.append(model.get_submodule(name))
        except AttributeError:
            raise EdgepipeError(f"prune.ignore: the model has no module '{name}'") from None
    return ignored


def channels(model: nn.Module) -> dict[str, int]:
    """Each convolution's output channels; a model without convolutions (a transformer): each Linear's outputs."""
    convs = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return convs or {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}


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
    data, device = ctx.data, ctx.device
    # Torch-Pruning's graph is traced, and candidates are counted, on the training device: the model stays there
    # from pruning through fine-tuning (a candidate is exported from a CPU copy when its latency is measured).
    student = device.module(load_torch_artifact(ctx.input))
    net = ctx.task.graph_core(student)  # what the pruner changes: the model, or a detector's core (no NMS)
    teacher, distiller = _teacher(ctx, student)
    example = device.batch(ctx.task.prune_example(ctx.model_meta(), data.input_shape))
    base_macs, base_params = count(net, example)
    before = channels(student)
    # A transformer's own structures first (text: the vocabulary trimmed, whole attention heads removed); what it
    # returns are layers the width pruner below must not take as roots (attention's query/key/value).
    if pcfg.importance is Importance.TAYLOR and pcfg.heads > 0:  # heads are ranked before the first pruner step
        _accumulate_gradients(net, data, pcfg.taylor_batches, ctx.task)
    not_roots, structure = (ctx.task.prune_structure(net, data, pcfg, example, importance(pcfg.importance))
                            if distributed.is_main() else ([], None))
    # Under torchrun the graph surgery is rank 0's alone (Torch-Pruning's dependency graph, candidate latencies);
    # after each step the other ranks take its pruned weights (edgepipe.training.distributed.share_model) and every rank
    # fine-tunes under DDP.
    alone = distributed.is_main()
    pruner = tp.pruner.MetaPruner(
        net, example, importance=importance(pcfg.importance), pruning_ratio=1.0,
        iterative_steps=SMALL_STEPS, max_pruning_ratio=pcfg.max_layer_ratio, global_pruning=pcfg.global_pruning,
        ignored_layers=ignored_layers(student, ctx.task, ctx.model_meta(), pcfg.ignore) + not_roots,
        round_to=pcfg.round_to) if alone else None
    step_log, histories = [], []
    with distributed.main_only_threads():
        latency = _Latency(ctx, example, base_macs) if pcfg.target == "latency" and alone else None
    for step in range(1, pcfg.steps + 1):
        if alone:  # with all of the node's cores while the other ranks wait (candidate latencies are timed)
            goal = pcfg.ratio ** (step / pcfg.steps) if latency is None else latency.goal(step, pcfg.steps)
            with distributed.main_only_threads():
                if latency is None:
                    reached = _prune_to(pruner, net, example, goal, base_macs, base_params, pcfg, data, ctx.task)
                else:
                    reached = latency.prune_to(pruner, student, goal, pcfg, data, net)
        distributed.share_model(student, ctx.checkpoint_dir / f"pruned-step{step}.pt")
        if hasattr(student, "sync_shapes"):  # attributes that follow the widths (a transformer's heads, hidden size),
            student.sync_shapes()            # on every rank once it holds the pruned weights
        if alone:  # rank 0 records the steps (and stops the run below if the budget is out of reach)
            macs, params = count(net, example)
            step_log.append({"step": step, "goal_ratio" if latency is None else "goal_ms": goal, "macs": macs,
                             "params": params, "macs_ratio": macs / base_macs, "params_ratio": params / base_params,
                             "reached": reached, **({"latency_ms": latency.last_ms} if latency else {})})
            ctx.progress("prune steps", step, pcfg.steps, {"macs_ratio": macs / base_macs})
            log.info("prune step %d/%d: MACs %.1f%% params %.1f%% of the student", step, pcfg.steps,
                     100 * macs / base_macs, 100 * params / base_params)
        if step < pcfg.steps and pcfg.finetune_per_step and (teacher or distiller) is not None:
            histories += fit(student, data, pcfg.optim.model_copy(update={"epochs": pcfg.finetune_per_step}),
                             distiller.step if distiller is not None else
                             kd_step(teacher, pcfg.temperature, pcfg.alpha, task=ctx.task), batch_size=cfg.data.batch_size,
                             checkpoint_dir=ctx.checkpoint_dir, task=f"prune step {step} fine-tune",
                             progress=ctx.progress, tag=f"step{step}", evaluator=ctx.task, device=device)
    if latency is not None and not step_log[-1]["reached"]:
        raise EdgepipeError(f"prune.{'latency_ms' if pcfg.latency_ms else 'speedup'}: pruning reached "
                            f"{latency.last_ms:.4g} ms at batch 1 on {latency.where}, above the budget "
                            f"{latency.budget_ms:.4g} ms; raise prune.max_layer_ratio or relax the budget")
    if alone and not step_log[-1]["reached"]:
        reached = f"reached only {step_log[-1][f'{pcfg.target}_ratio']:.2f} of the {pcfg.target} (target {pcfg.ratio})"
        widths = {n: c for n, c in before.items() if c > pcfg.round_to} if pcfg.round_to else None
        if widths is not None and len(widths) < len(before):  # layers at or below round_to cannot lose a channel
            raise EdgepipeError(f"prune.round_to: {reached}: channel counts are kept a multiple of {pcfg.round_to}, so "
                                f"{len(before) - len(widths)} of {len(before)} layers (width {pcfg.round_to} or less; "
                                f"the widest layer has {max(before.values())}) cannot lose a channel; lower "
                                "prune.round_to or raise prune.ratio")
        raise EdgepipeError(f"prune.ratio: {reached}; raise prune.max_layer_ratio or the ratio")
    task = ctx.task
    pruned_top1 = task.val_score(student, data.choice_split(), cfg.data.eval_batch_size)
    loss = (distiller.step if distiller is not None else kd_step(teacher, pcfg.temperature, pcfg.alpha, task=task)
            if teacher is not None else task.train_loss)
    histories += fit(student, data, pcfg.optim, loss, batch_size=cfg.data.batch_size,
                     checkpoint_dir=ctx.checkpoint_dir, task="prune fine-tune", progress=ctx.progress,
                     eval_batch_size=cfg.data.eval_batch_size, tag="final", evaluator=task, device=device)
    if not alone:
        return StageResult(ctx.input)  # rank 0 saves and records the pruned model
    after = channels(student)
    build = json.loads(ctx.input.path("build").read_text())["build"]
    artifact = save_torch_artifact(student, build, ctx.out_dir, data.input_shape, data.num_classes,
                                   meta=ctx.task_meta())
    macs, params = count(net, example)
    if distiller is not None:
        distiller.remove()
    return StageResult(artifact, records={
        "history": histories, "importance": pcfg.importance.value, "target": pcfg.target, "ratio": pcfg.ratio,
        "macs_before": base_macs, "params_before": base_params, "macs_after": macs, "params_after": params,
        "macs_ratio": macs / base_macs, "params_ratio": params / base_params, "top1_after_pruning": pruned_top1,
        "steps": step_log, "channels": {n: [before[n], after.get(n, before[n])] for n in before},
        "structure": {**structure, "after": student.shape_record()} if structure else None,
        "soft_targets": teacher.record() if teacher is not None and distiller is None else None,
        "distillation": distiller.record() if distiller is not None else None,
        "latency": latency.record() if latency is not None else None})


def _teacher(ctx: StageContext, student: nn.Module) -> tuple[Any, Any]:
    """The fine-tune's teacher: its logits (``SoftTargets``), or the task's own distillation (a detector's
    prediction distillation at ``prune.temperature``/``prune.alpha``: ``Task.distiller``); (None, None) without one."""
    if not ctx.teacher:
        return None, None
    teacher = load_torch_artifact(ctx.teacher)
    example = ctx.device.batch(ctx.data.calibration_batches(1, 8)[0])
    pcfg = ctx.config.prune
    distiller = ctx.task.distiller(ctx.device.module(teacher), student, pcfg.temperature, pcfg.alpha, 0.0, example)
    if distiller is not None:
        return teacher, distiller
    return ctx.soft_targets(teacher), None


def _prune_to(pruner: tp.pruner.MetaPruner, model: nn.Module, example: torch.Tensor, goal: float, base_macs: int,
              base_params: int, pcfg: PruneConfig, data, task: Task) -> bool:
    """Take small pruner steps until MACs (or params) <= goal x the unpruned count; False if it cannot."""
    base = base_macs if pcfg.target == "macs" else base_params
    while True:
        macs, params = count(model, example)
        if (macs if pcfg.target == "macs" else params) <= goal * base:
            return True
        if pruner.current_step >= pruner.iterative_steps:
            return False
        if pcfg.importance is Importance.TAYLOR:
            _accumulate_gradients(model, data, pcfg.taylor_batches, task)
        pruner.step()


def _accumulate_gradients(model: nn.Module, data, batches: int, task: Task) -> None:
    """Taylor importance needs dL/dw: one backward pass of the task's loss over a few training batches."""
    from edgepipe import device as devices

    model.eval()
    model.zero_grad()
    on = devices.module_device(model)
    for i, (x, y) in enumerate(data.train_batches(64, epoch=10_000, augment=False)):
        if i >= batches:
            break
        task.train_loss(model, devices.to_device(x, on), devices.to_device(y, on))["loss"].backward()


class _Latency:
    """Latency-constrained pruning: the budget, and candidates measured on the target's backend."""

    def __init__(self, ctx: StageContext, example: torch.Tensor, base_macs: int) -> None:
        self.ctx, self.example, self.base_macs = ctx, example, base_macs
        self.shape = tuple(example.shape[1:])
        self.measurements: list[dict[str, Any]] = []
        unpruned = load_torch_artifact(ctx.input)
        # Two independent compiles and timings, the lower kept: a budget relative to an inflated first figure
        # would be met by noise, not by pruning.
        base = min((self.measure(unpruned, base_macs) for _ in range(2)), key=lambda x: x["p50_ms"])
        pcfg = ctx.config.prune
        self.base_ms = base["p50_ms"]
        self.budget_ms = pcfg.latency_ms if pcfg.latency_ms is not None else self.base_ms / pcfg.speedup
        self.last_ms = self.base_ms
        self.where = f"{base['backend']} {base['dtype']}" + (" (roofline ESTIMATE)" if base["kind"] == "estimate" else "")

    def goal(self, step: int, steps: int) -> float:
        """Geometric schedule from the unpruned latency to the budget over ``steps`` rounds."""
        return self.base_ms * (self.budget_ms / self.base_ms) ** (step / steps)

    def measure(self, model: nn.Module, macs: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="prune-candidate-") as tmp:
            lat = self.ctx.measure.candidate_latency(model, self.shape, Path(tmp))
        model.train()
        self.last_ms = lat["p50_ms"]
        self.measurements.append({"macs": macs, "macs_ratio": macs / self.base_macs, "p50_ms": lat["p50_ms"],
                                  "kind": lat["kind"]})
        self.ctx.progress("prune: candidate latency", len(self.measurements), len(self.measurements),
                          {"p50_ms": lat["p50_ms"], "macs_ratio": macs / self.base_macs})
        self.last = lat
        return lat

    def prune_to(self, pruner: tp.pruner.MetaPruner, model: nn.Module, goal_ms: float, pcfg: PruneConfig,
                 data, net: nn.Module | None = None) -> bool:
        """Small pruner steps, measuring whenever MACs fell by ``latency_check``, until p50 <= goal_ms (``model``
        timed whole; ``net``, the part the pruner changes, counted)."""
        net = model if net is None else net
        measured_at = count(net, self.example)[0]
        if self.last_ms <= goal_ms:
            return True
        while pruner.current_step < pruner.iterative_steps:
            if pcfg.importance is Importance.TAYLOR:
                _accumulate_gradients(model, data, pcfg.taylor_batches, self.ctx.task)
            pruner.step()
            macs = count(net, self.example)[0]
            if measured_at - macs >= pcfg.latency_check * self.base_macs:
                measured_at = macs
                if self._meets(model, macs, goal_ms):
                    return True
        return self._meets(model, count(net, self.example)[0], goal_ms)

    def _meets(self, model: nn.Module, macs: int, goal_ms: float) -> bool:
        """The candidate meets ``goal_ms`` in a measurement and again in an independent one (a fresh compile)."""
        return self.measure(model, macs)["p50_ms"] <= goal_ms and self.measure(model, macs)["p50_ms"] <= goal_ms

    def record(self) -> dict[str, Any]:
        last = self.last
        return {"budget_ms": self.budget_ms, "unpruned_ms": self.base_ms, "final_ms": self.last_ms,
                "speedup": self.base_ms / self.last_ms, "kind": last["kind"], "measured_on": self.where,
                "conditions": {k: last.get(k) for k in ("backend", "device", "dtype", "batch", "threads", "warmup",
                                                        "iterations", "rounds")},
                "note": "candidates timed in the target's best float dtype before QAT; INT8 runs faster still",
                "measurements": self.measurements}
