"""Structured pruning of a Hugging Face BERT-family classifier (``prune`` with task text), with Torch-Pruning.

Three structures, each removed whole so the result is a smaller dense model that every runtime runs as is:

- **vocabulary** (``prune.vocabulary: trim``): the word embeddings of ids the training data never produces
  (``edgepipe.models.hf.trim_vocabulary``); first, because it is the largest cut and needs no ranking.
- **attention heads** (``prune.heads``: the share of each layer's heads): ranked by the importance criterion over
  each head's query/key/value rows and the attention output's columns (Torch-Pruning's dependency graph couples
  them through the attention op), the least important removed in one step, at least one head kept per layer. Done
  here through ``DependencyGraph.get_pruning_group`` rather than ``MetaPruner(prune_num_heads=True)``: the pruner
  removes ``ceil(ratio x heads left)`` heads at *every* step of an iterative schedule, so the 200 small steps the
  width target needs (stages/prune.py) would remove every head (measured with torch-pruning 1.6.1).
- **FFN width and hidden size**: then the stage's usual ``MetaPruner`` in small steps to the params/MACs target, with
  query/key/value not roots (their outputs are heads, handled above); Torch-Pruning couples the hidden size across
  the embeddings (word, position, token type), every LayerNorm, every residual and the classifier's input.

The parameter counts are Torch-Pruning's, embeddings included, so a ratio counts the vocabulary cut.
"""
from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.models.hf import HFClassifier, trim_vocabulary


def head_importance(graph: tp.DependencyGraph, attention: nn.Module, importance: Any) -> torch.Tensor:
    """One score per head: the criterion's per-channel scores of the head's coupled rows and columns, averaged."""
    query = attention.query
    group = graph.get_pruning_group(query, tp.prune_linear_out_channels, idxs=list(range(query.out_features)))
    scores = importance(group)
    if scores is None:
        raise EdgepipeError("prune.importance: the criterion gives no score to attention heads; use magnitude or "
                            "taylor")
    return scores.detach().float().cpu().view(int(attention.num_attention_heads), -1).mean(1)


def prune_heads(model: HFClassifier, example: tuple[torch.Tensor, ...], importance: Any, share: float
                ) -> list[dict[str, Any]]:
    """Remove ``round(share x heads)`` of each layer's heads (at least one kept), least important first."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    removed = []
    for i, attention in enumerate(model.attention_modules()):
        heads = int(attention.num_attention_heads)
        drop = min(heads - 1, round(share * heads))
        if drop <= 0:
            removed.append({"layer": i, "heads": heads, "removed": []})
            continue
        scores = head_importance(graph, attention, importance)
        order = torch.argsort(scores)[:drop].tolist()
        size = int(attention.attention_head_size)
        rows = [c for h in sorted(order) for c in range(h * size, (h + 1) * size)]
        graph.get_pruning_group(attention.query, tp.prune_linear_out_channels, idxs=rows).prune()
        removed.append({"layer": i, "heads": heads, "removed": sorted(order),
                        "scores": [round(float(s), 6) for s in scores]})
    model.sync_shapes()
    return removed


def prepare(model: nn.Module, data: Any, pcfg: Any, example: tuple[torch.Tensor, ...], importance: Any
            ) -> tuple[list[nn.Module], dict[str, Any]]:
    """The vocabulary and head cuts (see the module docstring); returns the layers the width pruner must not take
    as roots (query, key, value) and what was done."""
    if not isinstance(model, HFClassifier):
        raise EdgepipeError("prune: task text prunes Hugging Face classifiers (model: {hf: FOLDER})")
    record: dict[str, Any] = {"before": model.shape_record()}
    if pcfg.vocabulary == "trim":
        notes = data.notes.get("text", {})
        used = set()
        for row in data.train_tokens["input_ids"]:
            used.update(int(i) for i in row)
        record["vocabulary"] = trim_vocabulary(model, used, notes.get("special_ids", []), int(notes.get("unk_id", 0)))
    if pcfg.heads > 0:
        record["heads"] = prune_heads(model, example, importance, pcfg.heads)
    record["after_structure"] = model.shape_record()
    roots = [layer for a in model.attention_modules() for layer in (a.query, a.key, a.value)]
    return roots, record
