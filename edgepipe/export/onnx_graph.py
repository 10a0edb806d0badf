"""Small lookups over an ONNX graph, shared by export, the backends' rewrites and records, and the TensorRT check."""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    from edgepipe.runtime.runner import TensorSpec


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers, Constant-node outputs and Identity-of-constant outputs, by tensor name.

    The TorchScript exporter emits all three (it deduplicates constants behind Identity nodes); nodes
    are topologically sorted, so one pass resolves Identity chains.
    """
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def is_residual_add(node: onnx.NodeProto, constants: set[str] | dict[str, np.ndarray]) -> bool:
    """An Add of two computed tensors (a residual or merge add), not of a tensor and a constant."""
    return node.op_type == "Add" and len(node.input) == 2 and not any(i in constants for i in node.input)


def residual_adds(graph: onnx.GraphProto) -> list[str]:
    """Names of the graph's residual adds (see ``is_residual_add``) inside the network: between its layers (a Conv,
    Gemm or MatMul upstream of both inputs and downstream of the sum), in graph order; not the box arithmetic of a
    detector's decoding after its last layer."""
    layers = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    constants = constant_values(graph)
    after: set[str] = set()  # tensors computed from a layer's output (a tensor's shape is not its values)
    for node in graph.node:  # topological order: one pass each way
        if node.op_type in layers or (node.op_type not in ("Shape", "Size") and any(i in after for i in node.input)):
            after.update(node.output)
    before: set[str] = set()  # tensors some later layer reads
    for node in reversed(graph.node):
        if node.op_type in layers or any(o in before for o in node.output):
            before.update(node.input)
    return [n.name for n in graph.node if is_residual_add(n, constants) and all(i in after for i in n.input)
            and n.output[0] in before]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {name: node for node in graph.node for name in node.output}


def float_layers(graph: onnx.GraphProto) -> list[dict[str, object]]:
    """The Conv/Gemm/MatMul nodes a QDQ graph leaves in float: neither their weight nor their input comes from a
    DequantizeLinear (through Reshape/Flatten). With ``qat.max_drop`` these are the budget's float layers."""
    made_by = producers(graph)

    def from_dq(name: str) -> bool:
        node = made_by.get(name)
        while node is not None and node.op_type in ("Reshape", "Flatten", "Identity", "Transpose"):
            node = made_by.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    out = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) >= 2:
            weight_q, input_q = from_dq(node.input[1]), from_dq(node.input[0])
            if not weight_q:
                out.append({"name": node.name, "op": node.op_type, "input_quantized": input_q})
    return out


def graph_inputs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    """The graph's real inputs (initializers excluded) as named specs: a dim without a value is named (dynamic)."""
    from onnx import helper

    from edgepipe.runtime.runner import TensorSpec

    weights = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        shape = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or f"dim{i}")
                      for i, d in enumerate(tensor.shape.dim))
        specs.append(TensorSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name, shape))
    return tuple(specs)
