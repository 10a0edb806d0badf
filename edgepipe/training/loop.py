"""The one training loop every stage uses: SGD + one-cycle LR, mixed precision, per-epoch checkpoints.

A stage supplies a ``loss_step(model, x, y) -> {"loss": total, <component>: value, ...}``; the loop
handles the rest the same way everywhere: the device (edgepipe.device: the model, its companion modules and every
batch moved there, batches from page-locked memory without blocking on a GPU), seeded data order (a function of seed
and epoch only, so a resumed run sees the same batches), mixed precision (edgepipe.device.precision: bf16 where the
CPU or GPU runs it natively, fp16 with a gradient scaler on older GPUs), channels-last,
an atomic checkpoint after every epoch (``checkpoints/last.pt``, CPU tensors) from which an interrupted stage
resumes on any device, per-epoch history (every loss component, the task's validation metric, images/s, the device)
and progress callbacks. A CUDA out-of-memory error is one line naming the stage, the device and the batch size.
Writes happen on rank 0 only (edgepipe.io.is_main_process), ready for torchrun.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgepipe.training import distributed
from edgepipe.config import OptimConfig
from edgepipe.data.batches import Batches
from edgepipe import device as devices
from edgepipe.device import Device, cpu_device, is_out_of_memory, out_of_memory_line, precision
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_torch_save, is_main_process

if TYPE_CHECKING:
    from edgepipe.tasks.base import Task

log = logging.getLogger(__name__)

LossStep = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
Progress = Callable[[str, int, int, dict[str, float]], None]


def autocast_dtype(cfg: OptimConfig, device: Device | None = None) -> torch.dtype | None:
    """The autocast dtype ``cfg`` trains in on ``device`` (default the CPU: bf16 when asked, or on 'auto' when the
    CPU has native bf16, AMX / AVX512-BF16); see edgepipe.device.precision."""
    return precision(device or cpu_device(), cfg.autocast).dtype


def autocast(dtype: torch.dtype | None, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _fingerprint(cfg: OptimConfig, tag: str) -> str:
    return hashlib.sha256((cfg.model_dump_json() + tag).encode()).hexdigest()[:16]


def fit(model: nn.Module, data: Batches, cfg: OptimConfig, loss_step: LossStep, *, batch_size: int,
        checkpoint_dir: Path, task: str = "train", extra_modules: nn.Module | None = None,
        progress: Progress | None = None, eval_batch_size: int = 256, tag: str = "",
        evaluator: Task | None = None, device: Device | None = None) -> list[dict[str, Any]]:
    """Train ``model`` (and ``extra_modules``, e.g. feature adapters) for ``cfg.epochs`` epochs on ``device``
    (default the CPU); both are left there.

    Resumes from ``checkpoint_dir/last.pt`` when it belongs to the same config (``tag`` distinguishes
    several trainings inside one stage), whichever device wrote it. ``evaluator``: the task whose headline metric is
    computed after every epoch on the split choices are made on (``Batches.choice_split``: the held-out split of
    data.val_from_train, else the validation split; ``val_<metric>`` in the history, and a ``"<task> validation"``
    progress call with it, which a sweep prunes trials by; default classification's top-1). Returns the per-epoch
    history.
    """
    from edgepipe.tasks import DEFAULT, get_task

    evaluator = evaluator or get_task(DEFAULT)
    progress = progress or (lambda *a: None)
    device = device or cpu_device()
    distributed.local_batch(batch_size)  # under torchrun: the configured batch must split over the ranks
    shard = (distributed.rank(), distributed.world_size()) if distributed.collective_active() else (0, 1)
    device.module(model)
    if extra_modules is not None:
        device.module(extra_modules)
    params = list(model.parameters()) + (list(extra_modules.parameters()) if extra_modules else [])
    steps = data.steps_per_epoch(batch_size)
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    # OneCycleLR divides by its warm-up length (pct_start x total_steps - 1): fewer than 9 steps (a handful of
    # images) would divide by zero or go negative, so the schedule spans at least 9 steps.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(9, cfg.epochs * steps + 1),
                                                pct_start=0.25, anneal_strategy="linear",
                                                div_factor=10.0, final_div_factor=100.0,
                                                cycle_momentum=cfg.optimizer == "sgd")
    prec = precision(device, cfg.autocast, f"optim.autocast ({task})")
    amp = prec.dtype
    # fp16 only: scale the loss so small gradients do not underflow (torch.amp.GradScaler skips a step whose
    # gradients overflowed and lowers the scale). bf16 keeps fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type) if prec.scaler else None
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    history: list[dict[str, Any]] = []
    start = 0
    ckpt = Path(checkpoint_dir) / f"last{('-' + tag) if tag else ''}.pt"
    fingerprint = _fingerprint(cfg, tag)
    state = None
    if ckpt.exists():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(type(state).__name__)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign checkpoint is never trusted
            log.warning("%s: checkpoint %s is damaged (%s); starting this training over", task, ckpt, type(e).__name__)
            state = None
    if state is not None and state.get("fingerprint") == fingerprint:
        model.load_state_dict(state["model"])
        if extra_modules is not None and "extra" in state:
            extra_modules.load_state_dict(state["extra"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history, start = json.loads(state["history"]), int(state["epoch"])
        for row in history:  # these epochs ran in an earlier, interrupted invocation
            row.setdefault("earlier_invocation", True)
        log.info("%s: resuming after epoch %d from %s", task, start, ckpt)
    with distributed.synced_batchnorm(model, device) as batchnorm:
        # Under torchrun the loss step calls the model through DistributedDataParallel (gradients averaged over
        # the ranks, each of which takes its slice of every global batch); alone, the model itself.
        net = distributed.data_parallel(model, extra_modules, device) if shard[1] > 1 else model
        updates = start * steps  # weight updates so far: none means a non-finite loss is not the learning rate's
        for epoch in range(start, cfg.epochs):
            model.train()
            sums: dict[str, float] = {}
            seen, t0 = 0, time.perf_counter()
            where = f" (epoch {epoch + 1})"
            try:
                for i, (x, y) in enumerate(_batches(data, batch_size, epoch, fmt, shard, device)):
                    with device.autocast(amp):
                        parts = loss_step(net, x, y)
                    loss_value = float(parts["loss"].detach())
                    if not math.isfinite(loss_value):
                        raise EdgepipeError(f"{task} epoch {epoch + 1}, batch {i + 1}: the loss is {loss_value} "
                                            f"{_why_not_finite(model, x, updates, cfg, evaluator)}")
                    opt.zero_grad(set_to_none=True)
                    if scaler is None:
                        parts["loss"].backward()
                        opt.step()
                    else:
                        scaler.scale(parts["loss"]).backward()
                        scaler.step(opt)
                        scaler.update()
                    sched.step()
                    updates += 1
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y)
                    seen += len(y)
                    progress(f"{task} epoch {epoch + 1}/{cfg.epochs}", i + 1, steps, {"loss": loss_value})
                device.synchronize()
                seconds = time.perf_counter() - t0
                where = f" (epoch {epoch + 1}, validation)"
                val = evaluator.val_score(model, data.choice_split(), eval_batch_size)
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if not is_out_of_memory(e):
                    raise
                raise EdgepipeError(out_of_memory_line(task, device, batch_size, eval_batch_size, where)) from None
            keys = sorted(sums)  # the same order on every rank
            *totals, seen = distributed.all_reduce_sum([sums[k] for k in keys] + [seen])
            sums = dict(zip(keys, totals))
            broken = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if broken:
                raise EdgepipeError(f"{task} epoch {epoch + 1}: {len(broken)} weight tensor(s) hold NaN or inf (first: "
                                    f"{broken[0]}); lower this stage's optim.lr (now {cfg.lr:g})")
            row = {"epoch": epoch + 1, "lr": sched.get_last_lr()[0], **{k: v / max(1, seen) for k, v in sums.items()},
                   f"val_{evaluator.headline.name}": val,
                   "images_per_s": seen / seconds,
                   "seconds": seconds, "autocast": str(amp).replace("torch.", "") if amp else "off",
                   **({"grad_scaler": True} if scaler is not None else {}), "device": device.label,
                   "processes": shard[1], **({"batchnorm": batchnorm} if shard[1] > 1 else {})}
            history.append(row)
            log.info("%s epoch %d/%d: %s", task, epoch + 1, cfg.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            if is_main_process():
                state = {"fingerprint": fingerprint, "epoch": epoch + 1, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": json.dumps(history)}
                if extra_modules is not None:
                    state["extra"] = extra_modules.state_dict()
                if scaler is not None:
                    state["scaler"] = scaler.state_dict()
                atomic_torch_save(ckpt, _on_cpu(state))
            # after the checkpoint: a sweep's pruner may stop the trial here, and a later run resumes from this epoch
            progress(f"{task} validation", epoch + 1, cfg.epochs, {f"val_{evaluator.headline.name}": val})
    model.to(memory_format=torch.contiguous_format).eval()
    return history


def _why_not_finite(model: nn.Module, x: Any, updates: int, cfg: OptimConfig, evaluator: Any = None) -> str:
    """Why a loss is NaN or inf, and what to do: training that diverged (weights updated, a learning rate too high)
    and inputs that were never finite (the images, the model's weights, the teacher's logits) need different fixes.
    ``x`` is a batch's inputs as the task gives them (a tensor, or named tensors: a text batch's token ids), run
    through ``evaluator.forward`` when given."""
    floats = [t for t in (x.values() if isinstance(x, dict) else [x])
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not all(bool(torch.isfinite(t).all()) for t in floats):
        return "(the input batch holds NaN or inf); check the images and data.mean/std"
    broken = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if updates == 0:
        if broken is not None:
            return (f"before any weight update: the model's weight '{broken}' already holds NaN or inf, so its input "
                    "model (the previous stage's output or a weights file) is damaged, not the learning rate; "
                    "give it finite weights or rerun the stage that made it with --force")
        with torch.no_grad():
            out = evaluator.forward(model, x) if evaluator is not None else model(x)
        if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
            return ("before any weight update: the model's own outputs are NaN or inf on finite inputs; check the "
                    "model and data.mean/std (lowering optim.lr cannot help)")
        return ("before any weight update, with finite weights, inputs and outputs: the teacher's logits (soft "
                "targets) or feature hints are NaN or inf; check the teacher's weights (lowering optim.lr cannot help)")
    return (f"(training diverged after {updates} weight update(s)); lower this stage's optim.lr (now {cfg.lr:g}) or "
            "check data.mean/std")


def _batches(data: Batches, batch_size: int, epoch: int, fmt: torch.memory_format, shard: tuple[int, int],
             device: Device) -> Iterator[tuple[Any, Any]]:
    """The epoch's batches on ``device``: on a GPU copied from page-locked memory without blocking, so the host
    prepares the next batch while the GPU computes."""
    for x, y in data.train_batches(batch_size, epoch, shard=shard):
        if isinstance(x, torch.Tensor):
            x = x.contiguous(memory_format=fmt)
        if device.pin_memory:
            x, y = devices.pinned(x), devices.pinned(y)
        yield device.batch(x), device.batch(y)


def _on_cpu(obj: Any) -> Any:
    """A checkpoint's tensors on the CPU (nested dicts and lists), so it loads on a machine without the GPU that
    wrote it and its bytes do not depend on the device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """Drop per-epoch checkpoints once the stage's artifact is safely written."""
    if is_main_process():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
