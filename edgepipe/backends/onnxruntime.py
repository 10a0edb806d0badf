"""ONNX Runtime backend: an ONNX graph optimized offline for one execution provider.

Compiling means two things, both measured:

1. For an INT8 (QDQ) model whose profile asks for ``activation_type: uint8``, every activation
   QuantizeLinear/DequantizeLinear pair is rewritten from int8 with zero-point 0 to uint8 with
   zero-point 128. The scale is unchanged, so each pair represents exactly the same values
   (``s * (q + 128 - 128) == s * q``) and the outputs are bit-identical; weights stay int8. The
   reason is speed: ONNX Runtime's x86 CPU integer kernels are built around u8 activations times s8
   weights (the AVX2/VNNI multiply-add instructions take one unsigned and one signed operand); s8
   activations were measured ~2x slower on some ONNX Runtime builds. The gain depends on the ORT
   version and CPU (ORT 1.32 on an AVX2 Zen 3 host ran both at the same speed), hence step 3.
2. ONNX Runtime applies its graph optimizations (constant folding, QDQ -> QLinearConv fusion,
   layout changes) at the profile's ``graph_optimization_level`` and saves the result
   ("offline mode"). Layout optimizations at level ``all`` are specific to the execution provider
   and CPU they were made on, so the file is tied to the profile's provider.
3. The speed-up over the input ONNX (run as exported, with ONNX Runtime's default session) is timed
   at batch 1 and recorded, so an "optimization" that makes things slower is visible in the report.

A QDQ graph is not proof of integer execution: ONNX Runtime fuses a QDQ group into an integer kernel
(QLinearConv, ...) only when the pattern allows it; e.g. a ReLU between Conv and a symmetric int8
QuantizeLinear blocks the fusion and the convolution runs in float on dequantized weights. So the
runner's ``dtype`` comes from the graph ONNX Runtime actually executes (CPU provider), not from the
presence of QuantizeLinear nodes, and compile records the executed compute ops.

Docs relied on:
- ONNX Runtime, "Graph Optimizations in ONNX Runtime" (levels, online/offline mode,
  ``SessionOptions.optimized_model_filepath``):
  https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html
- ONNX Runtime, "Quantize ONNX Models" (QDQ format; ``val = scale * (q - zero_point)``):
  https://onnxruntime.ai/docs/performance/quantization.html
- ONNX operator spec for QuantizeLinear/DequantizeLinear (uint8 saturates to [0, 255], int8 to
  [-128, 127]; a missing zero-point means uint8).
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgepipe.engine.artifacts import Artifact
from edgepipe.errors import EdgepipeError
from edgepipe.export.onnx_graph import constant_values, consumers, graph_inputs, is_residual_add
from edgepipe.io import atomic_write
from edgepipe.profiles import HardwareProfile
from edgepipe.runtime.runner import RunnerBase, example_feeds, time_runner
from edgepipe.host import host_cpu
from edgepipe.types import ArtifactKind, DType

log = logging.getLogger(__name__)

DTYPES = (DType.INT8, DType.FP32)
OUTPUT_FILE = "model.ort.onnx"
_QUANT_OPS = ("QuantizeLinear", "DynamicQuantizeLinear")
_INT8_COMPUTE = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                 "DynamicQuantizeMatMul", "QGemm"}
_FLOAT_COMPUTE = {"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}


def available() -> tuple[bool, str]:
    return True, ""


def _is_quantized(model: onnx.ModelProto) -> bool:
    """True if the graph quantizes activations (QDQ, or already fused by ONNX Runtime to QLinear*)."""
    return any(n.op_type in _QUANT_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)


def compute_ops(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Histogram {"int8"|"float": {op_type: count}} of the convolution/matmul kernels in a graph."""
    hist: dict[str, dict[str, int]] = {"int8": {}, "float": {}}
    for node in model.graph.node:
        kind = "int8" if node.op_type in _INT8_COMPUTE else "float" if node.op_type in _FLOAT_COMPUTE else None
        if kind:
            hist[kind][node.op_type] = hist[kind].get(node.op_type, 0) + 1
    return hist


