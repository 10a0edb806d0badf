"""Datasets, held in memory as tensors and served in seeded, augmented batches.

Two sources: scikit-learn's ``digits`` (embedded: 1,797 8x8 grey images, no download) and an
ImageFolder tree (``root/<split>/<class>/*.jpg``) read through torchvision's ImageFolder. Decoded
images are cached as uint8 arrays (``$EDGEPIPE_CACHE`` or ``~/.cache/edgepipe``) keyed by the
folder's file list, so a benchmark decodes 60,000 JPEGs once, not once per stage.
Batches are normalized and augmented (random crop with reflect padding, horizontal flip) on whole
tensors, which on a 2-core CPU is far cheaper than per-image PIL transforms in worker processes.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgepipe.config import DataConfig
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train_images: torch.Tensor
    """uint8 or float [N, C, H, W] in [0, 255] (uint8) or [0, 1] (float)."""
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    class_names: list[str]
    augment: bool = True
    hflip: bool = True
    pad: int = 4
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop from a reflect-padded copy (per-sample offsets), then random horizontal flip."""
        n, c, h, w = x.shape
        p = self.pad
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (n, 1), generator=gen)
            dx = torch.randint(0, 2 * p + 1, (n, 1), generator=gen)
            rows = (dy + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * p)
            cols = (dx + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
            x = padded.gather(2, rows).gather(3, cols)
        if self.hflip:
            flip = torch.rand(n, generator=gen) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return x

    def train_batches(self, batch_size: int, epoch: int, augment: bool | None = None,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled (and augmented) training batches; the order depends only on seed and epoch."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_labels), generator=gen)
        aug = self.augment if augment is None else augment
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            idx = order[i:i + batch_size]
            x = self.normalize(self.train_images[idx])
            if aug:
                x = self._augment(x, gen)
            yield x, self.train_labels[idx]

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train_labels) // batch_size)

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.val_labels), batch_size):
            yield self.normalize(self.val_images[i:i + batch_size]), self.val_labels[i:i + batch_size]

    def val_numpy(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in self.val_batches(batch_size):
            yield x.numpy(), y.numpy()

    def calibration_batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        """``n`` un-augmented training batches (fixed order) for range calibration."""
        gen = torch.Generator().manual_seed(self.seed + 7)
        order = torch.randperm(len(self.train_labels), generator=gen)[: n * batch_size]
        return [self.normalize(self.train_images[order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]


def data_fingerprint(cfg: DataConfig) -> str:
    """What the data files are, cheaply: for an ImageFolder, every file's path, size and modification time
    under its train and validation splits (a stat per file, no reading); for digits, scikit-learn's version.
    Part of every data-dependent stage key, so replaced or added images retrain instead of passing as
    "unchanged"."""
    digest = hashlib.sha256()
    if cfg.kind == "digits":
        import sklearn

        digest.update(f"sklearn {sklearn.__version__} load_digits".encode())
        return digest.hexdigest()
    root = Path(cfg.path or "")
    for split in (cfg.train_split, cfg.val_split):
        base = root / split
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load the dataset a config names."""
    if cfg.kind == "digits":
        bundle = _digits(cfg, seed)
    else:
        bundle = _imagefolder(cfg, seed)
    channels = bundle.train_images.shape[1]
    for field in ("mean", "std"):
        given = getattr(cfg, field)
        if given is not None and len(given) != channels:
            raise EdgepipeError(f"data.{field}: {len(given)} value(s) for images with {channels} channel(s); "
                                f"give one per channel")
    if cfg.limit_train:
        bundle.train_images, bundle.train_labels = bundle.train_images[: cfg.limit_train], bundle.train_labels[: cfg.limit_train]
    if cfg.limit_val:
        bundle.val_images, bundle.val_labels = bundle.val_images[: cfg.limit_val], bundle.val_labels[: cfg.limit_val]
    return bundle


def _digits(cfg: DataConfig, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, va = train_test_split(np.arange(len(labels)), test_size=cfg.val_fraction, random_state=seed,
                              stratify=d.target)
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    if cfg.image_size and cfg.image_size != 8:
        images = torch.nn.functional.interpolate(images, size=cfg.image_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg.mean) if cfg.mean else images[tr].mean(dim=(0, 2, 3))
    std = torch.tensor(cfg.std) if cfg.std else images[tr].std(dim=(0, 2, 3))
    return DataBundle(images[tr], labels[tr], images[va], labels[va], mean, std,
                      [str(i) for i in range(10)], augment=cfg.augment, hflip=False,
                      pad=max(1, (cfg.image_size or 8) // 8), seed=seed)


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGEPIPE_CACHE", Path.home() / ".cache" / "edgepipe"))


def _files_signature(paths: list[str]) -> str:
    """Path, size and modification time of each file: the decode cache's key, so an image replaced under the same
    name is decoded again (the same facts as data_fingerprint, which keys the stages)."""
    parts = []
    for p in paths:
        try:
            st = os.stat(p)
            parts.append(f"{p}\0{st.st_size}\0{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{p}\0missing")
    return "\n".join(parts)


def _decode_split(root: Path, size: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise EdgepipeError(f"{root}: image folder not found; data.path must hold the train/val split folders")
    try:
        ds = ImageFolder(str(root))
    except FileNotFoundError as e:  # no class folders, or a class folder without a single image file
        raise EdgepipeError(f"{root}: {str(e).rstrip('.')}; every class needs a sub-folder holding at least one "
                            "image (.jpg, .png, ...)") from None
    key = hashlib.sha256((_files_signature([p for p, _ in ds.samples]) + f"|{size}").encode()).hexdigest()[:16]
    cache = _cache_dir() / f"imagefolder-{key}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return z["images"], z["labels"], list(ds.classes)
        except Exception as e:  # noqa: BLE001 - a damaged cache file is decoded again, never trusted
            log.warning("%s: damaged decode cache (%s), decoding the images again", cache, type(e).__name__)
    log.info("decoding %d images under %s (cached afterwards in %s)", len(ds), root, cache)
    first = _open_image(ds, ds.samples[0][0])
    shape = (size, size) if size else first.size[::-1]
    images = np.empty((len(ds), 3, *shape), dtype=np.uint8)
    for i, (path, _) in enumerate(ds.samples):
        img = _open_image(ds, path)
        if size:
            img = img.resize((size, size))
        elif img.size[::-1] != shape:
            raise EdgepipeError(f"{path}: size {img.size} differs from {shape[::-1]}; set data.image_size")
        images[i] = np.asarray(img).transpose(2, 0, 1)
    labels = np.asarray(ds.targets, dtype=np.int64)
    atomic_write(cache, lambda p: np.savez(p.open("wb"), images=images, labels=labels))
    return images, labels, list(ds.classes)


def _open_image(ds, path: str):
    """One image as RGB, or one clear error naming the file (PIL raises OSError, SyntaxError, ValueError...)."""
    try:
        img = ds.loader(path)
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is the problem
        raise EdgepipeError(f"{path}: cannot decode this image ({type(e).__name__}: {str(e)[:120]}); remove or "
                            "replace the file") from None


def _imagefolder(cfg: DataConfig, seed: int) -> DataBundle:
    root = Path(cfg.path)  # type: ignore[arg-type]
    tr_x, tr_y, classes = _decode_split(root / cfg.train_split, cfg.image_size)
    va_x, va_y, va_classes = _decode_split(root / cfg.val_split, cfg.image_size)
    if classes != va_classes:
        raise EdgepipeError(f"{root}: class folders of {cfg.train_split}/ and {cfg.val_split}/ differ")
    tr, va = torch.from_numpy(tr_x), torch.from_numpy(va_x)
    if cfg.mean and cfg.std:
        mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    else:
        f = tr.float() / 255.0
        mean, std = f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3))
    return DataBundle(tr, torch.from_numpy(tr_y), va, torch.from_numpy(va_y), mean, std, classes,
                      augment=cfg.augment, hflip=cfg.hflip, pad=max(1, tr.shape[-1] // 8), seed=seed)
