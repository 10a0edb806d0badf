"""Tiny models, data and configs shared by every test, so each stage test runs in seconds."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from edgepipe.config import PipelineConfig, validate_config
from edgepipe.data.batches import DataBundle

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR10 = Path(os.environ.get("EDGEPIPE_CIFAR10", SHARED / "datasets" / "cifar10"))
TEACHERS = Path(os.environ.get("EDGEPIPE_TEACHERS", SHARED / "teachers"))

needs_cifar = pytest.mark.skipif(not (CIFAR10 / "train").is_dir(),
                                 reason=f"needs the CIFAR-10 ImageFolder at {CIFAR10} (../shared is not in a user's clone)")
needs_teacher = pytest.mark.skipif(not (TEACHERS / "resnet56_cifar10.state_dict.pt").is_file(),
                                   reason=f"needs the ResNet-56 teacher at {TEACHERS} (../shared is not in a user's clone)")


def tensorrt_here() -> bool:
    """TensorRT and a CUDA device present: a Jetson target's compile builds an engine instead of a bundle."""
    from edgepipe.backends import get_backend

    return get_backend("tensorrt").available()[0]


JETSON_COMPILED_KIND = "tensorrt_engine" if tensorrt_here() else "tensorrt_bundle"
without_tensorrt = pytest.mark.skipif(tensorrt_here(), reason="TensorRT and a CUDA device are here: the Jetson "
                                                               "target builds an engine, not a deploy bundle")


class TinyCNN(nn.Module):
    """conv-bn-relu x2 + linear on 1x8x8 inputs: prunable, quantizable, exportable, instant."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_cnn(width: int = 8, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Factory for configs: ``factory: tests.support:tiny_cnn``."""
    return TinyCNN(width, num_classes, in_channels)


def tiny_data(n_train: int = 128, n_val: int = 64, seed: int = 0) -> DataBundle:
    """Random 1x8x8 images with a learnable label (which quadrant is brightest)."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
        y = torch.randint(0, 4, (n,), generator=g)
        for i, label in enumerate(y.tolist()):
            r, c = divmod(label, 2)
            x[i, 0, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 0.7
        return x, y

    tx, ty = make(n_train)
    vx, vy = make(n_val)
    return DataBundle(tx, ty, vx, vy, torch.tensor([0.5]), torch.tensor([0.3]),
                      [str(i) for i in range(10)], augment=False, hflip=False, pad=1, seed=seed)


def tiny_config(**overrides: Any) -> PipelineConfig:
    """The digits recipe shrunk to seconds: small models, one or two epochs, few timing iterations."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "data": {"kind": "digits", "batch_size": 64, "limit_train": 512, "limit_val": 128},
        "teacher": {"model": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 16, "in_channels": 1}},
                    "train": {"epochs": 2, "lr": 0.1}},
        "distill": {"student": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "in_channels": 1}},
                    "optim": {"epochs": 2, "lr": 0.1}},
        "prune": {"ratio": 0.6, "steps": 2, "optim": {"epochs": 1, "lr": 0.02}},
        "qat": {"calibration_batches": 2, "optim": {"epochs": 1, "lr": 0.005, "autocast": "off"}},
        "measure": {"warmup": 2, "iterations": 5, "throughput_batch": 8},
        # 128 validation images of a barely trained model: one image flipped by a runtime's int8 rounding
        # is 0.78 points of top-1, so the default 0.3-point bar would test luck, not the compile stage.
        "compile": {"max_top1_drop": 3.0},
        "bench": {"batch_sizes": [1, 4], "warmup": 1, "iterations": 3},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    return validate_config(cfg, "tiny_config")


DEVICE_FORBIDDEN = ("torch", "torchvision", "openvino", "matplotlib", "onnxruntime", "nncf", "torch_pruning",
                    "edgepipe")  # pycuda is a device binding the script may try
FAKES = Path(__file__).resolve().parent


def run_device_script(bundle: Path, args: list[str], fakes: bool, env: dict[str, str] | None = None,
                      timeout: int = 120) -> tuple[int, str, str, list[str]]:
    """Run a bundle's ``edgepipe_trt.py`` the way a Jetson would, in an environment holding only the device
    requirements: ``python -S`` (no site-packages, so torch, openvino, matplotlib... cannot be imported), numpy
    linked in alone, and with ``fakes`` the strict fake TensorRT 10.3 (tests/fake_tensorrt) and a fake
    cuda-python runtime (tests/fake_cuda). Every attempt to import a ``DEVICE_FORBIDDEN`` module is recorded.

    Returns:
        (exit code, stdout, stderr, forbidden imports attempted).
    """
    import json
    import subprocess
    import sys
    import tempfile

    import numpy

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        np_dir = Path(numpy.__file__).parent
        for d in (np_dir, np_dir.parent / "numpy.libs"):  # numpy and its bundled BLAS, nothing else
            if d.exists():
                (site / d.name).symlink_to(d)
        paths = ([str(FAKES / "fake_tensorrt"), str(FAKES / "fake_cuda")] if fakes else []) + [str(site)]
        attempts = Path(tmp) / "attempts.json"
        boot = f"""
import importlib.abc, json, runpy, sys
sys.path[:0] = {paths!r}
seen = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {DEVICE_FORBIDDEN!r}:
            seen.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (device environment)")
        return None
sys.meta_path.insert(0, Block())
sys.argv = [{str(bundle / "edgepipe_trt.py")!r}, *{args!r}]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    open({str(attempts)!r}, "w").write(json.dumps(seen))
"""
        proc = subprocess.run([sys.executable, "-S", "-c", boot], capture_output=True, text=True, timeout=timeout,
                              cwd=bundle, env={"PATH": os.environ.get("PATH", ""), **(env or {})})
        seen = json.loads(attempts.read_text()) if attempts.is_file() else ["<interpreter did not finish>"]
    return proc.returncode, proc.stdout, proc.stderr, seen


class PickleMarker:
    """Unpickling this object creates a file: what a crafted .pt2 could do to a user's machine."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def program_with_pickled_weights(path: Path, payload: object | None = None) -> Path:
    """A real torch.export archive whose weights are stored as pickles (torch.export does this for some tensors);
    with ``payload``, every weight entry is replaced by that pickled object (a crafted file)."""
    import io
    import zipfile
    from unittest import mock

    from torch.export.pt2_archive import _package

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    plain = path.with_suffix(".plain.pt2")
    with mock.patch.object(_package, "_should_use_pickle", lambda t: True):
        torch.export.save(program, plain)
    if payload is None:
        return plain
    buf = io.BytesIO()
    torch.save(payload, buf)
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            weight = "/data/weights/weight_" in info.filename
            zout.writestr(info, buf.getvalue() if weight else zin.read(info.filename))
    return path
