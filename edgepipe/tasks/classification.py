"""Image classification: one float image batch ``input`` [N, C, H, W] in, one ``logits`` [N, classes] out.

Targets are integer class labels. The loss is cross-entropy; distillation compares the student's logits with the
teacher's (Hinton et al. 2015: KL at temperature T, scaled by T^2, plus cross-entropy on the labels); the headline
is top-1 (top-5 beside it when there are more than 5 classes, top-1 per class); the export check asks the ONNX
graph for PyTorch's logits (float) or PyTorch's top-1 decisions (INT8); the fidelity test between two runtimes is
the exact McNemar test on the images exactly one of them gets right; pruning leaves the classifier layer whole;
the TensorRT device script computes top-1 on the bundle's images.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgepipe import device as devices
from edgepipe.errors import EdgepipeError
from edgepipe.runtime.runner import TensorSpec
from edgepipe.tasks import register
from edgepipe.tasks.base import Task
from edgepipe.tasks.metric import TOP1, Metric
from edgepipe.training import distributed

if TYPE_CHECKING:
    from edgepipe.data.batches import Batches

log = logging.getLogger(__name__)
TOP5 = Metric("top5", "top-5")
FIDELITY_ALPHA = 0.01
"""A drop above ``compile.max_top1_drop`` fails when its one-sided McNemar p-value is below this."""


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


@torch.no_grad()
def evaluate(model: nn.Module, data: Batches, batch_size: int = 256, forward: Any = None) -> float:
    """Top-1 accuracy of ``model`` on the validation set, in float32 eval mode, on the device the model is on (under
    torchrun each rank takes every world-th batch and the counts are summed: the whole set, once). ``forward(model,
    x)``: how a batch's inputs are given to the model (a task's ``forward``; default ``model(x)``)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    share, ranks = (distributed.rank(), distributed.world_size()) if distributed.collective_active() else (0, 1)
    on = devices.module_device(model)
    for i, (x, y) in enumerate(data.val_batches(batch_size)):
        if i % ranks == share:
            x = devices.to_device(x, on)
            correct += int(((forward(model, x) if forward else model(x)).argmax(1).cpu() == y).sum())
            total += len(y)
    model.train(was_training)
    correct, total = distributed.all_reduce_sum([correct, total])
    return correct / max(1, total)


def cross_entropy_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain supervised loss (teacher training, scratch baselines): a ``loss_step`` for edgepipe.training.loop.fit."""
    loss = F.cross_entropy(model(x), y)
    return {"loss": loss, "hard": loss.detach()}


def kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float, alpha: float) -> dict[str, torch.Tensor]:
    """Soft (KL at temperature T, scaled by T^2 so its gradient scale does not depend on T) and hard (CE) terms and
    their weighted sum."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    hard = labelled_cross_entropy(student_logits, labels)
    return {"loss": alpha * soft + (1 - alpha) * hard, "soft": soft, "hard": hard}


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the images that have a label (an unlabeled image's is -1, data.unlabeled); zero, with the
    graph kept, for a batch of unlabeled images only (PyTorch's ignore_index mean would be 0/0)."""
    if bool((labels >= 0).all()):
        return F.cross_entropy(logits.float(), labels)
    if not bool((labels >= 0).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=-1)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              alpha: float, tckd_weight: float, nckd_weight: float) -> dict[str, torch.Tensor]:
    """Decoupled KD (Zhao et al. 2022, "Decoupled Knowledge Distillation", eq. 7), written here because no
    maintained library ships it as a loss: KD's KL splits into the target-class term (TCKD: KL of the binary
    target / rest distributions) and the non-target term (NCKD: KL among the other classes, the target masked out),
    each at temperature T and scaled by T^2; the soft term is ``tckd_weight * TCKD + nckd_weight * NCKD`` and it is
    mixed with cross-entropy by ``alpha`` as KD's is. (The paper also ramps the DKD term in over its first 20 of 240
    epochs; edgepipe's one-cycle schedule warms the learning rate up instead.)"""
    t = temperature
    s, te = student_logits.float() / t, teacher_logits.float() / t
    # an unlabeled image (label -1) splits at the teacher's class
    target = F.one_hot(torch.where(labels >= 0, labels, te.argmax(1)), s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(te, dim=1)
    eps = 1e-8  # the binary probabilities' floor: log(0) where a model puts all its mass on one side

    def binary(p: torch.Tensor) -> torch.Tensor:
        on = (p * target).sum(1, keepdim=True)
        return torch.cat([on, 1 - on], dim=1).clamp_min(eps)
    b_s, b_t = binary(p_s), binary(p_t)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * (t * t)
    masked = -1e4  # the target's logit out of the non-target softmax (finite: bf16 and fp16 safe)
    log_s = F.log_softmax(s.masked_fill(target, masked), dim=1)
    log_t = F.log_softmax(te.masked_fill(target, masked), dim=1)
    nckd = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)
    soft = tckd_weight * tckd + nckd_weight * nckd
    hard = labelled_cross_entropy(student_logits, labels)
    return {"loss": alpha * soft + (1 - alpha) * hard, "soft": soft, "hard": hard, "tckd": tckd.detach(),
            "nckd": nckd.detach()}


def accuracy_record(logits: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """top-1 (and top-5 when there are more than 5 classes), and with ``class_names`` the top-1 of each class
    (``per_class``: name -> fraction, None for a class with no images)."""
    rec: dict[str, Any] = {"top1": topk_accuracy(logits, labels, 1), "samples": int(len(labels))}
    if logits.shape[1] > 5:
        rec["top5"] = topk_accuracy(logits, labels, 5)
    if class_names is not None:
        hit = logits.argmax(1) == labels
        rec["per_class"] = {name: (float(hit[labels == i].mean()) if (labels == i).any() else None)
                            for i, name in enumerate(class_names)}
    return rec


def fidelity_verdict(ref_correct: Any, compiled_correct: Any, limit: float) -> dict[str, Any]:
    """Top-1 drop in points, and whether it fails: above ``limit`` and unlikely under equal accuracy.

    ``losses``: images the reference gets right and the compiled model wrong; ``wins``: the reverse. With
    equal accuracy each of those ``losses + wins`` images is a fair coin, so the p-value is the binomial
    tail P(X >= losses), X ~ Bin(losses + wins, 1/2) (exact McNemar test, one-sided).
    """
    from scipy.stats import binomtest

    ref_correct, compiled_correct = np.asarray(ref_correct, bool), np.asarray(compiled_correct, bool)
    losses = int((ref_correct & ~compiled_correct).sum())
    wins = int((~ref_correct & compiled_correct).sum())
    drop = 100.0 * (losses - wins) / max(len(ref_correct), 1)
    p = binomtest(losses, losses + wins, 0.5, alternative="greater").pvalue if losses + wins else 1.0
    return {"top1_drop_points": drop, "max_top1_drop_points": limit, "losses": losses, "wins": wins,
            "p_value": float(p), "alpha": FIDELITY_ALPHA, "fails": bool(drop > limit and p < FIDELITY_ALPHA),
            "test": "exact McNemar (one-sided binomial on the images exactly one of the two gets right)"}


@register
class Classification(Task):
    name = "classification"
    headline = TOP1
    secondary = (TOP5,)
    data_kinds = ("digits", "imagefolder")
    device_metric = "top1"
    distill_losses = ("kd", "dkd")

    def inputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return (TensorSpec("input", "float32", ("batch", *(meta.get("input_shape") or ()))),)

    def outputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", "float32", ("batch", meta.get("num_classes") or -1)),)  # -1: not known here

    def loss(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(outputs, targets)
        return {"loss": loss, "hard": loss.detach()}

    def distill_loss(self, student: Any, teacher: Any, targets: Any, temperature: float, alpha: float,
                     method: str = "kd", weights: tuple[float, ...] = ()) -> dict[str, torch.Tensor]:
        if method == "dkd":
            return dkd_terms(student, teacher, targets, temperature, alpha, *weights)
        return kd_terms(student, teacher, targets, temperature, alpha)

    def val_score(self, model: nn.Module, data: Batches, batch_size: int) -> float:
        return evaluate(model, data, batch_size)

    def score_outputs(self, outputs: list[Any], targets: list[Any]) -> float:
        """Top-1 of PyTorch logits, computed in PyTorch (argmax, float32 mean) as the accuracy budget always has."""
        logits = torch.cat([o.float() for o in outputs])
        return float((logits.argmax(1) == torch.cat(list(targets))).float().mean())

    def check_outputs(self, out: Any, field: str, meta: Mapping[str, Any], batch: int) -> None:
        num_classes = meta["num_classes"]
        if not isinstance(out, torch.Tensor):
            raise EdgepipeError(f"{field}: returns a {type(out).__name__}, not one tensor; the model must return one "
                                f"logits tensor [N, {num_classes}] (return only the logits from forward, or re-export "
                                "a wrapper that does)")
        if out.ndim != 2 or out.shape[1] != num_classes or out.shape[0] != batch:
            raise EdgepipeError(f"{field}: outputs shape {list(out.shape)} for a batch of {batch}, but the data has "
                                f"{num_classes} classes; set num_classes in the model kwargs (logits [N, classes])")

    def metrics(self, outputs: Mapping[str, np.ndarray], targets: list[Any],
                class_names: list[str] | None = None) -> dict[str, Any]:
        logits, labels = outputs["logits"], np.concatenate([np.asarray(y) for y in targets])
        if logits.ndim != 2 or len(logits) != len(labels):
            raise EdgepipeError(f"model output shape {list(logits.shape)} is not [N, classes]")
        return accuracy_record(logits.astype(np.float32, copy=False), labels, class_names)

    def export_check(self, model: nn.Module, onnx_bytes: bytes, data: Batches, batch_size: int, quantized: bool,
                     tolerance: float, min_agreement: float, threads: int | None = None) -> dict[str, Any]:
        return compare_with_torch(model, onnx_bytes, data, batch_size, quantized, tolerance, min_agreement, threads)

    def fidelity(self, reference: Mapping[str, np.ndarray], compiled: Mapping[str, np.ndarray], targets: list[Any],
                 limit: float) -> dict[str, Any]:
        labels = np.concatenate([np.asarray(y) for y in targets])
        ref, out = reference["logits"], compiled["logits"]
        verdict = fidelity_verdict(ref.argmax(1) == labels, out.argmax(1) == labels, limit)
        return {**verdict, "drop_points": verdict["top1_drop_points"], "max_drop_points": limit,
                "reference_top1": topk_accuracy(ref, labels, 1), "compiled_top1": topk_accuracy(out, labels, 1),
                "prediction_agreement": float((ref.argmax(1) == out.argmax(1)).mean()), "samples": int(len(labels))}

    def protected_layers(self, model: nn.Module, meta: Mapping[str, Any]) -> list[nn.Module]:
        """The classifier: any Linear/Conv layer producing ``num_classes`` outputs."""
        n = meta.get("num_classes")
        return [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == n)
                or (isinstance(m, nn.Conv2d) and m.out_channels == n)]


# --- the export check: ONNX Runtime vs PyTorch -------------------------------------------------------------
NOISE_REL = 4 * 2.0**-23
"""Relative size of the noise ``self_agreement`` puts on each quantizer's input: 4 float32 ulps, the size of the
differences a different summation order makes (1-5 ulps measured between PyTorch and ONNX Runtime)."""
NOISE_SLACK = 0.005
"""How far below PyTorch's self-agreement ONNX Runtime's agreement may fall (0.5 points of the images)."""
MAX_TOP1_GAP = 0.01
"""Largest top-1 difference (1 point) between ONNX Runtime and PyTorch accepted on a low-margin model."""


def agreement_verdict(agreement: float, floor: float, ort_top1: float, torch_top1: float) -> str | None:
    """Why an agreement below int8_min_agreement is a real difference, or None when it is within the model's own
    sensitivity to float rounding (``floor``) and top-1 is kept."""
    if agreement < floor - NOISE_SLACK:
        return (f"PyTorch agrees with itself on {floor:.2%} under float-rounding noise, so the difference is not "
                "rounding")
    if abs(ort_top1 - torch_top1) > MAX_TOP1_GAP:
        return f"top-1 differs: {ort_top1:.2%} in ONNX Runtime, {torch_top1:.2%} in PyTorch"
    return None


@torch.no_grad()
def self_agreement(model: nn.Module, data: Batches, batch_size: int, ref_logits: np.ndarray) -> float:
    """Top-1 agreement of ``model`` with its own ``ref_logits`` when every activation quantizer's input is multiplied
    by (1 + u), u uniform in [-NOISE_REL, NOISE_REL] from a fixed seed: how much of the model's top-1 hangs on
    float rounding alone."""
    from edgepipe.quantization.layers import ActQuant

    gen = torch.Generator().manual_seed(0)

    def nudge(_m: nn.Module, args: tuple) -> tuple:
        x = args[0]
        u = (torch.rand(x.shape, generator=gen) * 2 - 1) * NOISE_REL
        return (x * (1 + u), *args[1:])
    hooks = [m.register_forward_pre_hook(nudge) for m in model.modules() if isinstance(m, ActQuant)]
    try:
        out = np.concatenate([model(x).float().numpy() for x, _ in data.val_batches(batch_size)])
    finally:
        for h in hooks:
            h.remove()
    return float((out.argmax(1) == ref_logits.argmax(1)).mean())


@torch.no_grad()
def compare_with_torch(model: nn.Module, onnx_bytes: bytes, data: Batches, batch_size: int, quantized: bool,
                       tolerance: float, min_agreement: float, threads: int | None = None) -> dict[str, Any]:
    """Run the validation set through both; raise EdgepipeError when they disagree beyond the limits."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # The QDQ graph's own semantics: with graph optimizations off, ONNX Runtime runs each Q/DQ as the spec
    # defines it (in float), which is what the QAT model computes (measured: 1e-7 apart). Its fused integer
    # kernels round differently; whether a runtime's kernels keep the graph's accuracy is the compile
    # stage's fidelity check, against this same reference.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    model.eval()
    ref, out, labels = [], [], []
    for x, y in data.val_batches(batch_size):
        ref.append(model(x).float().numpy())
        out.append(session.run(["logits"], {"input": x.numpy().astype(np.float32)})[0])
        labels.append(y.numpy())
    ref_logits, ort_logits, y_all = np.concatenate(ref), np.concatenate(out), np.concatenate(labels)
    bad = ~(np.isfinite(ref_logits).all(1) & np.isfinite(ort_logits).all(1))
    if bad.any():  # NaN logits would pass a max-difference check (NaN > x is False) and agree on argmax 0
        raise EdgepipeError(f"export: the model outputs NaN or inf logits for {int(bad.sum())} of {len(y_all)} "
                            f"validation images (PyTorch: {int((~np.isfinite(ref_logits).all(1)).sum())}, ONNX Runtime: "
                            f"{int((~np.isfinite(ort_logits).all(1)).sum())}); the model is broken: check the earlier "
                            "stages' training losses and data.mean/std")
    checks: dict[str, Any] = {"samples": int(len(y_all)), "ort_top1": topk_accuracy(ort_logits, y_all, 1),
                              "torch_top1": topk_accuracy(ref_logits, y_all, 1)}
    if quantized:
        agreement = float((ref_logits.argmax(1) == ort_logits.argmax(1)).mean())
        checks.update(top1_agreement=agreement, min_agreement=min_agreement, reference="ONNX Runtime, graph "
                      "optimizations off (QDQ as specified)", max_abs_diff=float(np.abs(ref_logits - ort_logits).max()))
        if agreement < min_agreement:
            # A low-margin model (many near-tied logits) flips top-1 under any float rounding difference: measured on
            # a CIFAR MobileNetV2 subset model, PyTorch agreed with itself on only 97.9% when each quantizer's input
            # moved by 1e-7. ONNX Runtime sums convolutions in another order (inputs 1-5 ulps apart), so a faithful
            # graph cannot be asked to agree more than the model agrees with itself under that noise.
            floor = self_agreement(model, data, batch_size, ref_logits)
            checks.update(self_agreement=floor, self_agreement_noise=f"each quantizer input x (1 + u), |u| <= "
                          f"{NOISE_REL:.2g}, seeded", top1_gap_points=abs(checks["ort_top1"] - checks["torch_top1"]) * 100)
            problem = agreement_verdict(agreement, floor, checks["ort_top1"], checks["torch_top1"])
            if problem:
                raise EdgepipeError(f"export: ONNX Runtime and PyTorch agree on top-1 for {agreement:.2%} of "
                                    f"{len(y_all)} validation images (< export.int8_min_agreement {min_agreement:.2%}) "
                                    f"and {problem}; the INT8 graph does not compute what the QAT model does")
            checks["note"] = (f"agreement {agreement:.2%} is below {min_agreement:.2%} but within PyTorch's own "
                              f"{floor:.2%} under float-rounding noise, with top-1 {checks['ort_top1']:.2%} vs "
                              f"{checks['torch_top1']:.2%}: a low-margin model, not a different graph")
            log.warning("export: %s", checks["note"])
    else:
        diff = float(np.abs(ref_logits - ort_logits).max())
        checks.update(max_abs_diff=diff, tolerance=tolerance)
        if diff > tolerance:
            raise EdgepipeError(f"export: ONNX Runtime logits differ from PyTorch by up to {diff:.3g} "
                                f"(> export.float_tolerance {tolerance:g}) on the validation set")
    return checks
