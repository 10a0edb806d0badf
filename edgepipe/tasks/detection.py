"""Object detection (issue 27): images in, ``boxes``/``scores``/``labels``/``count`` out, scored by COCO mAP.

Data: ``data.kind`` coco, voc or yolo (``edgepipe.data.detection``) or the embedded ``digit-canvases``
(``edgepipe.data.canvas``), served at ``data.image_size`` by ``edgepipe.data.detection_batches``. Models:
``edgepipe.models.detectors`` (torchvision's detectors behind fixed-shape outputs). A detector trains on its own
loss terms (torchvision's: classification and box regression, and the RPN's for a two-stage model), each logged per
epoch. Scores: mAP@.5 (the headline), mAP@[.5:.95], mAP@.75 and the AP of each class from pycocotools' COCOeval
(``edgepipe.tasks.detection_metrics``).

Every stage takes a detector: distillation across architectures (``distiller``: prediction distillation and PKD,
``edgepipe.training.detection_kd``), pruning and QAT of a one-stage detector's core (``graph_core``; a two-stage
detector is refused with one line, as is Taylor importance), export with decoding and NMS in the graph
(``edgepipe.models.detection_outputs``; a two-stage teacher per image under an ONNX Scan), checked by mAP, and
the device's detections scored on the host (``device_validation``, ``edgepipe.engine.device_results``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepipe import device as devices
from edgepipe.config import DETECTION_KINDS
from edgepipe.errors import EdgepipeError
from edgepipe.runtime.runner import TensorSpec
from edgepipe.tasks import register
from edgepipe.tasks.base import Task
from edgepipe.tasks.detection_metrics import coco_scores
from edgepipe.tasks.metric import Metric

MAP50 = Metric("map50", "mAP@.5")
MAP = Metric("map", "mAP@[.5:.95]")
OUTPUTS = ("boxes", "scores", "labels", "count")
EXPORT_MAP_GAP = 0.5
"""Points of mAP@.5 a float graph may differ from PyTorch by on the validation split (an INT8 graph: 1, as for every
task): a graph that computes something else misses by far more."""


def _per_image(outputs: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The padded outputs of a batch of images as each image's (boxes, scores, labels), its ``count`` first ones."""
    boxes, scores, labels, count = (np.asarray(outputs[k]) for k in OUTPUTS)
    return [(boxes[i, :c], scores[i, :c], labels[i, :c]) for i, c in enumerate(count.astype(int))]


EXAMPLES = 4
"""Validation images whose detections each stage records, for the report's pictures."""
EXAMPLE_SCORE = 0.3


