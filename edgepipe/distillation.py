"""Knowledge distillation loss (Hinton et al. 2015) with optional feature hints (FitNets, Romero et al. 2015).

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)
       + beta * sum_pairs MSE(adapter(student_feature), teacher_feature)

The T^2 factor keeps the soft term's gradient scale independent of T. Adapters are learned 1x1
convolutions from the student's channels to the teacher's; when spatial sizes differ the student
map is resized to the teacher's.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from edgepipe.config import FeaturePair
from edgepipe.errors import EdgepipeError


def kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float, alpha: float) -> dict[str, torch.Tensor]:
    """Soft (KL at temperature T, scaled by T^2) and hard (CE) terms and their weighted sum."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    hard = F.cross_entropy(student_logits.float(), labels)
    return {"loss": alpha * soft + (1 - alpha) * hard, "soft": soft, "hard": hard}


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise EdgepipeError(f"distill.feature_pairs: {role} has no module '{name}' (top-level: {', '.join(names)})") from None


class FeatureHints(nn.Module):
    """Captures configured teacher/student feature maps with forward hooks and scores them through adapters."""

    def __init__(self, teacher: nn.Module, student: nn.Module, pairs: list[FeaturePair], example: torch.Tensor) -> None:
        super().__init__()
        self.pairs = pairs
        self._feats: dict[str, torch.Tensor] = {}
        self._hooks = []
        for i, p in enumerate(pairs):
            self._hooks.append(_module(teacher, p.teacher, "teacher").register_forward_hook(self._keep(f"t{i}")))
            self._hooks.append(_module(student, p.student, "student").register_forward_hook(self._keep(f"s{i}")))
        with torch.no_grad():
            was = student.training
            teacher.eval(), student.eval()
            teacher(example), student(example)
            student.train(was)
        self.adapters = nn.ModuleList(
            nn.Conv2d(self._feats[f"s{i}"].shape[1], self._feats[f"t{i}"].shape[1], 1, bias=False)
            for i in range(len(pairs)))
        self._feats.clear()

    def _keep(self, key: str) -> Callable:
        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            self._feats[key] = out
        return hook

    def loss(self) -> torch.Tensor:
        total = torch.zeros(())
        for i, adapter in enumerate(self.adapters):
            s, t = self._feats[f"s{i}"], self._feats[f"t{i}"].detach()
            s = adapter(s.float())
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            total = total + F.mse_loss(s, t.float())
        self._feats.clear()
        return total

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def kd_step(teacher: nn.Module, temperature: float, alpha: float, beta: float = 0.0,
            hints: FeatureHints | None = None) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """A ``loss_step`` for edgepipe.training.fit: teacher forward (no grad, eval mode) + KD terms."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def step(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t_logits = teacher(x)
        terms = kd_terms(student(x), t_logits, y, temperature, alpha)
        if hints is not None and beta > 0:
            feature = hints.loss()
            terms["feature"] = feature.detach()
            terms["loss"] = terms["loss"] + beta * feature
        terms["soft"], terms["hard"] = terms["soft"].detach(), terms["hard"].detach()
        return terms
    return step
