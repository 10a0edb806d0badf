"""What a task is: the one place that knows what a model of some kind takes, returns, learns from and is scored on.

The engine, the stages and the backends speak of named tensors (``edgepipe.runtime.runner``), a headline metric
with a direction (``Metric``) and artifacts; a ``Task`` says what those are for its kind of model:

- **data**: what a batch holds (``feeds``: a batch's model inputs as named arrays; the targets stay the task's own:
  class labels, lists of boxes, token labels) and how the splits are loaded (``load_data``);
- **I/O**: the ONNX input and output names, dtypes and dynamic axes (``inputs``/``outputs``), example inputs for
  export (``example_inputs``) and for timing (``timing_inputs``);
- **training**: how a model is called on a batch (``forward``), the loss on labels (``loss``), what distillation
  compares and its loss (``distill_loss``), the headline on the validation split during training (``val_score``);
- **checks and scores**: the output check a model must pass before training (``check_outputs``), the metrics
  computed from runner outputs (``metrics``: the headline, secondary metrics, per-class breakdown), the export
  check against PyTorch (``export_check``), the paired fidelity test between two runtimes on the same data
  (``fidelity``), the layers pruning must leave alone (``protected_layers``), what the device script evaluates
  (``device_metric``), and the report's columns (``Metric.label`` and ``unit``).

A task is one module: subclass ``Task``, decorate it with ``edgepipe.tasks.register``; a module in
``edgepipe/tasks/`` is found by name. ``edgepipe.tasks.classification`` is the reference implementation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgepipe.tasks.metric import Metric

if TYPE_CHECKING:
    from edgepipe.config import PipelineConfig
    from edgepipe.data.batches import Batches
    from edgepipe.runtime.runner import TensorSpec


class Task(ABC):
    """One kind of model (see the module docstring for what each member is for)."""

    name: ClassVar[str]
    headline: ClassVar[Metric]
    """The metric every comparison uses."""
    secondary: ClassVar[tuple[Metric, ...]] = ()
    distill_losses: ClassVar[tuple[str, ...]] = ("kd",)
    """The soft terms ``distill_loss`` offers (``distill.loss``); the first is the default."""
    data_kinds: ClassVar[tuple[str, ...]] = ()
    """``data.kind`` values this task is the default for (when the config names no ``task``)."""
    device_metric: ClassVar[str | None] = None
    """The metric a TensorRT deploy bundle's device script computes on the device (None: not on the device)."""
    exportable: ClassVar[bool] = True
    """Its models export to ONNX (``Task.inputs``/``outputs``), so every stage is timed on the target's runtime. False:
    a torch stage is measured in PyTorch only (its latency the eager model's on the host, labelled so) and no stage
    is compared on the target (the gain check)."""

    def exports(self, model: nn.Module) -> bool:
        """Whether this model exports to ONNX (``exportable`` for every model of the task, unless the task says per
        model: a detector whose post-processing is not a graph is measured in PyTorch alone)."""
        return self.exportable

    def device_validation(self, data: Batches, limit: int) -> tuple[dict[str, np.ndarray], Any]:
        """The bundle's ``val.npz`` (the first ``limit`` validation images for the device script) and those images'
        targets, one per image (sliced into batches as ``metrics`` takes them)."""
        from edgepipe.backends.tensorrt_plan import validation_arrays

        arrays = validation_arrays(*data.val_head(limit), data.mean.numpy(), data.std.numpy(), limit)
        return arrays, arrays["labels"]

    def check_stage(self, config: PipelineConfig, stage: str) -> None:
        """Refuse, with one line, a stage (or a setting of it) this task cannot do, before the engine records anything
        for that stage (the stages before it stay done, and the run resumes there); default: nothing to refuse."""

    # --- data ------------------------------------------------------------------------------------------------
    def load_data(self, config: PipelineConfig) -> Batches | None:
        """The configured splits, served in seeded batches of ``(inputs, targets)``; None (this default): the data
        ``data.kind`` names, as ``edgepipe.data.loading.run_data`` loads it (``edgepipe.tasks.task_data``)."""
        return None

    def feeds(self, x: Any) -> dict[str, np.ndarray]:
        """A batch's model inputs (as ``Batches`` yields them) as named arrays for a runner."""
        return {self.inputs({})[0].name: np.ascontiguousarray(np.asarray(x, dtype=np.float32))}

    def val_feeds(self, data: Batches, batch_size: int) -> Any:
        """The validation split as ``(feeds, targets)`` pairs for ``edgepipe.runtime.runner.run_batches``."""
        for x, y in data.val_numpy(batch_size):
            yield self.feeds(x), y

    # --- I/O ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def inputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        """The model's inputs: ONNX names, dtypes, shapes with named dynamic axes (``meta``: an artifact's meta,
        ``input_shape`` and ``num_classes``, empty when only the names are needed)."""

    @abstractmethod
    def outputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        """The model's outputs, in the order its ``forward`` returns them."""

    def dynamic_dims(self, meta: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
        """The (min, opt, max) of each named input axis after the batch that varies at run time (a text model's
        sequence), for runtimes that build for a range (TensorRT optimization profiles); default: none."""
        return {}

    def example_inputs(self, meta: Mapping[str, Any], batch: int) -> tuple[torch.Tensor, ...]:
        """Positional example inputs for export and for the output check (zeros of the input specs)."""
        return tuple(torch.zeros(batch, *spec.shape[1:], dtype=getattr(torch, spec.dtype))
                     for spec in self.inputs(meta))

    def timing_inputs(self, meta: Mapping[str, Any], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs a latency is measured on (recorded with it: ``Latency.inputs``)."""
        from edgepipe.runtime.runner import example_feeds

        return example_feeds(self.inputs(meta), batch, seed)

    # --- training ----------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, x: Any) -> Any:
        """Call ``model`` on a training or validation batch's inputs."""
        return model(x)

    def train_loss(self, model: nn.Module, x: Any, y: Any) -> dict[str, torch.Tensor]:
        """One training batch's supervised loss (``loss`` of ``forward``); a task whose models compute their own loss
        from the targets in training mode (torchvision's detectors) overrides it."""
        return self.loss(self.forward(model, x), y)

    @abstractmethod
    def loss(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        """The supervised loss: ``{"loss": total, "hard": detached total, <component>: ...}``."""

    @abstractmethod
    def distill_loss(self, student: Any, teacher: Any, targets: Any, temperature: float, alpha: float,
                     method: str = "kd", weights: tuple[float, ...] = ()) -> dict[str, torch.Tensor]:
        """Distillation against the teacher's outputs: ``{"loss", "soft", "hard", <component>...}`` (soft: the
        teacher term); ``method`` one of ``distill_losses`` with its ``weights`` (dkd: TCKD's and NCKD's)."""

    def distiller(self, teacher: nn.Module, student: nn.Module, temperature: float, alpha: float, beta: float,
                  example: torch.Tensor) -> nn.Module | None:
        """Distillation that is not a comparison of outputs (``distill_loss``): a module whose parameters train with
        the student (adapters) and whose ``step`` is the ``loss_step``, ``record()`` what it did and ``remove()`` its
        hooks. None (this default): ``distill_loss`` on the teacher's outputs, with the configured feature hints."""
        return None

    @abstractmethod
    def val_score(self, model: nn.Module, data: Batches, batch_size: int) -> float:
        """The headline metric of ``model`` on the validation split in PyTorch (each training epoch)."""

    # --- checks and scores -------------------------------------------------------------------------------------
    @abstractmethod
    def check_outputs(self, out: Any, field: str, meta: Mapping[str, Any], batch: int) -> None:
        """Raise ``EdgepipeError`` naming ``field`` when a model's output for a batch of ``batch`` is not what this
        task's models return."""

    @abstractmethod
    def metrics(self, outputs: Mapping[str, np.ndarray], targets: list[Any],
                class_names: list[str] | None = None) -> dict[str, Any]:
        """Scores from a runner's outputs over the validation split: ``{headline.name: value, "samples": n,
        <secondary>: ..., "per_class": {...} (optional)}``; a score is a float."""

    def score_outputs(self, outputs: list[Any], targets: list[Any]) -> float:
        """The headline metric of a PyTorch model's outputs over a few batches (``outputs[i]`` for ``targets[i]``): the
        accuracy budget's measure (``qat.max_drop``). Default: the outputs named as ``outputs`` names them, scored by
        ``metrics``."""
        names = [s.name for s in self.outputs({})]
        named: dict[str, list[np.ndarray]] = {}
        for out in outputs:
            values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else (out,)
            for name, value in zip(names, values):
                named.setdefault(name, []).append(value.detach().float().numpy())
        arrays = {k: np.concatenate(v) for k, v in named.items()}
        return float(self.metrics(arrays, [np.asarray(t) for t in targets])[self.headline.name])

    def export_check(self, model: nn.Module, onnx_bytes: bytes, data: Batches, batch_size: int, quantized: bool,
                     tolerance: float, min_agreement: float, threads: int | None = None) -> dict[str, Any] | None:
        """PyTorch's outputs against the exported ONNX's on the validation split; raise EdgepipeError when the graph
        does not compute what the model does. None (this default): the engine's generic check of every named output
        (``edgepipe.export.check.compare_outputs``); a task with a sharper test overrides it."""
        return None

    @abstractmethod
    def fidelity(self, reference: Mapping[str, np.ndarray], compiled: Mapping[str, np.ndarray], targets: list[Any],
                 limit: float) -> dict[str, Any]:
        """A paired test of a compiled model against the reference runtime on the same data: at least
        ``drop_points`` (headline points lost), ``max_drop_points`` (= ``limit``), ``fails`` and ``test``."""

    def graph_core(self, model: nn.Module) -> nn.Module:
        """The part of ``model`` that is one tensor graph: what structured pruning traces and changes and QAT
        quantizes (default: all of it)."""
        return model

    def protected_layers(self, model: nn.Module, meta: Mapping[str, Any]) -> list[nn.Module]:
        """Layers structured pruning must leave whole (their outputs are the task's outputs)."""
        return []

    def calibration_samples(self, data: Any, n: int) -> tuple[Any, dict[str, Any]]:
        """What post-training quantization (the ptq baseline) calibrates on: ``n`` un-augmented training samples (an
        array, one sample per row), and the keyword arguments that tell the backend how to quantize this task's
        models (``post_training_quantize``'s)."""
        return data.calibration_batches(1, n)[0].numpy(), {}

    def prune_example(self, meta: Mapping[str, Any], input_shape: tuple[int, ...]) -> Any:
        """The input structured pruning traces its dependency graph with and counts MACs at (batch 1)."""
        return torch.zeros(1, *input_shape)

    def prune_structure(self, model: nn.Module, data: Any, pcfg: Any, example: Any, importance: Any
                        ) -> tuple[list[nn.Module], dict[str, Any] | None]:
        """Structures the model's kind removes before channels are pruned to the target (a transformer's vocabulary
        and attention heads): the layers the channel pruner must not take as roots, and what was done (None:
        nothing, this default). ``prune.heads`` and ``prune.vocabulary`` belong to text."""
        if pcfg.heads > 0 or pcfg.vocabulary != "keep":
            from edgepipe.errors import EdgepipeError

            raise EdgepipeError(f"prune.{'heads' if pcfg.heads > 0 else 'vocabulary'}: attention heads and a "
                                f"vocabulary are pruned for task text, not {self.name}; leave it at its default")
        return [], None
