"""TensorRT backend: a serialized engine built on the device, or a deploy bundle to build it there.

An engine is specific to the GPU and TensorRT version it was built with, so it is built where it
runs. On a host without TensorRT and a CUDA device, compile writes a *bundle* instead (the ONNX, the
profile, the build settings and the exact commands to run on the device) and says so in its records;
it never writes a placeholder engine.

INT8 models are explicitly quantized (QDQ). TensorRT keeps the Q/DQ placement and requires signed
int8 with zero-point 0, per-tensor activations and per-channel weight scales on the output-channel
axis, so ``check_onnx_for_tensorrt`` rejects anything else before a build is attempted. The INT8
and FP16 builder flags are both set so layers left in float may run fp16.

Targets the TensorRT 10 Python API (explicit batch is the default: ``create_network(0)``; I/O by
tensor name with ``set_input_shape``/``set_tensor_address``/``execute_async_v3``). ``tensorrt`` and
``pycuda`` are imported inside functions only.

Why one file of ~430 lines: the device side (engine build, runner) and the host side (ONNX checks,
build settings, the bundle and its commands) must agree on the same settings and file names, and the
bundle ships this module's logic to the device; issue 10 splits the device-only part out with its own
dependencies.

Docs relied on:
- TensorRT Python API: Builder (``create_network``, ``build_serialized_network``, ``num_DLA_cores``),
  IBuilderConfig (``set_memory_pool_limit``, ``set_flag``, ``default_device_type``, ``DLA_core``,
  ``builder_optimization_level``), OnnxParser (``parse_from_file``, ``num_errors``, ``get_error``),
  IExecutionContext (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html
- TensorRT operator docs, Quantize/Dequantize (zero_point must be zero; int8 output):
  https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/Quantize.html
- TensorRT "Working with DLA" / GPU fallback mode (BuilderFlag GPU_FALLBACK):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-with-dla.html
- onnx-tensorrt supported operator matrix (docs/operators.md), for ``SUPPORTED_OPS``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.artifacts import Artifact
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write, atomic_write_json, atomic_write_text
from edgepipe.profiles import HardwareProfile
from edgepipe.types import ArtifactKind, DType

log = logging.getLogger(__name__)

DTYPES = (DType.INT8, DType.FP16, DType.FP32)
ENGINE_FILE = "model.engine"
BUNDLE_FILES = {"onnx": "model.onnx", "profile": "profile.yaml", "settings": "build_settings.json",
                "readme": "README.md", "script": "build_engine.sh"}
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute) needs opset 13
SUPPORTED_OPS = frozenset({
    # convolution, pooling, normalization
    "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "LayerNormalization", "LRN",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Gemm", "MatMul",
    # activations
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Softmax", "LogSoftmax",
    # elementwise
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Min", "Max",
    "Sum", "Mean", "Floor", "Ceil", "Round", "Sign", "Where", "Equal", "Greater", "Less", "Not",
    # shape and data movement
    "Flatten", "Reshape", "Transpose", "Concat", "Split", "Slice", "Squeeze", "Unsqueeze", "Shape",
    "Gather", "Expand", "Tile", "Pad", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth",
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ArgMax", "TopK",
    "Identity", "Constant", "ConstantOfShape", "Cast", "Dropout", "Range",
    # explicit quantization
    "QuantizeLinear", "DequantizeLinear",
})


SUPPORTED_MAJOR = 10
"""The TensorRT API this backend uses (JetPack 6.1/6.2 ship TensorRT 10.3; JetPack 6.0 ships 8.6)."""


def version_problem(version: str) -> str | None:
    """None for a supported TensorRT version, else one line saying which JetPack release to use."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return f"TensorRT reports version '{version}'; edgepipe needs TensorRT {SUPPORTED_MAJOR}.x"
    if major == SUPPORTED_MAJOR:
        return None
    hint = ("JetPack 6.0 ships TensorRT 8.6: flash JetPack 6.1 or 6.2 (TensorRT 10.3)" if major < SUPPORTED_MAJOR
            else "TensorRT 11 removed the INT8/FP16 builder flags this build uses: install tensorrt 10.x "
                 "(pip install 'tensorrt>=10,<11', or JetPack 6.1/6.2's TensorRT 10.3)")
    return f"TensorRT {version} found, edgepipe builds with the TensorRT {SUPPORTED_MAJOR} API; {hint}"


