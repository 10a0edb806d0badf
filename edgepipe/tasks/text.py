"""Text classification: token ids in (``input_ids``, ``attention_mask`` and, where the model has them,
``token_type_ids``: int64 [N, L], L dynamic), one ``logits`` [N, classes] out.

The models are Hugging Face sequence classifiers (``model: {hf: FOLDER}``, ``edgepipe.models.hf``); the data is
labelled sentences tokenised with the model folder's own tokenizer (``edgepipe.data.text``). What a sentence is
scored by is what an image is: accuracy (top-1), per-class accuracy, the same loss (cross-entropy), the same
distillation of logits (KD at temperature T, or DKD), the same export check (PyTorch's logits against ONNX Runtime's)
and the same fidelity test between two runtimes (exact McNemar on the sentences exactly one of them gets right), so
those are the classification task's functions, called on token batches.

What is text's own: the inputs (three named integer tensors whose sequence axis is dynamic), the data (files,
tokenizer, dynamic padding), latency inputs (random in-vocabulary ids at a stated sequence length) and the device's
validation set (token ids, so the device needs no tokenizer).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.runtime.runner import TensorSpec
from edgepipe.tasks import register
from edgepipe.tasks.classification import Classification, evaluate
from edgepipe.tasks.metric import Metric

if TYPE_CHECKING:
    from edgepipe.config import PipelineConfig
    from edgepipe.data.batches import Batches

log = logging.getLogger(__name__)
ACCURACY = Metric("top1", "accuracy")
"""The headline: the share of sentences classified right (named top1 as classification's, so every report, sweep and
claim that reads a top-1 reads it)."""
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SAFE_IDS = (5, 30)
"""Token ids example and timing inputs are drawn from: past BERT's special tokens ([PAD] [UNK] [CLS] [SEP] [MASK] in
the first five of the embedded vocabulary) and inside any BERT-family vocabulary; a latency does not depend on which
ids a sentence holds, only on its length."""
TIMING_SEQUENCE = 128
"""The sequence length latency is measured at unless the data's max_length is shorter (the issue's batch-1 figure)."""


def input_names(meta: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(meta.get("input_names") or INPUTS)


@register
class TextClassification(Classification):
    name = "text"
    headline = ACCURACY
    data_kinds = ("text", "text-synthetic")
    device_metric = "top1"
    secondary = ()

    def check_stage(self, config: PipelineConfig, stage: str) -> None:
        st = config.soft_targets
        if stage == "distill" and config.distill.feature_pairs:
            raise EdgepipeError("distill.feature_pairs: feature hints (FitNets adapters) are built for image layers; "
                                "task text distils hidden states and attention with distill.beta alone: remove "
                                "distill.feature_pairs")
        if stage in ("distill", "prune", "qat", "finetune") and (st.runtime != "torch" or st.cache):
            raise EdgepipeError("soft_targets: task text computes the teacher's logits in PyTorch for each batch "
                                "(runtime: torch, cache: false); the OpenVINO runtime and the logits cache take image "
                                "batches")
        if stage == "prune" and config.prune.enabled and config.prune.target == "latency":
            raise EdgepipeError("prune.target: latency-targeted pruning times image candidates; for task text give "
                                "prune.target: params (embeddings included) or macs")

    # --- data ------------------------------------------------------------------------------------------------
    def load_data(self, config: PipelineConfig) -> Batches:
        from edgepipe.data.text_loading import load_text_data

        return load_text_data(config)

    def feeds(self, x: Any) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(np.asarray(v, dtype=np.int64)) for k, v in x.items()}

    def val_feeds(self, data: Batches, batch_size: int) -> Any:
        for x, y in data.val_numpy(batch_size):
            yield self.feeds(x), y

    def device_validation(self, data: Batches, limit: int) -> tuple[dict[str, np.ndarray], Any]:
        """The first ``limit`` validation sentences as token ids padded to data.max_length (int32, with their
        attention mask), so the device script needs no tokenizer."""
        x, labels = data.val_head(limit)
        arrays = {k: v.astype(np.int32) for k, v in x.items()}
        arrays["labels"] = labels.astype(np.int64)
        return arrays, labels

    # --- I/O ---------------------------------------------------------------------------------------------------
    def inputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(n, "int64", ("batch", "sequence")) for n in input_names(meta))

    def dynamic_dims(self, meta: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
        """The sequence length: 1 to data.max_length, tuned for the length latency is stated at (128, or max_length
        when shorter)."""
        longest = int((meta.get("input_shape") or [TIMING_SEQUENCE])[0])
        return {"sequence": (1, min(TIMING_SEQUENCE, longest), longest)}

    def example_inputs(self, meta: Mapping[str, Any], batch: int) -> tuple[torch.Tensor, ...]:
        """A batch of 8-token sentences of in-vocabulary ids (never all padding: a fully masked row is not a
        sentence), the last two of the second row padded, so export traces a mask that is used."""
        length = 8
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(*SAFE_IDS, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.int64)
        if batch > 1:
            mask[1, -2:] = 0
        types = torch.zeros(batch, length, dtype=torch.int64)
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return tuple(out[n] for n in input_names(meta))

    def timing_inputs(self, meta: Mapping[str, Any], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random in-vocabulary ids at ``timing_sequence`` tokens (default data.max_length, at most 128), every token
        attended: a full-length sentence, the shape the latency is stated at."""
        length = int(meta.get("timing_sequence") or min(TIMING_SEQUENCE, int((meta.get("input_shape") or [128])[0])))
        rng = np.random.default_rng(seed)
        feeds = {"input_ids": rng.integers(*SAFE_IDS, (batch, length), dtype=np.int64),
                 "attention_mask": np.ones((batch, length), dtype=np.int64),
                 "token_type_ids": np.zeros((batch, length), dtype=np.int64)}
        return {n: feeds[n] for n in input_names(meta)}

    def distiller(self, teacher: nn.Module, student: nn.Module, temperature: float, alpha: float, beta: float,
                  example: Any) -> nn.Module | None:
        """With ``beta > 0``: logits KD plus hidden-state and attention distillation (``edgepipe.training.text_kd``);
        otherwise None (logits KD through the soft targets)."""
        if beta <= 0:
            return None
        from edgepipe.training.text_kd import TextDistiller

        return TextDistiller(teacher, student, self, temperature, alpha, beta)

    def calibration_samples(self, data: Any, n: int) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
        """``n`` training sentences, each its own feed at its own length (no padding), quantized with NNCF's
        transformer scheme."""
        samples = []
        for batch in data.calibration_batches(1, n):
            lengths = batch["attention_mask"].sum(1).tolist()
            for i, length in enumerate(lengths):
                samples.append({k: np.ascontiguousarray(v[i:i + 1, :int(length)].numpy().astype(np.int64))
                                for k, v in batch.items()})
        return samples[:n], {"transformer": True, "what": "un-augmented training sentences (each at its own length)"}

    # --- pruning -----------------------------------------------------------------------------------------------
    def prune_example(self, meta: Mapping[str, Any], input_shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """One sentence of the timing length (128 tokens, or data.max_length when shorter), every token attended:
        MACs are counted at the length latency is stated at."""
        feeds = self.timing_inputs({**meta, "input_shape": list(input_shape)}, 1)
        return tuple(torch.from_numpy(feeds[n]) for n in input_names(meta))

    def prune_structure(self, model: nn.Module, data: Any, pcfg: Any, example: Any, importance: Any
                        ) -> tuple[list[nn.Module], dict[str, Any] | None]:
        """The vocabulary trimmed and whole attention heads removed (``edgepipe.models.hf_pruning``)."""
        from edgepipe.models.hf_pruning import prepare

        return prepare(model, data, pcfg, example, importance)

    # --- training ----------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, x: Any) -> Any:
        if isinstance(x, Mapping):
            names = getattr(model, "input_names", None) or [n for n in INPUTS if n in x]
            return model(*(x[n] for n in names))
        return model(x)

    def val_score(self, model: nn.Module, data: Batches, batch_size: int) -> float:
        return evaluate(model, data, batch_size, forward=self.forward)

    def check_outputs(self, out: Any, field: str, meta: Mapping[str, Any], batch: int) -> None:
        n = meta["num_classes"]
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape != (batch, n):
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise EdgepipeError(f"{field}: returns {shape} for a batch of {batch} sentences; a text classifier returns "
                                f"logits [N, {n}] (the data has {n} classes)")

    def export_check(self, model: nn.Module, onnx_bytes: bytes, data: Batches, batch_size: int, quantized: bool,
                     tolerance: float, min_agreement: float, threads: int | None = None) -> dict[str, Any] | None:
        """The engine's check of every named output (fed through ``val_feeds``), not classification's image one."""
        return None
