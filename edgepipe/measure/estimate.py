"""Latency *estimates* for a device that is not this host: the ideal roofline and a calibrated roofline.

When the target is elsewhere (a Jetson, a Xeon server) nothing can be timed here, so edgepipe estimates.

* :func:`roofline_estimate` is the ideal lower bound the profile's datasheet figures allow: a model runs no
  faster than its arithmetic at peak throughput, nor faster than its memory traffic at peak bandwidth.
* :func:`calibrated_estimate` adds what the ideal leaves out, per layer (see :data:`CALIBRATED_FORM`):
  achievable fractions of peak compute and bandwidth, a launch overhead per kernel and a fixed enqueue/sync
  overhead per inference. Their values are fitted (:func:`calibrate`) to published results kept, with their
  sources, in ``hardware_profiles/published/jetson.yaml``; a device with no published results gets the ideal
  lower bound only.

Every result is labelled an estimate with its assumptions, never mixed up with a measurement.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile, profiles_dir
from edgepipe.types import DType

log = logging.getLogger(__name__)

ASSUMPTIONS = (
    "ideal lower bound: full utilisation of the profile's dense peak throughput for this dtype and of its "
    "peak memory bandwidth, compute and memory traffic fully overlapped (latency = max of the two), "
    "weights read once per batch, every activation written once and read once, no kernel-launch, "
    "scheduling, host-transfer or pre/post-processing overhead; 1 MAC = 2 ops"
)


def roofline_estimate(profile: HardwareProfile, dtype: DType, macs: int, weight_bytes: int,
                      activation_bytes: int, batch: int = 1) -> dict:
    """Ideal roofline latency of one batch on ``profile`` in ``dtype``.

    Args:
        profile: Target device; its ``peak_tops[dtype]`` and ``memory_bandwidth_gbps`` are used.
        dtype: Precision the model runs in on the device.
        macs: Multiply-accumulates of ONE image (batch 1).
        weight_bytes: Bytes of all weights in ``dtype``; read once per batch.
        activation_bytes: Activation traffic of ONE image in ``dtype`` (see :func:`activation_bytes`).
        batch: Images per inference.

    Returns:
        A JSON-able dict: ``kind`` ("estimate"), ``label``, ``device``, ``dtype``, ``batch``,
        ``latency_ms``, ``compute_bound_ms``, ``memory_bound_ms``, ``bound`` ("compute" or "memory"),
        ``images_per_s`` and ``assumptions``.

    Raises:
        EdgepipeError: The profile has no peak figure for ``dtype``, or an input is out of range.
    """
    dtype = DType(dtype)
    peak = profile.peak_tops.get(dtype)
    if peak is None:
        known = ", ".join(d.value for d in profile.peak_tops)
        raise EdgepipeError(f"profile '{profile.name}': no peak_tops figure for dtype '{dtype.value}' "
                            f"(has: {known}); add one to hardware_profiles/{profile.name}.yaml or pick "
                            "another dtype")
    if batch < 1:
        raise EdgepipeError(f"roofline estimate: batch must be >= 1, got {batch}")
    for field, value in (("macs", macs), ("weight_bytes", weight_bytes), ("activation_bytes", activation_bytes)):
        if value < 0:
            raise EdgepipeError(f"roofline estimate: {field} must be >= 0, got {value}")

    compute_s = 2 * macs * batch / (peak * 1e12)
    memory_s = (weight_bytes + activation_bytes * batch) / (profile.memory_bandwidth_gbps * 1e9)
    latency_s = max(compute_s, memory_s)
    bound = "compute" if compute_s >= memory_s else "memory"
    log.debug("roofline %s %s batch %d: compute %.4g s, memory %.4g s (%s-bound)",
              profile.name, dtype.value, batch, compute_s, memory_s, bound)
    return {
        "kind": "estimate",
        "label": f"estimate: roofline from {profile.name} peak figures (not measured)",
        "device": profile.name,
        "dtype": dtype.value,
        "batch": batch,
        "latency_ms": latency_s * 1e3,
        "compute_bound_ms": compute_s * 1e3,
        "memory_bound_ms": memory_s * 1e3,
        "bound": bound,
        "images_per_s": batch / latency_s if latency_s > 0 else None,
        "assumptions": ASSUMPTIONS,
    }


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


# --- the calibrated estimate -------------------------------------------------------------------------
CALIBRATED_FORM = """\
Per kernel i of the deployed network (one per convolution, matmul/linear and pooling layer; batch-norm,
activations and residual adds are fused into the convolution before them, as TensorRT does):

    t_i = max(2 x MACs_i x batch / (peak x compute_efficiency),
              (weights_i + batch x (inputs_i + outputs_i)) x dtype bytes / (bandwidth x bandwidth_efficiency))
          + kernel_launch_us
    latency(batch) = sum_i t_i + enqueue_us