def _cuda_devices() -> tuple[int | None, str]:
    """CUDA devices through pycuda, else NVIDIA's cuda-python (aarch64 wheels); never through torch."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count(), ""
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 - pycuda raises its own LogicError/RuntimeError when no device is found
        return 0, f" ({e})"
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None, ""
    err, count = cudart.cudaGetDeviceCount()
    return (count if int(err) == 0 else 0), ("" if int(err) == 0 else f" ({err})")


def _missing() -> list[str]:
    missing = []
    try:
        import tensorrt
    except ImportError:
        missing.append("tensorrt is not installed")
    else:
        problem = version_problem(tensorrt.__version__)
        if problem:
            missing.append(problem)
    try:
        import pycuda.driver  # noqa: F401 - the runner's memory and streams
    except ImportError:
        missing.append("pycuda is not installed")
    count, why = _cuda_devices()
    if count is None:
        missing.append("no CUDA binding to look for a device (pip install pycuda or cuda-python)")
    elif count == 0:
        missing.append(f"no CUDA device{why}")
    return missing


def available() -> tuple[bool, str]:
    missing = _missing()
    return (False, f"requires TensorRT and a CUDA device: {'; '.join(missing)}") if missing else (True, "")


def build_settings(profile: HardwareProfile, dtype: DType, input_shape: tuple[int, ...],
                   input_name: str = "input") -> dict[str, Any]:
    """Everything the engine build uses, as plain data (no TensorRT needed to compute or read it).

    Args:
        profile: Target; ``options.tensorrt`` gives workspace, DLA, batch range and optimization level.
        dtype: INT8 (explicitly quantized QDQ model), FP16 or FP32.
        input_shape: Per-sample input shape (C, H, W); the batch dim is dynamic.
        input_name: The ONNX input the optimization profile is for.
    """
    name = f"hardware_profiles/{profile.name}.yaml"
    if dtype not in DTYPES:
        raise EdgepipeError(f"{name}: backend tensorrt cannot compile {dtype.value} "
                            f"(supported: {', '.join(d.value for d in DTYPES)})")
    opts = profile.options.tensorrt
    if opts.opt_batch > opts.max_batch:
        raise EdgepipeError(f"{name}: options.tensorrt.opt_batch ({opts.opt_batch}) exceeds max_batch ({opts.max_batch})")
    # INT8: Q/DQ decide what runs int8; FP16 lets the layers left in float run in half precision.
    flags = {DType.INT8: ["INT8", "FP16"], DType.FP16: ["FP16"], DType.FP32: []}[dtype]
    if opts.use_dla_core is not None:
        if opts.use_dla_core >= opts.dla_cores:
            valid = f"0..{opts.dla_cores - 1}" if opts.dla_cores else "none: the device has no DLA; use null"
            raise EdgepipeError(f"{name}: options.tensorrt.use_dla_core is {opts.use_dla_core} but dla_cores is "
                                f"{opts.dla_cores} (valid: {valid})")
        if dtype is DType.FP32:
            raise EdgepipeError(f"{name}: DLA runs only fp16 and int8; compile fp16/int8 or set use_dla_core: null")
        flags.append("GPU_FALLBACK")
    per_sample = [int(d) for d in input_shape]
    batches = {"min": 1, "opt": opts.opt_batch, "max": opts.max_batch}
    if opts.use_dla_core is not None:
        # DLA engines have static shapes: min = opt = max (TensorRT "Working with DLA"); one batch size.
        batches = dict.fromkeys(batches, opts.opt_batch)
    return {
        "dtype": dtype.value,
        "workspace_bytes": opts.workspace_mb * 1024 * 1024,
        "flags": flags,
        "device_type": "DLA" if opts.use_dla_core is not None else "GPU",
        "dla_core": opts.use_dla_core,
        "input_name": input_name,
        "shapes": {k: [b, *per_sample] for k, b in batches.items()},
        "builder_optimization_level": opts.builder_optimization_level,
    }


def _qdq_problems(node: Any, values: dict[str, np.ndarray]) -> list[str]:
    from onnx import helper

    where = f"{node.op_type} '{node.name or node.output[0]}'"
    problems = []
    if len(node.input) < 3 or not node.input[2]:
        if node.op_type == "QuantizeLinear" or (node.input[0] in values and values[node.input[0]].dtype != np.int8):
            problems.append(f"{where}: no zero-point, which means uint8; TensorRT needs int8 with zero-point 0")
    elif node.input[2] not in values:
        problems.append(f"{where}: zero-point is not a constant; TensorRT needs a constant int8 zero-point 0")
    else:
        zp = values[node.input[2]]
        if zp.dtype != np.int8:
            problems.append(f"{where}: zero-point type is {zp.dtype} (TensorRT explicit quantization needs int8); "
                            "export with int8 activations, not uint8")
        if np.any(zp.astype(np.int64) != 0):
            problems.append(f"{where}: zero-point is {np.unique(zp).tolist()} (TensorRT needs 0: symmetric quantization)")
    scale = values.get(node.input[1])
    per_channel = scale is not None and scale.size > 1
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
    if per_channel and node.input[0] in values and axis != 0:
        problems.append(f"{where}: per-channel weight scales on axis {axis}; TensorRT expects axis 0 "
                        "(output channels) for Conv/Gemm weights")
    if per_channel and node.input[0] not in values and node.op_type == "QuantizeLinear":
        problems.append(f"{where}: per-channel activation quantization; TensorRT quantizes activations per-tensor")
    return problems


def check_onnx_for_tensorrt(onnx_path: Path | str) -> list[str]:
    """Static TensorRT compatibility check of an ONNX file (onnx only, no TensorRT needed).

    Returns:
        Problems, one line each (empty when the model is ready): opset, dynamic batch, Q/DQ
        zero-points and axes, and ops outside ``SUPPORTED_OPS``.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        problems.append(f"opset {opset} < {MIN_OPSET}: re-export with opset_version >= {MIN_OPSET}")
    initializers = {t.name for t in graph.initializer}
    for inp in (i for i in graph.input if i.name not in initializers):
        dims = inp.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            fixed = dims[0].dim_value if dims else "missing"
            problems.append(f"input '{inp.name}': batch dim is {fixed}, not dynamic; export with "
                            f"dynamic_axes={{'{inp.name}': {{0: 'batch'}}}}")
    from edgepipe.onnx_graph import constant_values

    values = constant_values(graph)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            domain = f"{node.domain}." if node.domain else ""
            problems.append(f"{node.op_type} '{node.name or node.output[0]}': op {domain}{node.op_type} is not in "
                            "edgepipe's list of TensorRT-supported ONNX ops for CNN classifiers")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.extend(_qdq_problems(node, values))
    return problems


