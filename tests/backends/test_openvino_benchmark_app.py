"""edgepipe's OpenVINO throughput against OpenVINO's own ``benchmark_app`` on the same IR and settings.

A user who checks an edgepipe figure with ``benchmark_app`` (sync API, one stream, two threads, batch 64) should land
within 10% of it: edgepipe's timed loop (``time_runner`` over ``OvRunner.bind``) must time the model, not Python
copies of the batch in and the outputs out (copying both on every call measured 0.85x of ``benchmark_app`` on a small
INT8 MobileNetV2). The two are run in alternating rounds so that load from other processes on the host falls on both
alike, and their medians are compared.

The model is a small float CNN on 32x32 images, big enough (about a millisecond a batch) that the comparison is about
the timed call rather than a fixed few microseconds per call.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgepipe.backends import openvino as ovb
from edgepipe.runtime.runner import time_runner
from edgepipe.types import DType
from tests.backends.conftest import make_profile

BATCH, THREADS, ROUNDS, SECONDS = 64, 2, 5, 1  # benchmark_app's -t takes whole seconds
SHAPE = (3, 32, 32)


def benchmark_app() -> list[str] | None:
    """The command that runs OpenVINO's benchmark_app: the script beside this Python, else its module."""
    script = Path(sys.executable).parent / "benchmark_app"
    if script.is_file():
        return [str(script)]
    if shutil.which("benchmark_app"):
        return [str(shutil.which("benchmark_app"))]
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("openvino.tools.benchmark.main"):
        # the module has no __main__ guard: call its entry point
        return [sys.executable, "-c", "import sys; from openvino.tools.benchmark.main import main; "
                                      "sys.argv[0] = 'benchmark_app'; sys.exit(main())"]
    return None


BENCHMARK_APP = benchmark_app()
pytestmark = pytest.mark.skipif(BENCHMARK_APP is None, reason="OpenVINO's benchmark_app is not installed "
                                                              "(pip install openvino: openvino.tools.benchmark)")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (8, 16, 32 channels, the last two strided), global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, 8, 1), (8, 16, 2), (16, 32, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def export(path: Path) -> Path:
    torch.manual_seed(0)
    torch.onnx.export(SmallCNN().eval(), (torch.randn(2, *SHAPE),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def their_throughput(xml: Path, precision: str, seconds: int) -> float:
    """benchmark_app's "Throughput: N FPS" (batch x iterations / wall time of its sync loop)."""
    cmd = [*BENCHMARK_APP, "-m", str(xml), "-d", "CPU", "-api", "sync", "-nstreams", "1", "-nthreads", str(THREADS),
           "-b", str(BATCH), "-hint", "none", "-infer_precision", precision, "-t", str(seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r"Throughput:\s+([\d.]+)\s*FPS", proc.stdout + proc.stderr)
    assert proc.returncode == 0 and found, \
        f"{' '.join(cmd)} gave no throughput:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return float(found.group(1))


def test_openvino_runner_throughput_is_within_10_percent_of_benchmark_app(tmp_path: Path) -> None:
    onnx_path = export(tmp_path / "small_cnn.onnx")
    profile = make_profile("intel-cpu-test", "openvino", (DType.INT8, DType.FP32), {"openvino": {"num_streams": 1}})
    artifact, _ = ovb.compile(onnx_path, profile, DType.FP32, tmp_path / "ir")
    precision = artifact.meta["config"]["INFERENCE_PRECISION_HINT"]  # f32: benchmark_app's default may be bf16
    runner = ovb.load(artifact, threads=THREADS)
    feeds = {"input": np.random.default_rng(0).standard_normal((BATCH, *SHAPE)).astype(np.float32)}
    probe = time_runner(runner, feeds, warmup=10, iterations=20)
    iterations = max(50, int(SECONDS * 1e3 / probe.mean_ms))  # as long a round as benchmark_app's

    ours, theirs = [], []
    for _ in range(ROUNDS):  # alternating: edgepipe, benchmark_app, edgepipe, ...
        ours.append(time_runner(runner, feeds, warmup=20, iterations=iterations).images_per_s)
        theirs.append(their_throughput(artifact.path("xml"), precision, SECONDS))
    ratio = statistics.median(ours) / statistics.median(theirs)
    figures = (f"edgepipe {[round(x) for x in ours]} images/s, benchmark_app {[round(x) for x in theirs]} FPS, "
               f"median ratio {ratio:.3f} (batch {BATCH}, sync, 1 stream, {THREADS} threads, {precision}, "
               f"{iterations} iterations a round; {time.strftime('%H:%M:%S')})")
    print(figures)
    assert ratio >= 0.90, f"edgepipe's OpenVINO throughput is below 90% of benchmark_app's: {figures}"
