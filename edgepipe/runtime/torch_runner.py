"""A PyTorch model behind the Runner protocol (see ``edgepipe.runtime.runner``), so it is timed like any runtime.

Inference runs under ``torch.inference_mode`` on the CPU (or the device given: a CUDA GPU evaluates in exact fp32,
TF32 off, and every call ends with the outputs copied back, so a timing covers the GPU's work), optionally inside
``torch.autocast`` (bf16 is only worth measuring on CPUs with native bf16: AMX or AVX512-BF16; elsewhere it is
emulated and slow).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepipe import device as devices
from edgepipe.engine.artifacts import Artifact
from edgepipe.errors import EdgepipeError
from edgepipe.host import host_cpu
from edgepipe.runtime.runner import RunnerBase

_AUTOCAST_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


class TorchRunner(RunnerBase):
    """Run an ``nn.Module`` on named NumPy inputs: eval mode, inference mode, a fixed thread count.

    Args:
        model: The module; it is put in eval mode.
        threads: Intra-op threads while inferring (None: PyTorch's current setting, recorded as is).
            The process-wide setting is changed only for the duration of each ``infer`` call.
        autocast_dtype: ``torch.bfloat16`` (or ``torch.float16``) to run under CPU autocast; None for fp32.
        input_names: The model's positional inputs, in order (the task's ONNX input names).
        output_names: Names of the model's outputs: a tensor is the first name, a tuple/list is named in order,
            a dict keeps its own keys (the task's ONNX output names).
        device: An ``edgepipe.device.Device`` to run on (None: the CPU); the model is moved there.
    """

    backend = "pytorch"

    def __init__(self, model: nn.Module, threads: int | None = None,
                 autocast_dtype: torch.dtype | None = None, input_names: tuple[str, ...] = ("input",),
                 output_names: tuple[str, ...] = ("logits",), device: Any = None) -> None:
        if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_NAMES:
            raise EdgepipeError(f"TorchRunner: autocast_dtype must be torch.bfloat16 or torch.float16, "
                                f"got {autocast_dtype}")
        self.on = device.torch if device is not None else torch.device("cpu")
        self.model = (device.module(model) if device is not None else model).eval()
        self.autocast_dtype = autocast_dtype
        self.threads = threads or torch.get_num_threads()
        self.device = f"cpu: {host_cpu()}" if device is None or not device.is_cuda else device.label
        self.dtype = _AUTOCAST_NAMES.get(autocast_dtype, "fp32")
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)

    @classmethod
    def from_artifact(cls, artifact: Artifact, threads: int | None = None,
                      autocast_dtype: torch.dtype | None = None, device: Any = None) -> TorchRunner:
        """Rebuild a torch artifact's module (see ``edgepipe.models.loading.load_torch_artifact``) and wrap it, named as
        its task names its inputs and outputs."""
        from edgepipe.models.loading import load_torch_artifact
        from edgepipe.tasks import task_of_artifact

        task = task_of_artifact(artifact)
        return cls(load_torch_artifact(artifact), threads, autocast_dtype,
                   tuple(s.name for s in task.inputs(artifact.meta)), tuple(s.name for s in task.outputs(artifact.meta)),
                   device)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        previous = torch.get_num_threads()
        if previous != self.threads:
            torch.set_num_threads(self.threads)
        try:
            # torch.from_numpy shares memory, as every runtime reads its input: float stays float32, ids int64
            args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self.input_names]
            if self.on.type != "cpu":
                args = [devices.to_device(a, self.on) for a in args]
            with torch.inference_mode(), _exact_fp32(self.on), \
                    torch.autocast(self.on.type, dtype=self.autocast_dtype or torch.bfloat16,
                                   enabled=self.autocast_dtype is not None):
                out = self.model(*args)
            return self.named(out)
        finally:
            if previous != self.threads:
                torch.set_num_threads(previous)

    def named(self, out: Any) -> dict[str, np.ndarray]:
        """The model's output(s) by name, floating ones as float32 (an autocast model returns bf16)."""
        if isinstance(out, Mapping):
            items = list(out.items())
        elif isinstance(out, (tuple, list)):
            if len(out) != len(self.output_names):
                raise EdgepipeError(f"TorchRunner: the model returns {len(out)} outputs, its task names "
                                    f"{len(self.output_names)} ({', '.join(self.output_names)})")
            items = list(zip(self.output_names, out))
        else:
            items = [(self.output_names[0], out)]
        return {k: (v.float() if v.is_floating_point() else v).cpu().numpy() for k, v in items}

    def __repr__(self) -> str:
        return f"TorchRunner({type(self.model).__name__}, dtype={self.dtype}, threads={self.threads}, {self.on})"


@contextlib.contextmanager
def _exact_fp32(device: torch.device) -> Iterator[None]:
    """On a CUDA GPU, fp32 convolutions and matmuls in fp32, not TF32 (PyTorch's default for cuDNN convolutions on
    Ampere and later): a measured score then matches the CPU's and the exported ONNX's to fp32 rounding."""
    if device.type != "cuda":
        yield
        return
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm

