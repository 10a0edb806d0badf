"""The kernels of a network, counted per image for the latency estimates (edgepipe.measure.roofline).

A network is counted from a torch model (``model_layers``: the aten ops of one forward pass), from an ONNX graph
(``onnx_layers``: ONNX shape inference, no torch model needed) or from a stage artifact (``artifact_layers``,
either of the two). ``activation_bytes`` is the activation traffic the ideal roofline of a whole model uses.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.types import DType

log = logging.getLogger(__name__)


def activation_bytes(model: nn.Module, example: torch.Tensor, dtype_bytes: int) -> int:
    """Activation traffic of one image: every leaf module's output, written once and read once.

    Runs one batch-1 forward pass under ``torch.no_grad()`` in eval mode with forward hooks on every leaf
    module (a module with no children) and sums ``output elements x dtype_bytes x 2``. The model's
    train/eval mode is restored afterwards.

    Args:
        model: The network; only leaf modules are counted, so a container is not counted twice.
        example: One input; only its first item is used (batch 1).
        dtype_bytes: Bytes per activation element in the deployed dtype (``DType.bytes``).

    Returns:
        Total activation bytes moved per image.
    """
    if dtype_bytes <= 0:
        raise EdgepipeError(f"activation_bytes: dtype_bytes must be > 0, got {dtype_bytes}")
    elements = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal elements
        elements += _numel(output)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return elements * dtype_bytes * 2


def _numel(output: object) -> int:
    """Elements in a module output: a tensor, or tensors nested in tuples, lists or dicts."""
    if isinstance(output, torch.Tensor):
        return output.numel()
    if isinstance(output, (tuple, list)):
        return sum(_numel(o) for o in output)
    if isinstance(output, dict):
        return sum(_numel(o) for o in output.values())
    return 0


@dataclass(frozen=True)
class Layer:
    """One kernel of the deployed network, counted for ONE image (batch 1)."""

    op: str
    """What it is: conv, gemm, matmul or pool."""
    macs: int
    """Multiply-accumulates of one image (0 for pooling)."""
    weight_elements: int
    """Weight elements, read once per batch."""
    activation_elements: int
    """Input and output activation elements of one image (each written once and read once)."""


def model_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
    """The kernels of ``model`` on one ``input_shape`` image, read from the aten ops of one forward pass.

    A dispatch-level hook records every convolution, matrix product and pooling op with its operand shapes, so
    modules, functional calls, QAT fake-quant wrappers and ``torch.export`` programs are all counted the same
    way. Other ops (batch-norm, activations, adds, reshapes, fake-quant) are taken as fused into a neighbour.
    The model's train/eval mode is restored afterwards.

    Raises:
        EdgepipeError: The forward pass fails (e.g. the input shape does not fit the model), or no layer is found.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers() if b.numel()}
    pools = {aten.max_pool2d_with_indices, aten.max_pool2d, aten.max_pool3d_with_indices, aten.avg_pool2d,
             aten.avg_pool3d, aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.mean}
    layers: list[Layer] = []

    def is_weight(t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in weights

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            packet = func.overloadpacket
            if packet is aten.convolution:
                x, w, transposed = args[0], args[1], bool(args[6])
                per_out = w.shape[1] * math.prod(w.shape[2:])
                macs = (x.numel() if transposed else out.numel()) * per_out
                layers.append(Layer("conv", int(macs), w.numel(), x.numel() + out.numel()))
            elif packet in (aten.addmm, aten.mm):
                a, b = (args[1], args[2]) if packet is aten.addmm else (args[0], args[1])
                macs = a.shape[0] * a.shape[1] * b.shape[1]
                if packet is aten.addmm or is_weight(b):
                    layers.append(Layer("gemm", int(macs), b.numel(), a.numel() + out.numel()))
                else:
                    layers.append(Layer("matmul", int(macs), 0, a.numel() + b.numel() + out.numel()))
            elif packet is aten.bmm:
                a, b = args[0], args[1]
                layers.append(Layer("matmul", int(a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]), 0,
                                    a.numel() + b.numel() + out.numel()))
            elif packet in pools:
                x = args[0]
                y = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() >= 3:
                    layers.append(Layer("pool", 0, 0, x.numel() + y.numel()))
            return out

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), Recorder():
            model(torch.zeros(1, *input_shape))
    except EdgepipeError:
        raise
    except Exception as e:  # noqa: BLE001 - a model raises many error types; all mean "does not take this input"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EdgepipeError(f"cannot count layers: forward pass on one {list(input_shape)} input failed "
                            f"({type(e).__name__}: {first})") from None
    finally:
        model.train(was_training)
    if not any(layer.macs for layer in layers):
        raise EdgepipeError("cannot count layers: the forward pass ran no convolution or matrix product")
    return layers


_ONNX_CONV = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "FusedConv": (0, 1),
              "ConvTranspose": (0, 1)}


_ONNX_MATMUL = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "Gemm": (0, 1),
                "FusedMatMul": (0, 1)}


_ONNX_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "QLinearAveragePool",
              "QLinearGlobalAveragePool"}


_ONNX_PASS = {"DequantizeLinear", "QuantizeLinear", "Cast", "Identity", "Transpose", "Reshape", "Flatten"}


