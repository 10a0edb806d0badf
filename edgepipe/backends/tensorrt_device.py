"""Build, time and evaluate a TensorRT engine on the device: TensorRT, numpy and a CUDA binding, nothing else.

This file is the device half of the TensorRT backend. It is copied verbatim into every deploy bundle as
``edgepipe_trt.py`` and runs there as a script, so a Jetson needs only what JetPack's TensorRT needs:

    python3 edgepipe_trt.py run        # build engine/model.engine, time it, evaluate it -> results.json

It imports only the standard library and numpy at module level; ``tensorrt`` and the CUDA binding
(NVIDIA's ``cuda-python``, which has aarch64 wheels, or ``pycuda``, which compiles on the device) are
imported inside functions. It never imports torch, torchvision, openvino, matplotlib or any other edgepipe
module (``tests/backends/test_tensorrt_device.py`` checks this), which is why it repeats nothing from them
but the few lines it needs. ``edgepipe.backends.tensorrt`` uses the same functions on a CUDA host. It is one file
over 500 lines because a bundle ships it alone: building, timing and evaluating must all be in the one script.

Results JSON (``SCHEMA``): ``tensorrt_version``, ``jetpack`` (L4T release and the nvidia-jetpack package
version when the device has them), ``device``, ``settings`` (the bundle's build settings), ``engine``
(file, size, build time, its ONNX's sha256), ``latency`` (batch 1: p50/p90/p99/mean of GPU time between
CUDA events around ``execute_async_v3``, plus end-to-end time with host copies, and ``inputs``: each input's
dtype and shape), ``throughput`` (images/s at the profile's optimal batch), ``layers`` (name, type and precision
of every engine layer, from the engine inspector) and ``precision_counts``, ``accuracy`` (a classifier: top-1 on the
bundle's ``val.npz``, read from the output named ``logits``; a detector: its detections on those images, from its
``boxes``/``scores``/``labels``/``count`` outputs, scored by mAP on the host at import; a text classifier: accuracy
on the bundle's token ids, each batch cut to its longest sentence), ``latency_by_sequence`` (a text model: batch-1
latency at sequence 32 and 128 where its profile allows, every token attended), ``created``.

TensorRT API used (TensorRT 10; JetPack 6.1/6.2 ship 10.3): Builder/IBuilderConfig/OnnxParser/Runtime/
IExecutionContext (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), IEngineInspector; every
I/O tensor by name (``num_io_tensors``, ``get_tensor_name``/``mode``/``dtype``/``profile_shape``), so an engine
with several named inputs and outputs of their own dtypes runs as one with a single input and output;
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html. The cuda-python calls
follow NVIDIA/TensorRT's ``samples/python/common_runtime.py`` (cudart.cudaMalloc/cudaMemcpyAsync/
cudaStreamCreate); the events are cudart.cudaEventCreate/Record/ElapsedTime.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

SCHEMA = "edgepipe.tensorrt-device-results/1"
SUPPORTED_MAJOR = 10
"""The TensorRT API this code uses (JetPack 6.1/6.2 ship TensorRT 10.3; JetPack 6.0 ships 8.6)."""
ENGINE_FILE = "model.engine"
INSTALL_HINT = ("on JetPack 6.1/6.2: sudo apt install python3-libnvinfer, a venv made with "
                "--system-site-packages, pip install cuda-python (see README.md)")


class DeviceError(Exception):
    """A problem the device owner can fix; the script prints it as one line and exits 2."""


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


# ---------------------------------------------------------------------------------------------- CUDA
class _CudaPython:
    """NVIDIA's cuda-python runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""

    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def _call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise DeviceError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)

    def device_count(self) -> int:
        err, count = self.rt.cudaGetDeviceCount()
        return int(count) if int(err) == 0 else 0

    def device_name(self) -> str:
        props = self._call(self.rt.cudaGetDeviceProperties(0))
        name = props.name
        return (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip()

    def versions(self) -> dict[str, int]:
        return {"cuda_driver": int(self._call(self.rt.cudaDriverGetVersion())),
                "cuda_runtime": int(self._call(self.rt.cudaRuntimeGetVersion()))}

    def stream(self) -> Any:
        return self._call(self.rt.cudaStreamCreate())

    def handle(self, stream: Any) -> int:
        return int(stream)

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr))

    def host_array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def htod(self, dev: int, host: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes, kind, stream))

    def dtoh(self, host: np.ndarray, dev: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes, kind, stream))

    def sync(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream))

    def event(self) -> Any:
        return self._call(self.rt.cudaEventCreate())

    def record(self, event: Any, stream: Any) -> None:
        self._call(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._call(self.rt.cudaEventSynchronize(end))
        return float(self._call(self.rt.cudaEventElapsedTime(start, end)))


class _PyCuda:
    """pycuda (built from source on the device); buffers are page-locked as its async copies require."""

    name = "pycuda"

    def __init__(self, cuda: Any) -> None:
        cuda.init()
        self.cuda, self._context = cuda, None

    def device_count(self) -> int:
        return int(self.cuda.Device.count())

    def _ensure_context(self) -> None:
        if self._context is None:
            self._context = self.cuda.Device(0).make_context()
            import atexit

            atexit.register(self._context.pop)

    def device_name(self) -> str:
        return str(self.cuda.Device(0).name())

    def versions(self) -> dict[str, int]:
        return {"cuda_driver": int(self.cuda.get_driver_version())}

    def stream(self) -> Any:
        self._ensure_context()
        return self.cuda.Stream()

    def handle(self, stream: Any) -> int:
        return int(stream.handle)

    def malloc(self, nbytes: int) -> Any:
        self._ensure_context()
        return self.cuda.mem_alloc(nbytes)

    def free(self, ptr: Any) -> None:
        ptr.free()

    def host_array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return self.cuda.pagelocked_empty(shape, dtype)

    def htod(self, dev: Any, host: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(dev, host, stream)

    def dtoh(self, host: np.ndarray, dev: Any, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(host, dev, stream)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def event(self) -> Any:
        return self.cuda.Event()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(end.time_since(start))


def cuda_binding() -> _CudaPython | _PyCuda | None:
    """cuda-python if installed (preferred: aarch64 wheels), else pycuda, else None."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            cudart = None
    if cudart is not None:
        return _CudaPython(cudart)
    try:
        import pycuda.driver as cuda
    except ImportError:
        return None
    return _PyCuda(cuda)


def missing() -> list[str]:
    """What keeps this machine from building and running an engine (empty: nothing)."""
    problems = []
    try:
        import tensorrt
    except ImportError:
        problems.append("tensorrt is not installed")
    else:
        problem = version_problem(tensorrt.__version__)
        if problem:
            problems.append(problem)
    try:
        binding = cuda_binding()
    except Exception as e:  # noqa: BLE001 - pycuda's init raises its own error types without a driver
        problems.append(f"no CUDA device ({e})")
        return problems
    if binding is None:
        problems.append("no CUDA binding (pip install cuda-python, or pycuda)")
    else:
        try:
            count = binding.device_count()
        except Exception as e:  # noqa: BLE001 - a binding without a driver raises its own error types
            problems.append(f"no CUDA device ({e})")
        else:
            if count == 0:
                problems.append("no CUDA device")
    return problems


def require() -> None:
    """Raise DeviceError naming everything missing, with the install hint."""
    problems = missing()
    if problems:
        raise DeviceError(f"no TensorRT engine can be built or run on this machine: {'; '.join(problems)} "
                          f"({INSTALL_HINT})")


# --------------------------------------------------------------------------------------------- build
def sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes | memoryview) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _atomic_write_json(path: Path, obj: Any) -> Path:
    return _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def build_engine(onnx_path: Path | str, settings: dict[str, Any], out_path: Path | str,
                 progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> Path:
    """Parse ``onnx_path``, build a serialized engine with ``settings`` (``build_settings.json``), write it.

    Raises:
        DeviceError: the parser reports errors (all are listed), the DLA core is absent, or the build fails.
    """
    import tensorrt as trt

    report = progress or (lambda task, done, total, values: None)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DeviceError(f"{onnx_path}: TensorRT's ONNX parser failed ({len(errors)} error(s)): " + " | ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings["workspace_bytes"]))
    for name in settings["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))  # TensorRT 10 has every flag build_settings writes
    config.builder_optimization_level = int(settings["builder_optimization_level"])
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # lets the inspector report layer precisions
    if settings.get("dla_core") is not None:
        if settings["dla_core"] >= builder.num_DLA_cores:
            raise DeviceError(f"DLA core {settings['dla_core']} requested but this device has "
                              f"{builder.num_DLA_cores} DLA core(s); fix options.tensorrt.use_dla_core in the profile")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(settings["dla_core"])
    # ``input_shapes`` ({name: {min, opt, max}}) gives a profile to every input of a model with several; else the
    # one input ``input_name`` has ``shapes``.
    profile = builder.create_optimization_profile()
    for name, shapes in (settings.get("input_shapes") or {settings["input_name"]: settings["shapes"]}).items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    report("tensorrt: build engine", 0, 1, {})
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeviceError(f"{onnx_path}: TensorRT could not build an engine (settings: {json.dumps(settings)}); "
                          "see the TensorRT log above (often: workspace too small or an unsupported layer)")
    report("tensorrt: build engine", 1, 1, {})
    return _atomic_write_bytes(Path(out_path), memoryview(serialized))


# ----------------------------------------------------------------------------------------------- run
def engine_layers(engine: Any) -> list[dict[str, str]]:
    """Every engine layer with its type and precision, from the engine inspector (needs DETAILED verbosity)."""
    import tensorrt as trt

    try:
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except (RuntimeError, ValueError, TypeError):
        return []
    layers = []
    for layer in info.get("Layers", []) if isinstance(info, dict) else []:
        if isinstance(layer, str):  # without DETAILED verbosity the inspector lists names only
            layers.append({"name": layer, "type": "", "precision": "unknown"})
            continue
        tensors = [*layer.get("Inputs", []), *layer.get("Outputs", [])]
        formats = " ".join(str(t.get("Format/Datatype", "")) for t in tensors if isinstance(t, dict))
        layers.append({"name": str(layer.get("Name", "")), "type": str(layer.get("LayerType", "")),
                       "precision": _precision_of(formats)})
    return layers


def _precision_of(formats: str) -> str:
    for token, dtype in (("Int8", "int8"), ("INT8", "int8"), ("FP8", "fp8"), ("FP16", "fp16"), ("Half", "fp16"),
                         ("BF16", "bf16"), ("FP32", "fp32"), ("Float", "fp32")):
        if token in formats:
            return dtype
    return "unknown"


def compute_precision(layers: list[dict[str, str]]) -> str | None:
    """The widest precision any convolution/matmul layer runs in (what the engine's speed depends on)."""
    seen = {lay["precision"] for lay in layers if re.search(r"Conv|Gemm|MatrixMultiply|MatMul", lay["type"])}
    return next((d for d in ("fp32", "fp16", "bf16", "int8") if d in seen), None)


Shapes = dict[str, tuple[int, ...]]
Buffers = tuple[dict[str, np.ndarray], dict[str, Any]]
"""Host arrays and device allocations of every I/O tensor, by name, for one set of input shapes."""


def describe_inputs(feeds: Mapping[str, np.ndarray]) -> dict[str, str]:
    """``{"input": "float32[8,3,224,224]"}``: what a timing was measured on (as edgepipe's runner records it)."""
    return {name: f"{a.dtype}[{','.join(str(d) for d in a.shape)}]" for name, a in feeds.items()}


class Engine:
    """A deserialized engine with one execution context, one CUDA stream, and host and device buffers for every
    I/O tensor per set of input shapes. Tensors are addressed by name, in the engine's order: any number of inputs
    and outputs, each in its own dtype (float32/float16, int64/int32, bool...)."""

    def __init__(self, engine_path: Path | str) -> None:
        import tensorrt as trt

        require()
        self.cuda = cuda_binding()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise DeviceError(f"{engine_path}: TensorRT could not deserialize the engine (built with another TensorRT "
                              "version or GPU?); rebuild it on this device")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input_names = tuple(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        if not self.input_names or not self.output_names:
            raise DeviceError(f"{engine_path}: the engine has inputs {list(self.input_names)} and outputs "
                              f"{list(self.output_names)}; it needs at least one of each")
        self.dtypes: dict[str, np.dtype] = {}
        for name in names:
            try:
                self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            except TypeError:
                dtype = self.engine.get_tensor_dtype(name)
                raise DeviceError(f"{engine_path}: tensor '{name}' is {dtype}, which numpy cannot hold; "
                                  " export the model with float32/float16/integer/bool inputs and "
                                  "outputs") from None
        self.profiles = {n: self._profile(n) for n in self.input_names}
        """Each input's (min, opt, max) shape in optimization profile 0."""
        first = self.profiles[self.input_names[0]]
        self.min_batch, self.max_batch = first[0][0], first[2][0]
        self._buffers: dict[tuple[tuple[int, ...], ...], Buffers] = {}
        self._bound: Buffers | None = None

    def _profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        shapes = [tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, 0)]
        if len(shapes) != 3:  # an input no profile names: its static shape
            static = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            if any(d < 0 for d in static):
                raise DeviceError(f"input '{name}' has dynamic shape {list(static)} but no optimization profile; "
                                  "rebuild the engine")
            shapes = [static] * 3
        return shapes[0], shapes[1], shapes[2]

    def _inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DeviceError(f"no value for input(s) {missing}; the engine's inputs are {list(self.input_names)}")
        return {n: np.asarray(feeds[n]) for n in self.input_names}

    def _padded(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch below a static (DLA) engine's size, padded with zeros to it."""
        out = {}
        for name, a in arrays.items():
            lo = self.profiles[name][0][0]
            out[name] = np.concatenate([a, np.zeros((lo - len(a), *a.shape[1:]), a.dtype)]) if 0 < len(a) < lo else a
        return out

    def _bind(self, shapes: Shapes) -> Buffers:
        """Set the input shapes and every I/O address on the context (once per change of shapes); the buffers."""
        for name, shape in shapes.items():
            lo, _opt, hi = self.profiles[name]
            if not shape or not lo[0] <= shape[0] <= hi[0]:
                raise DeviceError(f"batch {shape[0] if shape else '?'} of input '{name}' is outside the engine's batch "
                                  f"range {lo[0]}..{hi[0]} (options.tensorrt.opt_batch/max_batch in the profile; a DLA "
                                  "engine has one batch size)")
        key = tuple(shapes[n] for n in self.input_names)
        buffers = self._buffers.get(key)
        if buffers is not None and buffers is self._bound:
            return buffers
        for name in self.input_names:
            if not self.context.set_input_shape(name, shapes[name]):
                lo, _opt, hi = self.profiles[name]
                raise DeviceError(f"input '{name}': shape {list(shapes[name])} is outside the engine's optimization "
                                  f"profile {list(lo)}..{list(hi)}")
        if buffers is None:
            buffers = self._buffers[key] = self._allocate(shapes)
        for name, ptr in buffers[1].items():
            self.context.set_tensor_address(name, int(ptr))
        self._bound = buffers
        return buffers

    def _allocate(self, shapes: Shapes) -> Buffers:
        out_shapes = {n: tuple(int(d) for d in self.context.get_tensor_shape(n)) for n in self.output_names}
        unknown = {n: list(s) for n, s in out_shapes.items() if any(d < 0 for d in s)}
        if unknown:
            raise DeviceError(f"outputs {unknown} have data-dependent sizes, which this script cannot allocate; "
                              "export the model with outputs of fixed size (padded detections, say)")
        host = {n: self.cuda.host_array(s, self.dtypes[n]) for n, s in {**shapes, **out_shapes}.items()}
        return host, {n: self.cuda.malloc(max(1, a.nbytes)) for n, a in host.items()}

    def _fill(self, host: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
        for name, a in arrays.items():
            try:
                np.copyto(host[name], a, casting="same_kind")
            except TypeError:
                raise DeviceError(f"input '{name}' is {a.dtype}; the engine takes {self.dtypes[name]}") from None

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise DeviceError("TensorRT execute_async_v3 failed; see the TensorRT log")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output, by name, for named inputs (host copies included); a batch below a static engine's size is
        padded, and outputs that carry the padded batch are cut back to the batch given."""
        arrays = self._inputs(feeds)
        n = len(arrays[self.input_names[0]])
        arrays = self._padded(arrays)
        padded = len(arrays[self.input_names[0]])
        host, dev = self._bind({k: a.shape for k, a in arrays.items()})
        self._fill(host, arrays)
        for name in self.input_names:
            self.cuda.htod(dev[name], host[name], self.stream)
        self._execute()
        for name in self.output_names:
            self.cuda.dtoh(host[name], dev[name], self.stream)
        self.cuda.sync(self.stream)
        return {name: np.array(host[name][:n] if padded != n and len(host[name]) == padded else host[name])
                for name in self.output_names}

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], None]:
        """A call that runs the engine on ``feeds`` copied to the device once, and waits for it; outputs stay on the
        device. The inputs live in the buffers of their shapes: a ``run`` on the same shapes in between replaces
        them (the call still times the same work)."""
        arrays = self._padded(self._inputs(feeds))
        shapes = {k: a.shape for k, a in arrays.items()}
        host, dev = self._bind(shapes)
        self._fill(host, arrays)
        for name in self.input_names:
            self.cuda.htod(dev[name], host[name], self.stream)
        self.cuda.sync(self.stream)

        def call() -> None:
            self._bind(shapes)  # a no-op unless a run on other shapes came in between
            self._execute()
            self.cuda.sync(self.stream)

        return call

    def example_feeds(self, batch: int, seed: int = 0, sequence: int | None = None) -> dict[str, np.ndarray]:
        """Timing inputs for a model known only by its engine, as edgepipe's ``example_feeds``: the batch first,
        every other axis at its profile's opt size (a text model's sequence at ``sequence`` when given); float
        inputs standard normal from ``seed`` (in input order), integer and bool inputs zeros (a valid token id, class
        or index), except a text model's: ``input_ids`` random ids past BERT's special tokens and
        ``attention_mask`` ones (every token attended, as edgepipe's text task times on the host)."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for name in self.input_names:
            rest = list(self.profiles[name][1][1:])
            if sequence is not None and name in TEXT_INPUTS and rest:
                rest[0] = sequence
            shape, dtype = (batch, *rest), self.dtypes[name]
            if dtype.kind == "f":
                feeds[name] = rng.standard_normal(shape).astype(dtype)
            elif name == "input_ids":  # its own generator: the float inputs' draws stay those of ``seed``
                feeds[name] = np.random.default_rng(seed + 1).integers(5, 30, shape).astype(dtype)
            elif name == "attention_mask":
                feeds[name] = np.ones(shape, dtype)
            else:
                feeds[name] = np.zeros(shape, dtype)
        return feeds

    def time(self, batch: int, warmup: int, iterations: int, progress: Callable[[int, int], None] | None = None,
             feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """GPU time of ``execute_async_v3`` between CUDA events, and end-to-end time with host copies of every input
        and output, on ``feeds`` (default ``example_feeds(batch)``; their first input's batch must be ``batch``)."""
        arrays = self._inputs(feeds) if feeds is not None else self.example_feeds(batch)
        if len(arrays[self.input_names[0]]) != batch:
            raise DeviceError(f"timing feeds have batch {len(arrays[self.input_names[0]])}, not {batch}")
        host, dev = self._bind({k: a.shape for k, a in arrays.items()})
        self._fill(host, arrays)
        start, end = self.cuda.event(), self.cuda.event()
        gpu, e2e = [], []
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            for name in self.input_names:
                self.cuda.htod(dev[name], host[name], self.stream)
            self.cuda.record(start, self.stream)
            self._execute()
            self.cuda.record(end, self.stream)
            for name in self.output_names:
                self.cuda.dtoh(host[name], dev[name], self.stream)
            self.cuda.sync(self.stream)
            if i >= warmup:
                e2e.append((time.perf_counter() - t0) * 1e3)
                gpu.append(self.cuda.elapsed_ms(start, end))
            if progress and (i + 1) % 50 == 0:
                progress(i + 1, warmup + iterations)
        g, e = np.array(gpu), np.array(e2e)
        return {"batch": batch, "warmup": warmup, "iterations": iterations,
                "timer": "CUDA events around execute_async_v3",
                "p50_ms": float(np.percentile(g, 50)), "p90_ms": float(np.percentile(g, 90)),
                "p99_ms": float(np.percentile(g, 99)), "mean_ms": float(g.mean()),
                "end_to_end_p50_ms": float(np.percentile(e, 50)),
                "images_per_s": float(batch * 1e3 / np.percentile(g, 50)), "inputs": describe_inputs(arrays)}


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""A text classifier's inputs (edgepipe's text task): token ids, int [N, sequence]."""


def validation_inputs(val: Any) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray]:
    """The bundle's ``val.npz`` as model input: raw pixels normalized exactly as edgepipe's data pipeline does
    (uint8 / 255, then (x - mean) / std per channel, in float32), and the labels; a text set's token ids as they
    are (``input_ids``, ``attention_mask`` and ``token_type_ids`` when present, padded to the data's max_length)."""
    if "input_ids" in val:
        x = {k: np.asarray(val[k]) for k in TEXT_INPUTS if k in val}
        labels = np.asarray(val["labels"]).astype(np.int64)
        if x["input_ids"].ndim != 2 or len(labels) != len(x["input_ids"]) or len(labels) == 0:
            raise DeviceError(f"expected token ids (N, sequence) with N > 0 and as many labels, got "
                              f"{x['input_ids'].shape} and {labels.shape}")
        return x, labels
    images = val["images"]
    labels = val["labels"] if "labels" in val else None  # a detector's set holds boxes instead (box_image...)
    if images.ndim != 4 or len(images) == 0 or (labels is not None and len(images) != len(labels)):
        raise DeviceError(f"expected images (N,C,H,W) with N > 0 and as many labels, got {images.shape} and "
                          f"{None if labels is None else labels.shape}")
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x = x / np.float32(255.0)
    mean, std = (val[k].astype(np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    return (x - mean) / std, None if labels is None else labels.astype(np.int64)


def evaluate(engine: Engine, val_path: Path | str, batch: int) -> dict[str, Any]:
    """Top-1 of the engine on the bundle's validation set: the images go to its one input, the classes are read
    from its output named ``logits`` (else its first output)."""
    if len(engine.input_names) != 1 and not set(engine.input_names) <= set(TEXT_INPUTS):
        raise DeviceError(f"the bundle's val.npz holds images for one input; the engine takes "
                          f"{list(engine.input_names)}")
    try:
        with np.load(val_path, allow_pickle=False) as val:  # a bundle is data: never unpickle from it
            x, y = validation_inputs(val)
            detection = "box_image" in val
    except (KeyError, ValueError, OSError) as e:
        raise DeviceError(f"{val_path}: not a validation set written by edgepipe ({e}); copy the bundle again") from None
    if detection:
        return detections(engine, x, batch, Path(val_path).name)
    if isinstance(x, dict):
        return sentences(engine, x, y, batch, Path(val_path).name)
    if len(engine.input_names) != 1:
        raise DeviceError(f"the bundle's val.npz holds images; the engine takes {list(engine.input_names)}")
    name = engine.input_names[0]
    output = "logits" if "logits" in engine.output_names else engine.output_names[0]
    correct = 0
    for i in range(0, len(x), batch):
        logits = engine.run({name: x[i:i + batch]})[output]
        correct += int((logits.argmax(axis=1) == y[i:i + batch]).sum())
    return {"top1": correct / len(x), "images": int(len(x)), "source": Path(val_path).name, "batch": batch}


def sentences(engine: Engine, x: dict[str, np.ndarray], y: np.ndarray, batch: int, source: str) -> dict[str, Any]:
    """Accuracy of a text classifier on the bundle's token ids: each batch cut to its longest sentence (the dynamic
    padding edgepipe trains and measures with), each input cast to the engine's dtype, classes from ``logits``."""
    missing = [n for n in engine.input_names if n not in x]
    if missing:
        raise DeviceError(f"the engine takes {list(engine.input_names)} but the bundle's val.npz holds "
                          f"{sorted(x)}; rebuild the bundle")
    output = "logits" if "logits" in engine.output_names else engine.output_names[0]
    correct = 0
    for i in range(0, len(y), batch):
        mask = x["attention_mask"][i:i + batch] if "attention_mask" in x else None
        length = int(mask.sum(axis=1).max()) if mask is not None else x["input_ids"].shape[1]
        feeds = {n: x[n][i:i + batch, :max(1, length)].astype(engine.dtypes[n]) for n in engine.input_names}
        logits = engine.run(feeds)[output]
        correct += int((logits.argmax(axis=1) == y[i:i + batch]).sum())
    return {"top1": correct / len(y), "sentences": int(len(y)), "source": source, "batch": batch,
            "padding": "each batch cut to its longest sentence"}


DETECTION_OUTPUTS = ("boxes", "scores", "labels", "count")


def detections(engine: Engine, x: np.ndarray, batch: int, source: str) -> dict[str, Any]:
    """A detector's detections on the bundle's images, each image's first ``count`` as the engine returns them
    (boxes rounded to 0.01 pixel). mAP is computed from them on the host at import (``edgepipe import-results``,
    pycocotools, the code that scores every stage), so the device needs no COCO tooling and the figures compare."""
    missing = [n for n in DETECTION_OUTPUTS if n not in engine.output_names]
    if missing:
        raise DeviceError(f"the bundle's val.npz holds a detection set, but the engine has no output(s) "
                          f"{', '.join(missing)} (it returns {list(engine.output_names)})")
    name = engine.input_names[0]
    found: dict[str, list[Any]] = {"boxes": [], "scores": [], "labels": []}
    for i in range(0, len(x), batch):
        out = engine.run({name: x[i:i + batch]})
        for j, c in enumerate(np.asarray(out["count"]).astype(np.int64).reshape(-1)):
            found["boxes"].append(np.round(out["boxes"][j, :c].astype(np.float64), 2).tolist())
            found["scores"].append(out["scores"][j, :c].astype(np.float64).tolist())
            found["labels"].append(out["labels"][j, :c].astype(np.int64).tolist())
    return {"detections": found, "images": int(len(x)), "source": source, "batch": batch,
            "metric": "map50: computed on the host from these detections by edgepipe import-results"}


def device_facts(binding: Any) -> dict[str, Any]:
    """TensorRT, CUDA, L4T/JetPack versions and the GPU name, from what the device reports."""
    import tensorrt as trt

    facts: dict[str, Any] = {"tensorrt_version": trt.__version__, "cuda_binding": binding.name,
                             "python": platform.python_version(), "machine": platform.machine()}
    try:
        facts["gpu"] = binding.device_name()
        facts.update(binding.versions())
    except Exception as e:  # noqa: BLE001 - versions are informative; a binding may lack one call
        facts["gpu_error"] = str(e)
    release = Path("/etc/nv_tegra_release")
    if release.is_file():  # e.g. "# R36 (release), REVISION: 4.0, ..." -> L4T R36.4.0
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release.read_text(errors="replace"))
        facts["l4t"] = f"R{m.group(1)}.{m.group(2)}" if m else release.read_text(errors="replace").strip()[:120]
    status = Path("/var/lib/dpkg/status")
    if status.is_file():
        m = re.search(r"Package: nvidia-jetpack\n(?:[^\n]+\n)*?Version: ([^\n]+)", status.read_text(errors="replace"))
        if m:
            facts["jetpack"] = m.group(1)
    return facts


# ----------------------------------------------------------------------------------------- commands
def _settings(bundle: Path) -> dict[str, Any]:
    path = bundle / "build_settings.json"
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeviceError(f"{path}: not found; run this script inside the deploy bundle or pass --bundle DIR") from None
    except ValueError as e:
        raise DeviceError(f"{path}: not valid JSON ({e}); copy the bundle again") from None
    need = {"workspace_bytes", "flags", "input_name", "shapes", "builder_optimization_level", "onnx"}
    if not isinstance(settings, dict) or need - set(settings):
        raise DeviceError(f"{path}: missing {sorted(need - set(settings or {}))}; copy the bundle again")
    return settings


def _engine_path(bundle: Path, engine: str | None) -> Path:
    return Path(engine) if engine else bundle / "engine" / ENGINE_FILE


def cmd_build(bundle: Path, engine: str | None = None, force: bool = False) -> tuple[Path, float | None]:
    """Build the bundle's engine unless one built from the same ONNX and settings is already there."""
    settings = _settings(bundle)
    onnx_path = bundle / settings["onnx"]
    if not onnx_path.is_file():
        raise DeviceError(f"{onnx_path}: not found; copy the whole bundle folder to the device")
    require()
    out = _engine_path(bundle, engine)
    stamp = out.with_suffix(".json")
    key = {"onnx_sha256": sha256(onnx_path), "settings": settings}
    if not force and out.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("key") == key:
                print(f"engine up to date: {out}", file=sys.stderr)
                return out, None
        except ValueError:
            pass
    print(f"building {out} from {onnx_path} (TensorRT; this takes a minute or more)", file=sys.stderr)
    t0 = time.perf_counter()
    build_engine(onnx_path, settings, out)
    seconds = time.perf_counter() - t0
    _atomic_write_json(stamp, {"key": key, "build_seconds": seconds})
    return out, seconds


def cmd_bench(bundle: Path, engine: str | None, results: Path, warmup: int, iterations: int) -> dict[str, Any]:
    """Time and evaluate the engine, write the results JSON (``SCHEMA``)."""
    settings = _settings(bundle)
    path = _engine_path(bundle, engine)
    if not path.is_file():
        raise DeviceError(f"{path}: no engine; build it first (python3 edgepipe_trt.py build)")
    eng = Engine(path)
    opt_batch = int(settings["shapes"]["opt"][0])
    lat_batch = max(1, eng.min_batch)  # a static (DLA) engine runs only its own batch size

    def show(done: int, total: int) -> None:
        print(f"  timed {done}/{total}", file=sys.stderr)

    print(f"latency: batch {lat_batch}, {warmup} warm-up + {iterations} timed runs", file=sys.stderr)
    latency = eng.time(lat_batch, warmup, iterations, show)
    print(f"throughput: batch {opt_batch}", file=sys.stderr)
    throughput = eng.time(opt_batch, warmup, iterations, show)
    by_sequence = []
    sequence = (settings.get("dynamic_dims") or {}).get("sequence")
    if sequence:  # a text model: batch-1 latency at each of the usual lengths its profile covers
        for length in sorted({n for n in (32, 128, int(sequence[1])) if int(sequence[0]) <= n <= int(sequence[2])}):
            print(f"latency: batch {lat_batch}, sequence {length}", file=sys.stderr)
            by_sequence.append({"sequence": length, **eng.time(lat_batch, warmup, iterations, show,
                                                               feeds=eng.example_feeds(lat_batch, sequence=length))})
    layers = engine_layers(eng.engine)
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer["precision"]] = counts.get(layer["precision"], 0) + 1
    val = bundle / "val.npz"
    accuracy = evaluate(eng, val, opt_batch) if val.is_file() else None
    stamp = path.with_suffix(".json")
    build = json.loads(stamp.read_text()) if stamp.is_file() else {}
    out = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": settings.get("target"), **device_facts(eng.cuda),
        "settings": settings,
        "engine": {"file": path.name, "size_bytes": path.stat().st_size, "build_seconds": build.get("build_seconds"),
                   "onnx_sha256": (build.get("key") or {}).get("onnx_sha256") or sha256(bundle / settings["onnx"])},
        "latency": latency, "throughput": throughput, **({"latency_by_sequence": by_sequence} if by_sequence else {}),
        "precision": compute_precision(layers), "precision_counts": counts, "layers": layers,
        "accuracy": accuracy,
    }
    _atomic_write_json(results, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgepipe_trt.py", description="Build, time and evaluate the bundle's TensorRT "
                                "engine on this device; writes results.json for `edgepipe import-results`.")
    p.add_argument("command", choices=["check", "build", "bench", "run"], nargs="?", default="run",
                   help="check: what is missing; build: the engine; bench: time + top-1 -> results; run: both")
    p.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent, help="bundle folder (default: here)")
    p.add_argument("--engine", help="engine file (default: BUNDLE/engine/model.engine)")
    p.add_argument("--results", type=Path, help="results JSON (default: BUNDLE/results.json)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--force", action="store_true", help="rebuild the engine even if it is up to date")
    args = p.parse_args(argv)
    try:
        if args.warmup < 0 or args.iterations < 1:
            raise DeviceError(f"--warmup must be >= 0 and --iterations >= 1 (got {args.warmup}, {args.iterations})")
        if args.command == "check":
            require()
            import tensorrt as trt

            print(f"ok: TensorRT {trt.__version__}, {cuda_binding().name}, {cuda_binding().device_count()} CUDA device(s)")
            return 0
        if args.command in ("build", "run"):
            engine, seconds = cmd_build(args.bundle, args.engine, args.force)
            if seconds is not None:
                print(f"built {engine} in {seconds:.1f} s", file=sys.stderr)
        if args.command in ("bench", "run"):
            results = args.results or args.bundle / "results.json"
            out = cmd_bench(args.bundle, args.engine, results, args.warmup, args.iterations)
            acc = out["accuracy"]
            print(f"{out.get('gpu', 'GPU')}, TensorRT {out['tensorrt_version']}, {out['precision']}: "
                  f"batch {out['latency']['batch']} p50 {out['latency']['p50_ms']:.3f} ms, "
                  f"{out['throughput']['images_per_s']:.0f} img/s at batch {out['throughput']['batch']}"
                  + (f", top-1 {100 * acc['top1']:.2f}% on {acc.get('images', acc.get('sentences'))} "
                     f"{'images' if 'images' in acc else 'sentences'}" if acc else ""))
            print(f"wrote {results}; on the host: edgepipe import-results --run RUN {results.name}")
        return 0
    except DeviceError as e:
        print(f"edgepipe_trt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgepipe_trt: interrupted; run the same command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