def trtexec_command(settings: dict[str, Any], onnx: str = "model.onnx", engine: str = "engine/model.engine") -> str:
    """The ``trtexec`` line that builds the same engine as ``build_engine(settings)``: shapes, precision
    flags, workspace, DLA core, optimization level, with per-layer information exported beside it."""
    def dims(shape: list[int]) -> str:
        return f"{settings['input_name']}:{'x'.join(str(d) for d in shape)}"

    flags = {"INT8": "--int8", "FP16": "--fp16", "GPU_FALLBACK": "--allowGPUFallback"}
    parts = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}",
             *(f"--{k}Shapes={dims(settings['shapes'][k])}" for k in ("min", "opt", "max")),
             *(flags[f] for f in settings["flags"]),
             f"--memPoolSize=workspace:{settings['workspace_bytes'] // (1024 * 1024)}M",
             f"--builderOptimizationLevel={settings['builder_optimization_level']}"]
    if settings.get("dla_core") is not None:
        parts.append(f"--useDLACore={settings['dla_core']}")
    parts += ["--profilingVerbosity=detailed", f"--exportLayerInfo={Path(engine).parent / 'layers.json'}"]
    return " ".join(parts)


def build_command(profile: HardwareProfile) -> str:
    # The bundle's own profile.yaml travels with it, so a custom profile needs no install on the device.
    return ("edgepipe compile --onnx model.onnx --target profile.yaml --out engine/"
            " && edgepipe bench --artifact engine/ --target profile.yaml")


