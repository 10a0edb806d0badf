"""A strict fake CUDA GPU for machines without one (tests/test_device.py).

PyTorch here has no GPU, so nothing can really be moved to one. The fake keeps every tensor on the CPU but tracks
where the code *put* it, through the one place edgepipe moves anything (edgepipe.device: ``Device.module``,
``to_device``, ``module_device``, ``cpu_copy``, ``pinned``):

- a module given to ``Device.module`` is marked as on the GPU (a deep copy keeps the mark, as a copy of a CUDA
  module stays on CUDA; ``cpu_copy`` drops it);
- a tensor given to ``to_device(..., cuda)`` comes back as a marked copy (floats and integers alike), and a view of it
  (``x[0]``, what ``model(*x)`` passes) counts as marked too; ``to_device(..., cpu)`` drops the mark;
- ``module_device`` answers ``cuda:0`` for a marked module, so evaluation code that follows the model's device
  moves its batches as it would on a real GPU.

A global forward pre-hook then checks every top-level module call (one not made from inside another module's
forward) the way CUDA would: a module on the GPU must get GPU inputs and a CPU module CPU inputs. A stage that forgets
to place its teacher, its student or its batches fails exactly where it would on a real GPU. Anything that tries a
real ``.to("cuda")`` fails too, since this PyTorch sees no GPU.
"""
from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

MARK = "_edgepipe_fake_cuda"


@dataclass
class FakeGPU:
    name: str = "Fake GPU"
    capability: tuple[int, int] = (8, 0)
    count: int = 1
    calls: list[tuple[str, bool]] = field(default_factory=list)
    """(module class, on the GPU) of every top-level module call."""
    mismatches: list[str] = field(default_factory=list)
    pinned: int = 0

    def on_gpu(self) -> int:
        return sum(1 for _, gpu in self.calls if gpu)


def _marked(t: Any) -> bool:
    return bool(getattr(t, MARK, False)) or bool(getattr(getattr(t, "_base", None), MARK, False))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _fake_to_device(obj: Any, device: torch.device) -> Any:
    import edgepipe.device as devices

    gpu = torch.device(device).type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        if gpu == _marked(t):
            return t
        out = t.clone() if gpu else t.detach().clone()
        if gpu:
            setattr(out, MARK, True)
        return out
    return devices.map_tensors(obj, move)


@contextlib.contextmanager
def fake_gpu(monkeypatch: Any, gpu: FakeGPU | None = None) -> Iterator[FakeGPU]:
    """Make edgepipe see ``gpu`` (one 'Fake GPU' of compute capability 8.0 by default) and check every top-level
    module call for a device mismatch while the context is open."""
    import edgepipe.device as devices

    gpu = gpu or FakeGPU()
    props = types.SimpleNamespace(name=gpu.name, major=gpu.capability[0], minor=gpu.capability[1],
                                  total_memory=80 * 2**30)
    monkeypatch.setattr(devices, "cuda_count", lambda: gpu.count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)

    def module(self: devices.Device, model: nn.Module) -> nn.Module:
        if self.is_cuda:
            setattr(model, MARK, True)
        else:
            model.__dict__.pop(MARK, None)
        return model

    def cpu_copy(model: nn.Module) -> nn.Module:
        out = copy.deepcopy(model)
        out.__dict__.pop(MARK, None)
        return out

    def pinned(obj: Any) -> Any:
        gpu.pinned += 1
        return obj

    monkeypatch.setattr(devices.Device, "module", module)
    monkeypatch.setattr(devices.Device, "synchronize", lambda self: None)
    monkeypatch.setattr(devices, "to_device", _fake_to_device)
    monkeypatch.setattr(devices, "module_device",
                        lambda m: torch.device("cuda", 0) if _marked(m) else torch.device("cpu"))
    monkeypatch.setattr(devices, "cpu_copy", cpu_copy)
    monkeypatch.setattr(devices, "pinned", pinned)

    depth = [0]

    def pre(module: nn.Module, args: tuple) -> None:
        depth[0] += 1
        if depth[0] != 1:
            return
        inputs = list(_tensors(args))
        if not inputs:
            return
        on_gpu = _marked(module)
        gpu.calls.append((type(module).__name__, on_gpu))
        wrong = [t for t in inputs if _marked(t) != on_gpu and t.dim() > 0]
        if wrong:
            where = "cuda:0" if on_gpu else "cpu"
            gpu.mismatches.append(f"{type(module).__name__} on {where} called with an input on "
                                  f"{'cpu' if on_gpu else 'cuda:0'} (shape {tuple(wrong[0].shape)})")

    def post(module: nn.Module, args: tuple, out: Any) -> None:
        depth[0] -= 1

    hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
             nn.modules.module.register_module_forward_hook(post, always_call=True)]
    try:
        yield gpu
    finally:
        for h in hooks:
            h.remove()
