"""The on-disk cache of decoded images and file checks ($EDGEPIPE_CACHE, default ~/.cache/edgepipe).

Entries are keyed by every file's path, size and modification time (``files_signature``) plus the decoding
settings and ``DECODE_VERSION``, so a benchmark decodes 60,000 JPEGs once, not once per stage, and an image
replaced under the same name is decoded again. ``edgepipe cache`` lists and clears it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.io import atomic_write

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache folder: $EDGEPIPE_CACHE, default ~/.cache/edgepipe (created when first written)."""
    return Path(os.environ.get("EDGEPIPE_CACHE", Path.home() / ".cache" / "edgepipe"))


def decode_cache() -> tuple[Path, list[Path]]:
    """The decoded-image cache folder ($EDGEPIPE_CACHE, default ~/.cache/edgepipe) and its files."""
    folder = cache_dir()
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


def files_signature(paths: list[str]) -> str:
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


def write_cache(path: Path, write: Callable[[Path], Any]) -> None:
    """Write a cache file atomically; a full or read-only disk only costs the decoding again next time."""
    try:
        atomic_write(path, write)
    except OSError as e:
        log.warning("%s: cannot write the cache (%s); continuing without it", path, e.strerror)
