"""Sizes and counts that must fit in memory, proven before anything is allocated or written.

A model kwarg such as ``width: 200000``, ``data.image_size: 100000`` or ``measure.throughput_batch: 1e9`` used to
fail mid-command with a MemoryError or an allocator traceback (after the run's config was rewritten, with a stage
left ``running``). Here each is refused with one line naming the field, the memory it would need and the memory
available: a registered architecture is built on the ``meta`` device (shapes only, no storage) to count its
parameters, and an input batch is sized from its shape. Only what is certain to fail is refused (the weights alone,
or the input batch alone, larger than the available memory), so no working config depends on the host's memory.

``check_models`` is called by edgepipe.engine.prepare.preflight before anything builds a model; edgepipe.data checks the
image sizes and batch sizes against the data it lists (``check_image_size``, ``check_batches``).
"""
from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgepipe.errors import EdgepipeError

if TYPE_CHECKING:
    from edgepipe.config import ModelSpec, PipelineConfig

TRAIN_FACTOR = 4
"""Copies of the weights a trained model holds at once: weights, gradients, SGD momentum, a checkpoint's copy."""
FLOAT_BYTES = 4


def available_memory() -> int:
    """Bytes of memory this process can still allocate (psutil's ``available``; /proc/meminfo without psutil)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: refuse nothing


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units (GiB and up keep one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:,.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} EiB"


def _culprit(spec: ModelSpec, field: str) -> str:
    """The kwarg most above the architecture's default (e.g. ``distill.student.kwargs.width``), else the kwargs."""
    from edgepipe.models.zoo import ARCHITECTURES

    try:
        defaults = {k: p.default for k, p in inspect.signature(ARCHITECTURES[spec.arch]).parameters.items()}
    except (KeyError, TypeError, ValueError):
        defaults = {}
    ratios = {k: v / defaults[k] for k, v in spec.kwargs.items()
              if isinstance(v, int | float) and not isinstance(v, bool) and isinstance(defaults.get(k), int | float)
              and not isinstance(defaults.get(k), bool) and defaults[k] > 0}
    worst = max(ratios, key=ratios.get, default=None)
    return f"{field}.kwargs.{worst}" if worst is not None and ratios[worst] > 1 else f"{field}.kwargs"


def meta_model(spec: ModelSpec, field: str) -> nn.Module:
    """The registered architecture ``spec`` names, built on the meta device (shapes, no storage); an architecture
    that rejects its kwargs (``width: -1``) is one line naming ``field``."""
    from edgepipe.models.zoo import ARCHITECTURES, build_arch

    part = "kwargs" if spec.arch in ARCHITECTURES else "arch"
    try:
        with torch.device("meta"):
            return build_arch(spec.arch, spec.kwargs)
    except EdgepipeError as e:
        raise EdgepipeError(f"{field}.{part}: {e}" + ("; fix the kwargs" if part == "kwargs" else "")) from None


def check_model(spec: ModelSpec, field: str, trains: bool) -> nn.Module | None:
    """Refuse a registered architecture whose weights (x TRAIN_FACTOR when it trains) exceed the available memory;
    return its meta-device model (None for a program or factory: their size is known only once built)."""
    if not spec.arch:
        return None
    model = meta_model(spec, field)
    count = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    need = count * FLOAT_BYTES * (TRAIN_FACTOR if trains else 1)
    have = available_memory()
    if need > have:
        what = (f"about {human_bytes(need)} to train (weights, gradients, optimizer state)" if trains
                else f"{human_bytes(need)} of float32 weights")
        name = _culprit(spec, field)
        raise EdgepipeError(f"{name}: {spec.arch} with kwargs {spec.kwargs} has {count:,} parameters, {what}, more "
                            f"than the {human_bytes(have)} of memory available; lower {name}")
    return model


def check_models(run: Any) -> None:
    """The models ``run``'s stages build, and ``prune.round_to`` against the widths of the model pruning takes.
    ``run`` is an edgepipe.engine.run.Run (typed Any: prepare imports this module, and no import goes back).
    """
    config, order = run.config, run.order
    teacher = check_model(config.teacher.model, "teacher.model",
                          trains="teacher" in order and config.teacher.train.epochs > 0)
    distill = "distill" in order and config.distill.enabled
    student = check_model(config.distill.student, "distill.student", trains=True) if distill else None
    if "prune" in order and config.prune.enabled and config.prune.round_to:
        pruned = student if distill else teacher
        if pruned is not None:
            check_round_to(config, pruned)


def check_round_to(config: PipelineConfig, model: nn.Module) -> None:
    """``prune.round_to`` keeps channel counts a multiple of it: at or above every prunable layer's width no channel
    can be removed (Torch-Pruning then reaches none of the ratio, which looked like the ratio's fault)."""
    pcfg = config.prune
    ignored = set(pcfg.ignore)
    widths = {n: m.out_channels for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d) and n not in ignored and not any(n.startswith(i + ".") for i in ignored)}
    if not widths:
        return
    widest = max(widths, key=widths.get)
    if pcfg.round_to >= widths[widest]:
        raise EdgepipeError(f"prune.round_to: {pcfg.round_to} is not below the channel count of any prunable layer "
                            f"(the widest, {widest}, has {widths[widest]}), so no channel can be removed; give a value "
                            f"below {widths[widest]} (e.g. {max(1, min(8, widths[widest] // 4))}) or remove "
                            "prune.round_to")


def check_input(field: str, images: int, shape: tuple[int, ...], advice: str, what: str = "a batch of") -> None:
    """Refuse ``images`` float32 images of ``shape`` that alone exceed the available memory."""
    need = images * math.prod(shape) * FLOAT_BYTES
    have = available_memory()
    if need > have:
        dims = "x".join(str(d) for d in shape)
        raise EdgepipeError(f"{field}: {what} {images:,} image(s) of {dims} takes {human_bytes(need)} as float32, more "
                            f"than the {human_bytes(have)} of memory available; {advice}")


def check_batches(config: PipelineConfig, train_size: int, val_size: int, shape: tuple[int, ...]) -> None:
    """Every batch a command cuts from the data (``shape``: one image as the models take it). Training and
    evaluation batches hold at most the split's images; timing batches are drawn at their full size."""
    data = config.data
    rows: list[tuple[str, int, str]] = [
        ("data.batch_size", min(data.batch_size, train_size), "lower data.batch_size"),
        ("data.eval_batch_size", min(data.eval_batch_size, val_size), "lower data.eval_batch_size"),
        ("measure.throughput_batch", config.measure.throughput_batch, "lower measure.throughput_batch (e.g. 32)"),
        ("qat.calibration_batches", min(config.qat.calibration_batches * data.batch_size, train_size),
         "lower qat.calibration_batches or data.batch_size"),
        *((f"bench.batch_sizes[{i}]", b, "lower it") for i, b in enumerate(config.bench.batch_sizes)),
    ]
    for field, images, advice in rows:
        check_input(field, images, shape, advice)