def executed_op_precisions(model: onnx.ModelProto) -> dict[str, Any]:
    """Every convolution/matmul kernel and residual add of an executed graph, with the precision it runs in.

    A residual add runs int8 when ONNX Runtime fused its DQ -> Add -> Q group into QLinearAdd, float when
    an Add of two computed tensors is left. Returns ``ops`` [{op, name, precision}], ``residual_adds``
    {name: precision} and ``float_compute_ops``.
    """
    graph = model.graph
    constants = constant_values(graph)
    ops = []
    for node in graph.node:
        if node.op_type in _INT8_COMPUTE or node.op_type == "QLinearAdd":
            ops.append({"op": node.op_type, "name": node.name, "precision": "int8"})
        elif node.op_type in _FLOAT_COMPUTE or is_residual_add(node, constants):
            ops.append({"op": node.op_type, "name": node.name, "precision": "fp32"})
    adds = {o["name"]: o["precision"] for o in ops if o["op"] in ("Add", "QLinearAdd")}
    return {"ops": ops, "residual_adds": adds, "float_compute_ops": [o for o in ops if o["precision"] != "int8"]}


class OrtRunner(RunnerBase):
    """An ONNX Runtime session behind the Runner protocol (sequential execution, fixed threads).

    ``dtype`` is "int8" when the executed graph has integer convolution/matmul kernels, else "fp32".
    With the CPU provider the executed graph is read back from ONNX Runtime (``compute_ops`` holds
    its histogram); other providers compile subgraphs ONNX Runtime cannot serialize, so there the
    presence of QuantizeLinear nodes is all we can go on.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path | str, threads: int | None = None, providers: list[str] | None = None,
                 reference: bool = False) -> None:
        """``reference``: graph optimizations off, so every Q/DQ runs as the ONNX spec defines it (in float):
        the exported graph's own semantics, against which compiled models are checked."""
        import onnxruntime as ort

        providers = providers or ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        if reference:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default (one per physical core)
        so.log_severity_level = 3  # the "hardware specific optimized model" warning is expected here
        self.compute_ops: dict[str, dict[str, int]] | None = None
        self.op_precisions: dict[str, Any] | None = None
        if providers == ["CPUExecutionProvider"]:
            with tempfile.TemporaryDirectory(prefix="edgepipe-ort-") as tmp:
                so.optimized_model_filepath = str(Path(tmp) / "executed.onnx")
                self.session = ort.InferenceSession(str(path), so, providers=providers)
                executed = onnx.load(so.optimized_model_filepath)
                self.compute_ops = compute_ops(executed)
                self.op_precisions = executed_op_precisions(executed)
            int8 = bool(self.compute_ops["int8"])
        else:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
            int8 = _is_quantized(onnx.load(str(path), load_external_data=False))
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        provider = self.session.get_providers()[0]  # what it actually runs on, not what was asked
        self.device = f"cpu: {host_cpu()}" if provider == "CPUExecutionProvider" else provider
        self.dtype = DType.INT8.value if int8 else DType.FP32.value
        self.threads = threads

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, {n: feeds[n] for n in self.input_names})))

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """Inputs bound once (ONNX Runtime reads the arrays in place), outputs left in ONNX Runtime's buffers."""
        binding = self.session.io_binding()
        kept = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}  # alive as long as the call
        for name, array in kept.items():
            binding.bind_cpu_input(name, array)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        return lambda: self.session.run_with_iobinding(binding) or kept


def _is_int8_zero(value: np.ndarray | None) -> bool:
    return value is not None and value.dtype == np.int8 and value.size == 1 and int(value.reshape(-1)[0]) == 0


