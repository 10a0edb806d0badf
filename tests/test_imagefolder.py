"""The ImageFolder path a user's own dataset takes: decode, cache, normalize, and fail clearly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgepipe.config import DataConfig
from edgepipe.data.loading import load_data
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
    from edgepipe.data.imagefolder import decode_split

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))  # never write into the user's cache from a test
    images, labels, classes, notes = decode_split(CIFAR10 / "test", None)
    assert notes["skipped"] == [] and notes["modes"] == {"RGB": 10_000}
    assert images.shape == (10_000, 3, 32, 32) and classes[0] == "airplane" and np.bincount(labels).tolist() == [1000] * 10


def test_an_image_replaced_under_the_same_name_is_decoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode cache is keyed by each file's size and modification time, not its name only: stale pixels would
    otherwise reach a retrained stage whose key did change (edgepipe.data.loading.data_fingerprint)."""
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


def test_every_image_mode_is_converted_explicitly(tmp_path: Path) -> None:
    """16-bit keeps its range (PIL's own convert clips it to 255), alpha is dropped, palette and CMYK go through RGB,
    and grayscale becomes 3 equal channels or stays 1."""
    from edgepipe.data.imagefolder import to_channels

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000 of 65,535
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    deep = Image.open(path)
    assert deep.mode.startswith("I")
    gray = to_channels(deep, 1)
    assert gray.shape == (8, 8, 1) and gray.dtype == np.uint8
    assert (gray[..., 0] == ((ramp.astype(np.int64) * 255 + 32767) // 65535)).all()
    assert (gray == 255).mean() < 0.05 and gray.max() == 245  # not clipped: 63,000 -> 245
    rgba = Image.fromarray(np.dstack([np.full((4, 4, 3), 100, np.uint8), np.zeros((4, 4), np.uint8)]), "RGBA")
    assert (to_channels(rgba, 3) == 100).all()  # alpha dropped, colour kept
    palette = Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).convert("P")
    assert to_channels(palette, 3).shape == (4, 4, 3)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert (to_channels(cmyk, 3) == 255).all()  # no ink is white
    luma = Image.fromarray(np.full((4, 4), 77, np.uint8), "L")
    assert (to_channels(luma, 3) == 77).all() and to_channels(luma, 3).shape == (4, 4, 3)


def _gray_tree(root: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, cls in enumerate(("dark", "light")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 60, (8, 8), dtype=np.uint8) + 150 * label, "L").save(
                    root / split / cls / f"{i}.png")


def test_grayscale_folder_follows_a_one_channel_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepipe.config import validate_config
    from edgepipe.data.loading import run_data

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    _gray_tree(tmp_path / "data")
    base = {"data": {"kind": "imagefolder", "path": str(tmp_path / "data")},
            "teacher": {"model": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "in_channels": 1, "num_classes": 2}}},
            "distill": {"student": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "in_channels": 1, "num_classes": 2}}}}
    one = run_data(validate_config(base))
    assert one.input_shape == (1, 8, 8) and one.notes["channels"] == 1 and one.notes["train"]["modes"] == {"L": 12}
    base["data"]["channels"] = 3  # an explicit setting wins over the teacher
    assert run_data(validate_config(base)).input_shape == (3, 8, 8)


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed"])
def test_damaged_files_are_skipped_counted_or_stop_a_strict_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture,
                                                                 streaming: bool) -> None:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    _tree(tmp_path / "data")
    cat = tmp_path / "data" / "train" / "cat"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(cat / "whole.jpg")
    (cat / "truncated.jpg").write_bytes((cat / "whole.jpg").read_bytes()[:200])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("this is not an image")
    cfg = DataConfig(kind="imagefolder", path=str(tmp_path / "data"), streaming=streaming, workers=0)
    with caplog.at_level("WARNING"):
        d = load_data(cfg)
    skipped = d.notes["train"]["skipped"]
    assert sorted(p for p, _ in skipped) == ["cat/empty.jpg", "cat/notes.jpg", "cat/truncated.jpg"]
    assert sum("skipped, cannot decode" in r.getMessage() for r in caplog.records) == 3
    assert d.train_size == 7 and d.notes["streaming"]["on"] is streaming  # 6 good PNGs and whole.jpg
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = load_data(cfg)  # from the decode cache: the same notes, one summary line
    assert again.notes == d.notes and "3 unreadable image(s) skipped" in caplog.text
    with pytest.raises(EdgepipeError, match=r"(empty|notes|truncated)\.jpg: cannot decode this image .*data.strict"):
        load_data(cfg.model_copy(update={"strict": True}))
    for f in cat.iterdir():  # a class left with no readable image at all
        if f.suffix == ".png" or f.name == "whole.jpg":
            f.unlink()
    with pytest.raises(EdgepipeError, match="cat: none of its (3 )?image file"):
        load_data(cfg)


def test_the_decode_cache_is_listed_and_cleared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    from edgepipe.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    _tree(tmp_path / "data")
    load_data(DataConfig(kind="imagefolder", path=str(tmp_path / "data")))
    assert main(["cache"]) == 0
    assert "2 decoded-image file(s)" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 2 decoded-image file(s)" in capsys.readouterr().out
    assert not list((tmp_path / "cache").glob("*.npz"))


@pytest.mark.e2e
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed"])
def test_grayscale_folder_runs_end_to_end_with_one_channel_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 streaming: bool) -> None:
    import json

    import yaml

    from edgepipe.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    _gray_tree(tmp_path / "data", n=12)
    (tmp_path / "data" / "train" / "dark" / "zero-bytes.png").write_bytes(b"")  # skipped, counted in the report
    net = {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "in_channels": 1, "num_classes": 2}}
    cfg = {"data": {"kind": "imagefolder", "path": str(tmp_path / "data"), "batch_size": 8, "augment": False,
                    "streaming": streaming},
           "teacher": {"model": net, "train": {"epochs": 1, "lr": 0.05}},
           "distill": {"student": net, "optim": {"epochs": 1, "lr": 0.05}},
           "prune": {"ratio": 0.7, "steps": 1, "optim": {"epochs": 1, "lr": 0.02}},
           "qat": {"calibration_batches": 1, "optim": {"epochs": 1, "lr": 0.005, "autocast": "off"}},
           "export": {"int8_min_agreement": 0.5}, "compile": {"max_top1_drop": 100.0},
           "measure": {"warmup": 1, "iterations": 3, "throughput_batch": 4}}
    (tmp_path / "gray.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    argv = ["run", "--config", str(tmp_path / "gray.yaml"), "--target", "generic-cpu", "--run", str(run)]
    if streaming:
        # In a fresh process, as `edgepipe run` is used: in-process, after the whole suite had run in the same
        # pytest process, this run segfaulted (twice, 2026-11-24, not reproduced alone; see the issue 12 notes).
        import subprocess
        import sys

        done = subprocess.run([sys.executable, "-c", "import sys; from edgepipe.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", *argv], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        assert main(argv) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["channels"] == 1 and manifest["data"]["train"]["modes"] == {"L": 24}
    assert all(e["status"] == "done" for e in manifest["stages"])
    import onnx

    dims = onnx.load(str(next((run / "export").glob("*.onnx")))).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 1  # the deployed model takes one channel
    report = (run / "report.md").read_text()
    assert "1 channel(s) per image" in report and "**Unreadable images skipped:** 1" in report
    assert manifest["data"]["train"]["skipped"][0][0] == "dark/zero-bytes.png"
    assert manifest["data"]["streaming"]["on"] is streaming