def build_engine(onnx_path: Path | str, settings: dict[str, Any], out_path: Path | str,
                 progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> Path:
    """Parse ``onnx_path``, build a serialized engine with ``settings`` and write it atomically.

    ``progress(task, done, total, values)`` is called before and after the (long) build.

    Raises:
        EdgepipeError: the parser reports errors (all are listed), or the build returns nothing.
    """
    import tensorrt as trt

    report = progress or (lambda task, done, total, values: None)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgepipeError(f"{onnx_path}: TensorRT's ONNX parser failed ({len(errors)} error(s)):\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_bytes"])
    for name in settings["flags"]:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:  # TensorRT 11 dropped the precision flags: the network's types decide
            log.warning("tensorrt %s has no BuilderFlag.%s; precision comes from the network's types",
                        trt.__version__, name)
            continue
        config.set_flag(flag)
    config.builder_optimization_level = settings["builder_optimization_level"]
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # lets the runner read layer precisions
    if settings["dla_core"] is not None:
        if settings["dla_core"] >= builder.num_DLA_cores:
            raise EdgepipeError(f"DLA core {settings['dla_core']} requested but this device has "
                                f"{builder.num_DLA_cores} DLA core(s); fix options.tensorrt.use_dla_core")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings["dla_core"]
    shapes = settings["shapes"]
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(settings["input_name"], shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt_profile)
    report("tensorrt: build engine", 0, 1, {})
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgepipeError(f"{onnx_path}: TensorRT could not build an engine with {settings}; "
                            "see the TensorRT log above (often: workspace too small or an unsupported layer)")
    report("tensorrt: build engine", 1, 1, {})
    return atomic_write(Path(out_path), lambda p: p.write_bytes(serialized))  # IHostMemory is a buffer


def _engine_precision(engine: Any) -> str | None:
    """Precision of the convolution/matmul layers, from the engine inspector (needs DETAILED verbosity)."""
    import tensorrt as trt

    try:
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except (RuntimeError, ValueError):
        return None
    seen = set()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict) or not re.search(r"Conv|Gemm|MatrixMultiply", str(layer.get("LayerType", ""))):
            continue
        formats = " ".join(str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []))
        for token, dtype in (("Int8", "int8"), ("INT8", "int8"), ("FP16", "fp16"), ("Half", "fp16"),
                             ("FP32", "fp32"), ("Float", "fp32")):
            if token in formats:
                seen.add(dtype)
                break
    for dtype in ("fp32", "fp16", "int8"):  # report the widest precision any compute layer runs in
        if dtype in seen:
            return dtype
    return None


