"""Distillation between detectors of different architectures (issue 27, item 4): a two-stage teacher (Faster R-CNN)
into a one-stage student (SSD), or any detector into any SSD.

Three terms, each logged per epoch (``fit``'s history):

    loss = hard + alpha * (soft + soft_box) + beta * feature

The labels' term keeps its full weight and the teacher's terms are added to it, as detector distillation is done
(PKD, mmrazor's detection distillers): a detector's own loss is the signal that places boxes, and the convex
``(1 - alpha) hard + alpha soft`` of classification KD halves it. Measured on the embedded default (digit canvases,
16 epochs, same initialisation, 2 cores): the convex weighting at alpha 0.5 ended 6.4 mAP@.5 points *below* the
labels-only student.

- **hard**: the student's own loss on the labels (torchvision's SSD terms: classification with hard negative mining
  and box regression).
- **soft** (prediction distillation): the teacher's detections (after its own NMS, score above ``SCORE_FLOOR``) are
  soft targets for the student's classification. Each student anchor is matched to the teacher's detections by the
  student's own matcher (IoU >= 0.5, and every detection's best anchor); a matched anchor's target distribution is
  the teacher's confidence: its score ``s`` on its class and ``1 - s`` on background, softened by the temperature
  (``q^(1/T)``, renormalised) and compared with the student's ``softmax(logits / T)`` by KL, scaled by T^2 (Hinton
  et al. 2015). Anchors the teacher left empty are background targets, three per matched anchor, the ones the
  student is most wrong about (SSD's hard negative mining). Normalised by the matched anchors.
- **soft_box**: the teacher's boxes as regression targets of the matched anchors (smooth L1 of the encoded offsets,
  weighted by the teacher's score), as in SSD's own box loss.
- **feature** (feature imitation, PKD: Cao et al. 2022, "PKD: General Distillation Framework for Object Detectors via
  Pearson Correlation Coefficient"; mmrazor's ``PKDLoss``): every feature map the student's head reads is paired with
  the teacher's backbone/neck map of the nearest resolution, brought to the teacher's channels by a 1x1 convolution
  (an adapter, trained with the student and dropped after distillation) and resized to its size; both are normalised
  to zero mean and unit variance per image and channel, so the loss, half their mean squared difference, is
  ``1 - Pearson correlation``: it asks for the teacher's pattern, not its magnitudes, which differ between
  architectures.

Why written here: torchvision has the detectors but no distillation, and mmrazor's detector distillers are built on
mmdet's models and registry; the PKD loss is a few lines and follows the paper's definition.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgepipe.errors import EdgepipeError

SCORE_FLOOR = 0.05
"""Teacher detections below this score are not targets (torchvision's detectors keep boxes down to 0.01-0.05)."""
NEGATIVES_PER_MATCH = 3


def _maps(out: Any) -> list[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Half the mean squared difference of the two maps normalised per image and channel (= 1 - Pearson r)."""
    def norm(f: torch.Tensor) -> torch.Tensor:
        f = f.float().flatten(2)
        return (f - f.mean(-1, keepdim=True)) / (f.std(-1, keepdim=True, unbiased=False) + eps)
    return 0.5 * F.mse_loss(norm(student), norm(teacher))


class DetectionDistiller(nn.Module):
    """The adapters (its parameters, trained with the student) and the loss step (see the module docstring). The
    teacher and student are held, not registered: the optimizer and the checkpoint see the adapters alone."""

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float, alpha: float, beta: float,
                 example: torch.Tensor) -> None:
        super().__init__()
        if alpha > 0 and not hasattr(student, "anchors"):
            raise EdgepipeError("distill.student: prediction distillation (alpha > 0) needs a one-stage SSD student "
                                "(ssd_small, tv_ssdlite320_mobilenet_v3_large); set distill.alpha: 0 to distil "
                                "features only")
        for role, model in (("teacher", teacher), ("student", student)):
            if beta > 0 and not hasattr(model, "feature_module"):
                raise EdgepipeError(f"distill.{role}: a detector wrapped in edgepipe.models.detectors (Detector or "
                                    "SSDDetector) is needed to read its feature maps")
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self._models = (teacher, student)  # a tuple: not submodules
        self._seen: dict[str, Any] = {}
        self._hooks = []
        if beta > 0:  # feature maps: read by hooks (a QAT student's traced core has no backbone module to hook)
            self._hooks += [teacher.feature_module().register_forward_hook(self._keep("teacher")),
                            student.feature_module().register_forward_hook(self._keep("student"))]
        if hasattr(student, "core"):
            self._hooks.append(student.core.register_forward_hook(self._keep("head")))
        self.pairs: list[int] = []
        self.adapters = nn.ModuleList()
        if beta > 0:
            with torch.no_grad():
                was = student.training
                teacher.eval(), student.eval()
                teacher(example), student(example)
                student.train(was)
            t_maps, s_maps = _maps(self._seen["teacher"]), _maps(self._seen["student"])
            # each student map with the teacher map of the nearest resolution
            self.pairs = [min(range(len(t_maps)), key=lambda j, s=s: abs(t_maps[j].shape[-1] - s.shape[-1]))
                          for s in s_maps]
            self.adapters.extend(nn.Conv2d(s.shape[1], t_maps[j].shape[1], 1) for s, j in zip(s_maps, self.pairs))
        self._seen.clear()

    def _keep(self, key: str) -> Any:
        def hook(_m: nn.Module, _i: tuple, out: Any) -> None:
            self._seen[key] = out
        return hook

    def record(self) -> dict[str, Any]:
        return {"method": "prediction distillation (teacher detections as soft targets) + PKD feature imitation",
                "feature_pairs": [{"student_map": i, "teacher_map": j} for i, j in enumerate(self.pairs)],
                "score_floor": SCORE_FLOOR, "negatives_per_match": NEGATIVES_PER_MATCH}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()

    def feature_loss(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        total = []
        for s, j, adapter in zip(student_maps, self.pairs, self.adapters):
            t = teacher_maps[j].detach()
            s = adapter(s.float())
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            total.append(pkd_loss(s, t))
        return torch.stack(total).mean()

    def prediction_loss(self, student: nn.Module, class_logits: torch.Tensor, regression: torch.Tensor,
                        detections: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.ops import boxes as box_ops

        boxes, scores, labels, count = detections
        anchors, t = student.anchors, self.temperature
        logp = F.log_softmax(class_logits.float() / t, dim=-1)  # [N, A, 1 + C]
        cls_terms, box_terms, matched_total = [], [], 0
        for i in range(class_logits.shape[0]):
            keep = scores[i, :int(count[i])] > SCORE_FLOOR
            t_boxes, t_scores, t_labels = boxes[i][:len(keep)][keep], scores[i][:len(keep)][keep], labels[i][:len(keep)][keep]
            match = (student.proposal_matcher(box_ops.box_iou(t_boxes, anchors)) if len(t_boxes)
                     else torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device))
            pos = match >= 0
            n_pos = int(pos.sum())
            matched_total += n_pos
            target = torch.zeros_like(logp[i])
            target[:, 0] = 1.0  # background where the teacher saw nothing
            if n_pos:
                s = t_scores[match[pos]].clamp(1e-6, 1 - 1e-6)
                target[pos] = 0.0
                target[pos, 0] = (1 - s) ** (1 / t)
                target[pos, 1 + t_labels[match[pos]]] = s ** (1 / t)
                target[pos] = target[pos] / target[pos].sum(-1, keepdim=True)
                enc = student.box_coder.encode_single(t_boxes[match[pos]], anchors[pos])
                box_terms.append((F.smooth_l1_loss(regression[i][pos].float(), enc, reduction="none").sum(-1)
                                  * s).sum())
            kl = (target * (torch.log(target.clamp_min(1e-12)) - logp[i])).sum(-1)  # per anchor
            negatives = kl.detach().masked_fill(pos, float("-inf"))
            n_neg = min(NEGATIVES_PER_MATCH * max(n_pos, 1), int((~pos).sum()))
            cls_terms.append(kl[pos].sum() + kl[negatives.topk(n_neg).indices].sum())
        norm = max(matched_total, 1)
        soft = torch.stack(cls_terms).sum() * (t * t) / norm
        soft_box = torch.stack(box_terms).sum() / norm if box_terms else regression.sum() * 0.0
        return soft, soft_box

    def step(self, student: nn.Module, x: torch.Tensor, y: Any) -> dict[str, torch.Tensor]:
        """A ``loss_step`` for edgepipe.training.loop.fit (``student`` may be the DDP-wrapped student)."""
        teacher = self._models[0]
        teacher.eval()
        detections: tuple[torch.Tensor, ...] = ()
        if self.alpha > 0 or self.beta > 0:  # labels only (alpha = beta = 0, the scratch baselines): no teacher call
            with torch.no_grad():  # in float32 even under autocast: they index and fill float targets
                detections = tuple(d.float() if d.is_floating_point() else d for d in teacher(x))
        teacher_maps = _maps(self._seen.pop("teacher")) if self.beta > 0 else []
        losses = student(x, y)  # the student's own terms on the labels; the hooks keep its maps and head outputs
        hard = sum(losses.values())
        terms = {k: v.detach() for k, v in losses.items()}
        total = hard
        zero = hard.detach() * 0.0
        soft = soft_box = feature = zero
        if self.alpha > 0:
            soft, soft_box = self.prediction_loss(self._models[1], *self._seen.pop("head"), detections)
            total = total + self.alpha * (soft + soft_box)
        if self.beta > 0:
            feature = self.feature_loss(_maps(self._seen["student"]), teacher_maps)
            total = total + self.beta * feature
        self._seen.clear()
        return {"loss": total, "hard": hard.detach(), "soft": soft.detach(), "soft_box": soft_box.detach(),
                "feature": feature.detach(), **terms}
