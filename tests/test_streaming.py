"""Streamed data (a DataLoader with worker processes) serves what the in-memory path serves, deterministically."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgepipe.config import DataConfig
from edgepipe.data.batches import DataBundle
from edgepipe.data.loading import load_data
from edgepipe.data.streaming import StreamingBundle
from edgepipe.errors import EdgepipeError


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """3 classes, 24 training and 9 validation JPEGs of 16x16."""
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for label, cls in enumerate(("a", "b", "c")):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8) + 80 * label
                Image.fromarray(pixels).save(tmp_path / "data" / split / cls / f"{i}.jpg", quality=95)
    return tmp_path / "data"


def _cfg(folder: Path, **kw: object) -> DataConfig:
    return DataConfig(kind="imagefolder", path=str(folder), **kw)


def _epoch(data: object, epoch: int, batch: int = 6, **kw: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.train_batches(batch, epoch, **kw))  # type: ignore[attr-defined]


def test_streamed_and_in_memory_serve_the_same_data(folder: Path) -> None:
    estimated = load_data(_cfg(folder, streaming=True, workers=0))  # mean/std from all 24 images (< STAT_SAMPLE)
    memory = load_data(_cfg(folder, streaming=False))
    assert torch.allclose(estimated.mean, memory.mean) and torch.allclose(estimated.std, memory.std)
    stats = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}  # the same normalization: bit-equal batches
    memory = load_data(_cfg(folder, streaming=False, **stats))
    stream = load_data(_cfg(folder, streaming=True, workers=0, **stats))
    assert isinstance(memory, DataBundle) and isinstance(stream, StreamingBundle)
    assert stream.input_shape == memory.input_shape == (3, 16, 16) and stream.class_names == memory.class_names
    for (xs, ys), (xm, ym) in zip(stream.val_batches(4), memory.val_batches(4), strict=True):
        assert torch.equal(xs, xm) and torch.equal(ys, ym)  # the same decoded pixels, in file order
    for (xs, ys), (xm, ym) in zip(_epoch(stream, 1, augment=False), _epoch(memory, 1, augment=False), strict=True):
        assert torch.equal(xs, xm) and torch.equal(ys, ym)  # the same epoch order
    assert [torch.equal(a, b) for a, b in zip(stream.calibration_batches(2, 5), memory.calibration_batches(2, 5))] \
        == [True, True]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(_epoch(stream, 3), _epoch(memory, 3)))  # augmented: same labels
    images, labels = stream.val_head(5)
    assert images.dtype == np.uint8 and np.array_equal(images, memory.val_images[:5].numpy())
    assert np.array_equal(labels, memory.val_labels[:5].numpy())
    assert stream.notes["streaming"]["on"] and stream.notes["train"] == memory.notes["train"]


def _with_workers(folder: Path, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` (with ``data``: the folder streamed by 2 workers) in a fresh Python process. In the suite's own
    process, forking DataLoader workers left it to segfault at a later fork (SIGSEGV in a later subprocess call,
    twice on 2026-11-24, not reproduced alone), so the tests that start workers start them elsewhere, as the CLI
    does in its own process."""
    code = ("import sys, torch\nfrom edgepipe.config import DataConfig\nfrom edgepipe.data.loading import load_data\n"
            "def main():\n    data = load_data(DataConfig(kind='imagefolder', path=sys.argv[1], streaming=True, "
            "workers=2))\n" + "".join(f"    {line}\n" for line in body.splitlines()) +
            "if __name__ == '__main__':\n    main()\n")
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)


def test_batches_do_not_depend_on_the_number_of_workers(folder: Path, tmp_path: Path) -> None:
    inline = load_data(_cfg(folder, streaming=True, workers=0))
    out = tmp_path / "two.pt"
    done = _with_workers(folder, f"torch.save(list(data.train_batches(6, 0)), {str(out)!r})")
    assert done.returncode == 0, done.stderr[-2000:]
    first, again = _epoch(inline, 0), torch.load(out, weights_only=True)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], _epoch(inline, 1)[0][0])  # another epoch, another order and augmentation
    assert not torch.equal(first[0][0], _epoch(inline, 0, augment=False)[0][0])  # the augmentation is applied


def test_ranks_take_disjoint_shards_of_every_global_batch(folder: Path) -> None:
    data = load_data(_cfg(folder, streaming=True, workers=0))
    whole = _epoch(data, 2)
    ranks = [_epoch(data, 2, shard=(r, 2)) for r in range(2)]
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), x)
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), y)
    with pytest.raises(EdgepipeError, match="batch of 5 does not split evenly over 2 processes"):
        _epoch(data, 0, batch=5, shard=(0, 2))


def test_auto_streams_above_the_memory_limit(folder: Path) -> None:
    small = load_data(_cfg(folder, memory_limit_mb=1))  # 33 images x 768 bytes
    big = load_data(_cfg(folder, memory_limit_mb=0.01, workers=0))
    assert isinstance(small, DataBundle) and "within data.memory_limit_mb" in small.notes["streaming"]["reason"]
    assert isinstance(big, StreamingBundle) and "above data.memory_limit_mb" in big.notes["streaming"]["reason"]
    limited = load_data(_cfg(folder, streaming=True, workers=0, limit_train=7, limit_val=4))
    assert (limited.train_size, limited.val_size) == (7, 4) and len(list(limited.val_batches(3))) == 2


