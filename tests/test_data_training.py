"""Data batches are seeded and augmented correctly; training checkpoints every epoch and resumes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgepipe.config import DataConfig, OptimConfig
from edgepipe.data.loading import load_data
from edgepipe.training.loop import fit
from edgepipe.tasks.classification import cross_entropy_step
from tests.support import TinyCNN, tiny_data


def test_digits_split_and_normalization() -> None:
    d = load_data(DataConfig(kind="digits"), seed=0)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.train_labels) + len(d.val_labels) == 1797
    x, _ = next(d.train_batches(256, epoch=0, augment=False))
    assert abs(float(x.mean())) < 0.1 and 0.8 < float(x.std()) < 1.2


def test_batches_depend_only_on_seed_and_epoch() -> None:
    d = tiny_data()
    d.augment = True
    a = [y for _, y in d.train_batches(32, epoch=3)]
    b = [y for _, y in d.train_batches(32, epoch=3)]
    c = [y for _, y in d.train_batches(32, epoch=4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_augment_crop_is_a_shifted_window() -> None:
    d = tiny_data()
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    out = d._augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # every crop row is a (reflect-padded) contiguous run of the source: neighbours differ by 1 inside the image
    inner = out[0, 0, 2:6, 2:6]
    assert torch.all((inner[:, 1:] - inner[:, :-1]).abs() == 1)


def test_fit_resumes_after_interruption(tmp_path: Path) -> None:
    d = tiny_data()
    cfg = OptimConfig(epochs=3, lr=0.1, autocast="off")
    torch.manual_seed(0)
    full = TinyCNN()
    ref = fit(full, d, cfg, cross_entropy_step, batch_size=32, checkpoint_dir=tmp_path / "a")

    torch.manual_seed(0)
    part = TinyCNN()
    calls = {"n": 0}

    def interrupt_in_epoch_2(task: str, done: int, total: int, values: dict) -> None:
        if task.startswith("train epoch 2"):
            raise KeyboardInterrupt
    try:
        fit(part, d, cfg, cross_entropy_step, batch_size=32, checkpoint_dir=tmp_path / "b",
            progress=interrupt_in_epoch_2)
    except KeyboardInterrupt:
        calls["n"] += 1
    assert calls["n"] == 1 and (tmp_path / "b" / "last.pt").exists()
    torch.manual_seed(123)  # a fresh process: different init, weights come from the checkpoint
    resumed = TinyCNN()
    hist = fit(resumed, d, cfg, cross_entropy_step, batch_size=32, checkpoint_dir=tmp_path / "b")
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert abs(hist[-1]["loss"] - ref[-1]["loss"]) < 1e-5
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_diverging_training_stops_with_one_line_and_no_checkpoint(tmp_path: Path) -> None:
    import pytest

    from edgepipe.errors import EdgepipeError

    torch.manual_seed(0)
    with pytest.raises(EdgepipeError, match=r"distill epoch 1, batch \d+: the loss is (nan|inf).*lower this stage's "
                                            r"optim.lr \(now 1e\+30\)"):
        fit(TinyCNN(), tiny_data(), OptimConfig(epochs=2, lr=1e30, autocast="off"), cross_entropy_step,
            batch_size=32, checkpoint_dir=tmp_path, task="distill")
    assert not list(tmp_path.glob("*.pt"))  # nothing diverged is kept to resume from


@pytest.mark.parametrize("data, says", [
    ({"std": [0.5, 0.0, 0.5]}, "std: every value must be > 0"),
    ({"std": [float("inf")] * 3}, "finite"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "one value per channel each"),
])
def test_config_rejects_non_finite_and_zero_std(data: dict, says: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says):
        DataConfig(**data)


def test_std_of_the_wrong_length_for_the_images_is_one_line() -> None:
    import pytest

    from edgepipe.errors import EdgepipeError

    with pytest.raises(EdgepipeError, match=r"data.mean: 3 value\(s\) for images with 1 channel\(s\)"):
        load_data(DataConfig(kind="digits", mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]))

