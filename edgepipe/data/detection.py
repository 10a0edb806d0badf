"""Object-detection data in the three forms users bring, read into one internal form (issue 27, item 1).

- **COCO** (``instances_*.json``): ``images``, ``annotations`` (``bbox`` = x, y, width, height in pixels,
  ``category_id``), ``categories``; the images in a folder beside it.
- **Pascal VOC**: ``Annotations/<id>.xml`` (``<object><name>``, ``<bndbox>`` xmin/ymin/xmax/ymax in pixels),
  ``JPEGImages/<id>.jpg`` and the split's ids in ``ImageSets/Main/<split>.txt``.
- **YOLO**: ``images/<split>/*.jpg`` and ``labels/<split>/<stem>.txt`` (one ``class cx cy w h`` line per box,
  normalised to the image), class names from ``data.yaml`` (``names``: a list or an index -> name mapping) or
  ``classes.txt``.

Whatever the form, a split becomes a ``DetectionSplit``: one ``DetectionImage`` per image with its boxes as float32
``[N, 4]`` x1, y1, x2, y2 in pixels of the stored image and int64 labels in ``0..C-1`` (the order of
``class_names``). torchvision's detection models take exactly this (``boxes``, ``labels``), and its v2 transforms
take the boxes as ``tv_tensors.BoundingBoxes`` in ``XYXY`` format.

What real annotation files hold is handled the same way in every form, counted in ``DetectionSplit.counts`` (for the
run's records and the report) and warned about once per split: a box partly outside its image is clipped to it
(``clipped``); a box with no area, after clipping or as written (BCCD has two), is skipped (``degenerate``); an image
without boxes is kept as background (``background``); a listed image that is missing or cannot be opened is skipped
(``unreadable``), or stops the run with ``strict``. What cannot be read right is one ``EdgepipeError`` naming the
file (and the line or annotation) and what to do: a malformed annotation file, a class name outside the class list,
a class index out of range, a coordinate that is not a finite number.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from edgepipe.errors import EdgepipeError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FORMATS = ("coco", "voc", "yolo")
COUNTS = ("images", "boxes", "clipped", "degenerate", "background", "unreadable")


@dataclass
class DetectionImage:
    """One image and its boxes, in pixels of the stored image."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    """float32 [N, 4]: x1, y1, x2, y2 with 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height."""
    labels: np.ndarray
    """int64 [N]: indices into the split's ``class_names``."""
    path: Path | None = None
    """The image file (None for an image generated in memory)."""
    pixels: np.ndarray | None = None
    """uint8 [H, W, C] for an image generated in memory (the embedded default), else None: read from ``path``."""


@dataclass
class DetectionSplit:
    """The images of one split, the class names their labels index, and what reading them fixed or skipped."""

    images: list[DetectionImage]
    class_names: list[str]
    source: str
    """The form and the file or folder read (for messages and records)."""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))

    @property
    def num_boxes(self) -> int:
        return sum(len(im.labels) for im in self.images)


class _Reader:
    """Box checks shared by the three forms: clipping, skipping, counting."""

    def __init__(self, class_names: list[str], strict: bool) -> None:
        self.class_names, self.strict = class_names, strict
        self.counts = dict.fromkeys(COUNTS, 0)
        self.images: list[DetectionImage] = []

    def add(self, image_id: str, path: Path | None, size: tuple[int, int] | None,
            boxes: Iterable[tuple[float, float, float, float]], labels: Iterable[int], where: str) -> None:
        """``boxes`` as x1, y1, x2, y2 in pixels; ``size`` (width, height) when known, else read from the image
        file's header (the annotated size is not trusted: files get resized after annotating)."""
        actual = size if size is not None else _image_size(path, self.strict) if path is not None else None
        if actual is None:
            self.counts["unreadable"] += 1
            return
        width, height = actual
        kept_boxes, kept_labels = [], []
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                raise EdgepipeError(f"{where}: a box coordinate is not a finite number ({x1}, {y1}, {x2}, {y2}); fix "
                                    "or remove that box")
            c = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                 min(max(x2, 0.0), width), min(max(y2, 0.0), height))
            if c[2] <= c[0] or c[3] <= c[1]:
                self.counts["degenerate"] += 1
                continue
            if c != (x1, y1, x2, y2):
                self.counts["clipped"] += 1
            kept_boxes.append(c)
            kept_labels.append(label)
        if not kept_boxes:
            self.counts["background"] += 1
        self.counts["images"] += 1
        self.counts["boxes"] += len(kept_boxes)
        self.images.append(DetectionImage(image_id, int(width), int(height),
                                          np.asarray(kept_boxes, dtype=np.float32).reshape(-1, 4),
                                          np.asarray(kept_labels, dtype=np.int64), path))

    def label(self, name: str, where: str) -> int:
        try:
            return self.class_names.index(name)
        except ValueError:
            raise EdgepipeError(f"{where}: class {name!r} is not one of the {len(self.class_names)} classes "
                                f"({', '.join(self.class_names)}); fix the name or add it to the class list"
                                ) from None

    def split(self, source: str) -> DetectionSplit:
        fixed = {k: v for k, v in self.counts.items() if k not in ("images", "boxes") and v}
        if fixed:
            log.warning("%s: %s", source, ", ".join(f"{v} {_WHAT[k]}" for k, v in fixed.items()))
        if not self.images:
            raise EdgepipeError(f"{source}: no readable image in this split; check the paths and the split's list")
        return DetectionSplit(self.images, list(self.class_names), source, self.counts)


