"""Bad models and data (issue 24): each refused with one line before anything is written, or read once and recorded.

Every refusal runs against the session's ``finished`` run (tests/reliability.py) and asserts exit 2, one
``edgepipe: error:`` line naming the field or file and an unchanged run folder. Sizes are checked against the
memory available, which is fixed here (``SMALL_HOST``) so no case depends on the host running the tests.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from tests.reliability import TARGET, Case, Finished, assert_refused, copy_data, run_with, run_with_data, write_config

pytestmark = pytest.mark.e2e

SMALL_HOST = 8 << 30
"""The memory available as the size checks see it in these tests (8 GiB)."""


class _Logits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class _Pair(_Logits):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x.mean((2, 3)))
        return y, y.softmax(1)


class _Named(_Logits):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x.mean((2, 3)))}


def _program(module: nn.Module, path: Path, dynamic: bool = True) -> Path:
    """``module`` exported for the finished run's 3x8x8 images (batch dimension dynamic, or fixed at 2) and saved."""
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(module.eval(), (torch.zeros(2, 3, 8, 8),), dynamic_shapes=shapes), path)
    return path


def _nan_program(path: Path) -> Path:
    module = _Logits()
    with torch.no_grad():
        module.fc.weight[1, 2] = float("nan")
    return _program(module, path)


