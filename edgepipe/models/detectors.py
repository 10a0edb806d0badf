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
    """A torchvision detection model with edgepipe's labels and fixed-shape outputs (see the module docstring)."""

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

    def pad(self, detections: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        k = self.max_detections
        n = len(detections)
        device = detections[0]["boxes"].device if detections else torch.device("cpu")
        boxes = torch.zeros(n, k, 4, device=device)
        scores = torch.zeros(n, k, device=device)
        labels = torch.full((n, k), -1, dtype=torch.int64, device=device)
        count = torch.zeros(n, dtype=torch.int64, device=device)
        for i, d in enumerate(detections):
            m = min(k, len(d["scores"]))
            order = torch.argsort(d["scores"], descending=True)[:m]
            boxes[i, :m], scores[i, :m], labels[i, :m] = d["boxes"][order], d["scores"][order], d["labels"][order] - 1
            count[i] = m
        return boxes, scores, labels, count


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


def _load_backbone(backbone: nn.Module, path: str | None) -> None:
    if path:
        from edgepipe.models.weights import load_state_dict_file

        backbone.load_state_dict(load_state_dict_file(path))


def ssd_small(num_classes: int, size: int = 64, widths: tuple[int, ...] = (16, 32, 64, 64), maps: int = 3,
              backbone_weights: str | None = None) -> Detector:
    """A one-stage SSD (Liu et al. 2016; torchvision's SSD, its default boxes, matcher, losses and NMS) on a narrow
    backbone, for small images such as the digit canvases: ``maps`` feature maps of the last stages, default boxes
    of aspect 1, 2 and 1/2 at scales from 0.15 to 0.9 of the image."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD, SSDHead

    backbone = _Features(tuple(widths), maps)
    _load_backbone(backbone, backbone_weights)
    anchors = DefaultBoxGenerator([[2]] * maps, min_ratio=0.15, max_ratio=0.9)
    channels = list(widths[-maps:])
    head = SSDHead(channels, anchors.num_anchors_per_location(), num_classes + 1)
    model = SSD(backbone, anchors, (size, size), num_classes + 1, head=head, score_thresh=0.01,
                detections_per_img=MAX_DETECTIONS, topk_candidates=200)
    return Detector(model, num_classes)


def faster_rcnn_small(num_classes: int, size: int = 64, widths: tuple[int, ...] = (32, 64, 128),
                      backbone_weights: str | None = None) -> Detector:
    """A two-stage Faster R-CNN (Ren et al. 2015; torchvision's FasterRCNN: RPN, RoIAlign, box head) on a narrow
    stride-8 backbone, the small default's teacher: anchors of 8 to 32 pixels at three aspects."""
    from torchvision.models.detection.faster_rcnn import FasterRCNN
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = _Features(tuple(widths), 1)
    _load_backbone(backbone, backbone_weights)
    anchors = AnchorGenerator(sizes=((8, 16, 32),), aspect_ratios=((0.5, 1.0, 2.0),))
    model = FasterRCNN(backbone, num_classes + 1, min_size=size, max_size=size, rpn_anchor_generator=anchors,
                       box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
                       box_detections_per_img=MAX_DETECTIONS, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100)
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
    model.size = (size, size)
    model.transform.fixed_size = (size, size)
    model.transform.min_size, model.transform.max_size = (size,), size
    _load_backbone(model.backbone.features, backbone_weights)
    return Detector(model, num_classes)


DETECTORS = {
    "ssd_small": ssd_small,
    "faster_rcnn_small": faster_rcnn_small,
    "tv_fasterrcnn_resnet50_fpn": tv_fasterrcnn_resnet50_fpn,
    "tv_fasterrcnn_mobilenet_v3_large_fpn": tv_fasterrcnn_mobilenet_v3_large_fpn,
    "tv_ssdlite320_mobilenet_v3_large": tv_ssdlite320_mobilenet_v3_large,
}
"""The registered detection architectures (edgepipe.models.zoo adds them to ARCHITECTURES)."""
