"""ImageFolder data streamed from disk (``StreamingBundle``), for sets above ``data.memory_limit_mb`` decoded or
with ``data.streaming: true``.

A ``torch.utils.data.DataLoader`` with worker processes decodes and augments each image on the fly (torchvision
transforms v2), so memory does not grow with the data. Files are checked once (every one decoded, in the
workers) and the result kept in the decode cache, so unreadable images are skipped and recorded exactly as in
memory. A sample's augmentation is drawn from a generator seeded by (seed, epoch, index), so the batches do not
depend on the number of workers.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from edgepipe.config import DataConfig
from edgepipe.data.batches import Batches, batch_starts, class_spread, epoch_order, shard_of
from edgepipe.data.decode_cache import DECODE_VERSION, cache_dir, files_signature, write_cache
from edgepipe.data.imagefolder import Listing, decode_file, error_reason, same_size, unreadable, warn_skipped
from edgepipe.errors import EdgepipeError

log = logging.getLogger(__name__)


def default_workers() -> int:
    """DataLoader workers when data.workers is not set: one per CPU core this process may use (under torchrun, its
    share of the node's cores), at most 8."""
    from edgepipe.training import distributed

    launch = distributed.launch()
    return max(1, min(8, distributed.usable_cores() // (launch.local_world_size if launch else 1)))


def streaming_choice(cfg: DataConfig, train: Listing, val: Listing, channels: int) -> tuple[bool, str]:
    """Whether to stream, and why: data.streaming, or (auto) the decoded size against data.memory_limit_mb."""
    if cfg.streaming is not True and cfg.streaming is not False:
        n = len(train.paths) + len(val.paths)
        h = w = cfg.image_size
        if not h:
            for path in train.paths[:16]:  # the stored size from the file header, without decoding
                try:
                    with Image.open(path) as img:
                        w, h = img.size
                    break
                except Exception:  # noqa: BLE001 - a damaged file is reported when the images are checked
                    continue
        mib = n * channels * (h or 0) * (w or 0) / 2**20
        stream = mib > cfg.memory_limit_mb
        return stream, (f"auto: {n} images of {channels}x{h}x{w} take {mib:,.0f} MiB decoded, "
                        f"{'above' if stream else 'within'} data.memory_limit_mb {cfg.memory_limit_mb}")
    return bool(cfg.streaming), f"data.streaming: {str(cfg.streaming).lower()}"


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: independent of batches, ranks and workers."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


class ImageFiles(torch.utils.data.Dataset):
    """The image files of one split, decoded (``decode_file``) and augmented one at a time, in DataLoader workers.

    An item is addressed by ``(index, epoch)``; ``epoch`` None means un-augmented. Paths are one numpy byte-string
    array, not a list of Python strings: forked workers would otherwise touch every string's reference count and
    copy the whole list into each worker (pytorch/pytorch#13246), memory that grows with the data.
    """

    def __init__(self, root: Path, relpaths: list[str], labels: np.ndarray, channels: int, size: int | None,
                 crop_fraction: float, pad: int, hflip: bool, seed: int) -> None:
        self.root = str(root)
        self.paths = np.array([p.encode() for p in relpaths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.channels, self.size, self.crop_fraction = channels, size, crop_fraction
        self.pad, self.hflip, self.seed = pad, hflip, seed

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> ImageFiles:
        part = copy.copy(self)
        part.paths, part.labels = self.paths[indices], self.labels[indices]
        return part

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.paths[index].decode())

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        path = self.path(index)
        try:
            x, _ = decode_file(path, self.channels, self.size, self.crop_fraction)
        except Exception as e:  # noqa: BLE001 - it decoded when the files were checked
            raise EdgepipeError(f"{path}: cannot decode this image any more ({type(e).__name__}); it was readable "
                                "when the run checked its files: was it changed during the run? Run the command "
                                "again") from None
        if epoch is not None:
            x = self._augment(x, torch.Generator().manual_seed(_sample_seed(self.seed, epoch, index)))
        return x, int(self.labels[index])

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The in-memory path's augmentation on one image: random crop of a reflect-padded copy, random flip."""
        from torchvision.transforms.v2 import functional as F

        if self.pad:
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,), generator=gen).tolist()
            x = F.crop(F.pad(x, [self.pad], padding_mode="reflect"), dy, dx, x.shape[1], x.shape[2])
        if self.hflip and float(torch.rand(1, generator=gen)) < 0.5:
            x = F.horizontal_flip(x)
        return x


class _KeyBatches:
    """A DataLoader batch sampler over precomputed keys, drawn lazily (an epoch's list is never held whole)."""

    def __init__(self, make: Callable[[], Iterator[list[tuple[int, int | None]]]], count: int) -> None:
        self.make, self.count = make, count

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        return self.make()

    def __len__(self) -> int:
        return self.count


@dataclass
class StreamingBundle(Batches):
    """Images read from disk batch by batch: a DataLoader with ``workers`` processes decodes and augments them."""

    train: ImageFiles
    val: ImageFiles
    mean: torch.Tensor
    std: torch.Tensor
    class_names: list[str]
    shape: tuple[int, int, int]
    augment: bool = True
    seed: int = 0
    workers: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    choice: Batches | None = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.shape

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def val_size(self) -> int:
        return len(self.val)

    def _load(self, files: ImageFiles, batches: _KeyBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 batches in the sampler's order (the DataLoader keeps it with any number of workers)."""
        loader = torch.utils.data.DataLoader(files, batch_sampler=batches, num_workers=self.workers,
                                             prefetch_factor=4 if self.workers else None)
        try:
            yield from loader
        except EdgepipeError as e:  # raised in a worker: DataLoader wraps it in the worker's traceback
            raise EdgepipeError(str(e).rstrip().rsplit("EdgepipeError: ", 1)[-1]) from None

    def train_batches(self, batch_size: int, epoch: int, augment: bool | None = None, shard: tuple[int, int] = (0, 1),
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        tag = epoch if (self.augment if augment is None else augment) else None
        starts = batch_starts(self.train_size, batch_size)

        def keys() -> Iterator[list[tuple[int, int | None]]]:
            order, _ = epoch_order(self.train_size, self.seed, epoch)
            for i in starts:
                yield [(j, tag) for j in shard_of(order[i:i + batch_size], shard).tolist()]
        for x, y in self._load(self.train, _KeyBatches(keys, len(starts))):
            yield self.normalize(x), y

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = range(0, self.val_size, batch_size)

        def keys() -> Iterator[list[tuple[int, int | None]]]:
            for i in starts:
                yield [(j, None) for j in range(i, min(i + batch_size, self.val_size))]
        for x, y in self._load(self.val, _KeyBatches(keys, len(starts))):
            yield self.normalize(x), y

    def _images(self, files: ImageFiles, indices: list[int], batch_size: int) -> Iterator[torch.Tensor]:
        starts = range(0, len(indices), batch_size)
        batches = _KeyBatches(lambda: ([(j, None) for j in indices[i:i + batch_size]] for i in starts), len(starts))
        for x, _ in self._load(files, batches):
            yield x

    def calibration_batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        order = self.calibration_order(n, batch_size).tolist()
        return [self.normalize(x) for x in self._images(self.train, order, batch_size)]

    def val_head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = min(n, self.val_size)
        images = torch.cat(list(self._images(self.val, list(range(n)), 256))) if n else torch.empty(0, *self.shape)
        return images.to(torch.uint8).numpy(), self.val.labels[:n].copy()

    def train_labels_array(self) -> np.ndarray:
        return np.asarray(self.train.labels)

    def split_train(self, keep: np.ndarray, held_out: np.ndarray) -> StreamingBundle:
        kept = replace(self, train=self.train.take(keep), choice=None)
        kept.choice = replace(kept, val=self.train.take(held_out))
        return kept

    def subset(self, n_train: int, n_val: int) -> StreamingBundle:
        out = replace(self, train=self.train.take(class_spread(self.train.labels, n_train)),
                      val=self.val.take(class_spread(self.val.labels, n_val)), choice=None)
        if self.choice is not None:  # the held-out split is kept whole: its images are no training images
            out.choice = replace(self.choice, train=out.train)
        return out


class _Check(torch.utils.data.Dataset):
    """Decodes one file exactly as training will; returns its mode and size, or why it cannot be read."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str | None, tuple[int, int] | None, str | None]:
        try:
            x, mode = decode_file(self.files.path(index), self.files.channels, self.files.size,
                                  self.files.crop_fraction)
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is the problem
            return None, None, error_reason(e)
        return mode, (int(x.shape[1]), int(x.shape[2])), None


def _check_split(listing: Listing, cfg: DataConfig, channels: int, workers: int,
                 ) -> tuple[ImageFiles, tuple[int, int], dict[str, Any]]:
    """Decode every file of a split once (in the workers) to find the unreadable ones, the modes and the size.

    The outcome is cached beside the decoded-image cache (``imagefolder-check-*.json``, same key: every file's
    path, size and modification time), so later commands only stat the files. Returns the readable files,
    their common height and width, and the notes the run records (as the in-memory path does).
    """
    root = listing.root
    rel = [os.path.relpath(p, root) for p in listing.paths]
    files = ImageFiles(root, rel, np.asarray(listing.targets), channels, cfg.image_size, cfg.crop_fraction, 0, False, 0)
    signature = (files_signature(listing.paths) + f"|{cfg.image_size}|{cfg.crop_fraction}|{channels}|check"
                 f"|v{DECODE_VERSION}")
    cache = cache_dir() / f"imagefolder-check-{hashlib.sha256(signature.encode()).hexdigest()[:16]}.json"
    found = None
    if cache.exists():
        try:
            found = json.loads(cache.read_text())
            skipped, modes, sizes = found["skipped"], found["modes"], found["sizes"]
        except Exception as e:  # noqa: BLE001 - a damaged cache file is checked again, never trusted
            log.warning("%s: damaged file-check cache (%s), checking the images again", cache, type(e).__name__)
            found = None
    if found is None:
        skipped, modes, sizes = [], {}, {}
        log.info("checking %d images under %s (decoding each once, %d worker(s); remembered in %s)", len(files), root,
                 workers, cache)
        loader = torch.utils.data.DataLoader(_Check(files), batch_size=256, num_workers=workers,
                                             collate_fn=lambda items: items)
        done, step = 0, max(1, len(files) // 10)
        for batch in loader:
            for mode, hw, reason in batch:
                if reason is not None:
                    skipped.append([rel[done], reason])
                else:
                    modes[mode] = modes.get(mode, 0) + 1
                    sizes.setdefault(f"{hw[1]}x{hw[0]}", rel[done])  # each size's first file
                done += 1
                if done % step == 0:
                    log.info("checked %d/%d images under %s", done, len(files), root)
        record = json.dumps({"skipped": skipped, "modes": modes, "sizes": sizes})
        write_cache(cache, lambda p: p.write_text(record))
    for path, reason in skipped:  # in file order: with data.strict the first one stops the run
        if cfg.strict or found is None:  # a remembered check repeats only the summary line, as the decode cache does
            unreadable(str(root / path), reason, cfg.strict)
    if len(sizes) > 1:
        (first, a), (size, b) = list(sizes.items())[:2]
        raise EdgepipeError(f"{root / b}: size {size} differs from {first} ({root / a}); set data.image_size")
    bad = {p for p, _ in skipped}
    keep = [i for i, p in enumerate(rel) if p not in bad]
    labels = files.labels[keep]
    empty = [c for k, c in enumerate(listing.classes) if not (labels == k).any()]
    if empty:
        raise EdgepipeError(f"{root / empty[0]}: none of its image file(s) could be read; replace them or remove the "
                            "class folder")
    files.paths, files.labels = files.paths[keep], labels
    w, h = (int(v) for v in next(iter(sizes)).split("x"))
    notes = {"images": len(keep), "modes": modes, "channels": channels, "skipped": skipped,
             "repeated": listing.repeated}
    warn_skipped(root, notes, cached=found is not None)
    return files, (h, w), notes


STAT_SAMPLE = 2048
"""Training images the per-channel mean and std are estimated from when a streamed set has no data.mean/std."""


def streamed_imagefolder(cfg: DataConfig, seed: int, channels: int, train: Listing, val: Listing,
                         reason: str) -> StreamingBundle:
    workers = default_workers() if cfg.workers is None else cfg.workers
    tr_files, tr_hw, tr_notes = _check_split(train, cfg, channels, workers)
    va_files, va_hw, va_notes = _check_split(val, cfg, channels, workers)
    root = Path(cfg.path)  # type: ignore[arg-type]
    same_size(root, cfg, tr_hw, va_hw)
    pad = max(1, tr_hw[1] // 8)
    for files in (tr_files, va_files):
        files.pad, files.hflip, files.seed = pad, cfg.hflip, seed
    bundle = StreamingBundle(tr_files, va_files, torch.zeros(channels), torch.ones(channels), train.classes,
                             (channels, *tr_hw), augment=cfg.augment, seed=seed, workers=workers)
    stats = "data.mean/std"
    if cfg.mean and cfg.std:
        bundle.mean, bundle.std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    else:  # from a fixed sample: reading every image of a set too big for memory only for two numbers costs an epoch
        n = min(STAT_SAMPLE, bundle.train_size)
        pick = torch.randperm(bundle.train_size, generator=torch.Generator().manual_seed(seed + 11))[:n].tolist()
        f = torch.cat(list(bundle._images(tr_files, pick, 256))).float() / 255.0
        bundle.mean, bundle.std = f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3))
        stats = f"estimated from {n} of {bundle.train_size} training images (set data.mean/std to fix them)"
    bundle.notes = {"channels": channels, "streaming": {"on": True, "reason": reason, "workers": workers,
                                                        "mean_std": stats},
                    cfg.train_split: tr_notes, cfg.val_split: va_notes}
    log.info("data: streaming %d training and %d validation images from %s with %d worker(s) (%s)",
             bundle.train_size, bundle.val_size, root, workers, reason)
    return bundle