_WHAT = {"clipped": "box(es) clipped to their image", "degenerate": "box(es) without area skipped",
         "background": "image(s) without boxes kept as background", "unreadable": "missing or unreadable image(s) skipped"}


def _image_size(path: Path, strict: bool) -> tuple[int, int] | None:
    """(width, height) from the image file's header, or None (warned) when it is missing or cannot be opened."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError) as e:
        reason = "missing" if isinstance(e, FileNotFoundError) else f"cannot be opened ({type(e).__name__})"
        if strict:
            raise EdgepipeError(f"{path}: image {reason}; restore or remove it, or set data.strict: false to skip "
                                "such images with a warning") from None
        log.warning("%s: image %s; skipped", path, reason)
        return None


def _number(text: str | None, where: str) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise EdgepipeError(f"{where}: {text!r} is not a number") from None


# --- COCO --------------------------------------------------------------------------------------------------------


def read_coco(annotations: Path, images: Path, strict: bool = False) -> DetectionSplit:
    """A COCO ``instances`` file: classes from ``categories`` in order of their ids, images from ``images`` (a
    folder; ``file_name`` is relative to it)."""
    annotations, images = Path(annotations), Path(images)
    try:
        doc = json.loads(annotations.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgepipeError(f"{annotations}: annotation file not found; give the COCO instances JSON") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgepipeError(f"{annotations}: not a readable COCO JSON file ({str(e).splitlines()[0][:120]}); fix or "
                            "replace it") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations",
                                                                                   "categories")):
        raise EdgepipeError(f"{annotations}: a COCO instances file needs lists 'images', 'annotations' and "
                            "'categories'")
    try:
        categories = sorted(doc["categories"], key=lambda c: int(c["id"]))
        names = [str(c["name"]) for c in categories]
        category_index = {int(c["id"]): i for i, c in enumerate(categories)}
        by_image: dict[Any, list[dict[str, Any]]] = {}
        for a in doc["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        entries = [(im["id"], str(im["file_name"]), im.get("width"), im.get("height")) for im in doc["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise EdgepipeError(f"{annotations}: a category, image or annotation lacks {e} (or it has the wrong type); "
                            "fix the file") from None
    reader = _Reader(names, strict)
    for image_id, file_name, _w, _h in entries:
        boxes, labels = [], []
        for a in by_image.get(image_id, []):
            where = f"{annotations}: annotation {a.get('id', '?')} (image {image_id})"
            if a.get("iscrowd"):
                continue  # crowd regions are not instances (COCO's own evaluation ignores them)
            bbox = a.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise EdgepipeError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
            x, y, w, h = (_number(v, where) for v in bbox)
            cat = a.get("category_id")
            if cat not in category_index:
                raise EdgepipeError(f"{where}: category_id {cat!r} is not in the file's categories "
                                    f"({', '.join(str(c['id']) for c in categories)}); fix it")
            boxes.append((x, y, x + w, y + h))
            labels.append(category_index[cat])
        reader.add(Path(file_name).stem, images / file_name, None, boxes, labels, f"{annotations}: image {image_id}")
    return reader.split(f"COCO {annotations}")


# --- Pascal VOC --------------------------------------------------------------------------------------------------


def voc_class_names(root: Path, split: str) -> list[str]:
    """The class names a VOC split's annotations use, sorted (VOC files carry no class list)."""
    names: set[str] = set()
    for xml in _voc_files(Path(root), split):
        names.update(name for name, _ in _voc_objects(xml))
    return sorted(names)


def read_voc(root: Path, split: str, class_names: list[str] | None = None, strict: bool = False) -> DetectionSplit:
    """A Pascal VOC split (``ImageSets/Main/<split>.txt``); ``class_names`` default: the names its annotations use,
    sorted (give the training split's to a validation split, so both index the same classes)."""
    root = Path(root)
    names = class_names if class_names is not None else voc_class_names(root, split)
    reader = _Reader(names, strict)
    for xml in _voc_files(root, split):
        objects = _voc_objects(xml)
        file_name = _voc_filename(xml, root)
        reader.add(xml.stem, root / "JPEGImages" / file_name, None, [box for _, box in objects],
                   [reader.label(name, str(xml)) for name, _ in objects], str(xml))
    return reader.split(f"VOC {root} ({split})")