def _examples(detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[dict[str, list]]:
    """The first ``EXAMPLES`` images' detections scoring at least ``EXAMPLE_SCORE`` (at most 20 each), rounded."""
    out = []
    for boxes, scores, labels in detections[:EXAMPLES]:
        keep = np.flatnonzero(np.asarray(scores) >= EXAMPLE_SCORE)[:20]
        out.append({"boxes": np.round(np.asarray(boxes)[keep], 1).tolist(),
                    "scores": np.round(np.asarray(scores)[keep], 3).tolist(),
                    "labels": np.asarray(labels)[keep].astype(int).tolist()})
    return out


def _truth(targets: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of targets (lists of {"boxes", "labels"}) as one list of (boxes, labels) per image."""
    return [(np.asarray(t["boxes"]), np.asarray(t["labels"])) for batch in targets for t in batch]


@register
class Detection(Task):
    name = "detection"
    headline = MAP50
    secondary = (MAP,)
    data_kinds = DETECTION_KINDS
    device_metric = "map50"  # computed on the host from the device's detections (edgepipe import-results)
    exportable = True  # the wrapped detectors (see exports)

    def exports(self, model: nn.Module) -> bool:
        """Detectors wrapped by ``edgepipe.models.detectors`` export: SSD/SSDlite with decoding and NMS in one
        batch-wide graph, a two-stage model (Faster R-CNN) traced per image and scanned over the batch; a model
        without the wrapper's ``exportable`` is measured in PyTorch."""
        return bool(getattr(model, "exportable", False))

    def export_check(self, model: nn.Module, onnx_bytes: bytes, data: Any, batch_size: int, quantized: bool,
                     tolerance: float, min_agreement: float, threads: int | None = None) -> dict[str, Any] | None:
        """By mAP@.5 on the validation split (PyTorch against ONNX Runtime), float graphs too: detections are a set,
        and two boxes of nearly equal score may trade places between runtimes; plus the largest difference of each
        output, recorded."""
        from edgepipe.export.check import compare_outputs

        return compare_outputs(self, model, onnx_bytes, data, batch_size, quantized, tolerance, threads,
                               metric_gap=EXPORT_MAP_GAP)

    def device_validation(self, data: Any, limit: int) -> tuple[dict[str, np.ndarray], Any]:
        from edgepipe.backends.tensorrt_plan import detection_validation_arrays, detection_validation_targets

        images, targets = data.val_head(limit)
        arrays = detection_validation_arrays(images, targets, data.mean.numpy(), data.std.numpy(), limit,
                                             list(data.class_names))
        return arrays, detection_validation_targets(arrays)

    def check_stage(self, config: Any, stage: str) -> None:
        if stage == "prune" and config.prune.enabled and config.prune.importance.value == "taylor":
            raise EdgepipeError("prune.importance: taylor needs a detector's loss gradients in eval mode, which "
                                "torchvision's detectors do not give; use magnitude or bn_scale")
        if stage not in ("teacher", "distill", "prune", "qat", "export", "compile", "ptq", "finetune"):
            raise EdgepipeError(f"task detection: the {stage} stage cannot take a detector yet (issue 27 is in "
                                "progress: the teacher and the distilled student train, export and compile, and "
                                "stay done in the run)")
        if stage == "distill" and config.distill.enabled and config.distill.feature_pairs:
            raise EdgepipeError("distill.feature_pairs: a detector's feature maps are paired by resolution (PKD on "
                                "every map its head reads); leave feature_pairs empty and set distill.beta")

    def load_data(self, config: Any) -> Any:
        from edgepipe.data.detection_batches import detection_split_pair, detection_bundle

        cfg = config.data
        train, val, size = detection_split_pair(cfg, config.seed)
        bundle = detection_bundle(train, val, size, cfg.augment, cfg.hflip and cfg.kind != "digit-canvases",
                                  config.seed)
        if cfg.limit_train or cfg.limit_val:
            bundle = bundle.subset(cfg.limit_train or bundle.train_size, cfg.limit_val or bundle.val_size)
        return bundle

    def feeds(self, x: Any) -> dict[str, np.ndarray]:
        return {"images": np.ascontiguousarray(np.asarray(x, dtype=np.float32))}

    def inputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return (TensorSpec("images", "float32", ("batch", *(meta.get("input_shape") or ()))),)

    def outputs(self, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        k = meta.get("max_detections") or 100
        return (TensorSpec("boxes", "float32", ("batch", k, 4)), TensorSpec("scores", "float32", ("batch", k)),
                TensorSpec("labels", "int64", ("batch", k)), TensorSpec("count", "int64", ("batch",)))

    # --- training ----------------------------------------------------------------------------------------------
    def train_loss(self, model: nn.Module, x: Any, y: Any) -> dict[str, torch.Tensor]:
        """torchvision's detectors compute their loss terms themselves from the targets, in training mode."""
        return self.loss(model(x, y), y)

    def loss(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        if not isinstance(outputs, Mapping):
            raise EdgepipeError("detection: the model returned no loss terms in training mode; a detector's forward "
                                "must take (images, targets) and return its losses (edgepipe.models.detectors)")
        total = sum(outputs.values())
        return {"loss": total, "hard": total.detach(), **{k: v.detach() for k, v in outputs.items()}}

    def distill_loss(self, student: Any, teacher: Any, targets: Any, temperature: float, alpha: float,
                     method: str = "kd", weights: tuple[float, ...] = ()) -> dict[str, torch.Tensor]:
        raise EdgepipeError("detection: detectors distil through Detection.distiller (their outputs are detection "
                            "sets, not logits)")

    def distiller(self, teacher: nn.Module, student: nn.Module, temperature: float, alpha: float, beta: float,
                  example: torch.Tensor) -> nn.Module:
        """Prediction distillation and PKD feature imitation (``edgepipe.training.detection_kd``)."""
        from edgepipe.training.detection_kd import DetectionDistiller

        return DetectionDistiller(teacher, student, temperature, alpha, beta, example)

    @torch.no_grad()
    def predict(self, model: nn.Module, data: Any, batch_size: int) -> tuple[list[Any], list[Any]]:
        """Every validation image's detections (on the model's device) and its ground truth."""
        was = model.training
        model.eval()
        on = devices.module_device(model)
        detections, truth = [], []
        for x, y in data.val_batches(batch_size):
            out = model(devices.to_device(x, on))
            named = dict(zip(OUTPUTS, (t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                                       for t in out)))
            detections += _per_image(named)
            truth += _truth([y])
        model.train(was)
        return detections, truth

    def val_score(self, model: nn.Module, data: Any, batch_size: int) -> float:
        """mAP@.5 on the validation split (every rank scores the whole split: mAP does not add up over shards)."""
        detections, truth = self.predict(model, data, batch_size)
        return float(coco_scores(truth, detections, data.class_names)["map50"] or 0.0)

    # --- checks and scores -------------------------------------------------------------------------------------
    def check_outputs(self, out: Any, field: str, meta: Mapping[str, Any], batch: int) -> None:
        if not (isinstance(out, (tuple, list)) and len(out) == 4 and all(isinstance(t, torch.Tensor) for t in out)):
            raise EdgepipeError(f"{field}: a detector must return (boxes, scores, labels, count) tensors in eval mode; "
                                "wrap a torchvision detection model in edgepipe.models.detectors.Detector")
        boxes, scores, labels, count = out
        if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4 or scores.shape != boxes.shape[:2] \
                or labels.shape != boxes.shape[:2] or count.shape != (batch,):
            raise EdgepipeError(f"{field}: outputs shapes {[list(t.shape) for t in out]} for a batch of {batch}; "
                                "expected boxes [N, K, 4], scores [N, K], labels [N, K], count [N]")

    def metrics(self, outputs: Mapping[str, np.ndarray], targets: list[Any],
                class_names: list[str] | None = None) -> dict[str, Any]:
        truth = _truth(targets)
        detections = _per_image(outputs)
        if len(detections) != len(truth):
            raise EdgepipeError(f"detections for {len(detections)} images, ground truth for {len(truth)}")
        names = class_names or [str(i) for i in range(1 + max((int(t[1].max()) for t in truth if len(t[1])),
                                                              default=0))]
        scores = coco_scores(truth, detections, names)
        return {**scores, "samples": len(truth), "examples": _examples(detections)}

    def score_outputs(self, outputs: list[Any], targets: list[Any]) -> float:
        named = {k: np.concatenate([o[i].float().cpu().numpy() if o[i].is_floating_point() else o[i].cpu().numpy()
                                    for o in outputs]) for i, k in enumerate(OUTPUTS)}
        return float(self.metrics(named, targets)["map50"] or 0.0)

    def fidelity(self, reference: Mapping[str, np.ndarray], compiled: Mapping[str, np.ndarray], targets: list[Any],
                 limit: float) -> dict[str, Any]:
        ref, out = self.metrics(reference, targets), self.metrics(compiled, targets)
        drop = MAP50.drop_points(ref["map50"] or 0.0, out["map50"] or 0.0)
        return {"drop_points": drop, "max_drop_points": limit, "fails": drop > limit,
                "test": "mAP@.5 of the compiled model against the reference runtime's on the same images",
                "reference_map50": ref["map50"], "compiled_map50": out["map50"], "samples": ref["samples"]}

    def graph_core(self, model: nn.Module) -> nn.Module:
        """A one-stage detector's core (normalise, backbone, head): one tensor graph Torch-Pruning traces and QAT
        quantizes (its ``graph_part``), the decoding and NMS after it untouched and float; a two-stage detector is
        refused."""
        if not hasattr(model, "core"):
            raise EdgepipeError("a two-stage detector's RoI stage is not one traceable graph: only one-stage SSD "
                                "students (ssd_small, tv_ssdlite320_mobilenet_v3_large) are pruned and quantized")
        return model.core

    def protected_layers(self, model: nn.Module, meta: Mapping[str, Any]) -> list[nn.Module]:
        """The layers whose outputs are the detections: the class and box predictors of every head (SSD's and
        RetinaNet's per-level predictors, Faster R-CNN's RPN and box predictor)."""
        ends = ("cls_logits", "bbox_pred", "cls_score", "classification_head", "regression_head")
        return [m for n, m in model.named_modules() if n.split(".")[-1] in ends or
                any(f".{e}.module_list." in f".{n}." for e in ends[3:])]

