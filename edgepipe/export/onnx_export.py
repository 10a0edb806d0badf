"""ONNX export in the library: the torch model (float or QAT) to ONNX, QDQ weight folding and the QDQ report.

The export stage (``stages/export.py``) and every other place that needs an ONNX file (``edgepipe
bench`` exporting a float stage, the baselines) call ``export_onnx`` here, so there is one exporter.
The graph's inputs and outputs are the task's (``edgepipe.tasks``: names, dtypes, dynamic axes; a classifier has
one input ``input`` and one output ``logits``, both with a dynamic batch axis); the check against PyTorch is the
task's too (``Task.export_check``). A QAT
model exports in the QDQ form: every fake-quant op becomes QuantizeLinear -> DequantizeLinear, and
each weight's QuantizeLinear(float initializer) is then folded into an int8 initializer feeding its
DequantizeLinear, computed exactly as QuantizeLinear would (round half to even, saturate), so the
file holds the deployed integers and no float weights.
"""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.export.onnx_graph import constant_values, consumers
from edgepipe.quantization.layers import frozen_weight_scales

if TYPE_CHECKING:
    from edgepipe.tasks.base import Task

log = logging.getLogger(__name__)

MAX_OPSET = 20
"""Highest opset of the TorchScript exporter (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)."""


MIN_OPSET = 17
"""export.opset's lower bound (edgepipe.config.ExportConfig)."""


