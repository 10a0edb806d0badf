"""A one-stage detector's raw outputs to its detections, as one graph: decoding, candidates, NMS, fixed-size outputs.

``select_detections`` is what a one-stage detector (``edgepipe.models.detectors.SSDDetector``) runs after its core in
eval mode, in PyTorch and, unchanged, in the exported ONNX graph, so the export check compares like with like:

1. class probabilities (softmax over background + classes; background dropped) and boxes decoded from the anchors by
   torchvision's ``BoxCoder`` and clipped to the image;
2. the ``candidates`` best (anchor, class) pairs of each image (one ``TopK``), as torchvision's SSD keeps its best
   candidates before NMS; this bounds the NMS's input (TensorRT's NMS considers at most 2000 boxes per image on SM 5.3
   and 6.2 devices and 5000 on the others: TensorRT operator docs, "NMS", TopK box limit);
3. NMS per image and per class, ONNX's ``NonMaxSuppression`` in the graph (``BatchedNMS``: in PyTorch torchvision's
   ``batched_nms``; exported by its ``symbolic`` as the ONNX op, which TensorRT's ONNX parser builds as its
   ``INMSLayer``, ``INetworkDefinition.add_nms``, and OpenVINO as its NMS op);
4. the ``max_detections`` best kept detections of each image in score order, padded: ``boxes`` [N, K, 4],
   ``scores`` [N, K], ``labels`` [N, K] (-1 for padding) and ``count`` [N].

Every shape but the selected-index list is static apart from the batch, so the graph has a dynamic batch axis.

Why not torchvision's own ``postprocess_detections``: it loops over the images of a batch and over classes in Python,
which an exporter unrolls for one batch size; the ops here are the batch-wide equivalents of the same steps.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


class BatchedNMS(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` semantics: ``boxes`` [N, T, 4] (x1, y1, x2, y2), ``scores`` [N, C, T]; returns the
    selected ``(image, class, box)`` index triples [M, 3]. A box is a candidate when its score exceeds
    ``score_threshold``; within one image and class, a box is dropped when its IoU with a higher-scored kept box
    exceeds ``iou_threshold``; at most ``max_per_class`` boxes are kept per image and class."""

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,  # noqa: ANN001
                score_threshold: float) -> torch.Tensor:
        from torchvision.ops import batched_nms

        n, c, t = scores.shape
        image, cls, box = (scores > score_threshold).nonzero(as_tuple=True)
        group = image * c + cls
        keep = batched_nms(boxes[image, box].float(), scores[image, cls, box].float(), group, iou_threshold)
        # keep is in decreasing score order: a box's rank within its group caps each (image, class) at max_per_class
        kept_group = group[keep]
        order = torch.argsort(kept_group, stable=True)
        sorted_group = kept_group[order]
        first = torch.searchsorted(sorted_group, sorted_group)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device) - first
        keep = keep[rank < max_per_class]
        return torch.stack([image[keep], cls[keep], box[keep]], dim=1)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):  # noqa: ANN001, ANN205
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
                    g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)))


def decode_boxes(box_coder: object, regression: torch.Tensor, anchors: torch.Tensor, size: tuple[int, int],
                 ) -> torch.Tensor:
    """``regression`` [N, A, 4] against ``anchors`` [A, 4] with torchvision's ``BoxCoder``, clipped to ``size``
    (H, W): boxes [N, A, 4] in input pixels."""
    n, a = regression.shape[0], anchors.shape[0]
    from torchvision.ops import boxes as box_ops

    flat = box_coder.decode_single(regression.reshape(-1, 4), anchors.unsqueeze(0).expand(n, a, 4).reshape(-1, 4))
    return box_ops.clip_boxes_to_image(flat, size).reshape(n, a, 4)


def select_detections(class_logits: torch.Tensor, boxes: torch.Tensor, max_detections: int, candidates: int,
                      iou_threshold: float, score_threshold: float,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``class_logits`` [N, A, 1 + C] (index 0: background) and decoded ``boxes`` [N, A, 4] to the padded
    (boxes, scores, labels, count) of the module docstring; labels are 0..C-1."""
    n, a, c1 = class_logits.shape
    c = c1 - 1
    probs = F.softmax(class_logits.float(), dim=-1)[..., 1:].reshape(n, a * c)
    t = min(candidates, a * c)
    top, index = probs.topk(t, dim=1)
    anchor = torch.div(index, c, rounding_mode="trunc")  # = floor here (indices >= 0), and one integer Div in ONNX
    label = index - anchor * c
    cand = torch.gather(boxes.float(), 1, anchor.unsqueeze(-1).expand(n, t, 4))
    classes = torch.arange(c, device=label.device).view(1, c, 1)
    per_class = torch.where(label.unsqueeze(1) == classes, top.unsqueeze(1), torch.zeros_like(top).unsqueeze(1))
    selected = BatchedNMS.apply(cand, per_class, max_detections, iou_threshold, score_threshold)
    kept = torch.zeros_like(top)
    kept[selected[:, 0], selected[:, 2]] = 1.0
    k = min(max_detections, t)
    score, order = (top * kept).topk(k, dim=1)
    valid = score > 0
    out_boxes = torch.gather(cand, 1, order.unsqueeze(-1).expand(n, k, 4)) * valid.unsqueeze(-1).to(cand.dtype)
    out_labels = torch.where(valid, torch.gather(label, 1, order), torch.full_like(order, -1))
    count = valid.to(score.dtype).sum(dim=1).to(torch.int64)  # a float ReduceSum: TensorRT reduces floats
    if k < max_detections:  # fewer (anchor, class) pairs than detections asked for: pad to the fixed size
        pad = max_detections - k
        out_boxes, score = F.pad(out_boxes, (0, 0, 0, pad)), F.pad(score, (0, pad))
        out_labels = F.pad(out_labels, (0, pad), value=-1)
    return out_boxes, score, out_labels, count
