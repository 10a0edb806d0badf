"""The embedded detection default (issue 27, item 2): scikit-learn's digits placed on canvases, generated in memory,
so a fresh clone runs detection offline with no download.

Each canvas is ``size x size`` RGB with a faint noise background and 1 to ``max_objects`` digits, each scaled up
(nearest-neighbour, 2x to 4x of its 8x8 glyph) to a random size, tinted, and placed where it overlaps no other
digit; its box is the tight box around the glyph's ink. The training canvases use the first 80% of the 1,797 digit
images and the validation canvases the rest, so no glyph is seen in both. Everything is a function of the seed.
"""
from __future__ import annotations

import numpy as np

from edgepipe.data.detection import COUNTS, DetectionImage, DetectionSplit

TRAIN_SHARE = 0.8


def digit_canvases(n_images: int, split: str = "train", size: int = 64, max_objects: int = 3,
                   classes: tuple[int, ...] = tuple(range(10)), seed: int = 0) -> DetectionSplit:
    """``n_images`` canvases of ``split`` ("train" or "val"); labels index ``classes`` (digits)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    cut = int(len(digits.target) * TRAIN_SHARE)
    pick = slice(0, cut) if split == "train" else slice(cut, None)
    glyphs, targets = digits.images[pick], digits.target[pick]
    keep = np.isin(targets, classes)
    glyphs, targets = glyphs[keep] / 16.0, targets[keep]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, counts = [], dict.fromkeys(COUNTS, 0)
    for i in range(n_images):
        canvas = rng.uniform(0.0, 0.15, (size, size, 3))
        boxes: list[tuple[int, int, int, int]] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            k = int(rng.integers(len(targets)))
            scale = int(rng.integers(2, 5))
            glyph = np.kron(glyphs[k], np.ones((scale, scale)))
            side = glyph.shape[0]
            if side >= size:
                continue
            for _attempt in range(20):
                x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
                if all(x + side <= b[0] or b[2] <= x or y + side <= b[1] or b[3] <= y for b in boxes):
                    break
            else:
                continue
            ink = np.argwhere(glyph > 0.2)
            (gy0, gx0), (gy1, gx1) = ink.min(0), ink.max(0) + 1
            tint = rng.uniform(0.6, 1.0, 3)
            region = canvas[y:y + side, x:x + side]
            canvas[y:y + side, x:x + side] = np.maximum(region, glyph[..., None] * tint)
            boxes.append((x + int(gx0), y + int(gy0), x + int(gx1), y + int(gy1)))
            labels.append(classes.index(int(targets[k])))
        counts["images"] += 1
        counts["boxes"] += len(boxes)
        counts["background"] += not boxes
        images.append(DetectionImage(f"{split}-{i:05d}", size, size, np.asarray(boxes, np.float32).reshape(-1, 4),
                                     np.asarray(labels, np.int64), None, (canvas * 255).round().astype(np.uint8)))
    return DetectionSplit(images, [str(c) for c in classes], f"digit canvases ({split}, seed {seed})", counts)
