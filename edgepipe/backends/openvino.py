"""OpenVINO backend: ONNX -> OpenVINO IR (model.xml + model.bin), compiled and checked on a device.

What a model *runs* in is read back from the compiled model, never assumed from the request. The
CPU plugin picks each layer's precision from the hardware: a ``bf16`` INFERENCE_PRECISION_HINT on a
CPU without AVX512-BF16/AMX silently runs f32, and a QDQ model only runs int8 where the plugin's
low-precision transformations turn its FakeQuantize nodes into int8 kernels. So compile reads the
execution graph (``compiled.get_runtime_model()``): every node's ``rt_info`` carries ``layerType``
(e.g. Convolution, FullyConnected, MatMul, FakeQuantize, Reorder) and ``runtimePrecision`` (f32,
bf16, f16, i8, u8), plus ``outputPrecisions``, ``primitiveType`` (e.g. ``jit_avx2_I8``),
``originalLayersNames``, ``execOrder``, ``execTimeMcs`` and ``outputLayouts``. The artifact's dtype
is the precision the convolutions actually run in; the requested one is kept beside it.

A profile whose device (GPU, NPU) is not on this host is compiled and measured on CPU, and the
records say so in ``measured_on`` and ``note``: the IR itself is device independent.

This module is over 500 lines because it is the whole OpenVINO backend: every verb edgepipe.backends asks of a
backend (compile, load and its runner, NNCF post-training INT8, host facts, the INT8 form) beside the execution-graph
reading they all share; each part is short, and splitting them would only scatter that shared reading.

Docs relied on:
- OpenVINO, "Execution model utilities" (ov::exec_model_info: LAYER_TYPE "layerType",
  RUNTIME_PRECISION "runtimePrecision", OUTPUT_PRECISIONS, IMPL_TYPE "primitiveType", ...):
  https://docs.openvino.ai/2024/api/c_cpp_api/group__ov__dev__exec__model.html
- OpenVINO, "Precision Control" (inference precision vs IR precision, INFERENCE_PRECISION_HINT):
  https://docs.openvino.ai/2025/openvino-workflow/running-inference/optimize-inference/precision-control.html
- OpenVINO, "CPU Device" (supported inference precisions; bf16 needs native support):
  https://docs.openvino.ai/2024/openvino-workflow/running-inference/inference-devices-and-modes/cpu-device.html
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepipe.engine.artifacts import Artifact
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.host import host_cpu
from edgepipe.export.onnx_graph import float_layers
from edgepipe.runtime.runner import RunnerBase
from edgepipe.types import ArtifactKind, DType

log = logging.getLogger(__name__)

DTYPES = (DType.INT8, DType.BF16, DType.FP16, DType.FP32)
COMPUTE_LAYERS = ("Convolution", "MatMul", "FullyConnected")
_INT8 = ("i8", "u8")
_HINT = {DType.BF16: "bf16", DType.FP16: "f16", DType.FP32: "f32"}
_FROM_RUNTIME = {"i8": DType.INT8, "u8": DType.INT8, "bf16": DType.BF16, "f16": DType.FP16, "f32": DType.FP32}
_VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


def available() -> tuple[bool, str]:
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return False, f"openvino is not installed ({e}); pip install openvino"
    return True, ""


def runtime_precisions(compiled_model: Any, layer_types: tuple[str, ...] | None = COMPUTE_LAYERS) -> dict[str, dict[str, int]]:
    """Histogram {layerType: {runtimePrecision: count}} of a compiled model's execution graph.

    Args:
        compiled_model: an ``openvino.CompiledModel``.
        layer_types: the layer types to count (default: Convolution, MatMul, FullyConnected); None for all.
    """
    hist: dict[str, dict[str, int]] = {}
    for op in compiled_model.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info or "runtimePrecision" not in info:
            continue
        layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if layer_types is None or layer in layer_types:
            per_layer = hist.setdefault(layer, {})
            per_layer[precision] = per_layer.get(precision, 0) + 1
    return hist


def residual_adds(onnx_path: Path | str) -> list[str]:
    """Names of the ONNX Add nodes that merge two computed tensors (residual adds) in an ONNX file."""
    import onnx

    from edgepipe.export.onnx_graph import residual_adds as adds_of

    return adds_of(onnx.load(str(onnx_path), load_external_data=False).graph)


def op_precisions(compiled_model: Any, adds: list[str]) -> dict[str, Any]:
    """Runtime precision of every Convolution, MatMul/FullyConnected and residual Add of a compiled model.

    A residual add is usually fused into a convolution as an eltwise post-op; it runs in the precision
    of the execution node whose ``originalLayersNames`` holds it. Returns ``ops`` (one entry per compute
    node and per residual add: op, name, precision, fused_into), ``residual_adds`` {name: precision},
    ``standalone_fake_quantize`` (FakeQuantize nodes left in the execution graph) and ``float_compute_ops``.
    """
    ops, add_precision, fake_quantize = [], {}, []
    wanted = set(adds)
    for op in compiled_model.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info:
            continue
        layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        originals = [n for n in info["originalLayersNames"].astype(str).split(",") if n] \
            if "originalLayersNames" in info else []
        if layer in COMPUTE_LAYERS:
            ops.append({"op": layer, "name": originals[0] if originals else op.get_friendly_name(),
                        "precision": precision})
        elif layer == "FakeQuantize":
            fake_quantize.append(originals[0] if originals else op.get_friendly_name())
        for name in wanted.intersection(originals):
            add_precision[name] = precision
            ops.append({"op": "Add (residual)", "name": name, "precision": precision, "fused_into": layer})
    for name in wanted - set(add_precision):  # optimized away entirely: report it, never drop it
        ops.append({"op": "Add (residual)", "name": name, "precision": "not in execution graph"})
        add_precision[name] = "not in execution graph"
    return {"ops": ops, "residual_adds": add_precision, "standalone_fake_quantize": fake_quantize,
            "float_compute_ops": [o for o in ops if o["precision"] not in _INT8],
            "nms_layers": sum(op.get_rt_info()["layerType"].astype(str) == "NonMaxSuppression"
                              for op in compiled_model.get_runtime_model().get_ordered_ops()
                              if "layerType" in op.get_rt_info())}


def weight_layers(hist: dict[str, dict[str, int]]) -> dict[str, int]:
    """The layers whose weights QAT quantizes, by runtime precision: the convolutions, or in a model without any (a
    transformer) its FullyConnected layers (the Linear layers; a MatMul of two activations, attention's Q.K^T and
    its product with V, holds no weight and stays in the float precision the plugin picks)."""
    return hist.get("Convolution") or hist.get("FullyConnected") or {}


def int8_convolutions(hist: dict[str, dict[str, int]]) -> bool:
    """True only if there are weight layers (``weight_layers``: convolutions, else fully connected layers) and every
    one runs in i8/u8."""
    convs = weight_layers(hist)
    return bool(convs) and all(p in _INT8 for p in convs)


def runtime_dtype(hist: dict[str, dict[str, int]], hidden: DType = DType.FP32) -> DType:
    """INT8 if most convolutions run int8 (all of them, or all but an accuracy budget's float layers), else the
    float precision most compute layers run in; ``hidden`` when the execution graph shows no compute layer at all
    (they run inside a loop body, e.g. a two-stage detector's per-image ``Scan``: the precision hint's)."""
    if not hist:
        return hidden
    convs = weight_layers(hist)
    if int8_convolutions(hist) or sum(n for p, n in convs.items() if p in _INT8) > sum(convs.values()) / 2:
        return DType.INT8
    floats: dict[str, int] = {}
    for per_layer in hist.values():
        for precision, n in per_layer.items():
            if precision not in _INT8:
                floats[precision] = floats.get(precision, 0) + n
    if not floats:  # int8 matmuls but no convolutions at all
        return DType.INT8
    return _FROM_RUNTIME.get(max(floats, key=floats.get), DType.FP32)


def _device_present(core: Any, device: str) -> bool:
    family = device.split(":")[0].split(".")[0]
    return family in _VIRTUAL_DEVICES or any(d == device or d.split(".")[0] == family for d in core.available_devices)


_DEVICE_FAMILIES = ("CPU", "GPU", "NPU", *_VIRTUAL_DEVICES)


def check(profile: HardwareProfile, dtype: DType | None, float_dtype: DType | None = None) -> None:
    """Before a run changes anything: OpenVINO is installed and the profile names a device OpenVINO knows. A known
    device this host lacks (an iGPU profile on a server) is no error: compile builds the device-independent IR and
    measures it on the CPU, labelled so (``measured_on``, ``note``)."""
    ok, reason = available()
    if not ok:
        raise EdgepipeError(f"profile {profile.name}: backend openvino: {reason}")
    device = profile.options.openvino.device
    family = device.split(":")[0].split(".")[0]
    if family not in _DEVICE_FAMILIES:
        raise EdgepipeError(f"profile {profile.name}: options.openvino.device '{device}' is not an OpenVINO device "
                            f"name (known: {', '.join(_DEVICE_FAMILIES)}, optionally with an index, e.g. GPU.1); "
                            "fix the profile")


def inference_config(profile: HardwareProfile, dtype: DType, float_dtype: DType | None = None) -> dict[str, str]:
    opts = profile.options.openvino
    if dtype is DType.INT8:
        # FakeQuantize nodes decide what runs int8; the hint covers the layers left in float, in
        # ``float_dtype`` (qat.fallback_dtype) or the profile's preferred float dtype (else OpenVINO picks
        # bf16 on any CPU with native bf16).
        hint = _HINT.get(float_dtype or profile.best_float, "f32")
    else:
        hint = _HINT[dtype]
    config = {"PERFORMANCE_HINT": opts.performance_hint, "INFERENCE_PRECISION_HINT": hint}
    if opts.num_streams is not None:
        config["NUM_STREAMS"] = str(opts.num_streams)
    return config


def _device_label(core: Any, device: str) -> str:
    if device == "CPU":
        return f"cpu: {host_cpu()}"
    try:
        return f"{device}: {core.get_property(device, 'FULL_DEVICE_NAME')}"
    except RuntimeError:
        return device


class OvRunner(RunnerBase):
    """An OpenVINO compiled model behind the Runner protocol; ``dtype`` is what its convolutions run in."""

    backend = "openvino"

    def __init__(self, xml_path: Path | str, device: str = "CPU", config: dict[str, str] | None = None,
                 threads: int | None = None, per_image: bool = False) -> None:
        """``per_image``: the model takes one image (no batch axis, ``edgepipe.export.per_image.per_image_graph``); a
        batch runs as one inference per image, its outputs stacked, as the scanned graph it came from runs it."""
        import openvino as ov

        self.per_image = per_image
        core = ov.Core()
        config = dict(config or {})
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        self.compiled = core.compile_model(core.read_model(str(xml_path)), device, config)
        self.request = self.compiled.create_infer_request()
        self.precisions = runtime_precisions(self.compiled)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16", "f16"
        self.dtype = runtime_dtype(self.precisions, _FROM_RUNTIME.get(hint, DType.FP32)).value
        self.device = _device_label(core, device)
        self.threads = threads
        self.input_names = tuple(i.get_any_name() for i in self.compiled.inputs)
        self.output_names = tuple(_port_name(o) for o in self.compiled.outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.per_image:
            images = [self._run_one({n: feeds[n][i] for n in self.input_names})
                      for i in range(len(feeds[self.input_names[0]]))]
            return {n: np.stack([one[n] for one in images]) for n in self.output_names}
        return self._run_one(feeds)

    def _run_one(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.request.infer({n: feeds[n] for n in self.input_names})
        return {n: self.request.get_tensor(n).data.copy() for n in self.output_names}

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """Input tensors set once over the arrays' memory, then ``infer()`` alone is timed: OpenVINO's own
        ``benchmark_app`` times the same call (copying the batch in and the outputs out on every call measured 0.85x
        of its throughput on a small INT8 model)."""
        import openvino as ov

        kept = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        if self.per_image:  # one request per image, each bound to its slice: a batch is that many inferences
            requests = [self.compiled.create_infer_request() for _ in range(len(kept[self.input_names[0]]))]
            for i, request in enumerate(requests):
                for name, array in kept.items():
                    request.set_tensor(name, ov.Tensor(np.ascontiguousarray(array[i]), shared_memory=True))

            def each() -> None:
                for request in requests:
                    request.infer()
            each.kept = kept  # type: ignore[attr-defined]  # the arrays live as long as the call
            return each
        for name, array in kept.items():
            self.request.set_tensor(name, ov.Tensor(array, shared_memory=True))
        return self.request.infer


def _port_name(port: Any) -> str:
    """The name a graph gave an output: where OpenVINO merged tensors (an output Squeeze folded into the op before it)
    the port carries several names, and the one the exporter named (``boxes``) is preferred to the internal ones the
    ONNX frontend made from node paths (``/Slice_output_0``)."""
    return min(port.get_names(), key=lambda n: (n.startswith("/") or "::" in n, n), default=port.get_any_name())


def stable_names(model: Any) -> int:
    """Rename the ops OpenVINO named itself (``<Type>_<n>``, n from a counter of the whole process; a folded
    constant keeps the name of the op it replaced, e.g. a Const named ``Reshape_14425``) by their place in the
    graph, so the IR's bytes depend on the model alone: the same ONNX converted in a fresh process, or after a
    resumed run compiled other models first, gives the same model.xml (and so the same content hash). Names from
    edgepipe's ONNX graphs hold a '/' (``/layer1/conv1/Conv``) and are kept. Returns how many ops were renamed."""
    import re

    renamed = 0
    for i, op in enumerate(model.get_ordered_ops()):
        match = re.fullmatch(r"([A-Z][A-Za-z0-9]*)_\d+", op.get_friendly_name())
        if match:
            op.set_friendly_name(f"{match.group(1)}_{i}")  # unique: every name of this form is renamed
            renamed += 1
    return renamed


def save_ir(model: Any, out_dir: Path) -> Path:
    """Save model.xml + model.bin into a temp folder in out_dir, then move both into place (op names made
    independent of the process first: ``stable_names``)."""
    import openvino as ov

    stable_names(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ov-save-", dir=out_dir))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        os.replace(tmp / "model.bin", out_dir / "model.bin")  # weights first: the xml names them
        os.replace(tmp / "model.xml", out_dir / "model.xml")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "model.xml"


def convert(onnx_path: Path | str) -> Any:
    """ONNX -> an in-memory OpenVINO model (``ov.Model``), nothing compiled; ``save_ir`` writes it."""
    import openvino as ov

    from edgepipe.engine import signals

    with signals.deferred():  # the C++ frontend calls Python back: a Ctrl-C raised there becomes a RuntimeError
        return ov.convert_model(str(onnx_path))


def compile(onnx_path: Path, profile: HardwareProfile, dtype: DType, out_dir: Path,
            progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
            float_dtype: DType | None = None) -> tuple[Artifact, dict[str, Any]]:
    """Convert ``onnx_path`` to OpenVINO IR in ``out_dir``, compile it and verify runtime precisions.

    Args:
        onnx_path: The exported ONNX (float, or QDQ INT8).
        profile: Target; ``options.openvino`` gives device, performance hint and streams.
        dtype: Requested precision. The artifact records the one the runtime actually uses.
        out_dir: Folder for model.xml and model.bin.
        progress: ``progress(task, done, total, values)`` over the steps convert, save, compile.
        float_dtype: For INT8, the precision of the layers left in float (the INFERENCE_PRECISION_HINT);
            default the profile's best float dtype. Convolutions the ONNX leaves in float (no
            DequantizeLinear on their weight: an accuracy budget's float layers) may run in it.

    Returns:
        The OPENVINO_IR artifact and records (settings, device measured on, per-layer precisions).

    Raises:
        EdgepipeError: ``dtype`` is INT8 but more convolutions run in float than the ONNX leaves in float.
    """
    import openvino as ov

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if dtype not in DTYPES:
        raise EdgepipeError(f"backend openvino cannot compile {dtype.value} (supported: "
                            f"{', '.join(d.value for d in DTYPES)})")
    report = progress or (lambda task, done, total, values: None)
    core = ov.Core()
    target = profile.options.openvino.device
    measured_on = target if _device_present(core, target) else "CPU"
    config = inference_config(profile, dtype, float_dtype)
    float_convs = sum(f["op"] == "Conv" for f in float_layers(onnx.load(str(onnx_path)).graph)) \
        if dtype is DType.INT8 else 0

    model = convert(onnx_path)
    report("openvino: convert", 1, 3, {})
    xml = save_ir(model, out_dir)
    report("openvino: save IR", 2, 3, {})
    runner = OvRunner(xml, measured_on, config)  # compiles the saved IR: what ships is what is checked
    report(f"openvino: compile on {measured_on}", 3, 3, {})
    hist, achieved = runner.precisions, DType(runner.dtype)
    all_int8 = int8_convolutions(hist)
    per_op = op_precisions(runner.compiled, residual_adds(onnx_path))
    runtime_float_convs = sum(n for p, n in hist.get("Convolution", {}).items() if p not in _INT8)
    mixed = dtype is DType.INT8 and float_convs > 0 and 0 < runtime_float_convs <= float_convs \
        and runtime_float_convs < sum(hist.get("Convolution", {}).values())
    if mixed:
        achieved = DType.INT8  # int8 with the budget's float layers, as exported
    if dtype is DType.INT8 and not all_int8 and not mixed:
        raise EdgepipeError(f"{onnx_path}: compiled for int8 on {measured_on} but not every convolution (or, without "
                            f"any, fully connected layer) runs int8 (runtime precisions: {hist}); check that each "
                            "Conv/Gemm/MatMul input and weight has a QuantizeLinear/DequantizeLinear pair in the "
                            "exported ONNX")

    records: dict[str, Any] = {
        "settings": {"device": target, "config": config, "openvino_version": ov.__version__},
        "measured_on": measured_on,
        "device_capabilities": list(core.get_property(measured_on, "OPTIMIZATION_CAPABILITIES")),
        # The compiled model's own answer: a bf16 hint on a CPU without bf16 reads back f32.
        "compiled_inference_precision": runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
        "conv_precisions": hist,
        "int8_convolutions": all_int8,
        "float_convolutions": {"exported": float_convs, "runtime": runtime_float_convs} if dtype is DType.INT8 else None,
        # Layers left in float run in the hint's precision, set explicitly and read back above.
        "float_parts_precision": runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
        "op_precisions": per_op["ops"], "residual_adds": per_op["residual_adds"],
        "standalone_fake_quantize": per_op["standalone_fake_quantize"],
        "float_compute_ops": per_op["float_compute_ops"] if dtype is DType.INT8 else [],
        # a detector's NMS, compiled into the model (OpenVINO's NonMaxSuppression execution layer)
        **({"nms_layers": per_op["nms_layers"]} if per_op["nms_layers"] else {}),
        "requested_dtype": dtype.value,
        "runtime_dtype": achieved.value,
    }
    if measured_on != target:
        records["note"] = f"target device {target} not present on this host"
        log.warning("openvino: %s; compiled and measured on CPU instead (available: %s)",
                    records["note"], ", ".join(core.available_devices))
    if achieved is not dtype:
        log.warning("openvino: requested %s but %s runs %s (precisions: %s)", dtype.value, measured_on,
                    achieved.value, hist)
    artifact = Artifact(kind=ArtifactKind.OPENVINO_IR, root=out_dir, files={"xml": "model.xml", "bin": "model.bin"},
                        dtype=achieved, quantized=DType.INT8 in (dtype, achieved),
                        meta={"backend": "openvino", "device": target, "measured_on": measured_on, "config": config,
                              "requested_dtype": dtype.value, "runtime_dtype": achieved.value,
                              **({"note": records["note"]} if "note" in records else {})})
    return artifact, records


def load(artifact: Artifact, threads: int | None = None) -> OvRunner:
    return OvRunner(artifact.path("xml"), artifact.meta.get("measured_on", "CPU"), artifact.meta.get("config"), threads,
                    per_image=bool(artifact.meta.get("per_image")))


# --- what edgepipe asks every backend besides compile/load (the verbs listed in edgepipe.backends) ---------
SHAPE_RANGES = False
"""OpenVINO runs any sequence length the graph allows; no range to give."""
TIMING_FEEDS = False
"""compile times nothing on inputs of its own choosing (the engine measures every stage with the task's inputs)."""
BUILDS_ON_DEVICE = False
"""compile runs here (the profile's device, or this CPU where it is absent)."""
POST_TRAINING_QUANTIZATION = True
"""``post_training_quantize`` exists: NNCF quantizes the float model for OpenVINO (the PTQ baselines)."""


def host_facts(device: str) -> tuple[bool, list[str]]:
    """Is the OpenVINO device present here, and what OpenVINO reports as the CPU's capabilities."""
    try:
        import openvino as ov
    except ImportError:
        return False, []
    core = ov.Core()
    family = device.split(":")[0].split(".")[0].upper()
    present = any(d.split(".")[0] == family for d in core.available_devices)
    try:
        caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except RuntimeError:
        caps = []
    return present, caps


def int8_form(profile: HardwareProfile, activations: str, isa: tuple[str, ...]) -> dict[str, Any]:
    """The automatic INT8 form (edgepipe.quantization.form): a GPU/NPU present here accumulates in int32, so
    8-bit weights; on the CPU (or where the device is absent) the CPU rule. ``host`` holds OpenVINO's facts."""
    from edgepipe.quantization.cpu_form import cpu_int8_form

    device = profile.options.openvino.device
    present, caps = host_facts(device)
    host = {"openvino_cpu_capabilities": caps} if caps else {}
    if not (device.upper().startswith("CPU") or not present):
        return {"activations": "uint8_after_relu", "weight_bits": 8, "host": host,
                "reason": f"OpenVINO {device}: int8 kernels accumulate in int32; uint8 after ReLU as NNCF emits"}
    where = "" if device.upper().startswith("CPU") else f"{device} is not on this host, so compiled on the CPU: "
    return {**cpu_int8_form(isa, where), "host": host}


def fallback_dtype(profile: HardwareProfile, caps: list[str] | None = None) -> dict[str, Any] | None:
    """The float dtype an INT8 model's float layers run in on the CPU plugin: bf16/fp16 only where OpenVINO
    reports it among OPTIMIZATION_CAPABILITIES (a bf16 hint elsewhere silently runs f32). ``caps`` overrides
    them, for tests. None (the profile's best float dtype) on other devices or for an fp32 profile."""
    best, name = profile.best_float, f"hardware_profiles/{profile.name}.yaml"
    if not (profile.options.openvino.device.upper().startswith("CPU") and best in (DType.BF16, DType.FP16)):
        return None
    if caps is None:
        _, caps = host_facts("CPU")
    tag = {DType.BF16: "BF16", DType.FP16: "FP16"}[best]
    if tag not in caps:
        return {"dtype": DType.FP32.value, "source": "auto",
                "reason": f"{name} prefers {best.value}, but OpenVINO reports no {tag} on this CPU "
                          f"(capabilities: {', '.join(caps) or 'none'}), so its float layers run fp32"}
    return {"dtype": best.value, "source": "auto",
            "reason": f"{name} prefers {best.value} and OpenVINO reports {tag} on this CPU"}


def timing_runner(onnx_path: Path, profile: HardwareProfile, dtype: DType, out_dir: Path, threads: int | None,
                  float_dtype: DType | None = None) -> OvRunner:
    """A runner to time a candidate ONNX as this target would run it: compiled into ``out_dir``, then loaded."""
    artifact, _ = compile(onnx_path, profile, dtype, out_dir, float_dtype=float_dtype)
    return load(artifact, threads=threads)


def post_training_quantize(onnx_path: Path, images: np.ndarray | list[Any], preset: str, profile: HardwareProfile,
                           out_dir: Path, meta: dict[str, Any],
                           progress: Callable[[str, int, int, dict[str, float]], None],
                           transformer: bool = False, what: str = "un-augmented training images"
                           ) -> tuple[Artifact, dict[str, Any]]:
    """NNCF ``nncf.quantize`` of a float ONNX for the CPU, calibrated on ``images`` (an array: one sample per image;
    or a list of samples, each the model's feed: a text model's named token arrays of one sentence), saved as IR in
    ``out_dir``. ``transformer``: NNCF's ``ModelType.TRANSFORMER`` scheme (its recommendation for transformers:
    keeps the operations it cannot quantize accurately, e.g. around softmax and LayerNorm, in float). The artifact's
    dtype is what the CPU plugin runs its convolutions (or fully connected layers) in, read back from the compiled
    model; ``meta`` is added to its descriptor. Returns the artifact (unsaved) and its records."""
    import nncf

    from edgepipe.export.per_image import per_image_graph

    # A graph scanned over the batch (a two-stage detector, edgepipe.export.per_image): NNCF does not enter the Scan's
    # body, so the one-image graph inside it is quantized and run once per image (OvRunner(per_image=True)).
    single = per_image_graph(onnx.load(str(onnx_path)))
    model = convert(onnx_path) if single is None else _per_image_model(single, out_dir)
    samples = (list(images) if isinstance(images, list) else
               [images[i:i + 1] if single is None else images[i] for i in range(len(images))])
    progress("ptq: nncf.quantize", 0, 1, {})
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples),
                              preset=nncf.QuantizationPreset(preset), target_device=nncf.TargetDevice.CPU,
                              **({"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}))
    progress("ptq: nncf.quantize", 1, 1, {})
    if not any(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops()):
        raise EdgepipeError(f"ptq: NNCF found nothing to quantize in {onnx_path} (its layers run inside a loop "
                            "body it does not enter); no INT8 model is made")
    save_ir(quantized, out_dir)
    config = inference_config(profile, DType.INT8)
    runner = OvRunner(out_dir / "model.xml", "CPU", config, per_image=single is not None)
    method = (f"nncf {nncf.__version__} nncf.quantize, {len(samples)} {what}, "
              f"{preset} preset" + (", model_type TRANSFORMER" if transformer else "") + ("" if single is None else "; the one-image graph inside the exported Scan, run "
                                    "once per image of a batch"))
    if single is not None:
        meta = {**meta, "per_image": True}
    artifact = Artifact(kind=ArtifactKind.OPENVINO_IR, root=out_dir, files={"xml": "model.xml", "bin": "model.bin"},
                        dtype=DType(runner.dtype), quantized=True,
                        meta={"backend": "openvino", "device": "CPU", "measured_on": "CPU", "config": config,
                              "requested_dtype": DType.INT8.value, "runtime_dtype": runner.dtype,
                              **meta, "method": method})
    return artifact, {"method": method, "nncf_version": nncf.__version__, "subset_size": len(samples),
                      "per_image": single is not None,
                      "preset": preset, "conv_precisions": runner.precisions, "runtime_dtype": runner.dtype}


def _per_image_model(single: Any, out_dir: Path) -> Any:
    """The one-image ONNX graph as an OpenVINO model NNCF can walk: converted, then saved and read back, which drops
    the ops no output depends on (the traced graph leaves some; NNCF's graph builder meets them as consumers it
    cannot place)."""
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".per-image-", dir=out_dir))
    try:
        onnx.save(single, str(tmp / "model.onnx"))
        model = convert(tmp / "model.onnx")
        stable_names(model)
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        return ov.Core().read_model(str(tmp / "model.xml"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
