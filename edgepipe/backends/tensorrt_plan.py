"""The TensorRT plan, computable on any host: what the device-side build will do, and the deploy bundle.

Owns the host side of the TensorRT backend, none of which imports TensorRT or needs a GPU:
- ``check_onnx_for_tensorrt``: the ONNX a build consumes (opset, static C,H,W, supported ops, and the
  explicit-quantization rules: signed int8, zero-point 0, per-channel weights on axis 0);
- ``build_settings`` / ``trtexec_command``: workspace, precision flags, DLA core (static shapes), batch
  range and optimization level, as data and as the equivalent ``trtexec`` line;
- ``version_problem``: the TensorRT versions the device code supports, and the JetPack release to use;
- ``write_bundle``: the folder a Jetson owner receives (ONNX, profile, settings, README, build script).
The GPU-only build and run code is ``edgepipe.backends.tensorrt``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write, atomic_write_json, atomic_write_text
from edgepipe.profiles import HardwareProfile
from edgepipe.types import DType

DTYPES = (DType.INT8, DType.FP16, DType.FP32)
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


def onnx_input_shape(onnx_path: Path) -> tuple[int, ...]:
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        raise EdgepipeError(f"{onnx_path}: input needs static C,H,W dims after the batch dim; re-export")
    return tuple(int(d.dim_value) for d in dims)


def copy_file(src: Path, dst: Path) -> Path:
    return atomic_write(dst, lambda p: shutil.copyfile(src, p))


def write_bundle(onnx_path: Path, profile: HardwareProfile, settings: dict[str, Any], out_dir: Path,
                  reason: str) -> str:
    import yaml

    command = build_command(profile)
    copy_file(onnx_path, out_dir / BUNDLE_FILES["onnx"])
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
