"""Tiny ONNX models in the exact form the export stage hands to the backends.

Float: one input "input" [N,3,16,16] (dynamic N), one output "logits" [N,10], opset 17.
QDQ INT8: weights are int8 initializers + DequantizeLinear (per-channel, axis 0, zero-point 0);
activations are QuantizeLinear/DequantizeLinear pairs, per-tensor, int8 zero-point 0. Built from
core fake-quant ops and the TorchScript exporter (the dynamo exporter cannot export them), then the
weight QuantizeLinear nodes are folded into int8 initializers, as the export stage does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from edgepipe.profiles import HardwareProfile
from edgepipe.types import DType

INPUT_SHAPE = (3, 16, 16)
NUM_CLASSES = 10
ACT_SCALE = 4.0 / 127


class FakeQuant(nn.Module):
    """Per-tensor symmetric int8 fake quantization of an activation (zero-point 0)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, -128, 127)


def _weight_scales(weight: torch.Tensor, axis: int) -> torch.Tensor:
    dims = tuple(d for d in range(weight.dim()) if d != axis)
    return (weight.detach().abs().amax(dim=dims) / 127).clamp_min(1e-8)


class QdqNet(nn.Module):
    """conv-relu, strided conv-relu, global pool, linear; fake-quantized (or float with quantize=False).

    ``relu=False`` drops the ReLUs, so each QuantizeLinear directly follows a Conv: the pattern ONNX
    Runtime fuses into QLinearConv (a ReLU in between, with symmetric int8, blocks that fusion).
    """

    def __init__(self, quantize: bool = True, weight_axis: int = 0, relu: bool = True) -> None:
        super().__init__()
        self.quantize, self.weight_axis = quantize, weight_axis
        self.relu = torch.relu if relu else (lambda x: x)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, NUM_CLASSES)
        self.act = nn.ModuleList(FakeQuant(ACT_SCALE) for _ in range(3))
        for layer in (self.conv1, self.conv2, self.fc):
            layer.register_buffer("weight_scale", _weight_scales(layer.weight, weight_axis if layer is not self.fc else 0))

    def _w(self, layer: nn.Module, axis: int) -> torch.Tensor:
        if not self.quantize:
            return layer.weight
        s = layer.weight_scale
        return torch.fake_quantize_per_channel_affine(layer.weight, s, torch.zeros_like(s, dtype=torch.int32),
                                                      axis, -128, 127)

    def _a(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.act[i](x) if self.quantize else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(nn.functional.conv2d(self._a(0, x), self._w(self.conv1, self.weight_axis), self.conv1.bias, padding=1))
        x = self.relu(nn.functional.conv2d(self._a(1, x), self._w(self.conv2, self.weight_axis), self.conv2.bias,
                                           stride=2, padding=1))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return nn.functional.linear(self._a(2, x), self._w(self.fc, 0), self.fc.bias)


def export_onnx(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(model.eval(), (torch.randn(2, *INPUT_SHAPE),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def fold_weight_quantizers(path: Path) -> Path:
    """Replace QuantizeLinear(float weight) by the int8 initializer it computes (export-stage form)."""
    model = onnx.load(str(path))
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in values]:
        w, scale, zp = (values[name] for name in q.input)
        axis = next((helper.get_attribute_value(a) for a in q.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        qw = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape), -128, 127).astype(np.int8)
        graph.initializer.append(numpy_helper.from_array(qw, f"{q.input[0]}_int8"))
        for node in graph.node:
            node.input[:] = [f"{q.input[0]}_int8" if name == q.output[0] else name for name in node.input]
        graph.node.remove(q)
    used = {name for node in graph.node for name in node.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_qdq_onnx(path: Path, weight_axis: int = 0, relu: bool = True, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return fold_weight_quantizers(export_onnx(QdqNet(quantize=True, weight_axis=weight_axis, relu=relu), path))


def make_float_onnx(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return export_onnx(QdqNet(quantize=False), path)


def random_batch(n: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SHAPE)).astype(np.float32)


def make_profile(name: str, backend: str, dtypes: tuple[DType, ...], options: dict | None = None,
                 device: str = "cpu") -> HardwareProfile:
    """A valid HardwareProfile (the shipped YAMLs are not relied on in backend tests)."""
    return HardwareProfile(name=name, backend=backend, device=device, dtypes=dtypes,
                           peak_tops={d: 1.0 for d in dtypes}, memory_bandwidth_gbps=50.0, memory_gb=8.0,
                           options=options or {})


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_models")


@pytest.fixture(scope="session")
def qdq_onnx(models_dir: Path) -> Path:
    return make_qdq_onnx(models_dir / "qdq.onnx")


@pytest.fixture(scope="session")
def qdq_onnx_axis1(models_dir: Path) -> Path:
    return make_qdq_onnx(models_dir / "qdq_axis1.onnx", weight_axis=1)


@pytest.fixture(scope="session")
def qdq_onnx_norelu(models_dir: Path) -> Path:
    return make_qdq_onnx(models_dir / "qdq_norelu.onnx", relu=False)


@pytest.fixture(scope="session")
def float_onnx(models_dir: Path) -> Path:
    return make_float_onnx(models_dir / "float.onnx")
