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
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    notes: dict[str, Any] = field(default_factory=dict)
    """How the files became tensors: channels, source image modes, files skipped as unreadable (per split)."""

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


def load_data(cfg: DataConfig, seed: int = 0, channels: int | None = None) -> DataBundle:
    """Load the dataset a config names; ``channels`` (1 or 3) when ``data.channels`` is not set (default 3)."""
    want = cfg.channels or channels or (1 if cfg.kind == "digits" else 3)
    if cfg.kind == "digits":
        bundle = _digits(cfg, seed)
        if want == 3:
            bundle.train_images = bundle.train_images.repeat(1, 3, 1, 1)
            bundle.val_images = bundle.val_images.repeat(1, 3, 1, 1)
            bundle.mean, bundle.std = bundle.mean.expand(3).clone(), bundle.std.expand(3).clone()
        bundle.notes = {"channels": want}
    else:
        bundle = _imagefolder(cfg, seed, want)
    channels = bundle.train_images.shape[1]
    for name in ("mean", "std"):
        given = getattr(cfg, name)
        if given is not None and len(given) != channels:
            raise EdgepipeError(f"data.{name}: {len(given)} value(s) for images with {channels} channel(s); "
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


def run_data(config: PipelineConfig) -> DataBundle:
    """The data of a run: ``data.channels``, or as many channels as the teacher's first layer takes."""
    return load_data(config.data, seed=config.seed, channels=teacher_channels(config))


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

            found = next((m.in_channels for m in build_from_spec(spec).modules()
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
    return folder, sorted(folder.glob("imagefolder-*.npz")) if folder.is_dir() else []


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


DECODE_VERSION = 2  # 2: explicit mode conversion, 1 or 3 channels, unreadable files skipped and recorded


def _decode_split(root: Path, size: int | None, channels: int = 3, strict: bool = False,
                  ) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Decode every image under ``root/<class>/`` to uint8 [N, channels, H, W] (cached on disk).

    Returns images, labels, class names and notes: the source modes counted and the files skipped as unreadable
    (with the reason), which the run records. With ``strict`` the first unreadable file is an error instead.
    """
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise EdgepipeError(f"{root}: image folder not found; data.path must hold the train/val split folders")
    try:
        ds = ImageFolder(str(root), loader=_open_raw)
    except FileNotFoundError as e:  # no class folders, or a class folder without a single image file
        raise EdgepipeError(f"{root}: {str(e).rstrip('.')}; every class needs a sub-folder holding at least one "
                            "image (.jpg, .png, ...)") from None
    signature = _files_signature([p for p, _ in ds.samples]) + f"|{size}|{channels}|{strict}|v{DECODE_VERSION}"
    cache = _cache_dir() / f"imagefolder-{hashlib.sha256(signature.encode()).hexdigest()[:16]}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                images, labels, notes = z["images"], z["labels"], json.loads(str(z["notes"]))
            _warn_skipped(root, notes, cached=True)
            return images, labels, list(ds.classes), notes
        except Exception as e:  # noqa: BLE001 - a damaged cache file is decoded again, never trusted
            log.warning("%s: damaged decode cache (%s), decoding the images again", cache, type(e).__name__)
    log.info("decoding %d images under %s (cached afterwards in %s)", len(ds), root, cache)
    images: np.ndarray | None = None
    keep: list[int] = []
    modes: dict[str, int] = {}
    skipped: list[list[str]] = []
    for i, (path, _) in enumerate(ds.samples):
        try:
            img = _open_raw(path)
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is the problem
            reason = f"{type(e).__name__}: {str(e)[:120]}" if str(e) else type(e).__name__
            if strict:
                raise EdgepipeError(f"{path}: cannot decode this image ({reason}); remove or replace the file, or set "
                                    "data.strict: false to skip unreadable images with a warning") from None
            log.warning("%s: skipped, cannot decode this image (%s)", path, reason)
            skipped.append([os.path.relpath(path, root), reason])
            continue
        modes[img.mode] = modes.get(img.mode, 0) + 1
        pixels = to_channels(img, channels)
        if size:
            pixels = np.asarray(Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).resize((size, size)))
            pixels = pixels.reshape(size, size, channels)
        if images is None:
            images = np.empty((len(ds), channels, *pixels.shape[:2]), dtype=np.uint8)
        elif pixels.shape[:2] != images.shape[2:]:
            raise EdgepipeError(f"{path}: size {pixels.shape[1]}x{pixels.shape[0]} differs from "
                                f"{images.shape[3]}x{images.shape[2]} (the first image's); set data.image_size")
        images[len(keep)] = pixels.transpose(2, 0, 1)
        keep.append(i)
    targets = np.asarray(ds.targets, dtype=np.int64)
    labels = targets[keep]
    empty = [c for k, c in enumerate(ds.classes) if not (labels == k).any()]
    if empty:
        raise EdgepipeError(f"{root / empty[0]}: none of its {int((targets == ds.classes.index(empty[0])).sum())} "
                            f"image file(s) could be read; replace them or remove the class folder")
    images = images[: len(keep)] if images is not None else np.empty((0, channels, 1, 1), np.uint8)
    notes = {"images": len(keep), "modes": modes, "channels": channels, "skipped": skipped}
    _warn_skipped(root, notes, cached=False)
    atomic_write(cache, lambda p: np.savez(p.open("wb"), images=images, labels=labels, notes=np.array(json.dumps(notes))))
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
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if channels == 1 else a


def _imagefolder(cfg: DataConfig, seed: int, channels: int) -> DataBundle:
    root = Path(cfg.path)  # type: ignore[arg-type]
    tr_x, tr_y, classes, tr_notes = _decode_split(root / cfg.train_split, cfg.image_size, channels, cfg.strict)
    va_x, va_y, va_classes, va_notes = _decode_split(root / cfg.val_split, cfg.image_size, channels, cfg.strict)
    if classes != va_classes:
        raise EdgepipeError(f"{root}: class folders of {cfg.train_split}/ and {cfg.val_split}/ differ")
    if tr_x.shape[2:] != va_x.shape[2:]:
        raise EdgepipeError(f"{root}: {cfg.train_split}/ images are {tr_x.shape[3]}x{tr_x.shape[2]}, {cfg.val_split}/ "
                            f"images {va_x.shape[3]}x{va_x.shape[2]}; set data.image_size")
    tr, va = torch.from_numpy(tr_x), torch.from_numpy(va_x)
    if cfg.mean and cfg.std:
        mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    else:
        f = tr.float() / 255.0
        mean, std = f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3))
    return DataBundle(tr, torch.from_numpy(tr_y), va, torch.from_numpy(va_y), mean, std, classes,
                      augment=cfg.augment, hflip=cfg.hflip, pad=max(1, tr.shape[-1] // 8), seed=seed,
                      notes={"channels": channels, cfg.train_split: tr_notes, cfg.val_split: va_notes})