def qdq_activations_to_uint8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite activation Q/DQ pairs from int8 (zero-point 0) to uint8 (zero-point 128).

    Same scale, so every pair represents exactly the same values; only activation pairs (a
    QuantizeLinear of a computed tensor, consumed only by DequantizeLinear nodes) are touched, never
    weights. Why: ONNX Runtime's x86 CPU kernels are built around u8 activations (u8 x s8); how much
    that gains depends on the ORT version and CPU, so compile() measures it rather than assuming it.

    Returns:
        A rewritten copy of ``model`` and the number of activation Q/DQ pairs rewritten.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    values = constant_values(graph)
    readers = consumers(graph)
    rewritten = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        dqs = readers[q.output[0]]
        if (q.input[0] in values or not dqs or any(d.op_type != "DequantizeLinear" for d in dqs)
                or not _is_int8_zero(values.get(q.input[2]))
                or not all(len(d.input) == 3 and _is_int8_zero(values.get(d.input[2])) for d in dqs)):
            continue
        zp_name = f"{q.output[0]}_zero_point_u8"
        shape = values[q.input[2]].shape
        graph.initializer.append(numpy_helper.from_array(np.full(shape, 128, dtype=np.uint8), zp_name))
        for node in (q, *dqs):
            node.input[2] = zp_name
        rewritten += 1
    # Shape inference (the export stage runs it) recorded these tensors as int8: drop the stale types.
    retyped = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[2].endswith("_zero_point_u8")}
    stale = [v for v in graph.value_info if v.name in retyped]
    for v in stale:
        graph.value_info.remove(v)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    onnx.checker.check_model(out)
    return out, rewritten


_RESHAPES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")


def dequantize_after_reshapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Move each per-tensor DequantizeLinear below the Flatten/Reshape that alone reads it.

    The QAT graph quantizes a classifier's input above its flatten (OpenVINO fuses the quantizer into
    the pooling there), but ONNX Runtime's QDQ selectors only fuse DQ -> Gemm/MatMul when the DQ feeds
    the Gemm directly. A reshape only moves elements, and a per-tensor DequantizeLinear is elementwise
    with one scale, so reshape(dq(q)) == dq(reshape(q)) exactly. Returns the copy and how many moved.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    values = constant_values(graph)
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    moved = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        users = readers[dq.output[0]]
        scale = values.get(dq.input[1])
        if (len(users) != 1 or users[0].op_type not in _RESHAPES or users[0].input[0] != dq.output[0]
                or scale is None or scale.size != 1 or dq.input[0] in values or dq.output[0] in outputs):
            continue
        reshape = users[0]
        quantized_reshaped = f"{reshape.output[0]}_quantized"
        reshape.input[0], dq.input[0] = dq.input[0], quantized_reshaped
        dq.output[0], reshape.output[0] = reshape.output[0], quantized_reshaped
        nodes = list(graph.node)  # the DQ now reads the reshape: put it right after it
        nodes.remove(dq)
        nodes.insert(nodes.index(reshape) + 1, dq)
        del graph.node[:]
        graph.node.extend(nodes)
        moved += 1
    stale = [v for v in graph.value_info if v.name.endswith("_quantized") or
             any(v.name == n.output[0] for n in graph.node if n.op_type == "DequantizeLinear")]
    for v in stale:
        graph.value_info.remove(v)
    onnx.checker.check_model(out)
    return out, moved


