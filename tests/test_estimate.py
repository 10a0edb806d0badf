"""Roofline estimate arithmetic and activation-traffic counting."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.estimate import activation_bytes, roofline_estimate
from edgepipe.profiles import HardwareProfile, get_profile
from edgepipe.types import DType


@pytest.fixture
def fake() -> HardwareProfile:
    """10 TOPS int8, 5 TFLOPS fp16, 100 GB/s: round numbers so expected values are easy by hand."""
    return HardwareProfile(name="fake", backend="tensorrt", device="gpu", dtypes=["int8", "fp16"],
                           peak_tops={"int8": 10.0, "fp16": 5.0}, memory_bandwidth_gbps=100.0, memory_gb=8)


def test_compute_bound(fake: HardwareProfile):
    # 1e9 MACs = 2e9 ops / 10e12 ops/s = 0.2 ms; (1e6 + 1e6) B / 100e9 B/s = 0.02 ms.
    r = roofline_estimate(fake, DType.INT8, macs=10**9, weight_bytes=10**6, activation_bytes=10**6)
    assert r["compute_bound_ms"] == pytest.approx(0.2)
    assert r["memory_bound_ms"] == pytest.approx(0.02)
    assert r["latency_ms"] == pytest.approx(0.2)
    assert r["bound"] == "compute"
    assert r["images_per_s"] == pytest.approx(5000.0)
    assert (r["kind"], r["device"], r["dtype"], r["batch"]) == ("estimate", "fake", "int8", 1)


def test_memory_bound(fake: HardwareProfile):
    # 1e6 MACs -> 2e6 / 10e12 = 0.0002 ms; (50e6 + 50e6) B / 100e9 = 1 ms.
    r = roofline_estimate(fake, DType.INT8, macs=10**6, weight_bytes=50 * 10**6, activation_bytes=50 * 10**6)
    assert r["compute_bound_ms"] == pytest.approx(0.0002)
    assert r["memory_bound_ms"] == pytest.approx(1.0)
    assert r["latency_ms"] == pytest.approx(1.0)
    assert r["bound"] == "memory"
    assert r["images_per_s"] == pytest.approx(1000.0)


def test_batch_scales_compute_and_activations_not_weights(fake: HardwareProfile):
    # batch 4: compute 4 x 2e9 / 5e12 = 1.6 ms; memory (10e6 + 4 x 5e6) / 100e9 = 0.3 ms.
    r = roofline_estimate(fake, DType.FP16, macs=10**9, weight_bytes=10 * 10**6, activation_bytes=5 * 10**6,
                          batch=4)
    assert r["compute_bound_ms"] == pytest.approx(1.6)
    assert r["memory_bound_ms"] == pytest.approx(0.3)
    assert r["latency_ms"] == pytest.approx(1.6)
    assert r["images_per_s"] == pytest.approx(4 / 1.6e-3)
    assert (r["dtype"], r["batch"]) == ("fp16", 4)


def test_bound_flips_where_the_two_roofs_cross(fake: HardwareProfile):
    # memory 1 ms fixed (100e6 B); compute crosses 1 ms at 5e9 MACs on int8 (1e10 ops / 1e13).
    below = roofline_estimate(fake, "int8", macs=4 * 10**9, weight_bytes=10**8, activation_bytes=0)
    above = roofline_estimate(fake, "int8", macs=6 * 10**9, weight_bytes=10**8, activation_bytes=0)
    assert below["bound"] == "memory" and below["latency_ms"] == pytest.approx(1.0)
    assert above["bound"] == "compute" and above["latency_ms"] == pytest.approx(1.2)


def test_labelled_as_estimate_and_json_able(fake: HardwareProfile):
    r = roofline_estimate(fake, DType.INT8, macs=10**9, weight_bytes=10**6, activation_bytes=10**6)
    assert "estimate" in r["label"] and "not measured" in r["label"] and "fake" in r["label"]
    assert "lower bound" in r["assumptions"] and "launch" in r["assumptions"]
    assert json.loads(json.dumps(r)) == r


def test_dtype_without_peak_figure_raises(fake: HardwareProfile):
    with pytest.raises(EdgepipeError, match="no peak_tops figure for dtype 'bf16'.*int8, fp16"):
        roofline_estimate(fake, DType.BF16, macs=1, weight_bytes=1, activation_bytes=1)


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"macs": -1}, {"weight_bytes": -1}])
def test_out_of_range_inputs_raise(fake: HardwareProfile, kwargs: dict):
    args = {"macs": 1, "weight_bytes": 1, "activation_bytes": 1, **kwargs}
    with pytest.raises(EdgepipeError):
        roofline_estimate(fake, DType.INT8, **args)


def test_shipped_profile_estimate():
    # Orin Nano, 20 dense INT8 TOPS, 68 GB/s: 1.8e9 MACs -> 3.6e9 / 20e12 = 0.18 ms; 13.6e6 B / 68e9 = 0.2 ms.
    r = roofline_estimate(get_profile("jetson"), DType.INT8, macs=18 * 10**8, weight_bytes=68 * 10**5,
                          activation_bytes=68 * 10**5)
    assert r["device"] == "jetson-orin-nano"
    assert r["bound"] == "memory" and r["latency_ms"] == pytest.approx(0.2)


def test_activation_bytes_known_sizes():
    # Input 1x3x8x8. conv -> 1x4x8x8 = 256, relu -> 256, pool -> 1x4x4x4 = 64, flatten -> 64, linear -> 10.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64, 10))
    elements = 256 + 256 + 64 + 64 + 10
    x = torch.randn(5, 3, 8, 8)  # batch 5 given, batch 1 counted
    assert activation_bytes(model, x, dtype_bytes=1) == elements * 1 * 2
    assert activation_bytes(model, x, dtype_bytes=DType.FP32.bytes) == elements * 4 * 2


def test_activation_bytes_counts_leaves_once_and_restores_mode():
    inner = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    model = nn.Sequential(inner, nn.Linear(6, 2))  # nested container counted through its leaves only
    model.train()
    assert activation_bytes(model, torch.randn(1, 4), dtype_bytes=2) == (6 + 6 + 2) * 2 * 2
    assert model.training and inner.training
    assert not model[0][0]._forward_hooks  # hooks removed


def test_activation_bytes_runs_in_eval_without_grad():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["training"], seen["grad"] = self.training, torch.is_grad_enabled()
            return x * 2

    assert activation_bytes(nn.Sequential(nn.BatchNorm1d(3), Probe()), torch.randn(1, 3), 1) == (3 + 3) * 2
    assert seen == {"training": False, "grad": False}
