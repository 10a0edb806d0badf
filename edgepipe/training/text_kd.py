"""Distillation between BERT-family classifiers on intermediate states (task text, ``distill.beta > 0``).

    loss = (1 - alpha) hard + alpha soft + beta * (hidden + attention)

each term logged per epoch (``fit``'s history):

- **soft**, **hard**: the logits' KD and the labels' cross-entropy, as for every classifier (``kd_terms``).
- **hidden** (TinyBERT's hidden-state loss, Jiao et al. 2020): the mean squared difference between the student's
  embedding output and each of its layers' outputs and the teacher's at the mapped depth, over the sentence's real
  tokens (padding excluded). Student layer i reads teacher layer ``round(i (n-1)/(m-1))``, the layers
  ``init: teacher`` copies (first and last always), so a student starts where its targets are. Where the widths
  differ (a pruned hidden size) a learned linear map brings the student's states to the teacher's width (TinyBERT's
  W_h), trained with the student and dropped after.
- **attention** (MiniLM's self-attention distribution transfer, Wang et al. 2020): the KL divergence between the
  teacher's and the student's last-layer attention distributions (softmax(QK^T / sqrt(d)) with the padding masked),
  per head, averaged over heads and real query tokens. It needs the same number of heads in both last layers; where
  they differ the term is left out and the record says so. The distributions are computed from the query and key
  projections' outputs (forward hooks), so the models keep their fast attention kernels.

Why written here: TinyBERT's and MiniLM's losses are a few lines each over hidden states the models already compute;
their reference code is tied to its own training scripts. Hooks (not ``output_hidden_states``) read the states, so
the step works on a student wrapped in DistributedDataParallel.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgepipe.errors import EdgepipeError


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer each student layer learns from (evenly spaced, first and last)."""
    n, m = teacher_layers, student_layers
    return [round(i * (n - 1) / (m - 1)) if m > 1 else n - 1 for i in range(m)]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class TextDistiller(nn.Module):
    """The projections (its parameters) and the loss step; teacher and student are held, not registered."""

    def __init__(self, teacher: nn.Module, student: nn.Module, task: Any, temperature: float, alpha: float,
                 beta: float) -> None:
        super().__init__()
        from edgepipe.models.hf import HFClassifier

        if not (isinstance(teacher, HFClassifier) and isinstance(student, HFClassifier)):
            raise EdgepipeError("distill.beta: intermediate-state distillation of task text needs Hugging Face "
                                "teacher and student (model: {hf: FOLDER}); set distill.beta: 0 for logits only")
        self._models = (teacher, student)
        self.task, self.temperature, self.alpha, self.beta = task, temperature, alpha, beta
        t_layers, s_layers = teacher.encoder_layers(), student.encoder_layers()
        self.mapping = layer_map(len(t_layers), len(s_layers))
        self._states: dict[str, torch.Tensor] = {}
        self._hooks = []
        for role, model, layers in (("t", teacher, t_layers), ("s", student, s_layers)):
            self._hooks.append(model.model.base_model.embeddings.register_forward_hook(self._keep(f"{role}e")))
            for i, layer in enumerate(layers):
                self._hooks.append(layer.register_forward_hook(self._keep(f"{role}{i}")))
            last = model.attention_modules()[-1]
            self._hooks.append(last.query.register_forward_hook(self._keep(f"{role}q")))
            self._hooks.append(last.key.register_forward_hook(self._keep(f"{role}k")))
        t_width = teacher.model.get_input_embeddings().embedding_dim
        s_width = student.model.get_input_embeddings().embedding_dim
        self.projections = nn.ModuleList(
            nn.Linear(s_width, t_width, bias=False) for _ in range(len(s_layers) + 1)) if s_width != t_width else None
        t_last, s_last = teacher.attention_modules()[-1], student.attention_modules()[-1]
        self.attention_heads = (int(t_last.num_attention_heads), int(s_last.num_attention_heads))
        self.attention = self.attention_heads[0] == self.attention_heads[1]

    def _keep(self, key: str):
        def hook(_m: nn.Module, _i: tuple, out: Any) -> None:
            self._states[key] = _first(out)
        return hook

    @staticmethod
    def _attention(states: dict[str, torch.Tensor], heads: int, mask: torch.Tensor) -> torch.Tensor:
        """Log attention probabilities [N, heads, L, L] of the last layer from its query and key outputs."""
        q, k = states["q"].float(), states["k"].float()
        n, length, width = q.shape
        size = width // heads
        q = q.view(n, length, heads, size).transpose(1, 2)
        k = k.view(n, length, heads, size).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(size)
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)

    def step(self, student: nn.Module, x: Any, y: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher, _ = self._models
        self._states.clear()
        with torch.no_grad():
            was = teacher.training
            teacher.eval()
            t_logits = self.task.forward(teacher, x)
            teacher.train(was)
            t_states = {k[1:]: v.detach() for k, v in self._states.items() if k.startswith("t")}
        s_logits = self.task.forward(student, x)
        s_states = {k[1:]: v for k, v in self._states.items() if k.startswith("s")}
        self._states.clear()
        terms = self.task.distill_loss(s_logits, t_logits, y, self.temperature, self.alpha)
        mask = x["attention_mask"].bool() if isinstance(x, dict) and "attention_mask" in x else None
        keep = mask if mask is not None else torch.ones(s_logits.shape[0], s_states["e"].shape[1], dtype=torch.bool,
                                                         device=s_logits.device)
        hidden = s_logits.new_zeros((), dtype=torch.float32)
        pairs = [("e", "e")] + [(str(i), str(j)) for i, j in enumerate(self.mapping)]
        for p, (s_key, t_key) in enumerate(pairs):
            s, t = s_states[s_key].float(), t_states[t_key].float()
            if self.projections is not None:
                s = self.projections[p](s)
            hidden = hidden + ((s - t) ** 2).mean(-1)[keep].mean()
        hidden = hidden / len(pairs)
        total = terms["loss"] + self.beta * hidden
        terms["hidden"] = hidden.detach()
        if self.attention:
            heads = self.attention_heads[0]
            t_log, s_log = self._attention(t_states, heads, keep), self._attention(s_states, heads, keep)
            kl = (t_log.exp() * (t_log - s_log)).sum(-1)  # [N, heads, L]
            attention = kl.mean(1)[keep].mean()
            total = total + self.beta * attention
            terms["attention"] = attention.detach()
        terms["loss"] = total
        terms["soft"], terms["hard"] = terms["soft"].detach(), terms["hard"].detach()
        return terms

    def record(self) -> dict[str, Any]:
        return {"loss": "KD on logits + beta * (hidden-state MSE (TinyBERT) + last-layer attention KL (MiniLM))",
                "layer_map": {"embeddings": "embeddings", **{f"student layer {i}": f"teacher layer {j}"
                                                              for i, j in enumerate(self.mapping)}},
                "projections": self.projections is not None,
                "attention": "last layer, " + (f"{self.attention_heads[0]} heads" if self.attention else
                                               f"left out: the teacher has {self.attention_heads[0]} heads, the "
                                               f"student {self.attention_heads[1]}"),
                "temperature": self.temperature, "alpha": self.alpha, "beta": self.beta}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
