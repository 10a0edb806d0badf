"""The TensorRT plan, computable on any host: what the device-side build will do, and the deploy bundle.

Owns the host side of the TensorRT backend, none of which imports TensorRT or needs a GPU:
- ``check_onnx_for_tensorrt``: the ONNX a build consumes (opset, static C,H,W, supported ops, and the
  explicit-quantization rules: signed int8, zero-point 0, per-channel weights on axis 0);
- ``build_settings`` / ``trtexec_command``: workspace, precision flags, DLA core (static shapes), batch
  range and optimization level, as data and as the equivalent ``trtexec`` line;
- ``write_bundle`` / ``write_validation_set``: the folder a Jetson owner receives (ONNX, profile, settings,
  README, build script, validation images and the device script ``edgepipe_trt.py``).
The device code (build, run, time, evaluate; the TensorRT version rule) is
``edgepipe.backends.tensorrt_device``, copied into every bundle.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.backends.tensorrt_device import SUPPORTED_MAJOR, version_problem  # noqa: F401 - re-exported
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write, atomic_write_json, atomic_write_text
from edgepipe.profiles import HardwareProfile
from edgepipe.types import DType

DTYPES = (DType.INT8, DType.FP16, DType.FP32)
BUNDLE_FILES = {"onnx": "model.onnx", "profile": "profile.yaml", "settings": "build_settings.json",
                "readme": "README.md", "script": "build_engine.sh", "device_script": "edgepipe_trt.py"}
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
    # a detector's post-processing (edgepipe.models.detection_outputs): selection, NMS, padding to fixed outputs
    "GatherElements", "GatherND", "ScatterND", "ScatterElements", "NonMaxSuppression", "NonZero",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod",
    # a transformer's attention mask as transformers exports it (the padding mask built with IsNaN/Where)
    "IsNaN",
})
NMS_LAYER = ("INMSLayer", "add_nms")
"""How TensorRT runs ONNX ``NonMaxSuppression``: its ONNX parser builds an ``INMSLayer`` (``INetworkDefinition.add_nms``,
TensorRT 8.6 and later; per image and per class, as ONNX defines it), no plugin. The names are checked against the
TensorRT 10.3 bindings' (tests/fake_tensorrt/tensorrt_10_3_names.json)."""
NMS_TOPK_LIMIT = 2000
"""The most boxes per image TensorRT's NMS considers: 2000 on SM 5.3 and 6.2 devices (Jetson Nano, TX2), 5000 on the
others (TensorRT operator docs, "NMS", TopK box limit); the smaller bound, so a bundle builds on any Jetson."""


