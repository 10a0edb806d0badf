"""Detectors: torchvision's detection families behind one fixed interface (issue 27, item 3).

``Detector`` wraps any torchvision detection model (Faster R-CNN, SSD, SSDlite, RetinaNet, FCOS):

- training (``model.train()``): ``detector(images, targets)`` returns the model's own loss dict (classification and
  box regression terms; for Faster R-CNN the RPN's too), with edgepipe's labels ``0..C-1`` shifted to torchvision's
  ``1..C`` (0 is background there);
- inference: ``detector(images)`` returns four tensors, the task's outputs: ``boxes`` float32 ``[N, K, 4]`` (x1, y1,
  x2, y2 in input pixels), ``scores`` ``[N, K]``, ``labels`` int64 ``[N, K]`` and ``count`` int64 ``[N]``, each image's
  detections (after the model's own decoding and NMS) in score order, padded to ``K = max_detections`` (padding:
  zero boxes and scores, label -1). Fixed shapes are what an exported graph and a TensorRT engine return.

The registered architectures build at the data's resolution (``size``: the model neither resizes nor pads, so the
image a deployed model receives is the one it was trained on) and never download weights: a backbone's weights may
be given as a state-dict file (``backbone_weights``, loaded with ``weights_only=True``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn


MAX_DETECTIONS = 100


class Detector(nn.Module):
    """A torchvision detection model with edgepipe's labels and fixed-shape outputs (see the module docstring).
    Its inference runs torchvision's own per-image pipeline (transform, RPN, RoI heads, post-processing), which a
    trace unrolls for one batch size: it exports traced for one image and scanned over the batch
    (``export_per_image``, ``edgepipe.export.per_image``). One-stage SSDs are ``SSDDetector``, whose graph is
    batch-wide and whose core prunes and quantizes."""

    exportable = True
    export_per_image = True

    def __init__(self, model: nn.Module, num_classes: int, max_detections: int = MAX_DETECTIONS) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.max_detections = max_detections

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if self.training:
            if targets is None:
                raise ValueError("Detector: training needs targets (boxes and labels per image)")
            shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
            return self.model(list(images), shifted)
        return self.pad(self.model(list(images)))

    def feature_module(self) -> nn.Module:
        """The module whose output is the feature maps the heads read (its backbone, with the FPN where it has
        one): feature distillation hooks it."""
        return self.model.backbone

    def pad(self, detections: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """Each image's detections in score order, padded to ``max_detections`` by concatenating padding and cutting
        at a fixed length: no length read as a Python number, so a traced graph holds for any detection count."""
        k = self.max_detections
        out: list[list[torch.Tensor]] = [[], [], [], []]
        for d in detections:
            order = torch.argsort(d["scores"], descending=True)
            scores = d["scores"][order]
            out[0].append(torch.cat([d["boxes"][order], scores.new_zeros(k, 4)])[:k])
            out[1].append(torch.cat([scores, scores.new_zeros(k)])[:k])
            out[2].append(torch.cat([d["labels"][order] - 1, d["labels"].new_full((k,), -1)])[:k])
            out[3].append((torch.arange(k, device=scores.device) < scores.shape[0]).sum())
        if not detections:
            return (torch.zeros(0, k, 4), torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64),
                    torch.zeros(0, dtype=torch.int64))
        return tuple(torch.stack(parts) for parts in out)


class DetectorCore(nn.Module):
    """A one-stage detector's network, tensors in and out: images [N, 3, H, W] in [0, 1] -> normalised -> backbone ->
    head -> ``class_logits`` [N, A, 1 + C] and ``box_regression`` [N, A, 4] over its A anchors. Plain tensors and
    modules only, so torch.fx traces it (QAT), Torch-Pruning builds its dependency graph (pruning) and the exporter
    writes it; ``features`` are the maps its head reads (feature distillation)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.backbone((images - self.mean) / self.std)
        return list(maps.values()) if isinstance(maps, dict) else [maps]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.features(images))
        return out["cls_logits"], out["bbox_regression"]


