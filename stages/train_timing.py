"""Stage train_timing (a baseline, outside the pipeline order): edgepipe's training loop against a plain
PyTorch loop, timed back to back on the same batches.

Both loops distill the configured student from the teacher (same student, teacher, loss and batch
size) over ``TIMED_BATCHES`` augmented training batches: edgepipe's own ``edgepipe.training.loop.fit`` as the
distill stage configures it (channels-last, autocast, the soft-target runtime, with the logits cache
off so every batch pays for its teacher forward), then the loop a user writes by hand (eager NCHW
float32 student, teacher module under no_grad, KL + CE, SGD). Timed one after the other in one process,
so both see the same machine load. The output is the records; the model passes through unchanged.
Its key includes this host, so another CPU re-times it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgepipe.engine.artifacts import Artifact
from edgepipe.config import PipelineConfig
from edgepipe.data.batches import Batches
from edgepipe.device import Device, cpu_device, resolve
from edgepipe.host import host_cpu, host_isa
from edgepipe.profiles import HardwareProfile
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.types import ArtifactKind

NAME = "train_timing"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("distill", "soft_targets", "data", "seed")
USES_TEACHER = True
MEASURED = False
DISTRIBUTED = False  # under torchrun: rank 0 alone (a timing)
TIMED_BATCHES = 40
"""Batches each loop is timed over."""
Progress = Callable[[str, int, int, dict[str, float]], None]


def target_key(profile: HardwareProfile, config: PipelineConfig) -> dict[str, Any]:
    """This host: a timing from another CPU (or GPU) is not this one's."""
    device = resolve(config.device)
    return {"cpu": host_cpu(), "isa": list(host_isa()), "threads": torch.get_num_threads(),
            **({"gpu": device.label} if device.is_cuda else {})}


def run(ctx: StageContext) -> StageResult:
    cfg, data = ctx.config, ctx.data
    teacher = ctx.teacher or ctx.input
    n = TIMED_BATCHES * cfg.data.batch_size
    subset = data.subset(n, 500)
    pipeline = pipeline_kd_loop_throughput(cfg, subset, teacher, ctx.checkpoint_dir, ctx.progress, ctx.device)
    plain = plain_kd_loop_throughput(cfg, subset, teacher, ctx.progress, ctx.device)
    return StageResult(ctx.input, records={**pipeline, **plain, "device": ctx.device.label,
                                           "pipeline_teacher_runtime": cfg.soft_targets.runtime,
                                           "plain_teacher_runtime": "pytorch (eager, no_grad)",
                                           "ratio": pipeline["pipeline_images_per_s"] / plain["plain_images_per_s"]})


def pipeline_kd_loop_throughput(config: PipelineConfig, data: Batches, teacher_art: Artifact, folder: Path,
                                progress: Progress, device: Device | None = None) -> dict[str, Any]:
    """One epoch of edgepipe's own training loop (edgepipe.training.loop.fit) over ``data``, configured as the
    distill stage is (channels-last, autocast, soft-target runtime; the logits cache off, so every batch
    pays for its teacher forward)."""
    from edgepipe.training.distillation import SoftTargets, kd_step
    from edgepipe.models.loading import build_from_spec, load_torch_artifact
    from edgepipe.tasks import task_of
    from edgepipe.training.loop import clear_checkpoints, fit

    dcfg = config.distill
    torch.manual_seed(config.seed)
    student = build_from_spec(dcfg.student, data.num_classes)
    targets = SoftTargets(load_torch_artifact(teacher_art), config.soft_targets.runtime, cache=False,
                          example=torch.randn(2, *data.input_shape), device=device)
    optim = dcfg.optim.model_copy(update={"epochs": 1})
    history = fit(student, data, optim, kd_step(targets, dcfg.temperature, dcfg.alpha, task=task_of(config)),
                  batch_size=config.data.batch_size, checkpoint_dir=folder, task="edgepipe loop (timing)",
                  progress=progress, eval_batch_size=config.data.eval_batch_size, tag="timing", device=device)
    clear_checkpoints(folder)
    return {"pipeline_images_per_s": history[0]["images_per_s"], "pipeline_batches_timed": data.train_size
            // config.data.batch_size,
            "pipeline_setup": (f"edgepipe.training.loop.fit as in the distill stage: channels_last={dcfg.optim.channels_last}, "
                               f"autocast {dcfg.optim.autocast} (ran {history[0]['autocast']}), teacher logits from "
                               f"{config.soft_targets.runtime}, augmentation included; one epoch of "
                               f"{data.train_size // config.data.batch_size} batches of {config.data.batch_size}")}


def plain_kd_loop_throughput(config: PipelineConfig, data: Batches, teacher_art: Artifact,
                             progress: Progress, device: Device | None = None) -> dict[str, Any]:
    """A textbook PyTorch distillation loop (what a user writes by hand) over the same batches, all timed
    as the pipeline's are: eager student in NCHW float32, the teacher module under no_grad, the task's distillation
    loss (a classifier's KL + CE), SGD."""
    from edgepipe.models.loading import build_from_spec, load_torch_artifact
    from edgepipe.tasks import task_of

    dcfg, task = config.distill, task_of(config)
    torch.manual_seed(config.seed)
    device = device or cpu_device()
    student = device.module(build_from_spec(dcfg.student, data.num_classes)).train()
    teacher = device.module(load_torch_artifact(teacher_art)).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total, seen = data.steps_per_epoch(config.data.batch_size), 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(data.train_batches(config.data.batch_size, 0)):
        x, y = device.batch(x), device.batch(y)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = task.distill_loss(student(x), t_logits, y, dcfg.temperature, dcfg.alpha)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        progress("plain PyTorch loop (timing)", i + 1, total, {})
    device.synchronize()
    return {"plain_images_per_s": seen / (time.perf_counter() - t0), "plain_batches_timed": total,
            "plain_setup": "eager student, NCHW, float32, teacher module forward under no_grad, KL+CE, SGD "
                           f"Nesterov; the same {total} augmented batches of {config.data.batch_size}, all timed"}