def build_settings(profile: HardwareProfile, dtype: DType, input_shape: tuple[int, ...],
                   input_name: str = "input", float_dtype: DType | None = None,
                   inputs: dict[str, tuple[int | str, ...]] | None = None,
                   dynamic_dims: dict[str, tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """Everything the engine build uses, as plain data (no TensorRT needed to compute or read it).

    Args:
        profile: Target; ``options.tensorrt`` gives workspace, DLA, batch range and optimization level.
        dtype: INT8 (explicitly quantized QDQ model), FP16 or FP32.
        input_shape: Per-sample input shape (C, H, W); the batch dim is dynamic.
        input_name: The ONNX input the optimization profile is for.
        float_dtype: For INT8, the precision of the layers left in float (``qat.fallback_dtype``): FP16 adds
            the FP16 flag (TensorRT may then run them in half precision), FP32 leaves it off. Default: the
            profile's best float dtype.
        inputs: Every input's per-sample shape (``onnx_inputs``) when the model has several or a dynamic axis
            after the batch (a text model's ``sequence``): each gets its own optimization-profile range in
            ``input_shapes``; ``input_name``/``shapes`` stay the first input's (``input_shape`` is then unused).
        dynamic_dims: The (min, opt, max) of each named dynamic axis (``Task.dynamic_dims``: a text model's
            sequence length, 1 to data.max_length); DLA engines take its opt size alone (static shapes).
    """
    name = f"hardware_profiles/{profile.name}.yaml"
    if dtype not in DTYPES:
        raise EdgepipeError(f"{name}: backend tensorrt cannot compile {dtype.value} "
                            f"(supported: {', '.join(d.value for d in DTYPES)})")
    opts = profile.options.tensorrt
    if opts.opt_batch > opts.max_batch:
        raise EdgepipeError(f"{name}: options.tensorrt.opt_batch ({opts.opt_batch}) exceeds max_batch ({opts.max_batch})")
    # INT8: Q/DQ decide what runs int8; FP16 lets the layers left in float run in half precision.
    fallback = float_dtype or profile.best_float
    if dtype is DType.INT8 and fallback not in (DType.FP16, DType.FP32):
        raise EdgepipeError(f"{name}: TensorRT runs float layers of an INT8 engine in fp16 or fp32, not "
                            f"{fallback.value}; set qat.fallback_dtype to fp16 or fp32")
    flags = {DType.INT8: ["INT8", "FP16"] if fallback is DType.FP16 else ["INT8"], DType.FP16: ["FP16"],
             DType.FP32: []}[dtype]
    if opts.use_dla_core is not None:
        if opts.use_dla_core >= opts.dla_cores:
            valid = f"0..{opts.dla_cores - 1}" if opts.dla_cores else "none: the device has no DLA; use null"
            raise EdgepipeError(f"{name}: options.tensorrt.use_dla_core is {opts.use_dla_core} but dla_cores is "
                                f"{opts.dla_cores} (valid: {valid})")
        if dtype is DType.FP32:
            raise EdgepipeError(f"{name}: DLA runs only fp16 and int8; compile fp16/int8 or set use_dla_core: null")
        flags.append("GPU_FALLBACK")
    batches = {"min": 1, "opt": opts.opt_batch, "max": opts.max_batch}
    if opts.use_dla_core is not None:
        # DLA engines have static shapes: min = opt = max (TensorRT "Working with DLA"); one batch size.
        batches = dict.fromkeys(batches, opts.opt_batch)
    ranges = _input_ranges(name, inputs or {input_name: tuple(input_shape)}, batches, dynamic_dims or {},
                           opts.use_dla_core is not None)
    input_name = next(iter(ranges))
    extra = {"input_shapes": ranges, "dynamic_dims": {k: list(v) for k, v in (dynamic_dims or {}).items()}} \
        if inputs is not None and (len(ranges) > 1 or dynamic_dims) else {}
    return {
        "dtype": dtype.value,
        "workspace_bytes": opts.workspace_mb * 1024 * 1024,
        "flags": flags,
        "device_type": "DLA" if opts.use_dla_core is not None else "GPU",
        "dla_core": opts.use_dla_core,
        "input_name": input_name,
        "shapes": ranges[input_name],
        "builder_optimization_level": opts.builder_optimization_level,
        **extra,
    }


def _input_ranges(profile_file: str, inputs: dict[str, tuple[int | str, ...]], batches: dict[str, int],
                  dynamic_dims: dict[str, tuple[int, int, int]], static: bool) -> dict[str, dict[str, list[int]]]:
    """Each input's min/opt/max shape: the batch range first, then its static sizes or its named axis's range."""
    out = {}
    for name, per_sample in inputs.items():
        shapes: dict[str, list[int]] = {k: [b] for k, b in batches.items()}
        for d in per_sample:
            if isinstance(d, str) or d is None:
                if d not in dynamic_dims:
                    raise EdgepipeError(f"{profile_file}: input '{name}' has a dynamic axis '{d}' after the batch and "
                                        "no range for it; the task gives one for each (text: the sequence length, "
                                        "from data.max_length)")
                lo, opt, hi = (int(v) for v in dynamic_dims[d])
                if not 1 <= lo <= opt <= hi:
                    raise EdgepipeError(f"{profile_file}: axis '{d}' range min {lo} / opt {opt} / max {hi} is not "
                                        "1 <= min <= opt <= max")
                sizes = dict.fromkeys(shapes, opt) if static else {"min": lo, "opt": opt, "max": hi}
            else:
                sizes = dict.fromkeys(shapes, int(d))
            for k in shapes:
                shapes[k].append(sizes[k])
        out[name] = shapes
    return out


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
    from edgepipe.export.onnx_graph import constant_values

    values = constant_values(graph)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            domain = f"{node.domain}." if node.domain else ""
            problems.append(f"{node.op_type} '{node.name or node.output[0]}': op {domain}{node.op_type} is not in "
                            "edgepipe's list of TensorRT-supported ONNX ops for CNN classifiers and detectors")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.extend(_qdq_problems(node, values))
        elif node.op_type == "NonMaxSuppression":
            problems.extend(_nms_problems(node, values, model))
    return problems


def _nms_problems(node: Any, values: dict[str, np.ndarray], model: Any) -> list[str]:
    """ONNX NonMaxSuppression as TensorRT's parser takes it: ``max_output_boxes_per_class``, ``iou_threshold`` and
    ``score_threshold`` constants (onnx-tensorrt docs/operators.md), corner boxes, and at most ``NMS_TOPK_LIMIT`` boxes
    per image (the boxes input's static dimension 1, read by shape inference)."""
    import onnx

    where = f"NonMaxSuppression '{node.name or node.output[0]}'"
    problems = [f"{where}: input {i} ({what}) is not a constant; TensorRT's NMS layer needs it at build time"
                for i, what in ((2, "max_output_boxes_per_class"), (3, "iou_threshold"), (4, "score_threshold"))
                if len(node.input) <= i or node.input[i] not in values]
    if next((a.i for a in node.attribute if a.name == "center_point_box"), 0) != 0:
        problems.append(f"{where}: center_point_box=1; edgepipe's detectors give corner boxes")
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except onnx.shape_inference.InferenceError:  # a malformed graph: its other problems are reported
        inferred = model.graph
    shapes = {v.name: v for v in (*inferred.input, *inferred.value_info)}
    dims = shapes[node.input[0]].type.tensor_type.shape.dim if node.input[0] in shapes else []
    if len(dims) == 3 and dims[1].HasField("dim_value") and dims[1].dim_value > NMS_TOPK_LIMIT:
        problems.append(f"{where}: {dims[1].dim_value} boxes per image, more than the {NMS_TOPK_LIMIT} TensorRT's NMS "
                        "considers on every Jetson; lower the detector's candidates")
    return problems


def trtexec_command(settings: dict[str, Any], onnx: str = "model.onnx", engine: str = "engine/model.engine") -> str:
    """The ``trtexec`` line that builds the same engine as ``build_engine(settings)``: shapes, precision
    flags, workspace, DLA core, optimization level, with per-layer information exported beside it."""
    ranges = settings.get("input_shapes") or {settings["input_name"]: settings["shapes"]}

    def dims(k: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[k])}" for name, shapes in ranges.items())

    flags = {"INT8": "--int8", "FP16": "--fp16", "GPU_FALLBACK": "--allowGPUFallback"}
    parts = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}",
             *(f"--{k}Shapes={dims(k)}" for k in ("min", "opt", "max")),
             *(flags[f] for f in settings["flags"]),
             f"--memPoolSize=workspace:{settings['workspace_bytes'] // (1024 * 1024)}M",
             f"--builderOptimizationLevel={settings['builder_optimization_level']}"]
    if settings.get("dla_core") is not None:
        parts.append(f"--useDLACore={settings['dla_core']}")
    parts += ["--profilingVerbosity=detailed", f"--exportLayerInfo={Path(engine).parent / 'layers.json'}"]
    return " ".join(parts)


