"""The measurement service the engine hands a stage (``StageContext.measure``).

A stage never measures its own artifact (the engine does, the same way for every stage), but a few stages
decide by a measurement: latency-constrained pruning times its candidates, and QAT under an accuracy
budget times the INT8, mixed and float variants. They ask this service, which the engine binds to the
run's target and ``measure`` settings, so every such figure is taken the way the engine takes its own
(edgepipe.measure.figures) and no stage imports the measurement code or picks its own conditions.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from edgepipe.config import MeasureConfig
    from edgepipe.profiles import HardwareProfile
    from edgepipe.types import DType


class Measurement:
    """Batch-1 latency of torch models on the target's own backend, bound to one profile and ``measure`` config."""

    def __init__(self, profile: HardwareProfile, cfg: MeasureConfig) -> None:
        self.profile, self.cfg = profile, cfg

    def candidate_latency(self, model: nn.Module, input_shape: tuple[int, ...], workdir: Path, rounds: int = 3,
                          quantized: bool = False, float_dtype: DType | None = None) -> dict[str, Any]:
        """One model compiled for the target and timed (edgepipe.measure.figures.candidate_latency)."""
        from edgepipe.measure.figures import candidate_latency

        return candidate_latency(model, input_shape, self.profile, self.cfg, workdir, rounds=rounds,
                                 quantized=quantized, float_dtype=float_dtype)

    def candidate_latencies(self, candidates: list[tuple[nn.Module, bool, DType | None]], input_shape: tuple[int, ...],
                            workdir: Path, rounds: int = 3) -> list[dict[str, Any]]:
        """Several ``(model, quantized, float_dtype)`` to compare, timed in alternating rounds
        (edgepipe.measure.figures.candidate_latencies)."""
        from edgepipe.measure.figures import candidate_latencies

        return candidate_latencies(candidates, input_shape, self.profile, self.cfg, workdir, rounds=rounds)