Why this form: it is the roofline (which the profiles' cited peaks already define) applied per kernel, so a
network with memory-bound layers (early high-resolution convolutions, weight-heavy late layers at batch 1)
and compute-bound ones is not averaged into one ratio, plus the two costs the roofline ignores that dominate
small models: a gap per kernel and a fixed cost per inference. Four parameters, each with a physical meaning;
peak and bandwidth stay the profile's datasheet figures, so one family's factors carry over to every device of
that family. They are fitted (:func:`calibrate`) by least squares on log(estimate / published) over the
published rows marked ``use: fit``. Published results of one network (ResNet-50) have one kernel count, so the
per-kernel and per-inference overheads cannot be told apart from them: their sum is fitted and split by
``enqueue_share`` (an assumption, written beside the fitted values)."""

DEFAULT_ENQUEUE_SHARE = 0.5
"""Share of the fitted overhead attributed to the per-inference enqueue/sync (the rest is per kernel) when the
published rows cannot separate the two (one kernel count): an assumption, not a fitted value."""

_METRIC_FIELD = {"latency_p90_ms": "latency_ms", "latency_p99_ms": "latency_ms", "latency_ms": "latency_ms",
                 "samples_per_s": "images_per_s"}


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


# --- the published table and its calibration ---------------------------------------------------------
def published_path() -> Path:
    """The cited table of published results and the calibration fitted to it."""
    return profiles_dir() / "published" / "jetson.yaml"


@cache
def _table(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EdgepipeError(f"{path}: cannot read the published-results table ({type(e).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise EdgepipeError(f"{path}: expected a mapping with a 'results' list")
    return data


def published_table(path: Path | None = None) -> dict[str, Any]:
    """The parsed table: ``results`` (rows), ``families`` and, once fitted, ``calibration``."""
    return _table(str(path or published_path()))


def published_results(path: Path | None = None, device: str | None = None) -> list[dict[str, Any]]:
    """Rows of the table (optionally of one device profile), each with its value, source and URL."""
    rows = published_table(path)["results"]
    return [r for r in rows if device is None or r.get("device") == device]


@dataclass(frozen=True)
class Calibration:
    """The fitted factors of one device family (see :data:`CALIBRATED_FORM`)."""

    family: str
    profiles: tuple[str, ...]
    compute_efficiency: float
    bandwidth_efficiency: float
    kernel_launch_us: float
    enqueue_us: float
    enqueue_share: float | None
    """The assumed per-inference share of the fitted overhead; None when both overheads were fitted."""
    fitted_on: tuple[str, ...]
    fitted_devices: tuple[str, ...]
    fitted_dtypes: tuple[str, ...]
    max_fit_error: float
    """Largest factor between a fitted row's estimate and its published value (1.0 = exact)."""
    source: str
    table: str


def calibration_for(profile: HardwareProfile, path: Path | None = None) -> Calibration | None:
    """The calibration of the family ``profile`` belongs to, or None (no published results for it)."""
    path = path or published_path()
    if not Path(path).is_file():
        return None
    data = published_table(path)
    for family, c in (data.get("calibration") or {}).items():
        if profile.name in (c.get("profiles") or []):
            return Calibration(family=family, profiles=tuple(c["profiles"]),
                               compute_efficiency=float(c["compute_efficiency"]),
                               bandwidth_efficiency=float(c["bandwidth_efficiency"]),
                               kernel_launch_us=float(c["kernel_launch_us"]), enqueue_us=float(c["enqueue_us"]),
                               enqueue_share=None if c.get("enqueue_share") is None else float(c["enqueue_share"]),
                               fitted_on=tuple(c["fitted_on"]), fitted_devices=tuple(c["fitted_devices"]),
                               fitted_dtypes=tuple(c["fitted_dtypes"]), max_fit_error=float(c["max_fit_error"]),
                               source=str(data.get("source_round", "")), table=_display(Path(path)))
    return None


def _display(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[parts.index("hardware_profiles"):]) if "hardware_profiles" in parts else str(path)


def _peak(profile: HardwareProfile, dtype: DType) -> float:
    peak = profile.peak_tops.get(dtype)
    if peak is None:
        known = ", ".join(d.value for d in profile.peak_tops)
        raise EdgepipeError(f"profile '{profile.name}': no peak_tops figure for dtype '{dtype.value}' "
                            f"(has: {known}); add one to hardware_profiles/{profile.name}.yaml or pick another dtype")
    return peak


def _latency_s(layers: list[Layer], dtype: DType, batch: int, peak_tops: float, bandwidth_gbps: float,
               ec: float, eb: float, kernel_s: float, enqueue_s: float) -> tuple[float, float, float, float]:
    """(latency, compute-limited part, memory-limited part, overhead) in seconds: :data:`CALIBRATED_FORM`."""
    compute = memory = 0.0
    for x in layers:
        c = 2 * x.macs * batch / (peak_tops * 1e12 * ec)
        m = (x.weight_elements + batch * x.activation_elements) * dtype.bytes / (bandwidth_gbps * 1e9 * eb)
        if c >= m:
            compute += c
        else:
            memory += m
    overhead = len(layers) * kernel_s + enqueue_s
    return compute + memory + overhead, compute, memory, overhead


def calibrated_estimate(profile: HardwareProfile, dtype: DType, layers: list[Layer], batch: int,
                        calibration: Calibration) -> dict[str, Any]:
    """The calibrated latency of one batch of ``batch`` images on ``profile`` (:data:`CALIBRATED_FORM`).

    Returns:
        A JSON-able dict: ``kind`` ("estimate"), ``label``, ``device``, ``dtype``, ``batch``, ``latency_ms``,
        ``images_per_s``, ``bound`` (the largest part: "compute", "memory" or "overhead"), ``compute_limited_ms``,
        ``memory_limited_ms``, ``overhead_ms``, ``kernels``, ``macs``, ``weight_bytes`` and ``activation_bytes``
        (one image), ``lower_bound`` (the ideal :func:`roofline_estimate` of the same layers), ``calibration``
        (the factors and where they come from) and ``assumptions``.
    """
    dtype = DType(dtype)
    peak = _peak(profile, dtype)
    if batch < 1:
        raise EdgepipeError(f"estimate: batch must be >= 1, got {batch}")
    if not layers:
        raise EdgepipeError("estimate: no layers to estimate")
    c = calibration
    total, compute, memory, overhead = _latency_s(
        layers, dtype, batch, peak, profile.memory_bandwidth_gbps, c.compute_efficiency, c.bandwidth_efficiency,
        c.kernel_launch_us * 1e-6, c.enqueue_us * 1e-6)
    totals = layer_totals(layers, dtype)
    ideal = roofline_estimate(profile, dtype, totals["macs"], totals["weight_bytes"], totals["activation_bytes"],
                              batch=batch)
    parts = {"compute": compute, "memory": memory, "overhead": overhead}
    notes = []
    if dtype.value not in c.fitted_dtypes:
        notes.append(f"the factors were fitted on {'/'.join(c.fitted_dtypes)} rows and are applied unchanged to "
                     f"{dtype.value} (no published {dtype.value} rows)")
    if profile.name not in c.fitted_devices:
        notes.append(f"{profile.name} has no published rows: the {c.family} factors fitted on "
                     f"{', '.join(c.fitted_devices)} are applied to its datasheet peak and bandwidth")
    assumptions = (
        f"ESTIMATE, roofline calibrated on published results ({c.family}: {len(c.fitted_on)} {c.source} results "
        f"in {c.table}, reproduced within {c.max_fit_error:.2f}x). Per kernel (convolution, matmul/linear, pooling; "
        "batch-norm, activations and residual adds fused into the convolution before them, as TensorRT does): "
        f"max(2 x MACs x batch / ({peak:g} TOPS x {c.compute_efficiency:.3f}), (weights + batch x activations in "
        f"and out) x {dtype.bytes} B / ({profile.memory_bandwidth_gbps:g} GB/s x {c.bandwidth_efficiency:.3f})) "
        f"+ {c.kernel_launch_us:.2f} us launch, summed, plus {c.enqueue_us:.1f} us enqueue/sync per inference "
        + (f"(the per-kernel/per-inference split of the fitted overhead is an assumption: enqueue share "
           f"{c.enqueue_share:g})" if c.enqueue_share is not None else "(both overheads fitted)")
        + ". GPU only (no DLA); input already in device memory in the deployed dtype (no "
        "pre-processing, host copies or framework overhead); steady state after warm-up; the TensorRT kernels "
        "are as efficient on this model as on the published one" + ("; " + "; ".join(notes) if notes else ""))
    return {
        "kind": "estimate",
        "label": f"estimate: roofline calibrated on published results ({c.family}), {profile.name} (not measured)",
        "device": profile.name,
        "dtype": dtype.value,
        "batch": batch,
        "latency_ms": total * 1e3,
        "images_per_s": batch / total,
        "bound": max(parts, key=parts.get),
        "compute_limited_ms": compute * 1e3,
        "memory_limited_ms": memory * 1e3,
        "overhead_ms": overhead * 1e3,
        **totals,
        "lower_bound": ideal,
        "calibration": {"family": c.family, "compute_efficiency": c.compute_efficiency,
                        "bandwidth_efficiency": c.bandwidth_efficiency, "kernel_launch_us": c.kernel_launch_us,
                        "enqueue_us": c.enqueue_us, "enqueue_share": c.enqueue_share, "fitted_on": list(c.fitted_on),
                        "max_fit_error": c.max_fit_error, "source": c.source, "table": c.table},
        "assumptions": assumptions,
    }


def layer_estimate(profile: HardwareProfile, dtype: DType, layers: list[Layer], batch: int = 1) -> dict[str, Any]:
    """The estimate for ``layers``: calibrated when ``profile`` has published results, else the ideal lower bound
    (:func:`roofline_estimate` of the layer totals, with ``calibration`` None and ``lower_bound`` itself)."""
    cal = calibration_for(profile)
    if cal is not None:
        return calibrated_estimate(profile, dtype, layers, batch, cal)
    dtype = DType(dtype)
    totals = layer_totals(layers, dtype)
    ideal = roofline_estimate(profile, dtype, totals["macs"], totals["weight_bytes"], totals["activation_bytes"],
                              batch=batch)
    ideal = {**ideal, **totals, "calibration": None,
             "assumptions": ideal["assumptions"] + f"; UNCALIBRATED: no published results for {profile.name} in "
                            f"{_display(published_path())}, so only the ideal lower bound is given (a real device is "
                            "typically several times slower, most of all for small models)"}
    return {**ideal, "lower_bound": dict(ideal)}


def target_estimate(profile: HardwareProfile, dtype: DType, counts: dict[str, Any], batch: int = 1,
                    layers: list[Layer] | Callable[[], list[Layer] | None] | None = None) -> dict[str, Any]:
    """The estimate the pipeline records: calibrated when the profile has published results and the layers are
    known (``layers``, or a function giving them, called only then); otherwise the ideal roofline of ``counts``
    (``macs``, ``params``, ``activation_elements`` of one image), as before calibration existed."""
    dtype = DType(dtype)
    cal = calibration_for(profile)
    if cal is not None:
        try:
            found = layers() if callable(layers) else layers
        except EdgepipeError as e:
            log.warning("%s: per-layer counts unavailable (%s)", profile.name, e)
            found = None
        if found:
            return calibrated_estimate(profile, dtype, found, batch, cal)
        log.info("%s: no per-layer counts for the calibrated estimate; giving the ideal lower bound", profile.name)
    return roofline_estimate(profile, dtype, counts["macs"], counts["params"] * dtype.bytes,
                             counts["activation_elements"] * 2 * dtype.bytes, batch=batch)


def artifact_layers(artifact: Any, input_shape: tuple[int, ...] | None = None) -> list[Layer] | None:
    """The layers of a stage artifact: from its torch model (a torch artifact) or its ONNX file (export,
    TensorRT engine or bundle, ONNX Runtime graph); None for a form with neither (OpenVINO IR) or on failure."""
    from edgepipe.types import ArtifactKind

    try:
        if artifact.kind is ArtifactKind.TORCH:
            if input_shape is None:
                return None
            from edgepipe.models import load_torch_artifact

            return model_layers(load_torch_artifact(artifact), tuple(input_shape))
        if "onnx" in artifact.files:
            return onnx_layers(artifact.path("onnx"))
    except EdgepipeError as e:
        log.warning("%s: per-layer counts unavailable (%s); the estimate is the ideal lower bound", artifact.root, e)
    return None


# --- fitting -----------------------------------------------------------------------------------------
def row_estimate(row: dict[str, Any], calibration: Calibration, layers: list[Layer] | None = None) -> dict[str, Any]:
    """One published row against the calibrated estimate of the same network, device, dtype and batch:
    ``published``, ``estimate`` (same unit), ``ratio`` (estimate / published) and the full ``result``."""
    from edgepipe.profiles import get_profile

    layers = layers or _row_layers(row)
    result = calibrated_estimate(get_profile(row["device"]), DType(row["dtype"]), layers, int(row["batch"]),
                                 calibration)
    field = _METRIC_FIELD.get(row["metric"])
    if field is None:
        raise EdgepipeError(f"published row '{row.get('id')}': unknown metric '{row['metric']}' "
                            f"(known: {', '.join(_METRIC_FIELD)})")
    return {"id": row["id"], "device": row["device"], "scenario": row.get("scenario"), "metric": row["metric"],
            "batch": int(row["batch"]), "use": row.get("use"), "published": float(row["value"]),
            "estimate": result[field], "ratio": result[field] / float(row["value"]), "result": result}


@cache
def _arch_layers(arch: str, kwargs_items: tuple, input_shape: tuple[int, ...]) -> tuple[Layer, ...]:
    from edgepipe.models import build_arch

    return tuple(model_layers(build_arch(arch, dict(kwargs_items)), input_shape))


def _row_layers(row: dict[str, Any]) -> list[Layer]:
    kwargs = tuple(sorted((row.get("arch_kwargs") or {}).items()))
    return list(_arch_layers(row["arch"], kwargs, tuple(row["input_shape"])))


def calibrate(path: Path | None = None, enqueue_share: float = DEFAULT_ENQUEUE_SHARE) -> dict[str, dict[str, Any]]:
    """Fit every family's factors to its published rows marked ``use: fit`` (:data:`CALIBRATED_FORM`).

    Least squares on log(estimate / published) over the rows (scipy's ``least_squares``, bounded: efficiencies
    in [0.01, 1], overheads >= 0). Rows of one kernel count fit the compute efficiency, the bandwidth efficiency
    and the total overhead, split by ``enqueue_share``; rows of several kernel counts fit both overheads.

    Returns:
        Per family: the fitted values in the table's ``calibration`` form, plus ``rows`` (each fitted row
        against its estimate, see :func:`row_estimate`) and ``checks`` (the family's other rows, not fitted).
    """
    import numpy as np
    from scipy.optimize import least_squares

    from edgepipe.profiles import get_profile

    data = published_table(path)
    out: dict[str, dict[str, Any]] = {}
    for family, spec in (data.get("families") or {}).items():
        members = list(spec.get("profiles") or [])
        rows = [r for r in data["results"] if r.get("device") in members and r.get("use") == "fit"]
        if not rows:
            continue
        cases = []
        for r in rows:
            prof = get_profile(r["device"])
            dtype = DType(r["dtype"])
            field = _METRIC_FIELD[r["metric"]]
            cases.append((_row_layers(r), dtype, int(r["batch"]), _peak(prof, dtype), prof.memory_bandwidth_gbps,
                          field, float(r["value"])))
        split = len({len(c[0]) for c in cases}) == 1

        def residuals(x: np.ndarray) -> list[float]:
            ec, eb = x[0], x[1]
            res = []
            for layers, dtype, batch, peak, bw, field, value in cases:
                if split:
                    kernel_s, enqueue_s = x[2] * (1 - enqueue_share) / len(layers), x[2] * enqueue_share
                else:
                    kernel_s, enqueue_s = x[3], x[2]
                t = _latency_s(layers, dtype, batch, peak, bw, ec, eb, kernel_s, enqueue_s)[0]
                est = t * 1e3 if field == "latency_ms" else batch / t
                res.append(math.log(est / value))
            return res

        x0 = [0.5, 0.5, 1e-4] if split else [0.5, 0.5, 5e-5, 2e-6]
        hi = [1.0, 1.0, 1e-2] if split else [1.0, 1.0, 1e-2, 1e-3]
        fit = least_squares(residuals, x0, bounds=([0.01, 0.01] + [0.0] * (len(x0) - 2), hi), xtol=1e-12,
                            ftol=1e-12)
        if split:
            kernels = len(cases[0][0])
            kernel_us = fit.x[2] * (1 - enqueue_share) / kernels * 1e6
            enqueue_us = fit.x[2] * enqueue_share * 1e6
        else:
            kernel_us, enqueue_us = fit.x[3] * 1e6, fit.x[2] * 1e6
        result = {
            "profiles": members,
            "compute_efficiency": round(float(fit.x[0]), 4),
            "bandwidth_efficiency": round(float(fit.x[1]), 4),
            "kernel_launch_us": round(float(kernel_us), 3),
            "enqueue_us": round(float(enqueue_us), 2),
            "enqueue_share": enqueue_share if split else None,
            "fitted_on": [r["id"] for r in rows],
            "fitted_devices": sorted({r["device"] for r in rows}, key=members.index),
            "fitted_dtypes": sorted({r["dtype"] for r in rows}),
        }
        cal = Calibration(family=family, profiles=tuple(members), compute_efficiency=result["compute_efficiency"],
                          bandwidth_efficiency=result["bandwidth_efficiency"],
                          kernel_launch_us=result["kernel_launch_us"], enqueue_us=result["enqueue_us"],
                          enqueue_share=result["enqueue_share"],
                          fitted_on=tuple(result["fitted_on"]), fitted_devices=tuple(result["fitted_devices"]),
                          fitted_dtypes=tuple(result["fitted_dtypes"]), max_fit_error=1.0,
                          source=str(data.get("source_round", "")), table=_display(Path(path or published_path())))
        checked = [row_estimate(r, cal) for r in rows]
        result["max_fit_error"] = round(max(max(c["ratio"], 1 / c["ratio"]) for c in checked), 4)
        others = [row_estimate(r, cal) for r in data["results"] if r.get("device") in members and r.get("use") != "fit"]
        out[family] = {**result, "rows": [{k: v for k, v in c.items() if k != "result"} for c in checked],
                       "checks": [{k: v for k, v in c.items() if k != "result"} for c in others]}
    return out
