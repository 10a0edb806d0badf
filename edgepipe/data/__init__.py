"""Datasets, served in seeded, augmented batches: held in memory as tensors, or streamed from disk.

Two sources: scikit-learn's ``digits`` (embedded: 1,797 8x8 grey images, no download) and an
ImageFolder tree (``root/<split>/<class>/*.jpg``) listed by torchvision's ImageFolder. Every image
file goes through one function (``decode_file``: explicit mode conversion, then torchvision's Resize +
CenterCrop when ``data.image_size`` is set), whichever of the two paths serves it:

- **In memory** (``DataBundle``, small sets): every image decoded once to one uint8 array, cached on
  disk (``$EDGEPIPE_CACHE`` or ``~/.cache/edgepipe``) keyed by the files' paths, sizes and times, so a
  benchmark decodes 60,000 JPEGs once, not once per stage. Batches are normalized and augmented
  (random crop with reflect padding, horizontal flip) on whole tensors, which on a 2-core CPU is far
  cheaper than per-image transforms in worker processes.
- **Streamed** (``StreamingBundle``, above ``data.memory_limit_mb`` of decoded images, or
  ``data.streaming: true``): a ``torch.utils.data.DataLoader`` with worker processes decodes and
  augments each image on the fly (torchvision transforms v2), so memory does not grow with the data.
  Files are checked once (every one decoded, in the workers) and the result kept in the cache, so
  unreadable images are skipped and recorded exactly as in memory.

Both serve the same batches in the same order for a given seed and epoch (a permutation drawn from
seed and epoch only). A streamed sample's augmentation is drawn from a generator seeded by (seed,
epoch, index), so the batches do not depend on the number of workers, and a rank of a distributed
run can take its shard of every global batch (``shard=(rank, world)``).
"""
from __future__ import annotations

import abc
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from edgepipe.config import DataConfig
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write

if TYPE_CHECKING:
    from edgepipe.config import PipelineConfig

log = logging.getLogger(__name__)