def _voc_files(root: Path, split: str) -> list[Path]:
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        have = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise EdgepipeError(f"{listing}: split list not found; give a split that exists ({', '.join(have) or 'none'})"
                            ) from None
    except UnicodeDecodeError:
        raise EdgepipeError(f"{listing}: not a text file of image ids") from None
    return [root / "Annotations" / f"{i}.xml" for i in ids]


def _voc_tree(xml: Path) -> ElementTree.Element:
    try:
        return ElementTree.parse(xml).getroot()
    except FileNotFoundError:
        raise EdgepipeError(f"{xml}: annotation file not found (listed in the split); restore it or remove its id "
                            "from the split list") from None
    except ElementTree.ParseError as e:
        raise EdgepipeError(f"{xml}: not well-formed XML ({e}); fix or replace the file") from None


def _voc_filename(xml: Path, root: Path) -> str:
    name = (_voc_tree(xml).findtext("filename") or "").strip()
    if name and (root / "JPEGImages" / name).exists():
        return name
    for suffix in IMAGE_SUFFIXES:  # the <filename> is often stale (renamed files): the id with an image suffix
        if (root / "JPEGImages" / f"{xml.stem}{suffix}").exists():
            return f"{xml.stem}{suffix}"
    return name or f"{xml.stem}.jpg"


def _voc_objects(xml: Path) -> list[tuple[str, tuple[float, float, float, float]]]:
    out = []
    for i, obj in enumerate(_voc_tree(xml).iter("object")):
        where = f"{xml}: object {i + 1}"
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise EdgepipeError(f"{where}: needs <name> and <bndbox>; fix the file")
        out.append((name, tuple(_number(box.findtext(k), f"{where} <{k}>") for k in ("xmin", "ymin", "xmax", "ymax"))))
    return out


# --- YOLO --------------------------------------------------------------------------------------------------------


def yolo_class_names(root: Path) -> list[str]:
    """From ``data.yaml`` (``names``: a list, or a mapping from index to name) or ``classes.txt`` (one per line)."""
    root = Path(root)
    yaml_file = next((p for p in (root / "data.yaml", root / "dataset.yaml") if p.is_file()), None)
    if yaml_file is not None:
        from edgepipe.yamlfile import read_yaml

        doc = read_yaml(yaml_file, "YOLO dataset file")
        names = doc.get("names") if isinstance(doc, dict) else None
        if isinstance(names, dict) and names and all(isinstance(k, int) for k in names):
            if sorted(names) != list(range(len(names))):
                raise EdgepipeError(f"{yaml_file}: names must be indexed 0..{len(names) - 1}, got {sorted(names)}")
            return [str(names[i]) for i in range(len(names))]
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        raise EdgepipeError(f"{yaml_file}: needs 'names', a list of class names or a mapping from index to name")
    classes = root / "classes.txt"
    if classes.is_file():
        names = [line.strip() for line in classes.read_text(encoding="utf-8").splitlines() if line.strip()]
        if names:
            return names
    raise EdgepipeError(f"{root}: a YOLO dataset needs its class names in data.yaml ('names') or classes.txt")


def read_yolo(root: Path, split: str, strict: bool = False) -> DetectionSplit:
    """A YOLO split: ``images/<split>/`` and ``labels/<split>/`` (an image without a label file is background)."""
    root = Path(root)
    names = yolo_class_names(root)
    folder = root / "images" / split
    if not folder.is_dir():
        have = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
        raise EdgepipeError(f"{folder}: no such split folder; give one of: {', '.join(have) or 'none found'}")
    reader = _Reader(names, strict)
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        label_file = root / "labels" / split / f"{image.stem}.txt"
        size = _image_size(image, strict)
        if size is None:
            reader.counts["unreadable"] += 1
            continue
        rows = _yolo_rows(label_file, len(names)) if label_file.exists() else []
        w, h = size
        boxes = [((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
                 for _, cx, cy, bw, bh in rows]
        reader.add(image.stem, image, size, boxes, [int(r[0]) for r in rows], str(label_file))
    return reader.split(f"YOLO {root} ({split})")


def _yolo_rows(path: Path, classes: int) -> list[tuple[float, ...]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EdgepipeError(f"{path}: not a UTF-8 text label file; fix or replace it") from None
    rows = []
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}: line {n}"
        if len(parts) != 5:
            raise EdgepipeError(f"{where}: expected 'class cx cy w h' (5 numbers), got {len(parts)} field(s); "
                                "fix the line (segmentation polygons are not boxes)")
        values = tuple(_number(p, where) for p in parts)
        if values[0] != int(values[0]) or not 0 <= values[0] < classes:
            raise EdgepipeError(f"{where}: class {parts[0]} is not an index of the {classes} class names (0.."
                                f"{classes - 1}); fix it or the class list")
        rows.append(values)
    return rows