def run_with_teacher_program(make: Callable[[Path], Path], expect: str) -> Case:
    """The finished run given a teacher that is a torch.export program made by ``make`` (inference only)."""
    def case(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
        program = make(tmp / "teacher.pt2")
        cfg = write_config(tmp / "bad.yaml", f.config, **{"teacher.model": {"program": str(program)},
                                                          "teacher.train.epochs": 0})
        return ["run", "--config", str(cfg), "--target", TARGET, "--run", str(f.run)], f.run, expect
    return case


def _nan_weights(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
    from edgepipe.models.zoo import cifar_resnet

    state = cifar_resnet(**f.config["teacher"]["model"]["kwargs"]).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp / "teacher-nan.pt"
    torch.save(state, weights)
    cfg = write_config(tmp / "bad.yaml", f.config, **{"teacher.model.weights": str(weights), "teacher.train.epochs": 0})
    return (["run", "--config", str(cfg), "--target", TARGET, "--run", str(f.run)], f.run,
            f"{weights}: tensor 'layer2.0.conv1.weight' holds NaN or inf")


def _only_in_train(d: Path) -> None:
    shutil.rmtree(d / "test" / "owl")


def _one_each(d: Path) -> None:
    (d / "train" / "dog").rename(d / "train" / "emu")


CASES: dict[str, Case] = {
    # a width the architecture rejects is its own one line, not a torch traceback
    "student-width-negative": run_with({"distill.student.kwargs.width": -1},
                                       "distill.student.kwargs: cifar_resnet: width must be >= 1, got -1"),
    "teacher-width-zero": run_with({"teacher.model.kwargs.width": 0},
                                   "teacher.model.kwargs: cifar_resnet: width must be >= 1, got 0"),
    "student-depth-bad": run_with({"distill.student.kwargs.depth": 9}, "cifar_resnet: depth must be 6n+2"),
    # sizes that cannot fit: refused before anything is allocated, naming the field and the memory
    "teacher-width-huge": run_with({"teacher.model.kwargs.width": 200000},
                                   "teacher.model.kwargs.width: cifar_resnet with kwargs"),
    "student-width-huge": run_with({"distill.student.kwargs.width": 200000},
                                   "lower distill.student.kwargs.width"),
    "image-size-huge": run_with({"data.image_size": 100000}, "data.image_size: even a batch of 1 image(s) of "
                                                             "3x100000x100000 takes 111.8 GiB"),
    "throughput-batch-huge": run_with({"measure.throughput_batch": 1e9}, "measure.throughput_batch: a batch of "
                                                                         "1,000,000,000 image(s) of 3x8x8"),
    "bench-batch-huge": run_with({"bench.batch_sizes": [1, 10**10]}, "bench.batch_sizes[1]: a batch of"),
    # torch.export teachers the pipeline cannot run
    "program-fixed-batch": run_with_teacher_program(lambda p: _program(_Logits(), p, dynamic=False),
                                                    "exported with a fixed batch of 2"),
    "program-tuple": run_with_teacher_program(lambda p: _program(_Pair(), p),
                                              "teacher.model: returns a tuple, not one tensor; the model must return "
                                              "one logits tensor [N, 3]"),
    "program-dict": run_with_teacher_program(lambda p: _program(_Named(), p), "teacher.model: returns a dict"),
    "program-nan": run_with_teacher_program(_nan_program, "teacher.model: weight tensor 'program.fc.weight' holds "
                                                          "NaN or inf"),
    "weights-nan": _nan_weights,
    # round_to at or above every width is named, not blamed on the ratio
    "prune-round-to-huge": run_with({"prune.round_to": 1000},
                                    "prune.round_to: 1000 is not below the channel count of any prunable layer (the "
                                    "widest, layer3.0.conv1, has 32)"),
    # which classes differ
    "classes-only-in-train": run_with_data(_only_in_train, "differ (only in train/: owl); give both splits"),
    "classes-one-each": run_with_data(_one_each, "(only in train/: emu; only in test/: dog)"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_model_or_data_is_one_line_and_the_run_stays_byte_identical(
        name: str, finished: Finished, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    monkeypatch.setattr("edgepipe.engine.sizes.available_memory", lambda: SMALL_HOST)
    line = assert_refused(*CASES[name](finished, tmp_path), capsys)
    if "huge" in name and "round" not in name:
        assert "more than the 8.0 GiB of memory available" in line


def test_a_batch_larger_than_the_data_is_one_batch_of_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """data.batch_size / eval_batch_size above the split's size are accepted: a batch never holds more images than
    the split (edgepipe.data.batches.batch_starts), so only a split too large for memory in one batch is refused."""
    from edgepipe.config import PipelineConfig
    from edgepipe.engine.sizes import check_batches
    from tests.reliability import config_for

    monkeypatch.setattr("edgepipe.engine.sizes.available_memory", lambda: SMALL_HOST)
    cfg = PipelineConfig.model_validate(config_for(Path("/nowhere")))
    cfg.data.batch_size = cfg.data.eval_batch_size = 10**9
    check_batches(cfg, 48, 18, (3, 8, 8))
    with pytest.raises(EdgepipeError, match=r"data.batch_size: a batch of 10,000,000 image\(s\) of 3x224x224 takes "
                                            r"5.5 TiB as float32, more than the 8.0 GiB"):
        check_batches(cfg, 10**7, 18, (3, 224, 224))
    with pytest.raises(EdgepipeError, match=r"data.eval_batch_size: a batch of 10,000,000"):
        check_batches(cfg, 48, 10**7, (3, 224, 224))


def _loop_and_links(train: Path) -> None:
    """A symlink loop inside a class folder, a file symlinked twice, a file hard-linked twice."""
    os.symlink("../cat", train / "cat" / "loop")
    os.symlink("00.png", train / "dog" / "00-again.png")
    os.link(train / "owl" / "03.png", train / "owl" / "03-hard.png")


def test_symlink_loops_and_files_reached_twice_are_read_once(finished: Finished, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepipe.config import PipelineConfig
    from edgepipe.data.imagefolder import list_split
    from edgepipe.data.loading import run_data
    from edgepipe.reporting.report import _data_blocks

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    data = copy_data(finished, tmp_path / "data")
    clean = list_split(data / "train")
    _loop_and_links(data / "train")
    cfg: dict[str, Any] = {**finished.config, "data": {**finished.config["data"], "path": str(data)}}
    with caplog.at_level(logging.WARNING, logger="edgepipe.data"):
        bundle = run_data(PipelineConfig.model_validate(cfg))
    assert bundle.train_size == len(clean.paths) == 48 and bundle.val_size == 18
    repeated = bundle.notes["train"]["repeated"]
    assert sorted(path for path, _ in repeated) == ["cat/loop", "dog/00.png", "owl/03.png"] or \
        sorted(path for path, _ in repeated) == ["cat/loop", "dog/00.png", "owl/03-hard.png"]
    assert ["cat/loop", "a symlink loop back to cat"] in repeated
    assert bundle.notes["test"]["repeated"] == []
    warnings = [r.getMessage() for r in caplog.records if "reached more than once" in r.getMessage()]
    assert len(warnings) == 1 and "3 path(s) skipped" in warnings[0] and "1 folder(s) through symlinks, 2 file(s)" \
        in warnings[0]
    # the labels follow the listing: still 16 images of each class
    assert torch.bincount(bundle.train_labels).tolist() == [16, 16, 16]
    shown = str(_data_blocks(bundle.notes))
    assert "Folders or files reached twice, read once" in shown and "not read again train/cat/loop" in shown


def test_a_listing_never_recurses_through_nested_loops(tmp_path: Path) -> None:
    """Two folders linking to each other and to their parent: every file once, and the walk ends."""
    from PIL import Image

    from edgepipe.data.imagefolder import list_split

    for name in ("a", "b"):
        (tmp_path / "cls" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "cls" / name / f"{name}.png")
    os.symlink("../b", tmp_path / "cls" / "a" / "to-b")
    os.symlink("../a", tmp_path / "cls" / "b" / "to-a")
    os.symlink("..", tmp_path / "cls" / "a" / "up")
    listing = list_split(tmp_path)
    assert sorted(os.path.relpath(p, tmp_path) for p in listing.paths) == ["cls/a/a.png", "cls/b/b.png"]
    assert len(listing.repeated) == 3


def test_a_non_finite_loss_names_its_cause(tmp_path: Path) -> None:
    """Weights that were never finite, or a teacher giving NaN logits, are not blamed on the learning rate."""
    from edgepipe.config import OptimConfig
    from edgepipe.data.batches import DataBundle
    from edgepipe.training.distillation import kd_step
    from edgepipe.training.loop import fit
    from edgepipe.tasks.classification import cross_entropy_step

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(32, 3, 8, 8, generator=gen)
    labels = torch.arange(32) % 3
    data = DataBundle(images, labels, images[:8], labels[:8], torch.zeros(3), torch.ones(3), ["a", "b", "c"],
                      augment=False)
    cfg = OptimConfig(epochs=1, lr=0.01, autocast="off")
    broken = _Logits()
    with torch.no_grad():
        broken.fc.bias[0] = float("nan")
    with pytest.raises(EdgepipeError, match=r"batch 1: the loss is nan before any weight update: the model's weight "
                                            r"'fc.bias' already holds NaN or inf") as e:
        fit(broken, data, cfg, cross_entropy_step, batch_size=16, checkpoint_dir=tmp_path / "a", task="distill")
    assert "optim.lr (now" not in str(e.value)
    nan_teacher = _Logits()
    with torch.no_grad():
        nan_teacher.fc.weight.fill_(float("nan"))
    with pytest.raises(EdgepipeError, match=r"the teacher's logits \(soft targets\) or feature hints are NaN or inf; "
                                            r"check the teacher's weights"):
        fit(_Logits(), data, cfg, kd_step(nan_teacher, 4.0, 0.9), batch_size=16, checkpoint_dir=tmp_path / "b",
            task="distill")
