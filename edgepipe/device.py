"""Where PyTorch runs: the ``device`` setting (``auto | cpu | cuda | cuda:N``) resolved against this machine, the
mixed-precision policy that follows from it, and moving models and batches there.

Every stage that runs PyTorch (training, distillation's teacher forward, pruning's graph work, QAT calibration,
evaluation) takes its device from ``Device``; nothing else in edgepipe calls ``.cuda()``. Artifacts and checkpoints are
always written with CPU tensors and read with ``map_location="cpu"``, so a run moves between machines with and
without a GPU.

The CUDA facts come from PyTorch itself (``torch.cuda.is_available``, ``device_count``, ``get_device_properties``),
read once per process; the tests replace those functions to fake a GPU (tests/test_device.py).
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgepipe.errors import EdgepipeError

SETTINGS = "auto | cpu | cuda | cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """One resolved device: what tensors are moved to, and what the records say about it."""

    torch: torch.device
    name: str
    """The GPU's name (``torch.cuda.get_device_properties``) or the host CPU's model."""
    setting: str
    """The config's value it was resolved from (``auto``, ``cuda``...)."""
    capability: tuple[int, int] | None = None
    """CUDA compute capability (major, minor); None on the CPU."""
    memory_gib: float | None = None

    @property
    def type(self) -> str:
        return self.torch.type

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"

    @property
    def label(self) -> str:
        """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (Intel Xeon ...)``: written next to every figure."""
        return f"{self.torch} ({self.name})"

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"device": str(self.torch), "name": self.name, "setting": self.setting}
        if self.is_cuda:
            d.update(capability=".".join(map(str, self.capability or ())), memory_gib=self.memory_gib,
                     cuda=torch.version.cuda)
        return d

    def module(self, model: nn.Module) -> nn.Module:
        """``model`` (its parameters and buffers) on this device, in place; returned for chaining."""
        return model.to(self.torch)

    def batch(self, obj: Any) -> Any:
        """A batch (a tensor, or tuples/lists/dicts of them) on this device; copies from pinned memory do not
        block the host (``non_blocking``), so the next batch is prepared while this one is copied."""
        return to_device(obj, self.torch)

    @property
    def pin_memory(self) -> bool:
        """Whether loaders should hand out page-locked batches (only a GPU copies from them faster)."""
        return self.is_cuda

    def synchronize(self) -> None:
        """Wait for the GPU's queued work (before reading a clock); nothing on the CPU."""
        if self.is_cuda:
            torch.cuda.synchronize(self.torch)

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
        return torch.autocast(self.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor in ``obj`` (nested tuples, named tuples, lists, dicts); other values as they
    are. A batch's targets come in any of these forms (a detector's: a list of dicts of tensors)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [map_tensors(v, fn) for v in obj]
        return type(obj)(moved) if not hasattr(obj, "_fields") else type(obj)(*moved)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors in ``obj`` moved to ``device`` (without blocking the host on a GPU); other values as they are."""
    return map_tensors(obj, lambda t: t if t.device == device else t.to(device, non_blocking=device.type == "cuda"))


def pinned(obj: Any) -> Any:
    """``obj``'s CPU tensors in page-locked memory (a no-op without a usable GPU)."""
    return map_tensors(obj, lambda t: t.pin_memory() if t.device.type == "cpu" else t)


def cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU (the original stays where it is): what is exported or timed on the host."""
    import copy

    return copy.deepcopy(model).cpu()


def module_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives (its first parameter or buffer; the CPU for a module with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def parse(setting: str, field: str = "device") -> tuple[str, int | None]:
    """``(kind, index)`` of a device setting; one clear line for anything else."""
    m = _PATTERN.match(str(setting).strip().lower())
    if not m or (m.group(1) != "cuda" and m.group(2) is not None):
        raise EdgepipeError(f"{field}: {setting!r} is not a device; give one of {SETTINGS} (e.g. cuda:0)")
    return m.group(1), int(m.group(2)) if m.group(2) is not None else None


def cuda_count() -> int:
    """CUDA GPUs PyTorch can use here (0 without a CUDA build, a driver or a GPU)."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError):  # a broken driver: as good as none, said in the error below
        return 0


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA (a CPU-only wheel); install a CUDA build of PyTorch"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "CUDA_VISIBLE_DEVICES is empty, which hides every GPU; unset it"
    return (f"PyTorch (CUDA {torch.version.cuda}) finds no usable GPU (torch.cuda.is_available() is False); check "
            "nvidia-smi and the driver")


def _cuda_device(index: int, setting: str) -> Device:
    props = torch.cuda.get_device_properties(index)
    return Device(torch.device("cuda", index), str(props.name), setting, (int(props.major), int(props.minor)),
                  round(props.total_memory / 2**30, 1))


def cpu_device(setting: str = "cpu") -> Device:
    from edgepipe.host import host_cpu

    return Device(torch.device("cpu"), host_cpu(), setting)


