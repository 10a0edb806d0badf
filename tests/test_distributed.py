"""torchrun support (issue 13): DDP training equals one process on the same global batches, checkpoints move
between world sizes, and the launch's failure modes are single clear lines.

The two-rank runs use torchrun itself (gloo on the CPU, as a user launches), each in a fresh process group of
fresh processes; on 2 cores each rank runs one thread.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgepipe.training import distributed
from edgepipe.cli.parser import build_parser as _parser, check_launchable as _check_launchable
from edgepipe.errors import EdgepipeError

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _launch(mode: str, out: Path, ranks: int) -> subprocess.CompletedProcess:
    worker = [str(ROOT / "tests" / "ddp_worker.py"), mode, str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = ([str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}", *worker] if ranks > 1
           else [sys.executable, *worker])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts of the same model."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.e2e
def test_two_ranks_train_like_one_process_and_resume_with_one(tmp_path: Path) -> None:
    """DDP with synchronised BatchNorm over 2 ranks, each on half of every global batch, gives the weights,
    running statistics, loss history and validation top-1 of one process on the whole batches (to float
    rounding); a checkpoint written by 2 ranks resumes in 1 process to the same end."""
    for mode, ranks in (("full", 1), ("full", 2), ("interrupt", 2), ("resume", 1)):
        _launch(mode, tmp_path, ranks)
    one, two, resumed = (torch.load(tmp_path / f, weights_only=True) for f in ("full-1.pt", "full-2.pt", "resume-1.pt"))
    assert _same(one["state"], two["state"]) < 1e-4
    assert torch.equal(one["state"]["bn1.num_batches_tracked"], two["state"]["bn1.num_batches_tracked"])
    assert one["top1"] == two["top1"]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_top1"] == b["val_top1"]
    assert [r["processes"] for r in two["history"]] == [2, 2, 2]
    assert "synchronised across 2 ranks: 2 BatchNorm" in two["history"][0]["batchnorm"]
    # Resumed in 1 process after epoch 1 of the 2-rank run: the same end as training in 1 process throughout.
    assert [r.get("earlier_invocation", False) for r in resumed["history"]] == [True, False, False]
    assert [r["processes"] for r in resumed["history"]] == [2, 1, 1]
    assert _same(one["state"], resumed["state"]) < 1e-4


def test_batch_must_split_over_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "_LAUNCH", distributed.Launch(3, 0, 0, 3, "gloo", 60.0, 1, "h"))
    with distributed.collective():
        with pytest.raises(EdgepipeError, match=r"data.batch_size: 64 does not split evenly over 3 processes"):
            distributed.local_batch(64)
        assert distributed.local_batch(63) == 21
    assert distributed.local_batch(64) == 64  # outside a training stage the batch is the process's own


def test_backend_follows_the_training_device() -> None:
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda:1") == "cpu:gloo,cuda:nccl"  # NCCL for CUDA tensors, gloo for the CPU's


def test_collective_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed._timeout_s() == 90.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(EdgepipeError, match=r"EDGEPIPE_DIST_TIMEOUT='soon': not a positive number of seconds"):
        distributed._timeout_s()


def test_only_training_commands_run_under_torchrun() -> None:
    with pytest.raises(EdgepipeError, match=r"edgepipe report runs in one process; start it without torchrun"):
        _check_launchable(_parser().parse_args(["report", "--run", "x"]))
    _check_launchable(_parser().parse_args(["distill", "--run-dir", "x"]))


def test_run_dir_is_run() -> None:
    """torchrun's parser reads `--run` as an abbreviation of its own --run-path, so `--run-dir` is the same option."""
    assert _parser().parse_args(["run", "--run-dir", "r1"]).run == Path("r1")
    assert _parser().parse_args(["run", "--run", "r1"]).run == Path("r1")
