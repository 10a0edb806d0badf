"""Detection splits served as the stages read any data (``Batches``): seeded, sharded, box-aware augmented batches.

Every image is decoded once and resized to ``size x size`` (its boxes scaled with it), so a batch is one uint8
tensor ``[N, 3, size, size]`` and the detectors run at the data's resolution, as the deployed model will (a fixed
input shape for export and TensorRT). A batch's targets are a list of ``{"boxes": float32 [k, 4] x1y1x2y2 pixels,
"labels": int64 [k]}``, the form torchvision's detection models take; labels here are ``0..C-1`` (a model adds its
own background class where it has one).

Augmentation is torchvision's box-aware transforms (``torchvision.transforms.v2`` on ``tv_tensors.BoundingBoxes``):
a random zoom-out and IoU crop as in SSD's recipe (Liu et al. 2016; torchvision's references/detection), a horizontal
flip where ``data.hflip`` allows it (never for digits), then back to ``size x size``; boxes that lose their area are
dropped by ``SanitizeBoundingBoxes``. Each image's transform is seeded by (seed, epoch, index), so the batches depend
on seed and epoch only, like every other loader's.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from edgepipe.data.batches import Batches, batch_starts, class_spread, epoch_order, shard_of
from edgepipe.data.detection import DetectionSplit
from edgepipe.errors import EdgepipeError

Targets = list[dict[str, torch.Tensor]]


def decode_split(split: DetectionSplit, size: int) -> tuple[torch.Tensor, Targets]:
    """Every image of ``split`` as uint8 RGB ``[N, 3, size, size]`` and its boxes scaled to that size."""
    from PIL import Image

    images = torch.empty(len(split.images), 3, size, size, dtype=torch.uint8)
    targets: Targets = []
    for i, im in enumerate(split.images):
        if im.pixels is not None:
            pil = Image.fromarray(im.pixels)
        else:
            with Image.open(im.path) as f:  # type: ignore[arg-type]
                pil = f.convert("RGB")
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.BILINEAR)
        images[i] = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        scale = torch.tensor([size / im.width, size / im.height] * 2, dtype=torch.float32)
        targets.append({"boxes": torch.from_numpy(im.boxes) * scale, "labels": torch.from_numpy(im.labels)})
    return images, targets


@dataclass
class DetectionBundle(Batches):
    """Both splits of a detection set in memory (see the module docstring)."""

    train_images: torch.Tensor
    train_targets: Targets
    val_images: torch.Tensor
    val_targets: Targets
    class_names: list[str]
    augment: bool = True
    hflip: bool = True
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(3))
    std: torch.Tensor = field(default_factory=lambda: torch.ones(3))
    """Batches come in [0, 1]: torchvision's detectors normalise inside the model (their ``transform``), so the
    exported graph takes the same [0, 1] images."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def train_size(self) -> int:
        return len(self.train_targets)

    @property
    def val_size(self) -> int:
        return len(self.val_targets)

    def _augmented(self, image: torch.Tensor, target: dict[str, torch.Tensor], key: int) -> tuple[torch.Tensor, dict]:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        size = image.shape[-1]
        steps = [v2.RandomZoomOut(fill=0, side_range=(1.0, 2.0), p=0.5), v2.RandomIoUCrop()]
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.Resize((size, size), antialias=True), v2.SanitizeBoundingBoxes()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(size, size))
            out_image, out = v2.Compose(steps)(tv_tensors.Image(image), {"boxes": boxes, "labels": target["labels"]})
        return out_image.as_subclass(torch.Tensor), {"boxes": out["boxes"].as_subclass(torch.Tensor).float(),
                                                     "labels": out["labels"]}

    def train_batches(self, batch_size: int, epoch: int, augment: bool | None = None, shard: tuple[int, int] = (0, 1),
                      ) -> Iterator[tuple[torch.Tensor, Targets]]:
        order, _ = epoch_order(self.train_size, self.seed, epoch)
        aug = self.augment if augment is None else augment
        for start in batch_starts(len(order), batch_size):
            idx = shard_of(order[start:start + batch_size], shard).tolist()
            images, targets = self.train_images[idx], [self.train_targets[i] for i in idx]
            if aug:
                pairs = [self._augmented(images[j], t, (self.seed * 100_003 + epoch) * 1_000_003 + i)
                         for j, (i, t) in enumerate(zip(idx, targets))]
                images = torch.stack([p[0] for p in pairs])
                targets = [p[1] for p in pairs]
            yield self.normalize(images), targets

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Targets]]:
        for i in range(0, self.val_size, batch_size):
            yield self.normalize(self.val_images[i:i + batch_size]), self.val_targets[i:i + batch_size]

    def val_numpy(self, batch_size: int) -> Iterator[tuple[np.ndarray, Targets]]:
        for x, y in self.val_batches(batch_size):
            yield x.numpy(), y

    def calibration_batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        order = self.calibration_order(n, batch_size)
        return [self.normalize(self.train_images[order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]

    def val_head(self, n: int) -> tuple[np.ndarray, Targets]:
        return self.val_images[:n].numpy(), self.val_targets[:n]

    def subset(self, n_train: int, n_val: int) -> DetectionBundle:
        tr = class_spread(_first_labels(self.train_targets), n_train).tolist()
        va = class_spread(_first_labels(self.val_targets), n_val).tolist()
        return replace(self, train_images=self.train_images[tr], train_targets=[self.train_targets[i] for i in tr],
                       val_images=self.val_images[va], val_targets=[self.val_targets[i] for i in va])


def _first_labels(targets: Targets) -> np.ndarray:
    """One class per image for ``class_spread`` (its first box's; -1 for background), so a subset keeps every class
    in turn."""
    return np.array([int(t["labels"][0]) if len(t["labels"]) else -1 for t in targets])


def detection_split_pair(cfg: Any, seed: int) -> tuple[DetectionSplit, DetectionSplit, int]:
    """The training and validation splits ``data`` names (``data.kind``: digit-canvases, coco, voc, yolo) and the
    size their images are served at (``data.image_size``; default 64 for the canvases, 320 for files)."""
    from pathlib import Path

    from edgepipe.data import detection

    kind, strict = cfg.kind, cfg.strict
    if kind == "digit-canvases":
        from edgepipe.data.canvas import digit_canvases

        size = cfg.image_size or 64
        n = cfg.canvas_images
        return (digit_canvases(n, "train", size=size, seed=seed),
                digit_canvases(max(1, n // 4), "val", size=size, seed=seed), size)
    root = Path(cfg.path)
    if kind == "coco":
        pair = tuple(detection.read_coco(root / cfg.annotations.format(split=s), root / cfg.images.format(split=s),
                                         strict) for s in (cfg.train_split, cfg.val_split))
        if pair[0].class_names != pair[1].class_names:
            raise EdgepipeError(f"{root}: the {cfg.train_split} and {cfg.val_split} instances files list "
                                          "different categories; give both the same categories")
    elif kind == "voc":
        names = cfg.classes or detection.voc_class_names(root, cfg.train_split)
        pair = tuple(detection.read_voc(root, s, names, strict) for s in (cfg.train_split, cfg.val_split))
    elif kind == "yolo":
        pair = tuple(detection.read_yolo(root, s, strict) for s in (cfg.train_split, cfg.val_split))
    else:
        raise ValueError(f"not a detection data kind: {kind}")
    return pair[0], pair[1], cfg.image_size or 320


def detection_bundle(train: DetectionSplit, val: DetectionSplit, size: int, augment: bool, hflip: bool,
                     seed: int) -> DetectionBundle:
    train_images, train_targets = decode_split(train, size)
    val_images, val_targets = decode_split(val, size)
    notes = {"size": size, "train": {"source": train.source, **train.counts},
             "val": {"source": val.source, **val.counts}}
    return DetectionBundle(train_images, train_targets, val_images, val_targets, list(train.class_names),
                           augment=augment, hflip=hflip, seed=seed, notes=notes)
