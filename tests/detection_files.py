"""Write a ``DetectionSplit`` in the three forms users bring (COCO, Pascal VOC, YOLO), for the reader tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from edgepipe.data.detection import DetectionSplit


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.pixels).save(path)


def write_coco(split: DetectionSplit, root: Path) -> tuple[Path, Path]:
    """``root/images/*.png`` and ``root/instances.json``; category ids start at 1 (as COCO's)."""
    doc = {"images": [], "annotations": [],
           "categories": [{"id": k + 1, "name": n} for k, n in enumerate(split.class_names)]}
    for i, im in enumerate(split.images):
        _save(im, root / "images" / f"{im.image_id}.png")
        doc["images"].append({"id": i + 1, "file_name": f"{im.image_id}.png", "width": im.width, "height": im.height})
        for b, c in zip(im.boxes.tolist(), im.labels.tolist()):
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": i + 1, "category_id": c + 1,
                                       "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0,
                                       "area": (b[2] - b[0]) * (b[3] - b[1])})
    (root / "instances.json").write_text(json.dumps(doc))
    return root / "instances.json", root / "images"


def write_voc(split: DetectionSplit, root: Path, name: str = "train") -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for im in split.images:
        _save(im, root / "JPEGImages" / f"{im.image_id}.png")
        objects = "".join(
            f"<object><name>{split.class_names[c]}</name><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin>"
            f"<xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
            for b, c in zip(im.boxes.tolist(), im.labels.tolist()))
        (root / "Annotations" / f"{im.image_id}.xml").write_text(
            f"<annotation><filename>{im.image_id}.png</filename><size><width>{im.width}</width><height>{im.height}"
            f"</height><depth>3</depth></size>{objects}</annotation>")
    (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{im.image_id}\n" for im in split.images))
    return root


def write_yolo(split: DetectionSplit, root: Path, name: str = "train") -> Path:
    for im in split.images:
        _save(im, root / "images" / name / f"{im.image_id}.png")
        lines = []
        for (x1, y1, x2, y2), c in zip(im.boxes.tolist(), im.labels.tolist()):
            lines.append(f"{c} {(x1 + x2) / 2 / im.width!r} {(y1 + y2) / 2 / im.height!r} "
                         f"{(x2 - x1) / im.width!r} {(y2 - y1) / im.height!r}")
        label = root / "labels" / name / f"{im.image_id}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("\n".join(lines) + ("\n" if lines else ""))
    (root / "data.yaml").write_text("names:\n" + "".join(f"  {k}: '{n}'\n" for k, n in enumerate(split.class_names)))
    return root


def as_dict(split: DetectionSplit) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {im.image_id: (im.boxes, im.labels) for im in split.images}
