"""A second task in one file (README: Adding a task): digits with two heads, class logits plus the digit's value.

The model returns ``logits`` [N, 10] and ``value`` [N, 1] (the digit read as a number, regressed). The headline
metric is the value's mean absolute error, in digits, LOWER is better (so every comparison the engine makes must
follow the metric's direction); top-1 of the logits rides along as a secondary metric. Distillation matches the
teacher's logits (KL at T) and its value (MSE); the fidelity test between two runtimes is a one-sided paired t-test
on the per-image absolute errors. Nothing outside this file knows any of it: importing it registers the task and the
architecture, and a config says ``task: digits-two-head``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgepipe import device as devices
from edgepipe.errors import EdgepipeError
from edgepipe.models.zoo import register as register_arch
from edgepipe.runtime.runner import TensorSpec
from edgepipe.tasks import register
from edgepipe.tasks.base import Task
from edgepipe.tasks.metric import Metric

VALUE_MAE = Metric("value_mae", "value MAE", unit="digits", scale=1.0, higher_is_better=False)
TOP1 = Metric("top1", "top-1")


class TwoHeadCNN(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classes = nn.Linear(2 * width, num_classes)
        self.value = nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classes(f), self.value(f)


@register_arch("two_head_cnn")
def two_head_cnn(width: int = 8, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return TwoHeadCNN(width, num_classes, in_channels)


def _labels(targets: list[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(t) for t in targets]).astype(np.int64)


@register
class DigitsTwoHead(Task):
    name = "digits-two-head"
    headline = VALUE_MAE
    secondary = (TOP1,)

    def inputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return (TensorSpec("input", "float32", ("batch", *(meta.get("input_shape") or ()))),)

    def outputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", "float32", ("batch", meta.get("num_classes") or 10)),
                TensorSpec("value", "float32", ("batch", 1)))

    def loss(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        logits, value = outputs
        ce = F.cross_entropy(logits, targets)
        l1 = F.smooth_l1_loss(value.squeeze(1).float(), targets.float())
        loss = ce + l1
        return {"loss": loss, "hard": loss.detach(), "value_l1": l1.detach()}

    def distill_loss(self, student: Any, teacher: Any, targets: Any, temperature: float, alpha: float,
                     ) -> dict[str, torch.Tensor]:
        (s_logits, s_value), (t_logits, t_value) = student, teacher
        t = temperature
        soft = F.kl_div(F.log_softmax(s_logits.float() / t, 1), F.log_softmax(t_logits.float() / t, 1),
                        reduction="batchmean", log_target=True) * t * t + F.mse_loss(s_value.float(), t_value.float())
        hard = self.loss(student, targets)["loss"]
        return {"loss": alpha * soft + (1 - alpha) * hard, "soft": soft, "hard": hard}

    @torch.no_grad()
    def val_score(self, model: nn.Module, data: Any, batch_size: int) -> float:
        was = model.training
        model.eval()
        on = devices.module_device(model)
        errors = [(model(devices.to_device(x, on))[1].squeeze(1).cpu() - y.float()).abs() for x, y in data.val_batches(batch_size)]
        model.train(was)
        return float(torch.cat(errors).mean())

    def check_outputs(self, out: Any, field: str, meta: Mapping[str, Any], batch: int) -> None:
        if not (isinstance(out, tuple) and len(out) == 2 and out[0].shape == (batch, meta["num_classes"])
                and out[1].shape == (batch, 1)):
            raise EdgepipeError(f"{field}: a digits-two-head model returns (logits [N, classes], value [N, 1])")

    def metrics(self, outputs: Mapping[str, np.ndarray], targets: list[Any],
                class_names: list[str] | None = None) -> dict[str, Any]:
        labels = _labels(targets)
        errors = np.abs(outputs["value"][:, 0] - labels)
        return {"value_mae": float(errors.mean()), "top1": float((outputs["logits"].argmax(1) == labels).mean()),
                "samples": int(len(labels))}

    def fidelity(self, reference: Mapping[str, np.ndarray], compiled: Mapping[str, np.ndarray], targets: list[Any],
                 limit: float) -> dict[str, Any]:
        from scipy.stats import ttest_rel

        labels = _labels(targets)
        ref_err = np.abs(reference["value"][:, 0] - labels)
        out_err = np.abs(compiled["value"][:, 0] - labels)
        drop = VALUE_MAE.drop_points(float(ref_err.mean()), float(out_err.mean()))
        same = bool(np.allclose(ref_err, out_err))
        p = 1.0 if same else float(ttest_rel(out_err, ref_err, alternative="greater").pvalue)
        return {"drop_points": drop, "max_drop_points": limit, "p_value": p, "samples": int(len(labels)),
                "fails": bool(drop > limit and p < 0.01), "detail": f"paired t-test p = {p:.2g}",
                "test": "one-sided paired t-test on the per-image absolute errors of the value head"}
