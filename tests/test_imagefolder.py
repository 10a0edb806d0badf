"""The ImageFolder path a user's own dataset takes: decode, cache, normalize, and fail clearly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgepipe.config import DataConfig
from edgepipe.data import load_data
from edgepipe.errors import EdgepipeError
from tests.support import CIFAR10, needs_cifar


def _tree(root: Path, n: int = 3, size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + 150 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / cls / f"{i}.png")


def test_imagefolder_loads_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    _tree(tmp_path / "data")
    cfg = DataConfig(kind="imagefolder", path=str(tmp_path / "data"))
    d = load_data(cfg)
    assert d.class_names == ["cat", "dog"] and d.input_shape == (3, 12, 12)
    assert d.train_images.dtype.is_floating_point is False and len(d.train_labels) == 6
    assert sorted(d.val_labels.tolist()) == [0, 0, 0, 1, 1, 1]
    x, y = next(d.val_batches(16))
    assert abs(float(x.mean())) < 0.2  # normalized with the train split's own statistics
    assert len(list((tmp_path / "cache").glob("imagefolder-*.npz"))) == 2
    again = load_data(cfg)  # served from the cache
    assert (again.train_images == d.train_images).all()


def test_imagefolder_resize_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    _tree(tmp_path / "data")
    d = load_data(DataConfig(kind="imagefolder", path=str(tmp_path / "data"), image_size=8))
    assert d.input_shape == (3, 8, 8)
    with pytest.raises(EdgepipeError, match="image folder not found"):
        load_data(DataConfig(kind="imagefolder", path=str(tmp_path / "nowhere")))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "data" / "train" / "cat" / "odd.png")
    with pytest.raises(EdgepipeError, match="set data.image_size"):
        load_data(DataConfig(kind="imagefolder", path=str(tmp_path / "data")))


@needs_cifar
def test_cifar10_test_split_through_imagefolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepipe.data import _decode_split

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))  # never write into the user's cache from a test
    images, labels, classes = _decode_split(CIFAR10 / "test", None)
    assert images.shape == (10_000, 3, 32, 32) and classes[0] == "airplane" and np.bincount(labels).tolist() == [1000] * 10


def test_an_image_replaced_under_the_same_name_is_decoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode cache is keyed by each file's size and modification time, not its name only: stale pixels would
    otherwise reach a retrained stage whose key did change (edgepipe.data.data_fingerprint)."""
    import os

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    _tree(tmp_path / "data")
    cfg = DataConfig(kind="imagefolder", path=str(tmp_path / "data"))
    first = load_data(cfg)
    target = sorted((tmp_path / "data" / "train").rglob("*.png"))[0]
    Image.fromarray(np.full((12, 12, 3), 7, np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a different modification time even on a coarse clock
    second = load_data(cfg)
    assert not (second.train_images == first.train_images).all()
    assert (second.train_images[0] == 7).all()
