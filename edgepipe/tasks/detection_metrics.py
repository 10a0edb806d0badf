"""Detection scores from pycocotools' own COCOeval (issue 27, item 8): COCO mAP@[.5:.95], mAP@.5 and the AP of each
class, for ground truth and detections held in memory (``edgepipe.data.detection``'s form: x1, y1, x2, y2 in pixels).

COCOeval is the reference implementation every detection paper and library reports against; edgepipe only converts
boxes to its x, y, width, height form and reads its results (``stats`` and the ``precision`` array), so a figure here
is the figure pycocotools prints for the same boxes.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgepipe.errors import EdgepipeError


def coco_scores(truth: Sequence[tuple[np.ndarray, np.ndarray]], detections: Sequence[tuple[np.ndarray, np.ndarray,
                np.ndarray]], class_names: Sequence[str]) -> dict[str, Any]:
    """``truth``: per image (boxes [N, 4] x1y1x2y2, labels [N]); ``detections``: per image, in the same order
    (boxes [M, 4], scores [M], labels [M]). Returns ``map`` (mAP@[.5:.95]), ``map50`` (mAP@.5), ``map75``,
    ``per_class`` (name -> AP@[.5:.95], None for a class with no ground-truth box), ``images``, ``boxes``,
    ``detections``."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise EdgepipeError("detection metrics need pycocotools; pip install pycocotools") from None
    if len(truth) != len(detections):
        raise EdgepipeError(f"coco_scores: {len(truth)} images of ground truth but detections for {len(detections)}")
    images, annotations, results = [], [], []
    for i, ((boxes, labels), (d_boxes, d_scores, d_labels)) in enumerate(zip(truth, detections)):
        images.append({"id": i + 1})
        for b, c in zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels).reshape(-1)):
            w, h = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                                "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for b, s, c in zip(np.asarray(d_boxes, np.float64).reshape(-1, 4), np.asarray(d_scores).reshape(-1),
                           np.asarray(d_labels).reshape(-1)):
            results.append([i + 1, b[0], b[1], b[2] - b[0], b[3] - b[1], float(s), int(c) + 1])
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt.createIndex()
        if not results or not annotations:
            return _empty(len(images), len(annotations), len(results), class_names)
        dt = gt.loadRes(np.asarray(results, dtype=np.float64))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max detections]
    per_class: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else None
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "map75": float(ev.stats[2]),
            "per_class": per_class, "images": len(images), "boxes": len(annotations), "detections": len(results),
            "evaluator": "pycocotools COCOeval (bbox, maxDets 100)"}


def _empty(images: int, boxes: int, detections: int, class_names: Sequence[str]) -> dict[str, Any]:
    """No ground truth or no detection at all: COCOeval cannot run; every AP is 0 (None without ground truth)."""
    value = 0.0 if boxes else None
    return {"map": value, "map50": value, "map75": value, "per_class": dict.fromkeys(class_names, value),
            "images": images, "boxes": boxes, "detections": detections,
            "evaluator": "pycocotools COCOeval (bbox, maxDets 100)"}