def resolve(setting: str = "auto", *, local_rank: int | None = None, local_world: int = 1,
            field: str = "device") -> Device:
    """The device ``setting`` means on this machine.

    ``auto``: the GPU when PyTorch sees one, else the CPU. ``cuda``: the GPU (an error without one). ``cuda:N``: that
    GPU (an error when it does not exist). Under torchrun (``local_rank`` given, ``local_world`` processes on this
    node) each process takes GPU ``local_rank``: more processes than GPUs, or a fixed ``cuda:N`` shared by several
    processes, is one clear error (two processes on one GPU contend for its memory and NCCL refuses them)."""
    kind, index = parse(setting, field)
    count = cuda_count()
    if kind == "cpu" or (kind == "auto" and count == 0):
        return cpu_device(setting)
    if count == 0:
        raise EdgepipeError(f"{field}: {setting}: no CUDA GPU here: {_why_no_cuda()}; or set {field}: auto (or cpu) "
                            "to train on the CPU")
    if index is not None and index >= count:
        names = ", ".join(f"cuda:{i} ({torch.cuda.get_device_properties(i).name})" for i in range(count))
        raise EdgepipeError(f"{field}: {setting}: no such GPU; this machine has {count} ({names}); give an index "
                            f"below {count}")
    if local_rank is not None and local_world > 1:
        if index is not None:
            raise EdgepipeError(f"{field}: {setting}: torchrun started {local_world} processes on this node and "
                                f"{setting} would put them all on one GPU; use {field}: cuda (or auto), and each "
                                "process takes the GPU of its LOCAL_RANK")
        if local_world > count:
            raise EdgepipeError(f"torchrun started {local_world} processes on this node, which has {count} CUDA "
                                f"GPU(s): one process per GPU; give --nproc-per-node={count} (or {field}: cpu to "
                                "train on the CPU)")
    if local_rank is not None and index is None:
        index = local_rank
    return _cuda_device(index or 0, setting)


# --- mixed precision ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """What a training loop runs its forward passes in: an autocast dtype (None: fp32) and whether the loss is
    scaled (``torch.amp.GradScaler``; fp16 only, whose gradients underflow without it)."""

    dtype: torch.dtype | None
    scaler: bool = False

    @property
    def label(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off")


def gpu_has_bf16(capability: tuple[int, int] | None) -> bool:
    """Ampere (compute capability 8.0) and later run bf16 in their tensor cores; earlier GPUs (Volta, Turing) do not
    (the rule torch.cuda.is_bf16_supported applies on CUDA 11+)."""
    return capability is not None and capability >= (8, 0)


def precision(device: Device, setting: str, field: str = "optim.autocast") -> Precision:
    """The autocast a training stage runs, from its ``optim.autocast`` (auto | bf16 | fp16 | off) and the device.

    CPU: bf16 where the CPU runs it natively (AMX / AVX512-BF16) on ``auto``, as before; fp16 is refused (CPU fp16
    autocast is emulated: slower than fp32). GPU: ``auto`` is bf16 where the GPU has it (no loss scaling needed: bf16
    keeps fp32's range), else fp16 with a gradient scaler."""
    if setting == "off":
        return Precision(None)
    if not device.is_cuda:
        from edgepipe.host import host_has_native_bf16

        if setting == "fp16":
            raise EdgepipeError(f"{field}: fp16 autocast needs a CUDA device (this stage trains on {device.label}, "
                                "where fp16 is emulated and slower than fp32); use auto, bf16 or off")
        return Precision(torch.bfloat16 if setting == "bf16" or host_has_native_bf16() else None)
    bf16 = gpu_has_bf16(device.capability)
    if setting == "bf16" and not bf16:
        cap = ".".join(map(str, device.capability or ()))
        raise EdgepipeError(f"{field}: bf16: {device.label} (compute capability {cap}) has no bf16; use fp16 or auto "
                            "(fp16 with a gradient scaler)")
    if setting == "bf16" or (setting == "auto" and bf16):
        return Precision(torch.bfloat16)
    return Precision(torch.float16, scaler=True)


# --- CUDA out of memory ------------------------------------------------------------------------------------------


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "CUDA out of memory" in str(error)


def out_of_memory_line(stage: str, device: Device | None, batch_size: int, eval_batch_size: int,
                       where: str = "") -> str:
    """One line for a CUDA out-of-memory error: the stage, the device, the batch sizes and what to lower."""
    on = f" on {device.label}" + (f", {device.memory_gib:g} GiB" if device and device.memory_gib else "") \
        if device is not None else ""
    return (f"{stage}: CUDA out of memory{on}{where} with data.batch_size {batch_size} (data.eval_batch_size "
            f"{eval_batch_size}); lower data.batch_size (evaluation: data.eval_batch_size), or use a smaller model, "
            "then run the same command again: the stage resumes from its last finished epoch")
