"""ONNX export in the library: the torch model (float or QAT) to ONNX, QDQ weight folding, the QDQ
report, and the check against PyTorch in ONNX Runtime.

The export stage (``stages/export.py``) and every other place that needs an ONNX file (``edgepipe
bench`` exporting a float stage, the baselines) call ``export_onnx`` here, so there is one exporter.
The graph has one input ``input`` and one output ``logits``, both with a dynamic batch axis. A QAT
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
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgepipe.data import Batches
from edgepipe.errors import EdgepipeError
from edgepipe.export.onnx_graph import constant_values, consumers
from edgepipe.quantization.fakequant import frozen_weight_scales
from edgepipe.runtime.runner import topk_accuracy

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


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], opset: int) -> onnx.ModelProto:
    """Export with input ``input`` and output ``logits``, dynamic batch on both."""
    if opset > MAX_OPSET:
        raise EdgepipeError(f"export.opset: {opset} is above {MAX_OPSET}, the highest opset of the TorchScript "
                            f"exporter that INT8 export needs; use 17..{MAX_OPSET}")
    buf = io.BytesIO()
    example = torch.zeros(2, *input_shape)
    model.eval()
    try:
        with frozen_weight_scales(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated: see below
            # dynamo=False: the torch.export-based exporter (the default) cannot export fake-quant ops,
            # while the TorchScript exporter maps them to QuantizeLinear/DequantizeLinear. Float models
            # take the same path so both kinds of graph come out of one exporter.
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"], do_constant_folding=True,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - the exporter raises many error types; all mean "cannot export"
        raise EdgepipeError(f"export: torch.onnx.export failed at opset {opset} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return onnx.load_from_string(buf.getvalue())


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


# --- ONNX Runtime vs PyTorch ---------------------------------------------------------------------------
NOISE_REL = 4 * 2.0**-23
"""Relative size of the noise ``self_agreement`` puts on each quantizer's input: 4 float32 ulps, the size of the
differences a different summation order makes (1-5 ulps measured between PyTorch and ONNX Runtime)."""
NOISE_SLACK = 0.005
"""How far below PyTorch's self-agreement ONNX Runtime's agreement may fall (0.5 points of the images)."""
MAX_TOP1_GAP = 0.01
"""Largest top-1 difference (1 point) between ONNX Runtime and PyTorch accepted on a low-margin model."""


def agreement_verdict(agreement: float, floor: float, ort_top1: float, torch_top1: float) -> str | None:
    """Why an agreement below int8_min_agreement is a real difference, or None when it is within the model's own
    sensitivity to float rounding (``floor``) and top-1 is kept."""
    if agreement < floor - NOISE_SLACK:
        return (f"PyTorch agrees with itself on {floor:.2%} under float-rounding noise, so the difference is not "
                "rounding")
    if abs(ort_top1 - torch_top1) > MAX_TOP1_GAP:
        return f"top-1 differs: {ort_top1:.2%} in ONNX Runtime, {torch_top1:.2%} in PyTorch"
    return None


@torch.no_grad()
def self_agreement(model: nn.Module, data: Batches, batch_size: int, ref_logits: np.ndarray) -> float:
    """Top-1 agreement of ``model`` with its own ``ref_logits`` when every activation quantizer's input is multiplied
    by (1 + u), u uniform in [-NOISE_REL, NOISE_REL] from a fixed seed: how much of the model's top-1 hangs on
    float rounding alone."""
    from edgepipe.quantization.fakequant import ActQuant

    gen = torch.Generator().manual_seed(0)

    def nudge(_m: nn.Module, args: tuple) -> tuple:
        x = args[0]
        u = (torch.rand(x.shape, generator=gen) * 2 - 1) * NOISE_REL
        return (x * (1 + u), *args[1:])
    hooks = [m.register_forward_pre_hook(nudge) for m in model.modules() if isinstance(m, ActQuant)]
    try:
        out = np.concatenate([model(x).float().numpy() for x, _ in data.val_batches(batch_size)])
    finally:
        for h in hooks:
            h.remove()
    return float((out.argmax(1) == ref_logits.argmax(1)).mean())


@torch.no_grad()
def compare_with_torch(model: nn.Module, onnx_bytes: bytes, data: Batches, batch_size: int, quantized: bool,
                       tolerance: float, min_agreement: float, threads: int | None = None) -> dict[str, Any]:
    """Run the validation set through both; raise EdgepipeError when they disagree beyond the limits."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # The QDQ graph's own semantics: with graph optimizations off, ONNX Runtime runs each Q/DQ as the spec
    # defines it (in float), which is what the QAT model computes (measured: 1e-7 apart). Its fused integer
    # kernels round differently; whether a runtime's kernels keep the graph's accuracy is the compile
    # stage's fidelity check, against this same reference.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    model.eval()
    ref, out, labels = [], [], []
    for x, y in data.val_batches(batch_size):
        ref.append(model(x).float().numpy())
        out.append(session.run(["logits"], {"input": x.numpy().astype(np.float32)})[0])
        labels.append(y.numpy())
    ref_logits, ort_logits, y_all = np.concatenate(ref), np.concatenate(out), np.concatenate(labels)
    bad = ~(np.isfinite(ref_logits).all(1) & np.isfinite(ort_logits).all(1))
    if bad.any():  # NaN logits would pass a max-difference check (NaN > x is False) and agree on argmax 0
        raise EdgepipeError(f"export: the model outputs NaN or inf logits for {int(bad.sum())} of {len(y_all)} "
                            f"validation images (PyTorch: {int((~np.isfinite(ref_logits).all(1)).sum())}, ONNX Runtime: "
                            f"{int((~np.isfinite(ort_logits).all(1)).sum())}); the model is broken: check the earlier "
                            "stages' training losses and data.mean/std")
    checks: dict[str, Any] = {"samples": int(len(y_all)), "ort_top1": topk_accuracy(ort_logits, y_all, 1),
                              "torch_top1": topk_accuracy(ref_logits, y_all, 1)}
    if quantized:
        agreement = float((ref_logits.argmax(1) == ort_logits.argmax(1)).mean())
        checks.update(top1_agreement=agreement, min_agreement=min_agreement, reference="ONNX Runtime, graph "
                      "optimizations off (QDQ as specified)", max_abs_diff=float(np.abs(ref_logits - ort_logits).max()))
        if agreement < min_agreement:
            # A low-margin model (many near-tied logits) flips top-1 under any float rounding difference: measured on
            # a CIFAR MobileNetV2 subset model, PyTorch agreed with itself on only 97.9% when each quantizer's input
            # moved by 1e-7. ONNX Runtime sums convolutions in another order (inputs 1-5 ulps apart), so a faithful
            # graph cannot be asked to agree more than the model agrees with itself under that noise.
            floor = self_agreement(model, data, batch_size, ref_logits)
            checks.update(self_agreement=floor, self_agreement_noise=f"each quantizer input x (1 + u), |u| <= "
                          f"{NOISE_REL:.2g}, seeded", top1_gap_points=abs(checks["ort_top1"] - checks["torch_top1"]) * 100)
            problem = agreement_verdict(agreement, floor, checks["ort_top1"], checks["torch_top1"])
            if problem:
                raise EdgepipeError(f"export: ONNX Runtime and PyTorch agree on top-1 for {agreement:.2%} of "
                                    f"{len(y_all)} validation images (< export.int8_min_agreement {min_agreement:.2%}) "
                                    f"and {problem}; the INT8 graph does not compute what the QAT model does")
            checks["note"] = (f"agreement {agreement:.2%} is below {min_agreement:.2%} but within PyTorch's own "
                              f"{floor:.2%} under float-rounding noise, with top-1 {checks['ort_top1']:.2%} vs "
                              f"{checks['torch_top1']:.2%}: a low-margin model, not a different graph")
            log.warning("export: %s", checks["note"])
    else:
        diff = float(np.abs(ref_logits - ort_logits).max())
        checks.update(max_abs_diff=diff, tolerance=tolerance)
        if diff > tolerance:
            raise EdgepipeError(f"export: ONNX Runtime logits differ from PyTorch by up to {diff:.3g} "
                                f"(> export.float_tolerance {tolerance:g}) on the validation set")
    return checks
