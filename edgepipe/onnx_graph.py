"""Small lookups over an ONNX graph, shared by export, the backends' rewrites and records, and the TensorRT check."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


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
    """Names of the graph's residual adds (see ``is_residual_add``), in graph order."""
    constants = constant_values(graph)
    return [n.name for n in graph.node if is_residual_add(n, constants)]