@pytest.mark.parametrize("streaming", [False, True])
def test_limits_take_every_class_in_turn(folder: Path, streaming: bool) -> None:
    """An ImageFolder lists its files class by class: limit_train / limit_val keep the classes balanced, in both
    paths alike, instead of the first class or two."""
    data = load_data(_cfg(folder, streaming=streaming, workers=0, limit_train=7, limit_val=4, augment=False))
    train = torch.cat([y for _, y in _epoch(data, 0, batch=7)])
    val = torch.cat([y for _, y in data.val_batches(4)])
    assert sorted(torch.bincount(train, minlength=3).tolist()) == [2, 2, 3]
    assert sorted(torch.bincount(val, minlength=3).tolist()) == [1, 1, 2]
    whole = load_data(_cfg(folder, streaming=streaming, workers=0, augment=False))
    all_val = next(iter(whole.val_batches(9)))[0]  # a0 a1 a2 b0 b1 b2 c0 c1 c2
    assert torch.equal(torch.cat([x for x, _ in data.val_batches(4)]), all_val[[0, 1, 3, 6]])  # a0 a1 b0 c0


def test_image_size_is_resize_then_centre_crop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a squash: the shorter side goes to image_size / crop_fraction, then the centre is cut (torchvision's
    Resize + CenterCrop, what users of ImageNet-style models evaluate with), in both paths alike."""
    from torchvision.transforms import v2

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    files = []
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            files.append(tmp_path / "data" / split / cls / "wide.png")
            Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(files[-1])
    expect = v2.Compose([v2.PILToTensor(), v2.Resize(9), v2.CenterCrop(8)])(Image.open(files[2]))  # test/a
    for streaming in (False, True):
        data = load_data(_cfg(tmp_path / "data", image_size=8, crop_fraction=0.875, streaming=streaming, workers=0))
        assert data.input_shape == (3, 8, 8)
        assert np.array_equal(data.val_head(1)[0][0], expect.numpy())


def test_worker_count_is_not_part_of_the_stage_keys() -> None:
    from edgepipe.config import validate_config
    from edgepipe.engine.pipeline import _keyed_config

    base = {"data": {"kind": "imagefolder", "path": "x"}, "teacher": {"model": {"arch": "cifar_resnet"}},
            "distill": {"student": {"arch": "cifar_resnet"}}}
    one = validate_config({**base, "data": {**base["data"], "workers": 1}})
    four = validate_config({**base, "data": {**base["data"], "workers": 4}})
    assert _keyed_config(one) == _keyed_config(four)
    assert _keyed_config(one) != _keyed_config(validate_config({**base, "data": {**base["data"], "streaming": True}}))


def test_a_file_damaged_after_the_check_is_one_clear_error(folder: Path) -> None:
    victim = folder / "test" / "a" / "0.jpg"
    body = (f"open({str(victim)!r}, 'r+b').truncate(50)\ntry:\n    list(data.val_batches(4))\n"
            "except Exception as e:\n    print(type(e).__name__ + '|' + str(e))")
    done = _with_workers(folder, body)  # damaged in a worker, after the files were checked
    kind, _, message = done.stdout.strip().partition("|")
    assert kind == "EdgepipeError", done.stdout + done.stderr[-2000:]
    assert message.startswith(f"{victim}: cannot decode this image any more") and "\n" not in message


def test_benchmark_sections_survive_a_rewrite_of_benchmarks_md(tmp_path: Path) -> None:
    from edgepipe.reporting import formatting as fmt

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nrows\n")
    fmt.replace_section(doc, "data-loading", "## Data loading\n\nfirst")
    fmt.replace_section(doc, "data-loading", "## Data loading\n\nsecond")  # replaced, not appended twice
    text = doc.read_text()
    assert text.count("<!-- begin: data-loading -->") == 1 and "second" in text and "first" not in text
    kept = fmt.kept_sections(text)
    assert kept.startswith("<!-- begin: data-loading -->") and "rows" not in kept


def test_data_benchmark_measures_a_streamed_epoch(tmp_path: Path) -> None:
    """The benchmark's own machinery on a tiny folder: a fresh process, one epoch, the memory figures."""
    from edgepipe.data.bench import make_folder, measure, table

    folder = make_folder(tmp_path / "images", 200, 16, val=40)
    assert len(list((folder / "train").rglob("*.jpg"))) == 200 and (folder / ".complete").exists()
    row = measure(folder, True, 50, 1, tmp_path / "cache")
    assert row["images"] == 200 and row["workers"] == 1 and row["images_per_s"] > 0
    assert row["peak_rss_mib"] > 50 and row["peak_tree_pss_mib"] > 50 and row["tree_samples"] > 0
    text = table([row, {**row, "images": 400}], {"command": "x", "date": "d", "cpu": "c", "isa": "i", "cores": 2,
                                                 "torch": "t", "image_size": 16, "batch_size": 50})
    assert "meets the bound of +25%" in text


def test_streamed_and_in_memory_carve_the_same_held_out_split(folder: Path) -> None:
    """data.val_from_train: the same held-out images from disk as in memory, none of them left in training."""
    stats = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "val_from_train": 6}
    memory = load_data(_cfg(folder, streaming=False, **stats))
    stream = load_data(_cfg(folder, streaming=True, workers=0, **stats))
    assert stream.train_size == memory.train_size == 18 and stream.choice_split().val_size == 6
    for (xs, ys), (xm, ym) in zip(stream.choice_split().val_batches(4), memory.choice_split().val_batches(4),
                                  strict=True):
        assert torch.equal(xs, xm) and torch.equal(ys, ym)
    for (xs, ys), (xm, ym) in zip(stream.val_batches(4), memory.val_batches(4), strict=True):
        assert torch.equal(xs, xm) and torch.equal(ys, ym)  # the reported split is untouched
    assert stream.notes["val_from_train"] == memory.notes["val_from_train"]
