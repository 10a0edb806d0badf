"""An ImageFolder split (``root/<class>/*.jpg``): listing its files, decoding them, decoding a whole split.

Every image file goes through one function (``decode_file``: explicit mode conversion, then torchvision's
Resize + CenterCrop when ``data.image_size`` is set), whichever path serves it (in memory: ``decode_split``,
cached on disk; streamed: edgepipe.data.streaming), so both see the same pixels. Unreadable files are skipped
and recorded the same way on both paths (``unreadable``, ``warn_skipped``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from edgepipe.config import DataConfig
from edgepipe.data.decode_cache import DECODE_VERSION, cache_dir, files_signature, write_cache
from edgepipe.errors import EdgepipeError

log = logging.getLogger(__name__)


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


def error_reason(e: BaseException) -> str:
    """Why a file could not be decoded, in one short line (the notes record it)."""
    return f"{type(e).__name__}: {str(e)[:120]}" if str(e) else type(e).__name__


def unreadable(path: str, reason: str, strict: bool) -> str:
    """Warn that a file is skipped, and return why; with ``strict``, the error that stops the run instead."""
    if strict:
        raise EdgepipeError(f"{path}: cannot decode this image ({reason}); remove or replace the file, or set "
                            "data.strict: false to skip unreadable images with a warning") from None
    log.warning("%s: skipped, cannot decode this image (%s)", path, reason)
    return reason


def decode_split(root: Path, size: int | None, channels: int = 3, strict: bool = False, crop_fraction: float = 1.0,
                 listing: Listing | None = None) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Decode every image under ``root/<class>/`` to uint8 [N, channels, H, W] (cached on disk).

    Returns images, labels, class names and notes: the source modes counted and the files skipped as unreadable
    (with the reason), which the run records. With ``strict`` the first unreadable file is an error instead.
    """
    ds = listing or list_split(root)
    signature = (files_signature(ds.paths) + f"|{size}|{crop_fraction}|{channels}|{strict}|v{DECODE_VERSION}")
    cache = cache_dir() / f"imagefolder-{hashlib.sha256(signature.encode()).hexdigest()[:16]}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                images, labels, notes = z["images"], z["labels"], json.loads(str(z["notes"]))
            notes["repeated"] = ds.repeated  # from this listing: the cache is keyed by the files listed
            warn_skipped(root, notes, cached=True)
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
            skipped.append([os.path.relpath(path, root), unreadable(path, error_reason(e), strict)])
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
    warn_skipped(root, notes, cached=False)
    write_cache(cache, lambda p: np.savez(p.open("wb"), images=images, labels=labels,
                                          notes=np.array(json.dumps(notes))))
    return images, labels, list(ds.classes), notes


def warn_skipped(root: Path, notes: dict[str, Any], cached: bool) -> None:
    """One summary line for a split's unreadable files, also when its check or decoding came from the cache."""
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


def same_size(root: Path, cfg: DataConfig, train_hw: tuple[int, ...], val_hw: tuple[int, ...]) -> None:
    """Refuse splits of different image sizes: one model takes one input shape."""
    if train_hw != val_hw:
        raise EdgepipeError(f"{root}: {cfg.train_split}/ images are {train_hw[1]}x{train_hw[0]}, {cfg.val_split}/ "
                            f"images {val_hw[1]}x{val_hw[0]}; set data.image_size")