def _optimization_level(name: str) -> Any:
    import onnxruntime as ort

    return {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[name]


def _input_shape(model: onnx.ModelProto, source: Path, timing_feeds: Any = None) -> tuple[int, ...] | None:
    """The first input's per-sample shape; None for an input with a named axis after the batch (a text model's
    sequence), which ONNX Runtime runs at any size and ``timing_feeds`` gives one for."""
    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    if dims and all(d.HasField("dim_value") for d in dims):
        return tuple(int(d.dim_value) for d in dims)
    if timing_feeds is not None:
        return None
    raise EdgepipeError(f"{source}: input '{model.graph.input[0].name}' needs static C,H,W dims after the batch "
                        "dim; re-export with a fixed image size")


def _check_provider(profile: HardwareProfile) -> str:
    import onnxruntime as ort

    provider = profile.options.onnxruntime.execution_provider
    if provider not in ort.get_available_providers():
        raise EdgepipeError(f"profile {profile.name}: options.onnxruntime.execution_provider '{provider}' is not in this "
                            f"onnxruntime build (available: {', '.join(ort.get_available_providers())}); install the "
                            "onnxruntime package for that provider or compile on the device")
    return provider


def check(profile: HardwareProfile, dtype: DType | None, float_dtype: DType | None = None) -> None:
    """Before a run changes anything: the profile's execution provider is in this onnxruntime build (else the
    compile stage would fail only after qat and export were retrained)."""
    _check_provider(profile)


def compile(onnx_path: Path, profile: HardwareProfile, dtype: DType, out_dir: Path,
            progress: Callable[[str, int, int, dict[str, float]], None] | None = None, warmup: int = 5,
            iterations: int = 20, float_dtype: DType | None = None, timing_feeds: dict[str, Any] | None = None,
            ) -> tuple[Artifact, dict[str, Any]]:
    """Optimize ``onnx_path`` for the profile's execution provider into ``out_dir/model.ort.onnx``.

    Args:
        onnx_path: The exported ONNX (float, or QDQ INT8).
        profile: Target; ``options.onnxruntime`` gives provider, optimization level, activation type.
        dtype: INT8 for a QDQ model, FP32 for a float one.
        out_dir: Folder for the optimized model.
        progress: ``progress(task, done, total, values)`` per timed iteration (the stage's callback).
        warmup: Untimed runs before each latency measurement.
        iterations: Timed runs per latency measurement (batch 1).
        float_dtype: The precision asked for an INT8 model's float layers; the CPU execution provider computes
            them in fp32 whatever is asked, and the records say so.

    Returns:
        The ORT_OPTIMIZED artifact (its dtype is the one ONNX Runtime executes) and records: settings,
        rewritten Q/DQ pairs, requested vs runtime dtype, executed compute ops, measured speed-up.
    """
    import onnxruntime as ort

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if dtype not in DTYPES:
        raise EdgepipeError(f"backend onnxruntime cannot compile {dtype.value} (supported: "
                            f"{', '.join(d.value for d in DTYPES)})")
    opts = profile.options.onnxruntime
    provider = _check_provider(profile)
    model = onnx.load(str(onnx_path))
    if _is_quantized(model) != (dtype is DType.INT8):
        has = "has" if _is_quantized(model) else "has no"
        raise EdgepipeError(f"{onnx_path}: asked to compile {dtype.value} but the model {has} QuantizeLinear nodes; "
                            "compile a QDQ model as int8 and a float model as fp32")
    input_shape = _input_shape(model, onnx_path, timing_feeds)

    rewritten = moved = 0
    if dtype is DType.INT8:
        model, moved = dequantize_after_reshapes(model)
    if dtype is DType.INT8 and opts.activation_type == "uint8":
        model, rewritten = qdq_activations_to_uint8(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = _optimization_level(opts.graph_optimization_level)
    so.log_severity_level = 3  # level "all" warns that the file is hardware specific: documented above

    def optimize(tmp: Path) -> None:
        so.optimized_model_filepath = str(tmp)
        ort.InferenceSession(model.SerializeToString(), so, providers=[provider])

    out_path = atomic_write(out_dir / OUTPUT_FILE, optimize)

    def timed(task: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(task, done, total, {})) if progress else None

    feeds = dict(timing_feeds) if timing_feeds is not None else example_feeds(graph_inputs(model), 1)
    baseline = time_runner(OrtRunner(onnx_path, providers=[provider]), feeds, warmup, iterations,
                           timed("onnxruntime: time input ONNX (batch 1)"))
    runner = OrtRunner(out_path, providers=[provider])
    optimized = time_runner(runner, feeds, warmup, iterations, timed("onnxruntime: time optimized (batch 1)"))
    ratio = baseline.p50_ms / optimized.p50_ms
    if ratio < 1.0:
        log.warning("onnxruntime: optimized model is slower than the input ONNX (p50 %.3f ms vs %.3f ms)",
                    optimized.p50_ms, baseline.p50_ms)

    settings = {"execution_provider": provider, "graph_optimization_level": opts.graph_optimization_level,
                "activation_type": opts.activation_type if dtype is DType.INT8 else None,
                "execution_mode": "sequential", "onnxruntime_version": ort.__version__}
    records: dict[str, Any] = {
        "settings": settings,
        "activation_qdq_pairs_rewritten": rewritten,
        "dequantize_moved_below_reshape": moved,
        "requested_dtype": dtype.value,
        "runtime_dtype": runner.dtype,
        # the CPU execution provider has fp32 kernels only for the ops left in float
        "float_parts_precision": "f32", "requested_float_dtype": (float_dtype or DType.FP32).value,
        "executed_compute_ops": runner.compute_ops,
        **({"op_precisions": runner.op_precisions["ops"], "residual_adds": runner.op_precisions["residual_adds"],
            "float_compute_ops": runner.op_precisions["float_compute_ops"] if dtype is DType.INT8 else []}
           if runner.op_precisions else {}),
        "speedup": {"batch": 1, "baseline_model": f"{onnx_path.name} (as exported, default session)",
                    "baseline_p50_ms": baseline.p50_ms, "optimized_p50_ms": optimized.p50_ms,
                    "ratio_p50": ratio, "baseline": baseline.as_dict(), "optimized": optimized.as_dict()},
    }
    if runner.dtype != dtype.value:
        records["note"] = (f"requested {dtype.value} but ONNX Runtime executes {runner.dtype}: no Q/DQ group was fused "
                           "into an integer kernel (e.g. a ReLU between Conv and a symmetric int8 QuantizeLinear "
                           "blocks QLinearConv); see executed_compute_ops")
        log.warning("onnxruntime: %s", records["note"])
    artifact = Artifact(kind=ArtifactKind.ORT_OPTIMIZED, root=out_dir, files={"onnx": OUTPUT_FILE},
                        dtype=DType(runner.dtype), quantized=dtype is DType.INT8,
                        meta={"backend": "onnxruntime", **settings,
                              **({"input_shape": list(input_shape)} if input_shape is not None else {}),
                              "requested_dtype": dtype.value, "runtime_dtype": runner.dtype, "device": runner.device})
    return artifact, records


def load(artifact: Artifact, threads: int | None = None) -> OrtRunner:
    providers = [artifact.meta["execution_provider"]] if "execution_provider" in artifact.meta else None
    return OrtRunner(artifact.path("onnx"), threads=threads, providers=providers)


# --- what edgepipe asks every backend besides compile/load (the verbs listed in edgepipe.backends) ---------
SHAPE_RANGES = False
"""ONNX Runtime runs any sequence length the graph allows; no range to give."""
TIMING_FEEDS = True
"""compile times the input and the optimized graph at batch 1 on ``timing_feeds`` (the task's timing inputs: a text
model's token ids at a stated length), else on zeros/normal inputs of the graph's static shape."""
BUILDS_ON_DEVICE = False
"""compile runs here; ONNX Runtime needs no device of its own."""
POST_TRAINING_QUANTIZATION = False
"""No ``post_training_quantize``: the PTQ baselines (NNCF) build OpenVINO IR."""


def int8_form(profile: HardwareProfile, activations: str, isa: tuple[str, ...]) -> dict[str, Any]:
    """The automatic INT8 form: ONNX Runtime's CPU execution provider runs on this CPU, so the CPU rule."""
    from edgepipe.quantization.cpu_form import cpu_int8_form

    return cpu_int8_form(isa)


def fallback_dtype(profile: HardwareProfile, caps: list[str] | None = None) -> dict[str, Any] | None:
    """The float dtype an INT8 model's float layers run in: fp32, whatever the profile prefers."""
    return {"dtype": DType.FP32.value, "source": "auto",
            "reason": "ONNX Runtime's CPU execution provider computes float ops in fp32"}


def timing_runner(onnx_path: Path, profile: HardwareProfile, dtype: DType, out_dir: Path, threads: int | None,
                  float_dtype: DType | None = None) -> OrtRunner:
    """A runner to time a candidate ONNX as this target would run it: the ONNX itself in ONNX Runtime (the
    compile stage's offline optimization is skipped: it also times the model twice, too slow per candidate)."""
    return OrtRunner(onnx_path, threads)
