"""Images without labels for distillation (``data.unlabeled``): a folder of images in any layout, or ``rest``, the
training images ``data.limit_train`` leaves out (a labelled set's remainder, the semi-supervised benchmark's form).

The distill stage trains on them with the teacher's soft targets (``Batches.with_unlabeled``: label -1, which the
hard term ignores), optionally with the teacher's confident classes as hard labels
(edgepipe.training.distillation.kd_step); no other stage sees them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepipe.config import DataConfig
from edgepipe.data.batches import DataBundle, class_spread
from edgepipe.data.imagefolder import Listing, decode_split
from edgepipe.errors import EdgepipeError

UNLABELED = -1
"""The label of an unlabeled image in a training batch (cross-entropy's ignore_index)."""


def rest_of_training(bundle: DataBundle, limit: int) -> torch.Tensor:
    """The training images ``bundle.subset(limit, ...)`` leaves out (class_spread decides which are kept)."""
    labels = bundle.train_labels.numpy()
    left = np.ones(len(labels), dtype=bool)
    left[class_spread(labels, limit)] = False
    return bundle.train_images[torch.from_numpy(left)]


def folder_images(cfg: DataConfig, channels: int, training: Listing, shape: tuple[int, ...]) -> tuple[torch.Tensor,
                                                                                                      dict[str, Any]]:
    """Every image file under ``cfg.unlabeled`` (recursively, symlinks followed once), decoded as the training images
    are (``decode_split``, its cache and its unreadable-file notes); a file that is also a training image (same device
    and inode) is skipped, so no image is both labelled and unlabeled."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(cfg.unlabeled or "")
    if not root.is_dir():
        raise EdgepipeError(f"data.unlabeled: {root} is not a folder; give a folder of images, or 'rest' (the training "
                            "images data.limit_train leaves out)")
    known = set()
    for path in training.paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        known.add((st.st_dev, st.st_ino))
    paths, seen, labelled = [], set(), 0
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMG_EXTENSIONS):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                paths.append(path)  # reported as unreadable when decoded
                continue
            if (st.st_dev, st.st_ino) in known:
                labelled += 1
                continue
            known.add((st.st_dev, st.st_ino))
            paths.append(path)
    if not paths:
        raise EdgepipeError(f"data.unlabeled: {root} holds no image file (.jpg, .png, ...) that is not a training "
                            f"image ({labelled} training image(s) skipped); give a folder of unlabeled images")
    listing = Listing(root, paths, [0] * len(paths), ["(unlabeled)"])
    images, _, _, notes = decode_split(root, cfg.image_size, channels, cfg.strict, cfg.crop_fraction, listing)
    if tuple(images.shape[1:]) != tuple(shape):
        raise EdgepipeError(f"data.unlabeled: {root} decodes to {images.shape[2]}x{images.shape[3]} images, the "
                            f"training images are {shape[1]}x{shape[2]}; set data.image_size so both are resized alike")
    notes = {**notes, "skipped_as_training_images": labelled}
    return torch.from_numpy(images), notes