def check_opset(opset: int) -> None:
    """``export.opset`` against what this installation exports and runs: the TorchScript exporter (the one that
    writes Q/DQ), the onnx package (checker, shape inference) and onnxruntime (the export check, the ORT backend).
    Called before a run changes anything; a 99 would otherwise fail only after qat was retrained."""
    from torch.onnx import _constants

    torch_max = min(MAX_OPSET, getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", MAX_OPSET))
    onnx_max = onnx.defs.onnx_opset_version()
    high = min(torch_max, onnx_max)
    while high >= MIN_OPSET and not _ort_runs_opset(high):
        high -= 1
    if not MIN_OPSET <= opset <= high:
        import onnxruntime as ort

        raise EdgepipeError(f"export.opset: {opset} is not supported here; this installation exports and runs opsets "
                            f"{MIN_OPSET}..{high} (torch {torch.__version__}'s TorchScript exporter up to {torch_max}, "
                            f"onnx {onnx.__version__} up to {onnx_max}, onnxruntime {ort.__version__}); set export.opset "
                            f"to one of those ({MIN_OPSET} is the default)")


_ORT_OPSETS: dict[int, bool] = {}


def _ort_runs_opset(opset: int) -> bool:
    """Whether onnxruntime loads a one-node model stamped with ``opset`` (cached per process)."""
    if opset not in _ORT_OPSETS:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "opset", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            _ORT_OPSETS[opset] = True
        except Exception:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types for an unknown opset
            _ORT_OPSETS[opset] = False
    return _ORT_OPSETS[opset]


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], opset: int, task: Task | None = None,
                num_classes: int | None = None) -> onnx.ModelProto:
    """Export with the task's input and output names, dtypes and dynamic axes (``Task.inputs``/``outputs``;
    classification, the default: ``input`` -> ``logits``, dynamic batch on both)."""
    from edgepipe.tasks import DEFAULT, get_task

    if opset > MAX_OPSET:
        raise EdgepipeError(f"export.opset: {opset} is above {MAX_OPSET}, the highest opset of the TorchScript "
                            f"exporter that INT8 export needs; use 17..{MAX_OPSET}")
    from edgepipe import device as devices

    task = task or get_task(DEFAULT)
    meta = {"input_shape": list(input_shape), "num_classes": num_classes}
    inputs, outputs = task.inputs(meta), task.outputs(meta)
    if devices.module_device(model).type != "cpu":  # a model on a GPU (a pruning candidate): exported from the CPU
        model = devices.cpu_copy(model)
    buf = io.BytesIO()
    per_image = bool(getattr(model, "export_per_image", False))  # traced for one image, then scanned over the batch
    example = task.example_inputs(meta, 1 if per_image else 2)
    dynamic = {} if per_image else \
        {s.name: s.dynamic_axes() for s in (*inputs, *outputs) if s.dynamic_axes()}
    model.eval()
    try:
        with frozen_weight_scales(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated: see below
            # shapes read as Python numbers (a detector's anchor and class counts) are constants of the graph; the
            # export check runs the graph at other batch sizes and fails a graph that fixed one
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # dynamo=False: the torch.export-based exporter (the default) cannot export fake-quant ops,
            # while the TorchScript exporter maps them to QuantizeLinear/DequantizeLinear. Float models
            # take the same path so both kinds of graph come out of one exporter.
            torch.onnx.export(model, example, buf, dynamo=False, opset_version=opset,
                              input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
                              do_constant_folding=True, dynamic_axes=dynamic or None)
    except Exception as e:  # noqa: BLE001 - the exporter raises many error types; all mean "cannot export"
        raise EdgepipeError(f"export: torch.onnx.export failed at opset {opset} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    proto = onnx.load_from_string(buf.getvalue())
    if per_image:
        from edgepipe.export.per_image import scan_over_batch

        proto = scan_over_batch(proto)
    return proto


# --- folding weight quantizers ------------------------------------------------------------------------
def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1


def quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear in NumPy: saturate(round_half_even(x / scale) + zero_point)."""
    zp = np.zeros((), np.uint8) if zero_point is None else zero_point  # ONNX: no zero-point means uint8 0
    if scale.ndim == 1 and x.ndim > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zp.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def fold_weight_quantizers(model: onnx.ModelProto) -> int:
    """Replace each QuantizeLinear(float constant) by an int8 initializer; returns how many were folded."""
    graph = model.graph
    values = constant_values(graph)
    readers = consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    folded = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] in graph_outputs:
            continue
        w, scale = values.get(node.input[0]), values.get(node.input[1])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if w is None or scale is None or not np.issubdtype(w.dtype, np.floating) or (zp_name and zp_name not in values):
            continue  # an activation quantizer: stays in the graph
        q = quantize_linear(w, scale, values.get(zp_name), _axis(node))
        name = f"{node.input[0]}_quantized"
        graph.initializer.append(numpy_helper.from_array(q, name))
        for consumer in readers[node.output[0]]:
            for i, inp in enumerate(consumer.input):
                if inp == node.output[0]:
                    consumer.input[i] = name
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _drop_unused(graph)
    return len(folded)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers and Constant nodes nothing reads any more (the float weights)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    for inp in [i for i in graph.input if i.name not in used]:
        graph.input.remove(inp)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)


def qdq_report(onnx_path: str | Path) -> dict[str, Any]:
    """Every QuantizeLinear/DequantizeLinear: zero-point dtype and values, scale shape, axis, input kind.

    Per node: ``is_weight`` (its input is a constant), ``per_channel`` (non-scalar scale), ``axis``
    (None when per tensor), ``zero_point_dtype``, ``zero_points`` and ``zero_points_all_zero``.
    Summary: the counts, ``int8_weight_initializers`` (DequantizeLinear reading an int8 constant),
    ``float_weight_quantizers`` (QuantizeLinear still reading a float constant: 0 after export),
    ``zero_point_dtypes``, ``zero_points_all_zero`` and ``weights_per_channel_axis0``.
    """
    graph = onnx.load(str(onnx_path)).graph
    values = constant_values(graph)
    nodes = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        x, scale = values.get(node.input[0]), values.get(node.input[1])
        zp = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        per_channel = scale is not None and scale.ndim > 0
        zero_points = [0] if zp is None else sorted({int(v) for v in np.ravel(zp)})
        nodes.append({
            "name": node.name, "op": node.op_type, "input": node.input[0],
            "input_kind": "tensor" if x is None else f"{x.dtype} constant", "is_weight": x is not None,
            "scale_shape": None if scale is None else list(scale.shape),
            "per_channel": per_channel, "axis": _axis(node) if per_channel else None,
            "zero_point_dtype": "uint8 (default)" if zp is None else str(zp.dtype),
            "zero_points": zero_points, "zero_points_all_zero": zero_points == [0]})
    weights = [n for n in nodes if n["op"] == "DequantizeLinear" and n["is_weight"]]
    return {
        "nodes": nodes,
        "quantize_linear": sum(n["op"] == "QuantizeLinear" for n in nodes),
        "dequantize_linear": sum(n["op"] == "DequantizeLinear" for n in nodes),
        "int8_weight_initializers": sum(n["input_kind"] == "int8 constant" for n in weights),
        "float_weight_quantizers": sum(n["op"] == "QuantizeLinear" and n["input_kind"].startswith("float")
                                       for n in nodes),
        "zero_point_dtypes": sorted({n["zero_point_dtype"] for n in nodes}),
        "zero_points_all_zero": all(n["zero_points_all_zero"] for n in nodes),
        "weights_per_channel_axis0": bool(weights) and all(n["axis"] == 0 and len(n["scale_shape"]) == 1
                                                           for n in weights)}