DEVICE_SCRIPT = BUNDLE_FILES["device_script"]
VALIDATION_FILE = "val.npz"
VALIDATION_BYTES = 32 * 1024 * 1024  # keeps a bundle small enough to copy to a device: ~10k CIFAR or ~200 ImageNet images


def build_command(profile: HardwareProfile) -> str:
    """What the device owner runs inside the bundle: the self-contained device script (no torch, no edgepipe)."""
    return f"python3 {DEVICE_SCRIPT} run"


def onnx_input_name(onnx_path: Path) -> str:
    """The graph's first input (the task's input name: ``input`` for a classifier), which the profile shapes."""
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name


def onnx_inputs(onnx_path: Path) -> dict[str, tuple[int | str, ...]]:
    """Every graph input's per-sample shape: static sizes as ints, dynamic axes by their names."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {i.name: tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                          for d in i.type.tensor_type.shape.dim[1:]) for i in graph.input}


def onnx_input_shape(onnx_path: Path) -> tuple[int, ...]:
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        raise EdgepipeError(f"{onnx_path}: input needs static C,H,W dims after the batch dim; re-export")
    return tuple(int(d.dim_value) for d in dims)


def copy_file(src: Path, dst: Path) -> Path:
    return atomic_write(dst, lambda p: shutil.copyfile(src, p))


def validation_arrays(images: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray,
                      limit: int) -> dict[str, np.ndarray]:
    """The first images of the validation set as the bundle stores them: raw pixels (uint8 stays uint8)
    plus mean/std, at most ``limit`` images and ``VALIDATION_BYTES``; ``normalized`` gives the float input."""
    per_image = max(1, images[0].nbytes)
    n = max(1, min(limit, len(images), VALIDATION_BYTES // per_image))
    return {"images": np.ascontiguousarray(images[:n]), "labels": labels[:n].astype(np.int64),
            "mean": np.asarray(mean, np.float32), "std": np.asarray(std, np.float32)}


def detection_validation_arrays(images: np.ndarray, targets: list[dict[str, Any]], mean: np.ndarray, std: np.ndarray,
                                limit: int, class_names: list[str]) -> dict[str, np.ndarray]:
    """A detection set as the bundle stores it: the images as ``validation_arrays`` keeps them, and every ground-truth
    box flattened (``box_image``: its image, ``boxes`` x1 y1 x2 y2, ``box_labels``) with the class names, all plain
    arrays (the device loads the file with ``allow_pickle=False``)."""
    arrays = validation_arrays(images, np.zeros(len(images), np.int64), mean, std, limit)
    del arrays["labels"]
    kept = targets[:len(arrays["images"])]
    boxes = [np.asarray(t["boxes"], np.float32).reshape(-1, 4) for t in kept]
    return {**arrays, "box_image": np.concatenate([np.full(len(b), i, np.int64) for i, b in enumerate(boxes)]),
            "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
            "box_labels": np.concatenate([np.asarray(t["labels"], np.int64).reshape(-1) for t in kept]),
            "class_names": np.asarray(class_names, dtype=str)}


def detection_validation_targets(arrays: Any) -> list[dict[str, np.ndarray]]:
    """The ground truth of each image of a bundle's detection set (``detection_validation_arrays``)."""
    image = np.asarray(arrays["box_image"])
    return [{"boxes": np.asarray(arrays["boxes"])[image == i], "labels": np.asarray(arrays["box_labels"])[image == i]}
            for i in range(len(arrays["images"]))]


