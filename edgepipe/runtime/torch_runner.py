"""A PyTorch model behind the Runner protocol (see ``edgepipe.runtime.runner``), so it is timed like any runtime.

Inference runs under ``torch.inference_mode`` on the CPU, optionally inside ``torch.autocast`` (bf16 is
only worth measuring on CPUs with native bf16: AMX or AVX512-BF16; elsewhere it is emulated and slow).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepipe.engine.artifacts import Artifact
from edgepipe.errors import EdgepipeError
from edgepipe.host import host_cpu

_AUTOCAST_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


class TorchRunner:
    """Run an ``nn.Module`` on NumPy batches: eval mode, inference mode, a fixed thread count.

    Args:
        model: The module; it is put in eval mode.
        threads: Intra-op threads while inferring (None: PyTorch's current setting, recorded as is).
            The process-wide setting is changed only for the duration of each ``infer`` call.
        autocast_dtype: ``torch.bfloat16`` (or ``torch.float16``) to run under CPU autocast; None for fp32.
    """

    backend = "pytorch"

    def __init__(self, model: nn.Module, threads: int | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_NAMES:
            raise EdgepipeError(f"TorchRunner: autocast_dtype must be torch.bfloat16 or torch.float16, "
                                f"got {autocast_dtype}")
        self.model = model.eval()
        self.autocast_dtype = autocast_dtype
        self.threads = threads or torch.get_num_threads()
        self.device = f"cpu: {host_cpu()}"
        self.dtype = _AUTOCAST_NAMES.get(autocast_dtype, "fp32")

    @classmethod
    def from_artifact(cls, artifact: Artifact, threads: int | None = None,
                      autocast_dtype: torch.dtype | None = None) -> TorchRunner:
        """Rebuild a torch artifact's module (see ``edgepipe.models.load_torch_artifact``) and wrap it."""
        from edgepipe.models import load_torch_artifact

        return cls(load_torch_artifact(artifact), threads, autocast_dtype)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        previous = torch.get_num_threads()
        if previous != self.threads:
            torch.set_num_threads(self.threads)
        try:
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            with torch.inference_mode(), torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16,
                                                        enabled=self.autocast_dtype is not None):
                out = self.model(x)
            return out.float().numpy()
        finally:
            if previous != self.threads:
                torch.set_num_threads(previous)

    def __repr__(self) -> str:
        return f"TorchRunner({type(self.model).__name__}, dtype={self.dtype}, threads={self.threads})"

