"""The finished run the bad-input matrices and the interruption tests share, and their helpers.

One small ImageFolder pipeline on ``generic-cpu`` (ONNX Runtime, the quickest) is run once per session
(``finished`` in conftest.py); every matrix case refuses a command against it (or against a copy) and
``assert_refused`` checks the contract: exit 2, one ``edgepipe: error:`` line naming the problem, and every
file of the run folder byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from edgepipe.cli import main

TARGET = "generic-cpu"  # ONNX Runtime: the quickest full pipeline


def images(root: Path, per_class: int, seed: int) -> None:
    """Three classes of 8x8 RGB PNGs, each brightest in its own channel (learnable in one epoch)."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(("cat", "dog", "owl")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            px = rng.integers(0, 90, (8, 8, 3), dtype=np.uint8)
            px[..., k] += 150
            Image.fromarray(px).save(folder / f"{i:02d}.png")


def config_for(data: Path) -> dict[str, Any]:
    return {
        "name": "reliability",
        "data": {"kind": "imagefolder", "path": str(data), "mean": [0.4, 0.4, 0.4], "std": [0.25, 0.25, 0.25],
                 "batch_size": 16, "eval_batch_size": 32, "augment": False},
        "teacher": {"model": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "num_classes": 3}},
                    "train": {"epochs": 1, "lr": 0.05}},
        "distill": {"student": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "num_classes": 3}},
                    "optim": {"epochs": 1, "lr": 0.05}},
        "prune": {"ratio": 0.7, "steps": 1, "optim": {"epochs": 1, "lr": 0.02}},
        "qat": {"calibration_batches": 1, "optim": {"epochs": 1, "lr": 0.005, "autocast": "off"}},
        "export": {"int8_min_agreement": 0.5},  # 18 validation images of one-epoch models: near-ties flip
        "compile": {"max_top1_drop": 100.0},
        "measure": {"warmup": 1, "iterations": 3, "throughput_batch": 4},
        "bench": {"batch_sizes": [1], "warmup": 1, "iterations": 2},
    }


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the lock file included: it must stay empty)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Finished:
    tmp: Path
    run: Path
    data: Path
    config: dict[str, Any]
    config_file: Path


def make_finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    tmp = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPIPE_CACHE", str(tmp / "cache"))
        data = tmp / "data"
        images(data / "train", 16, seed=0)
        images(data / "test", 6, seed=1)
        cfg = config_for(data)
        cfg_file = tmp / "good.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        assert main(["run", "--config", str(cfg_file), "--target", TARGET, "--run", str(tmp / "run")]) == 0
        yield Finished(tmp, tmp / "run", data, cfg, cfg_file)


def write_config(path: Path, cfg: dict[str, Any], **changes: Any) -> Path:
    """``cfg`` with ``changes`` applied (keys are dotted paths; the value None deletes the key)."""
    cfg = json.loads(json.dumps(cfg))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def copy_data(f: Finished, dest: Path) -> Path:
    shutil.copytree(f.data, dest)
    return dest


def copy_run(f: Finished, dest: Path) -> Path:
    shutil.copytree(f.run, dest, symlinks=True)
    return dest


def profile_file(f: Finished, dest: Path, base: str, **changes: Any) -> Path:
    from edgepipe.profiles import get_profile

    data = get_profile(base).model_dump(mode="json")
    data.update(name=dest.stem, **changes)
    dest.write_text(yaml.safe_dump(data))
    return dest


# Each case: (f, case folder) -> (argv, run folder that must stay byte-identical, text the error line must hold).
Case = Callable[[Finished, Path], tuple[list[str], Path, str]]


def run_with(cfg_changes: dict[str, Any], expect: str) -> Case:
    def case(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
        cfg = write_config(tmp / "bad.yaml", f.config, **cfg_changes)
        return ["run", "--config", str(cfg), "--target", TARGET, "--run", str(f.run)], f.run, expect
    return case


def run_with_data(mutate: Callable[[Path], None], expect: str, **more: Any) -> Case:
    def case(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
        data = copy_data(f, tmp / "data")
        mutate(data)
        cfg = write_config(tmp / "bad.yaml", f.config, **{"data.path": str(data)}, **more)
        return ["run", "--config", str(cfg), "--target", TARGET, "--run", str(f.run)], f.run, expect
    return case


def run_with_file(name: str, content: bytes, field: str, value: Any, expect: str, **more: Any) -> Case:
    def case(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
        path = tmp / name
        path.write_bytes(content)
        cfg = write_config(tmp / "bad.yaml", f.config, **{field: value(path) if callable(value) else value}, **more)
        return ["run", "--config", str(cfg), "--target", TARGET, "--run", str(f.run)], f.run, expect
    return case


def run_target(make: Callable[[Finished, Path], str], expect: str, stage: str = "run") -> Case:
    def case(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
        return [stage, "--config", str(f.config_file), "--target", make(f, tmp), "--run", str(f.run)], f.run, expect
    return case


def damaged_run(mutate: Callable[[Path], None], expect: str, argv: list[str] | None = None) -> Case:
    """A copy of the finished run, damaged by ``mutate``: the command must refuse it and change nothing."""
    def case(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
        run = copy_run(f, tmp / "run")
        mutate(run)
        return [*(argv or ["run"]), "--run", str(run)], run, expect
    return case


def assert_refused(argv: list[str], run: Path, expect: str, capsys: pytest.CaptureFixture) -> str:
    """``edgepipe argv`` exits 2 with exactly one ``edgepipe: error:`` line holding ``expect`` and leaves every
    file under ``run`` as it was; returns the line."""
    before = tree(run)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("edgepipe: error: "), err
    assert expect in lines[0], lines[0]
    assert tree(run) == before, f"{argv} changed files in {run}"
    return lines[0]