def epoch_order(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
    """The training order of one epoch (a function of seed and epoch only) and the generator after drawing it."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen), gen


def batch_starts(n: int, batch_size: int) -> range:
    """Start of every full batch (the last partial one is dropped; a set smaller than one batch is one batch)."""
    return range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size)


def shard_of(idx: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """Rank ``shard[0]``'s part of one global batch among ``shard[1]`` ranks: a contiguous, disjoint slice."""
    rank, world = shard
    if world == 1:
        return idx
    if len(idx) % world:
        raise EdgepipeError(f"data.batch_size: a batch of {len(idx)} does not split evenly over {world} processes; "
                            f"give a batch size divisible by {world}")
    per = len(idx) // world
    return idx[rank * per:(rank + 1) * per]


class Batches(abc.ABC):
    """What the stages read from a dataset, whichever way it is held (in memory or streamed): an abstract base,
    implemented by DataBundle and StreamingBundle."""

    mean: torch.Tensor
    std: torch.Tensor
    class_names: list[str]
    notes: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image as the models receive it."""

    @property
    @abc.abstractmethod
    def train_size(self) -> int:
        """Number of training images."""

    @property
    @abc.abstractmethod
    def val_size(self) -> int:
        """Number of validation images."""

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.train_size // batch_size)

    @abc.abstractmethod
    def train_batches(self, batch_size: int, epoch: int, augment: bool | None = None, shard: tuple[int, int] = (0, 1),
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled (and augmented) training batches; the order depends only on seed and epoch.
        ``shard=(rank, world)`` yields that rank's slice of every global batch of ``batch_size``."""

    @abc.abstractmethod
    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation set in file order, normalized, never augmented."""

    def val_numpy(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in self.val_batches(batch_size):
            yield x.numpy(), y.numpy()

    def calibration_order(self, n: int, batch_size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 7)  # type: ignore[attr-defined]
        return torch.randperm(self.train_size, generator=gen)[: n * batch_size]

    @abc.abstractmethod
    def calibration_batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        """``n`` un-augmented training batches (fixed order) for range calibration."""

    @abc.abstractmethod
    def val_head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` validation images as stored (uint8 [n, C, H, W], or float in [0, 1]) and their labels."""

    @abc.abstractmethod
    def subset(self, n_train: int, n_val: int) -> Batches:
        """The same data limited to ``n_train`` training and ``n_val`` validation images, every class in turn
        (``class_spread``)."""


@dataclass
class DataBundle(Batches):
    """Every image decoded in memory; batches are cut, normalized and augmented as whole tensors."""

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
    notes: dict[str, Any] = field(default_factory=dict)
    """How the files became tensors: channels, source image modes, files skipped as unreadable (per split)."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def val_size(self) -> int:
        return len(self.val_labels)

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

    def train_batches(self, batch_size: int, epoch: int, augment: bool | None = None, shard: tuple[int, int] = (0, 1),
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, gen = epoch_order(self.train_size, self.seed, epoch)
        aug = self.augment if augment is None else augment
        for i in batch_starts(len(order), batch_size):
            idx = shard_of(order[i:i + batch_size], shard)
            x = self.normalize(self.train_images[idx])
            if aug:
                x = self._augment(x, gen)
            yield x, self.train_labels[idx]

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.val_labels), batch_size):
            yield self.normalize(self.val_images[i:i + batch_size]), self.val_labels[i:i + batch_size]

    def calibration_batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        order = self.calibration_order(n, batch_size)
        return [self.normalize(self.train_images[order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]

    def val_head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.val_images[:n].numpy(), self.val_labels[:n].numpy()

    def subset(self, n_train: int, n_val: int) -> DataBundle:
        tr = torch.from_numpy(class_spread(self.train_labels.numpy(), n_train))
        va = torch.from_numpy(class_spread(self.val_labels.numpy(), n_val))
        return replace(self, train_images=self.train_images[tr], train_labels=self.train_labels[tr],
                       val_images=self.val_images[va], val_labels=self.val_labels[va])


def class_spread(labels: np.ndarray, n: int) -> np.ndarray:
    """The indices, in dataset order, of ``n`` samples taken from every class in turn (each class's first ones).

    An ImageFolder lists its files class by class, so its first N images are one or two classes: a run limited
    with data.limit_train / limit_val would train and score on a set that says nothing. Taking the classes in
    turn keeps them balanced (to one sample) and the choice deterministic."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    within = np.empty(len(labels), dtype=np.int64)  # each sample's place within its class
    within[order] = np.arange(len(labels)) - np.searchsorted(ordered, ordered, side="left")
    return np.sort(np.lexsort((labels, within))[:n])


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


def load_data(cfg: DataConfig, seed: int = 0, channels: int | None = None) -> Batches:
    """Load the dataset a config names; ``channels`` (1 or 3) when ``data.channels`` is not set (default 3)."""
    want = cfg.channels or channels or (1 if cfg.kind == "digits" else 3)
    if cfg.image_size:  # refused before a single image is resized to it
        from edgepipe.engine.sizes import check_input

        size = (want, cfg.image_size, cfg.image_size)
        if cfg.kind == "digits":
            check_input("data.image_size", 1797, size, "lower data.image_size (the digits are 8x8)",
                        "the digits set of")
        check_input("data.image_size", 1, size, "lower data.image_size", "even a batch of")
    if cfg.kind == "digits":
        bundle = _digits(cfg, seed)
        if want == 3:
            bundle.train_images = bundle.train_images.repeat(1, 3, 1, 1)
            bundle.val_images = bundle.val_images.repeat(1, 3, 1, 1)
            bundle.mean, bundle.std = bundle.mean.expand(3).clone(), bundle.std.expand(3).clone()
        bundle.notes = {"channels": want}
    else:
        bundle = _imagefolder(cfg, seed, want)
    channels = bundle.input_shape[0]
    for name in ("mean", "std"):
        given = getattr(cfg, name)
        if given is not None and len(given) != channels:
            raise EdgepipeError(f"data.{name}: {len(given)} value(s) for images with {channels} channel(s); "
                                f"give one per channel")
    if cfg.limit_train or cfg.limit_val:
        bundle = bundle.subset(cfg.limit_train or bundle.train_size, cfg.limit_val or bundle.val_size)
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


def run_data(config: PipelineConfig) -> Batches:
    """The data of a run: ``data.channels``, or as many channels as the teacher's first layer takes. Every batch the
    run's settings cut from it must fit in memory (edgepipe.engine.sizes.check_batches), checked before one is cut."""
    from edgepipe.engine.sizes import check_batches

    data = load_data(config.data, seed=config.seed, channels=teacher_channels(config))
    check_batches(config, data.train_size, data.val_size, tuple(data.input_shape))
    return data


_CHANNELS: dict[str, int | None] = {}


def teacher_channels(config: PipelineConfig) -> int | None:
    """Input channels of the teacher's first layer (None when it takes neither 1 nor 3, or has no such layer)."""
    if config.data.channels:
        return config.data.channels
    spec = config.teacher.model
    key = spec.model_dump_json()
    if key not in _CHANNELS:
        if spec.arch and "in_channels" in spec.kwargs:
            found = spec.kwargs["in_channels"]
        else:
            from edgepipe.models import build_from_spec
            from edgepipe.engine.sizes import meta_model

            # a registered architecture on the meta device: its shapes, before its size is checked (edgepipe.engine.sizes)
            model = meta_model(spec, "teacher.model") if spec.arch else build_from_spec(spec)
            found = next((m.in_channels for m in model.modules()
                          if isinstance(getattr(m, "in_channels", None), int)), None)
            if found is None and spec.arch:
                found = 3  # a registered architecture without in_channels kwarg: torchvision's RGB models
        _CHANNELS[key] = found if found in (1, 3) else None
    return _CHANNELS[key]


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGEPIPE_CACHE", Path.home() / ".cache" / "edgepipe"))


def decode_cache() -> tuple[Path, list[Path]]:
    """The decoded-image cache folder ($EDGEPIPE_CACHE, default ~/.cache/edgepipe) and its files."""
    folder = _cache_dir()
    return folder, sorted(folder.glob("imagefolder-*")) if folder.is_dir() else []


def clear_decode_cache() -> tuple[int, int]:
    """Delete every decoded-image file of the cache; returns (files, bytes) removed. Images are decoded again,
    from the dataset itself, the next time a run needs them."""
    _, files = decode_cache()
    freed = 0
    for f in files:
        freed += f.stat().st_size
        f.unlink()
    return len(files), freed


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


# 3: Resize + CenterCrop (torchvision) for data.image_size, 2: explicit mode conversion, 1 or 3 channels,
# unreadable files skipped and recorded
DECODE_VERSION = 3


@dataclass
class Listing:
    """The image files of one split in ImageFolder order, with their class indices (nothing decoded yet)."""

    root: Path
    paths: list[str]
    targets: list[int]
    classes: list[str]
    repeated: list[list[str]] = field(default_factory=list)
    """[path, why] of every folder or file reached a second time (a symlink loop, a file linked twice): not listed."""


def list_split(root: Path) -> Listing:
    """``root/<class>/<image>`` as torchvision's ImageFolder lists it (sorted classes, image extensions only,
    symlinks followed), except that every folder and file is read once: a folder reached again through a symlink
    (a loop, or two links to one folder) is not entered again and a file reached twice (the same device and inode,
    e.g. a symlink or hard link to an image already listed) is listed once. ImageFolder follows a loop until the
    path is too long, which counted digits' 1,437 training images as 6,877; what was left out is warned about and
    recorded (``repeated``)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise EdgepipeError(f"{root}: image folder not found; data.path must hold the train/val split folders")
    every = "every class needs a sub-folder holding at least one image (.jpg, .png, ...)"
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise EdgepipeError(f"{root}: no class folder found; {every}")
    seen_dirs: dict[tuple[int, int], str] = {}
    seen_files: dict[tuple[int, int], str] = {}
    repeated: list[list[str]] = []
    paths: list[str] = []
    targets: list[int] = []
    for k, name in enumerate(classes):
        found: list[tuple[str, list[str]]] = []
        for folder, dirs, files in os.walk(root / name, followlinks=True):
            st = os.stat(folder)
            seen_dirs.setdefault((st.st_dev, st.st_ino), folder)
            keep = []
            for d in sorted(dirs):
                sub = os.path.join(folder, d)
                try:
                    st = os.stat(sub)
                except OSError:
                    continue
                first = seen_dirs.get((st.st_dev, st.st_ino))
                if first is None:
                    seen_dirs[(st.st_dev, st.st_ino)] = sub
                    keep.append(d)
                else:
                    loop = (sub + os.sep).startswith(first + os.sep)
                    how = "a symlink loop back to" if loop else "the same folder as"
                    repeated.append([os.path.relpath(sub, root), f"{how} {os.path.relpath(first, root)}"])
            dirs[:] = keep
            found.append((folder, files))
        for folder, files in sorted(found):  # ImageFolder's order: sorted folders, then sorted files
            for fname in sorted(files):
                path = os.path.join(folder, fname)
                if not path.lower().endswith(IMG_EXTENSIONS):
                    continue
                try:
                    st = os.stat(path)
                except OSError:  # e.g. a broken symlink: listed, and reported as unreadable when decoded
                    st = None
                first = seen_files.get((st.st_dev, st.st_ino)) if st else None
                if first is not None:
                    repeated.append([os.path.relpath(path, root), f"the same file as {os.path.relpath(first, root)}"])
                    continue
                if st:
                    seen_files[(st.st_dev, st.st_ino)] = path
                paths.append(path)
                targets.append(k)
    listed = set(targets)
    empty = [c for k, c in enumerate(classes) if k not in listed]
    if empty:
        raise EdgepipeError(f"{root}: found no image file for the class(es) {', '.join(empty)}; {every}")
    if repeated:
        files = sum(why.startswith("the same file") for _, why in repeated)
        log.warning("%s: %d path(s) skipped as reached more than once (%d folder(s) through symlinks, %d file(s) "
                    "linked twice; first: %s, %s): each file is read and counted once (recorded in the run's data "
                    "notes)", root, len(repeated), len(repeated) - files, files, *repeated[0])
    return Listing(root, paths, targets, classes, repeated)


def decode_file(path: str, channels: int, size: int | None, crop_fraction: float = 1.0) -> tuple[torch.Tensor, str]:
    """One image file as uint8 [channels, H, W], and the mode it was stored in: ``to_channels``, then, with
    ``size``, torchvision's Resize of the shorter side to size / crop_fraction and CenterCrop to size x size.
    Both the in-memory and the streamed path decode through here, so they see the same pixels.
    Raises whatever PIL raises for a damaged or foreign file."""
    img = _open_raw(path)
    x = torch.from_numpy(to_channels(img, channels)).permute(2, 0, 1)
    if size:
        from torchvision.transforms.v2 import functional as F

        short = round(size / crop_fraction)
        if min(x.shape[1:]) != short or x.shape[1] != x.shape[2]:
            x = F.resize(x, [short], antialias=True)
        x = F.center_crop(x, [size, size])
    return x.contiguous(), img.mode


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:120]}" if str(e) else type(e).__name__


def _unreadable(path: str, reason: str, strict: bool) -> str:
    """Warn that a file is skipped, and return why; with ``strict``, the error that stops the run instead."""
    if strict:
        raise EdgepipeError(f"{path}: cannot decode this image ({reason}); remove or replace the file, or set "
                            "data.strict: false to skip unreadable images with a warning") from None
    log.warning("%s: skipped, cannot decode this image (%s)", path, reason)
    return reason


def _decode_split(root: Path, size: int | None, channels: int = 3, strict: bool = False, crop_fraction: float = 1.0,
                  listing: Listing | None = None) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Decode every image under ``root/<class>/`` to uint8 [N, channels, H, W] (cached on disk).

    Returns images, labels, class names and notes: the source modes counted and the files skipped as unreadable
    (with the reason), which the run records. With ``strict`` the first unreadable file is an error instead.
    """
    ds = listing or list_split(root)
    signature = (_files_signature(ds.paths) + f"|{size}|{crop_fraction}|{channels}|{strict}|v{DECODE_VERSION}")
    cache = _cache_dir() / f"imagefolder-{hashlib.sha256(signature.encode()).hexdigest()[:16]}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                images, labels, notes = z["images"], z["labels"], json.loads(str(z["notes"]))
            notes["repeated"] = ds.repeated  # from this listing: the cache is keyed by the files listed
            _warn_skipped(root, notes, cached=True)
            return images, labels, list(ds.classes), notes
        except Exception as e:  # noqa: BLE001 - a damaged cache file is decoded again, never trusted
            log.warning("%s: damaged decode cache (%s), decoding the images again", cache, type(e).__name__)
    log.info("decoding %d images under %s (cached afterwards in %s)", len(ds.paths), root, cache)
    images: np.ndarray | None = None
    keep: list[int] = []
    modes: dict[str, int] = {}
    skipped: list[list[str]] = []
    for i, path in enumerate(ds.paths):
        try:
            pixels, mode = decode_file(path, channels, size, crop_fraction)
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is the problem
            skipped.append([os.path.relpath(path, root), _unreadable(path, _reason(e), strict)])
            continue
        modes[mode] = modes.get(mode, 0) + 1
        if images is None:
            images = np.empty((len(ds.paths), channels, *pixels.shape[1:]), dtype=np.uint8)
        elif pixels.shape[1:] != images.shape[2:]:
            raise EdgepipeError(f"{path}: size {pixels.shape[2]}x{pixels.shape[1]} differs from "
                                f"{images.shape[3]}x{images.shape[2]} (the first image's); set data.image_size")
        images[len(keep)] = pixels.numpy()
        keep.append(i)
    targets = np.asarray(ds.targets, dtype=np.int64)
    labels = targets[keep]
    empty = [c for k, c in enumerate(ds.classes) if not (labels == k).any()]
    if empty:
        raise EdgepipeError(f"{root / empty[0]}: none of its {int((targets == ds.classes.index(empty[0])).sum())} "
                            f"image file(s) could be read; replace them or remove the class folder")
    images = images[: len(keep)] if images is not None else np.empty((0, channels, 1, 1), np.uint8)
    notes = {"images": len(keep), "modes": modes, "channels": channels, "skipped": skipped, "repeated": ds.repeated}
    _warn_skipped(root, notes, cached=False)
    _write_cache(cache, lambda p: np.savez(p.open("wb"), images=images, labels=labels, notes=np.array(json.dumps(notes))))
    return images, labels, list(ds.classes), notes


def _warn_skipped(root: Path, notes: dict[str, Any], cached: bool) -> None:
    if notes["skipped"]:
        log.warning("%s: %d unreadable image(s) skipped%s (data.strict: true stops at the first instead)", root,
                    len(notes["skipped"]), ", as when they were first decoded" if cached else "")


def _open_raw(path: str) -> Image.Image:
    """The file decoded as stored (any mode); raises whatever PIL raises for a damaged or foreign file."""
    with open(path, "rb") as fh:
        img = Image.open(fh)
        img.load()
    return img


def to_channels(img: Image.Image, channels: int) -> np.ndarray:
    """``img`` as uint8 [H, W, channels], every mode converted explicitly (PIL's own convert clips 16-bit to 255):

    - 16-bit grayscale (I;16*, and I holding values above 255) is scaled by 255/65535 to keep its dynamic range;
      32-bit float (F) is clipped to 0..255.
    - Alpha (RGBA, LA, PA, palette with transparency) is dropped, as torchvision's loader does.
    - Palette, CMYK, YCbCr, LAB, HSV and bilevel images go through RGB.
    - 3 channels from grayscale repeat the channel; 1 channel from color is ITU-R 601-2 luma (PIL's "L").
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img, dtype=np.int64)
        if mode.startswith("I;16") or a.max(initial=0) > 255:
            a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La"):
        img = img.getchannel(0)
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # RGBA/RGBa/PA drop alpha; CMYK, YCbCr, LAB, HSV, 1 convert
    img = img.convert("L" if channels == 1 else "RGB")
    a = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy takes it as is
    return a[..., None] if channels == 1 else a


def _imagefolder(cfg: DataConfig, seed: int, channels: int) -> Batches:
    root = Path(cfg.path)  # type: ignore[arg-type]
    train, val = list_split(root / cfg.train_split), list_split(root / cfg.val_split)
    if train.classes != val.classes:
        only = [f"only in {split}/: {', '.join(sorted(set(a) - set(b)))}" for split, a, b in
                ((cfg.train_split, train.classes, val.classes), (cfg.val_split, val.classes, train.classes))
                if set(a) - set(b)]
        raise EdgepipeError(f"{root}: class folders of {cfg.train_split}/ and {cfg.val_split}/ differ "
                            f"({'; '.join(only)}); give both splits the same class folders")
    stream, reason = _streaming_choice(cfg, train, val, channels)
    if stream:
        return _streamed_imagefolder(cfg, seed, channels, train, val, reason)
    tr_x, tr_y, classes, tr_notes = _decode_split(train.root, cfg.image_size, channels, cfg.strict, cfg.crop_fraction,
                                                  train)
    va_x, va_y, _, va_notes = _decode_split(val.root, cfg.image_size, channels, cfg.strict, cfg.crop_fraction, val)
    _same_size(root, cfg, tuple(tr_x.shape[2:]), tuple(va_x.shape[2:]))
    tr, va = torch.from_numpy(tr_x), torch.from_numpy(va_x)
    if cfg.mean and cfg.std:
        mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    else:
        f = tr.float() / 255.0
        mean, std = f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3))
    return DataBundle(tr, torch.from_numpy(tr_y), va, torch.from_numpy(va_y), mean, std, classes,
                      augment=cfg.augment, hflip=cfg.hflip, pad=max(1, tr.shape[-1] // 8), seed=seed,
                      notes={"channels": channels, "streaming": {"on": False, "reason": reason},
                             cfg.train_split: tr_notes, cfg.val_split: va_notes})


def _same_size(root: Path, cfg: DataConfig, train_hw: tuple[int, ...], val_hw: tuple[int, ...]) -> None:
    if train_hw != val_hw:
        raise EdgepipeError(f"{root}: {cfg.train_split}/ images are {train_hw[1]}x{train_hw[0]}, {cfg.val_split}/ "
                            f"images {val_hw[1]}x{val_hw[0]}; set data.image_size")


# --- streaming ------------------------------------------------------------------------------------------
def default_workers() -> int:
    """DataLoader workers when data.workers is not set: one per CPU core this process may use (under torchrun, its
    share of the node's cores), at most 8."""
    from edgepipe.training import distributed

    launch = distributed.launch()
    return max(1, min(8, distributed.usable_cores() // (launch.local_world_size if launch else 1)))


def _streaming_choice(cfg: DataConfig, train: Listing, val: Listing, channels: int) -> tuple[bool, str]:
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
            raise EdgepipeError(f"{path}: cannot decode this image any more ({type(e).__name__}); it was readable when "
                                "the run checked its files: was it changed during the run? Run the command again") from None
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

    def subset(self, n_train: int, n_val: int) -> StreamingBundle:
        return replace(self, train=self.train.take(class_spread(self.train.labels, n_train)),
                       val=self.val.take(class_spread(self.val.labels, n_val)))


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
            return None, None, _reason(e)
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
    signature = (_files_signature(listing.paths) + f"|{cfg.image_size}|{cfg.crop_fraction}|{channels}|check"
                 f"|v{DECODE_VERSION}")
    cache = _cache_dir() / f"imagefolder-check-{hashlib.sha256(signature.encode()).hexdigest()[:16]}.json"
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
        _write_cache(cache, lambda p: p.write_text(record))
    for path, reason in skipped:  # in file order: with data.strict the first one stops the run
        if cfg.strict or found is None:  # a remembered check repeats only the summary line, as the decode cache does
            _unreadable(str(root / path), reason, cfg.strict)
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
    _warn_skipped(root, notes, cached=found is not None)
    return files, (h, w), notes


def _write_cache(path: Path, write: Callable[[Path], Any]) -> None:
    """Write a cache file atomically; a full or read-only disk only costs the decoding again next time."""
    try:
        atomic_write(path, write)
    except OSError as e:
        log.warning("%s: cannot write the cache (%s); continuing without it", path, e.strerror)


STAT_SAMPLE = 2048
"""Training images the per-channel mean and std are estimated from when a streamed set has no data.mean/std."""


def _streamed_imagefolder(cfg: DataConfig, seed: int, channels: int, train: Listing, val: Listing,
                          reason: str) -> StreamingBundle:
    workers = default_workers() if cfg.workers is None else cfg.workers
    tr_files, tr_hw, tr_notes = _check_split(train, cfg, channels, workers)
    va_files, va_hw, va_notes = _check_split(val, cfg, channels, workers)
    root = Path(cfg.path)  # type: ignore[arg-type]
    _same_size(root, cfg, tr_hw, va_hw)
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