class SSDDetector(Detector):
    """SSD and SSDlite (torchvision's ``SSD``) with an exportable inference path: the core (``DetectorCore``) and then
    ``edgepipe.models.detection_outputs.select_detections`` (decoding, NMS per class, fixed-size outputs), the same
    code in PyTorch and in the ONNX graph. Training computes torchvision's SSD losses (its matcher, box coder and
    ``SSD.compute_loss`` with hard negative mining) on the core's outputs, so what QAT and pruning change in the core
    is what trains. The anchors are computed once at the model's input size (it never resizes)."""

    exportable = True
    export_per_image = False
    graph_part = "core"  # what QAT quantizes (edgepipe.quantization.layers.graph_part); decoding and NMS stay float

    def __init__(self, ssd: nn.Module, num_classes: int, size: int, max_detections: int = MAX_DETECTIONS,
                 candidates: int = 400) -> None:
        nn.Module.__init__(self)
        self.num_classes, self.max_detections, self.candidates = num_classes, max_detections, candidates
        self.size = (size, size)
        self.core = DetectorCore(ssd.backbone, ssd.head, ssd.transform.image_mean, ssd.transform.image_std)
        self.box_coder, self.proposal_matcher = ssd.box_coder, ssd.proposal_matcher
        self.neg_to_pos_ratio = ssd.neg_to_pos_ratio
        self.score_thresh, self.nms_thresh = ssd.score_thresh, ssd.nms_thresh
        self.register_buffer("anchors", self._anchors(ssd.anchor_generator), persistent=False)

    @torch.no_grad()
    def _anchors(self, generator: nn.Module) -> torch.Tensor:
        from torchvision.models.detection.image_list import ImageList

        was = self.core.training
        self.core.eval()
        on = next(self.core.parameters()).device  # "meta" when a build is only checked (edgepipe.models.zoo)
        shapes = [m.shape for m in self.core.features(torch.zeros(1, 3, *self.size, device=on))]
        self.core.train(was)
        if on.type == "meta":  # shapes only: as many boxes as the generator would give
            per_cell = generator.num_anchors_per_location()
            return torch.zeros(sum(k * s[-2] * s[-1] for k, s in zip(per_cell, shapes)), 4, device=on)
        # the default boxes depend on the feature maps' sizes only
        return generator(ImageList(torch.zeros(1, 3, *self.size, device=on), [self.size]),
                         [torch.zeros(s, device=on) for s in shapes])[0]

    def feature_module(self) -> nn.Module:
        return self.core.backbone

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        class_logits, regression = self.core(images)
        if self.training:
            if targets is None:
                raise ValueError("Detector: training needs targets (boxes and labels per image)")
            return self.losses(class_logits, regression, targets)
        return self.detections(class_logits, regression)

    def detections(self, class_logits: torch.Tensor, regression: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from edgepipe.models.detection_outputs import decode_boxes, select_detections

        boxes = decode_boxes(self.box_coder, regression.float(), self.anchors, self.size)
        return select_detections(class_logits, boxes, self.max_detections, self.candidates, self.nms_thresh,
                                 self.score_thresh)

    def matches(self, targets: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each anchor's matched ground-truth box (-1: background), torchvision's SSD matcher."""
        from torchvision.ops import boxes as box_ops

        return [torch.full((len(self.anchors),), -1, dtype=torch.int64, device=self.anchors.device)
                if t["boxes"].numel() == 0 else self.proposal_matcher(box_ops.box_iou(t["boxes"], self.anchors))
                for t in targets]

    def losses(self, class_logits: torch.Tensor, regression: torch.Tensor, targets: list[dict[str, torch.Tensor]],
               ) -> dict[str, torch.Tensor]:
        from torchvision.models.detection.ssd import SSD

        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        head = {"cls_logits": class_logits.float(), "bbox_regression": regression.float()}
        # SSD.compute_loss reads only box_coder and neg_to_pos_ratio from its instance, both held here
        return SSD.compute_loss(self, shifted, head, [self.anchors] * len(targets), self.matches(targets))


def _fixed_size(model: nn.Module, size: int) -> nn.Module:
    """No resizing inside the model: the image arrives at the size the data (and the deployed input) has."""
    model.transform.min_size = (size,)
    model.transform.max_size = size
    return model


class _Features(nn.Module):
    """A narrow CNN for the small default: conv-BN-ReLU stages, each halving the resolution; returns the last
    ``outputs`` stages' maps (an OrderedDict, as torchvision's detection heads take)."""

    def __init__(self, widths: tuple[int, ...], outputs: int) -> None:
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            layers.append(nn.Sequential(nn.Conv2d(cin, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                                        nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            cin = w
        self.stages = nn.ModuleList(layers)
        self.outputs = outputs
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return OrderedDict((str(i), m) for i, m in enumerate(maps[-self.outputs:]))


class _FeaturePyramid(nn.Module):
    """``_Features``' last three maps (strides 4, 8, 16 of four stages) through torchvision's
    ``FeaturePyramidNetwork``: every level ``channels`` wide, so RoIs of every size pool from a map of their scale."""

    def __init__(self, widths: tuple[int, ...], channels: int) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

        super().__init__()
        self.body = _Features(widths, 3)
        self.fpn = FeaturePyramidNetwork(list(widths[-3:]), channels)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _load_backbone(backbone: nn.Module, path: str | None) -> None:
    if path:
        from edgepipe.models.weights import load_state_dict_file

        backbone.load_state_dict(load_state_dict_file(path))


def ssd_small(num_classes: int, size: int = 64, widths: tuple[int, ...] = (16, 32, 64, 64), maps: int = 3,
              min_ratio: float = 0.15, max_ratio: float = 0.9, backbone_weights: str | None = None) -> Detector:
    """A one-stage SSD (Liu et al. 2016; torchvision's SSD, its default boxes, matcher, losses and NMS) on a narrow
    backbone, for small images such as the digit canvases: ``maps`` feature maps of the last stages, default boxes
    of aspect 1, 2 and 1/2 at scales from ``min_ratio`` to ``max_ratio`` of the image (lower ``min_ratio`` for
    small objects)."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD, SSDHead

    backbone = _Features(tuple(widths), maps)
    _load_backbone(backbone, backbone_weights)
    anchors = DefaultBoxGenerator([[2]] * maps, min_ratio=min_ratio, max_ratio=max_ratio)
    channels = list(widths[-maps:])
    head = SSDHead(channels, anchors.num_anchors_per_location(), num_classes + 1)
    model = SSD(backbone, anchors, (size, size), num_classes + 1, head=head, score_thresh=0.01,
                detections_per_img=MAX_DETECTIONS, topk_candidates=200)
    return SSDDetector(model, num_classes, size)


def faster_rcnn_small(num_classes: int, size: int = 64, widths: tuple[int, ...] = (32, 64, 96, 128),
                      fpn_channels: int = 64, representation: int = 256, anchor_sizes: tuple[int, ...] = (8, 16, 32),
                      backbone_weights: str | None = None) -> Detector:
    """A two-stage Faster R-CNN with an FPN (Ren et al. 2015, Lin et al. 2017; torchvision's FasterRCNN: RPN,
    multi-scale RoIAlign, box head) on a narrow four-stage backbone, the small default's teacher: maps at strides 4,
    8 and 16 with anchors of ``anchor_sizes`` pixels (8, 16 and 32 by default; three aspects each); proposals, sampled RoIs and the box head's
    width (``representation``, torchvision's TwoMLPHead) sized for a few objects per image rather than COCO's (2000
    proposals, 512 RoIs, 1024 wide), which is most of its training time on a CPU."""
    from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = _FeaturePyramid(tuple(widths), fpn_channels)
    _load_backbone(backbone.body, backbone_weights)
    if len(anchor_sizes) != 3:
        raise ValueError(f"anchor_sizes: one size per pyramid level (3), got {list(anchor_sizes)}")
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    model = FasterRCNN(backbone, None, min_size=size, max_size=size, rpn_anchor_generator=anchors,
                       # one sample per bin: torchvision's CPU RoIAlign backward is most of a training step
                       box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=1,
                                                       canonical_scale=32, canonical_level=3),
                       box_head=TwoMLPHead(fpn_channels * 7 * 7, representation),
                       box_predictor=FastRCNNPredictor(representation, num_classes + 1),
                       box_detections_per_img=MAX_DETECTIONS,
                       rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_batch_size_per_image=128,
                       box_batch_size_per_image=64, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100)
    return _fixed_size_detector(model, size, num_classes)


def _fixed_size_detector(model: nn.Module, size: int, num_classes: int) -> Detector:
    return Detector(_fixed_size(model, size), num_classes)


def tv_fasterrcnn_resnet50_fpn(num_classes: int, size: int = 640, backbone_weights: str | None = None) -> Detector:
    """torchvision's Faster R-CNN ResNet-50 FPN (the usual accurate teacher), untrained."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                    min_size=size, max_size=size, box_detections_per_img=MAX_DETECTIONS)
    _load_backbone(model.backbone.body, backbone_weights)
    return Detector(model, num_classes)


def tv_fasterrcnn_mobilenet_v3_large_fpn(num_classes: int, size: int = 640, backbone_weights: str | None = None,
                                         ) -> Detector:
    """torchvision's Faster R-CNN MobileNetV3-Large FPN, untrained."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                              min_size=size, max_size=size, box_detections_per_img=MAX_DETECTIONS)
    _load_backbone(model.backbone.body, backbone_weights)
    return Detector(model, num_classes)


def tv_ssdlite320_mobilenet_v3_large(num_classes: int, size: int = 320, width_mult: float = 1.0,
                                     backbone_weights: str | None = None) -> Detector:
    """torchvision's SSDlite with a MobileNetV3-Large backbone (``width_mult`` narrower for an edge device), untrained,
    at ``size``."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                          width_mult=width_mult, detections_per_img=MAX_DETECTIONS)
    _load_backbone(model.backbone.features, backbone_weights)
    return SSDDetector(model, num_classes, size)


DETECTORS = {
    "ssd_small": ssd_small,
    "faster_rcnn_small": faster_rcnn_small,
    "tv_fasterrcnn_resnet50_fpn": tv_fasterrcnn_resnet50_fpn,
    "tv_fasterrcnn_mobilenet_v3_large_fpn": tv_fasterrcnn_mobilenet_v3_large_fpn,
    "tv_ssdlite320_mobilenet_v3_large": tv_ssdlite320_mobilenet_v3_large,
}
"""The registered detection architectures (edgepipe.models.zoo adds them to ARCHITECTURES)."""