class TrtRunner:
    """A TensorRT engine behind the Runner protocol (pycuda buffers, one CUDA stream)."""

    backend = "tensorrt"

    def __init__(self, engine_path: Path | str, threads: int | None = None, dtype: str | None = None) -> None:
        import pycuda.autoinit  # noqa: F401  (creates a CUDA context on device 0)
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda = cuda
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EdgepipeError(f"{engine_path}: TensorRT could not deserialize the engine (built with another "
                                f"TensorRT version or GPU?); rebuild it on this device")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._in_dtype = trt.nptype(self.engine.get_tensor_dtype(self.input_name))
        self._out_dtype = trt.nptype(self.engine.get_tensor_dtype(self.output_name))
        self._max_batch = self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0]
        self._buffers: dict[tuple[int, ...], tuple[Any, Any, Any, Any]] = {}
        self.device = f"cuda:0 {cuda.Device(0).name()}"
        self.dtype = _engine_precision(self.engine) or dtype or "unknown"
        self.threads = threads

    def _buffers_for(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any, Any]:
        if shape not in self._buffers:
            cuda = self._cuda
            self.context.set_input_shape(self.input_name, shape)
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            host_in = cuda.pagelocked_empty(shape, self._in_dtype)
            host_out = cuda.pagelocked_empty(out_shape, self._out_dtype)
            self._buffers[shape] = (host_in, cuda.mem_alloc(host_in.nbytes), host_out, cuda.mem_alloc(host_out.nbytes))
        return self._buffers[shape]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] > self._max_batch:
            raise EdgepipeError(f"batch {batch.shape[0]} exceeds the engine's max batch {self._max_batch}; "
                                "raise options.tensorrt.max_batch and rebuild")
        cuda = self._cuda
        host_in, dev_in, host_out, dev_out = self._buffers_for(tuple(batch.shape))
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        self.context.set_tensor_address(self.input_name, int(dev_in))
        self.context.set_tensor_address(self.output_name, int(dev_out))
        np.copyto(host_in, batch, casting="same_kind")
        cuda.memcpy_htod_async(dev_in, host_in, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise EdgepipeError("TensorRT execute_async_v3 failed; see the TensorRT log")
        cuda.memcpy_dtoh_async(host_out, dev_out, self.stream)
        self.stream.synchronize()
        return np.array(host_out, dtype=np.float32)


def _input_shape(onnx_path: Path) -> tuple[int, ...]:
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        raise EdgepipeError(f"{onnx_path}: input needs static C,H,W dims after the batch dim; re-export")
    return tuple(int(d.dim_value) for d in dims)


def _copy(src: Path, dst: Path) -> Path:
    return atomic_write(dst, lambda p: shutil.copyfile(src, p))


def _write_bundle(onnx_path: Path, profile: HardwareProfile, settings: dict[str, Any], out_dir: Path,
                  reason: str) -> str:
    import yaml

    command = build_command(profile)
    _copy(onnx_path, out_dir / BUNDLE_FILES["onnx"])
    atomic_write_text(out_dir / BUNDLE_FILES["profile"], yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
    trtexec = trtexec_command(settings, BUNDLE_FILES["onnx"])
    atomic_write_json(out_dir / BUNDLE_FILES["settings"], {"onnx": BUNDLE_FILES["onnx"], **settings, "trtexec": trtexec})
    steps = command.replace(" && ", "\n")
    atomic_write_text(out_dir / BUNDLE_FILES["readme"], f"""# TensorRT deploy bundle for `{profile.name}`

This folder holds no engine: a TensorRT engine is specific to the GPU and TensorRT version that built
it, and the host that made this bundle could not build one ({reason}).
Build it on the device ({profile.description or profile.name}):

```sh
{steps}
```

or run `sh build_engine.sh`. The engine is written to `engine/` and benchmarked there.

## Install on the device (JetPack 6.1 / 6.2)

JetPack 6.1 and 6.2 ship TensorRT 10.3 for the system Python 3.10 (apt package `python3-libnvinfer`);
edgepipe builds with the TensorRT 10 API (JetPack 6.0 ships TensorRT 8.6: flash 6.1 or later).

```sh
sudo apt install python3-libnvinfer python3-venv          # TensorRT's Python bindings, if not installed
python3 -m venv --system-site-packages ~/edgepipe-venv    # system site packages: the apt TensorRT
. ~/edgepipe-venv/bin/activate
pip install pycuda                                        # compiles on the device (needs the CUDA toolkit)
pip install edgepipe                                      # or: pip install /path/to/an/edgepipe/checkout
python3 -c "import tensorrt; print(tensorrt.__version__)" # 10.3.x
```

## The same engine with trtexec

```sh
mkdir -p engine && /usr/src/tensorrt/bin/{trtexec}
```

Same shapes (min/opt/max batch{" (static: DLA)" if settings.get("dla_core") is not None else ""}), precision flags,
workspace and optimization level as `build_settings.json`; `engine/layers.json` lists every layer and
the precision it runs in.

- `model.onnx`: the exported model ({settings['dtype']}), already checked for TensorRT compatibility.
- `profile.yaml`: the hardware profile `{profile.name}` used here; the commands above read it, so the
  engine is built with exactly these settings.
- `build_settings.json`: workspace, builder flags, DLA core and batch range (min/opt/max) of the build.
""")

    def write_script(p: Path) -> None:
        p.write_text(f"#!/bin/sh\n# Build and benchmark the TensorRT engine for {profile.name} on the device.\n"
                     f"set -e\ncd \"$(dirname \"$0\")\"\n{steps}\n")
        os.chmod(p, 0o755)

    atomic_write(out_dir / BUNDLE_FILES["script"], write_script)
    return command


def compile(onnx_path: Path, profile: HardwareProfile, dtype: DType, out_dir: Path,
            progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> tuple[Artifact, dict[str, Any]]:
    """Build a TensorRT engine when TensorRT and a CUDA device are here, else write a deploy bundle.

    Raises:
        EdgepipeError: the ONNX fails ``check_onnx_for_tensorrt`` (every problem is listed).
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    problems = check_onnx_for_tensorrt(onnx_path)
    if problems:
        raise EdgepipeError(f"{onnx_path}: not compatible with TensorRT ({len(problems)} problem(s)):\n  - "
                            + "\n  - ".join(problems))
    settings = build_settings(profile, dtype, _input_shape(onnx_path))
    records: dict[str, Any] = {"settings": settings, "onnx_check": "passed"}
    ok, reason = available()
    if ok:
        import tensorrt as trt

        build_engine(onnx_path, settings, out_dir / ENGINE_FILE, progress)
        _copy(onnx_path, out_dir / "model.onnx")
        records.update({"engine_built": True, "tensorrt_version": trt.__version__})
        artifact = Artifact(kind=ArtifactKind.TENSORRT_ENGINE, root=out_dir,
                            files={"engine": ENGINE_FILE, "onnx": "model.onnx"}, dtype=dtype,
                            quantized=dtype is DType.INT8, meta={"backend": "tensorrt", "target": profile.name,
                                                                 "settings": settings})
        return artifact, records
    command = _write_bundle(onnx_path, profile, settings, out_dir, reason)
    records.update({"engine_built": False, "reason": f"engine not built: {reason}", "build_command": command})
    log.warning("tensorrt: engine not built (%s); wrote a deploy bundle to %s", reason, out_dir)
    artifact = Artifact(kind=ArtifactKind.TENSORRT_BUNDLE, root=out_dir, files=dict(BUNDLE_FILES), dtype=dtype,
                        quantized=dtype is DType.INT8,
                        meta={"backend": "tensorrt", "target": profile.name, "engine_built": False,
                              "build_command": command, "reason": records["reason"]})
    return artifact, records


def load(artifact: Artifact, threads: int | None = None) -> TrtRunner:
    if artifact.kind is ArtifactKind.TENSORRT_BUNDLE:
        command = artifact.meta.get("build_command", "sh build_engine.sh")
        raise EdgepipeError(f"{artifact.root}: this TensorRT bundle holds no engine; build it on the device with: {command}")
    return TrtRunner(artifact.path("engine"), threads=threads, dtype=artifact.dtype.value)