def write_validation_set(out_dir: Path, arrays: dict[str, np.ndarray]) -> Path:
    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: given a path, numpy would append ".npz" to the temporary name
            np.savez_compressed(f, **arrays)

    return atomic_write(out_dir / VALIDATION_FILE, write)


def write_bundle(onnx_path: Path, profile: HardwareProfile, settings: dict[str, Any], out_dir: Path,
                  reason: str) -> str:
    """The deploy bundle: ONNX, profile, build settings, the device script, README and build script.

    The validation set (``val.npz``) is added by the compile stage, which has the data
    (``write_validation_set``); without it the device run reports no top-1.
    """
    import yaml

    from edgepipe.backends import tensorrt_device

    command = build_command(profile)
    copy_file(onnx_path, out_dir / BUNDLE_FILES["onnx"])
    copy_file(Path(tensorrt_device.__file__), out_dir / DEVICE_SCRIPT)
    atomic_write_text(out_dir / BUNDLE_FILES["profile"], yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
    trtexec = trtexec_command(settings, BUNDLE_FILES["onnx"])
    atomic_write_json(out_dir / BUNDLE_FILES["settings"],
                      {"onnx": BUNDLE_FILES["onnx"], "target": profile.name, **settings, "trtexec": trtexec})
    dla = settings.get("dla_core") is not None
    shapes = settings["shapes"]
    atomic_write_text(out_dir / BUNDLE_FILES["readme"], f"""# TensorRT deploy bundle for `{profile.name}`

This folder holds no engine: a TensorRT engine is specific to the GPU and TensorRT version that built
it, and the host that made this bundle could not build one ({reason}).
Build, time and evaluate it on the device ({profile.description or profile.name}):

```sh
{command}
```

(or `sh build_engine.sh`). It builds `engine/model.engine` with the settings in `build_settings.json`,
times it (batch-1 latency p50/p90/p99 from CUDA events around `execute_async_v3`, throughput at batch
{shapes['opt'][0]}), lists every layer's precision from the engine inspector, measures top-1 on `val.npz`
and writes `results.json`. Bring that file back to the machine that made this bundle:

```sh
edgepipe import-results --run RUN_FOLDER results.json
```

and `report.md` shows the measured device figures beside the estimates. `python3 {DEVICE_SCRIPT} check`
says what is missing; `build` and `bench` run the two halves; `--help` lists the options.

## Install on the device (JetPack 6.1 / 6.2)

`{DEVICE_SCRIPT}` needs TensorRT 10, numpy and a CUDA binding, nothing else (no torch, no edgepipe).
JetPack 6.1 and 6.2 ship TensorRT 10.3 for the system Python 3.10 (apt package `python3-libnvinfer`);
JetPack 6.0 ships TensorRT 8.6, which this bundle does not support: flash 6.1 or later.

```sh
sudo apt install python3-libnvinfer python3-venv          # TensorRT's Python bindings, if not installed
python3 -m venv --system-site-packages ~/trt-venv         # system site packages: the apt TensorRT
. ~/trt-venv/bin/activate
pip install numpy 'cuda-python>=12,<13'                   # aarch64 wheels; or: pip install pycuda (compiles)
python3 -c "import tensorrt; print(tensorrt.__version__)" # 10.3.x
```

## The same engine with trtexec

```sh
mkdir -p engine && /usr/src/tensorrt/bin/{trtexec}
```

Same shapes (min/opt/max batch {shapes['min'][0]}/{shapes['opt'][0]}/{shapes['max'][0]}{": static, as DLA requires" if dla else ""}),
precision flags, workspace and optimization level as `build_settings.json`; `engine/layers.json` lists
every layer and the precision it runs in.

## Files

- `model.onnx`: the exported model ({settings['dtype']}), already checked for TensorRT compatibility.
- `{DEVICE_SCRIPT}`: the device code (edgepipe's `edgepipe/backends/tensorrt_device.py`, copied verbatim).
- `build_settings.json`: workspace, builder flags, DLA core and batch range (min/opt/max) of the build.
- `val.npz`: the first validation images of the run (raw pixels, mean and std), for top-1 on the device.
- `profile.yaml`: the hardware profile `{profile.name}` the settings came from.
""")

    def write_script(p: Path) -> None:
        p.write_text(f"#!/bin/sh\n# Build, time and evaluate the TensorRT engine for {profile.name} on the device.\n"
                     f"set -e\ncd \"$(dirname \"$0\")\"\n{command}\n")
        os.chmod(p, 0o755)

    atomic_write(out_dir / BUNDLE_FILES["script"], write_script)
    return command