def onnx_layers(source: Path | str | Any, input_shape: tuple[int, ...] | None = None) -> list[Layer]:
    """The kernels of an ONNX graph, from ONNX shape inference: no torch model needed.

    Conv/ConvTranspose (and their quantized forms), MatMul/Gemm and pooling nodes are counted like
    :func:`model_layers` counts aten ops; every other node (Q/DQ pairs, batch-norm, activations, adds) is taken
    as fused. The first dimension of every tensor is the batch and is set to 1.

    Args:
        source: An ``.onnx`` path or an ``onnx.ModelProto``.
        input_shape: One image's shape (C, H, W), for a graph whose other input dimensions are symbolic.

    Raises:
        EdgepipeError: Unreadable file, symbolic dimensions left, or no convolution/matrix product in the graph.
    """
    import onnx
    from onnx import shape_inference

    name = str(source) if isinstance(source, (str, Path)) else "ONNX model"
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise EdgepipeError(f"{source}: ONNX file not found")
        try:
            model = onnx.load(str(source))
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and others: all mean "not ONNX"
            raise EdgepipeError(f"{source}: not a readable ONNX model ({type(e).__name__})") from None
    else:
        model = onnx.ModelProto()
        model.CopyFrom(source)
    graph = model.graph
    initializers = {i.name: list(i.dims) for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if not inputs:
        raise EdgepipeError(f"{name}: the graph has no input")
    for i, vi in enumerate(inputs):
        dims = vi.type.tensor_type.shape.dim
        if i == 0 and input_shape is not None:
            if len(dims) != len(input_shape) + 1:
                raise EdgepipeError(f"{name}: --input-shape {','.join(map(str, input_shape))} has {len(input_shape)} "
                                    f"dimensions, the graph input '{vi.name}' has {len(dims)} (batch included)")
            for d, v in zip(dims[1:], input_shape):
                d.ClearField("dim_param")
                d.dim_value = int(v)
        if len(dims):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    try:
        model = shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - onnx raises InferenceError and others
        raise EdgepipeError(f"{name}: ONNX shape inference failed ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    graph = model.graph
    shapes: dict[str, list[int | None]] = {n: list(d) for n, d in initializers.items()}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = list(a.t.dims)
    producer = {out: node for node in graph.node for out in node.output}

    def constant(tensor: str) -> bool:
        seen = 0
        while tensor not in initializers and seen < 8:
            node = producer.get(tensor)
            if node is None:
                return False
            if node.op_type == "Constant":
                return True
            if node.op_type not in _ONNX_PASS or not node.input:
                return False
            tensor, seen = node.input[0], seen + 1
        return tensor in initializers

    def numel(tensor: str, node: Any) -> int:
        dims = shapes.get(tensor)
        if dims is None or any(d is None for d in dims):
            raise EdgepipeError(f"{name}: no static shape for '{tensor}' ({node.op_type} node "
                                f"'{node.name or node.output[0]}'); give the image shape with --input-shape")
        return int(math.prod(dims))

    layers: list[Layer] = []
    for node in graph.node:
        op = node.op_type
        if op in _ONNX_CONV:
            xi, wi = _ONNX_CONV[op]
            x, w, y = node.input[xi], node.input[wi], node.output[0]
            wdims = shapes.get(w)
            if wdims is None or any(d is None for d in wdims):
                raise EdgepipeError(f"{name}: no static weight shape for {op} node '{node.name or y}'")
            per_out = wdims[1] * math.prod(wdims[2:])
            macs = (numel(x, node) if op == "ConvTranspose" else numel(y, node)) * per_out
            layers.append(Layer("conv", int(macs), int(math.prod(wdims)), numel(x, node) + numel(y, node)))
        elif op in _ONNX_MATMUL:
            ai, bi = _ONNX_MATMUL[op]
            a, b, y = node.input[ai], node.input[bi], node.output[0]
            out_dims = shapes.get(y)
            nb = numel(b, node)
            if not out_dims or out_dims[-1] in (None, 0):
                raise EdgepipeError(f"{name}: no static output shape for {op} node '{node.name or y}'")
            k = nb // out_dims[-1] if constant(b) else (shapes.get(a) or [0])[-1]
            macs = numel(y, node) * int(k or 0)
            if constant(b):
                layers.append(Layer("gemm", int(macs), nb, numel(a, node) + numel(y, node)))
            else:
                layers.append(Layer("matmul", int(macs), 0, numel(a, node) + nb + numel(y, node)))
        elif op in _ONNX_POOL:
            layers.append(Layer("pool", 0, 0, numel(node.input[0], node) + numel(node.output[0], node)))
    if not any(layer.macs for layer in layers):
        raise EdgepipeError(f"{name}: no convolution or matrix product found in the graph")
    return layers


def layer_totals(layers: list[Layer], dtype: DType) -> dict[str, int]:
    """MACs, weight bytes and activation bytes of one image in ``dtype``, summed over ``layers``."""
    dtype = DType(dtype)
    return {"kernels": len(layers), "macs": sum(x.macs for x in layers),
            "weight_bytes": sum(x.weight_elements for x in layers) * dtype.bytes,
            "activation_bytes": sum(x.activation_elements for x in layers) * dtype.bytes}


def artifact_layers(artifact: Any, input_shape: tuple[int, ...] | None = None) -> list[Layer] | None:
    """The layers of a stage artifact: from its torch model (a torch artifact) or its ONNX file (export,
    TensorRT engine or bundle, ONNX Runtime graph); None for a form with neither (OpenVINO IR) or on failure."""
    from edgepipe.types import ArtifactKind

    try:
        if artifact.kind is ArtifactKind.TORCH:
            if input_shape is None:
                return None
            from edgepipe.models.loading import load_torch_artifact

            return model_layers(load_torch_artifact(artifact), tuple(input_shape))
        if "onnx" in artifact.files:
            return onnx_layers(artifact.path("onnx"))
    except EdgepipeError as e:
        log.warning("%s: per-layer counts unavailable (%s); the estimate is the ideal lower bound", artifact.root, e)
    return None
