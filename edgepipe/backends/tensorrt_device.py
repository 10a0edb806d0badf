"""Build, time and evaluate a TensorRT engine on the device: TensorRT, numpy and a CUDA binding, nothing else.

This file is the device half of the TensorRT backend. It is copied verbatim into every deploy bundle as
``edgepipe_trt.py`` and runs there as a script, so a Jetson needs only what JetPack's TensorRT needs:

    python3 edgepipe_trt.py run        # build engine/model.engine, time it, evaluate it -> results.json

It imports only the standard library and numpy at module level; ``tensorrt`` and the CUDA binding
(NVIDIA's ``cuda-python``, which has aarch64 wheels, or ``pycuda``, which compiles on the device) are
imported inside functions. It never imports torch, torchvision, openvino, matplotlib or any other edgepipe
module (``tests/backends/test_tensorrt_device.py`` checks this), which is why it repeats nothing from them
but the few lines it needs. ``edgepipe.backends.tensorrt`` uses the same functions on a CUDA host.

Results JSON (``SCHEMA``): ``tensorrt_version``, ``jetpack`` (L4T release and the nvidia-jetpack package
version when the device has them), ``device``, ``settings`` (the bundle's build settings), ``engine``
(file, size, build time, its ONNX's sha256), ``latency`` (batch 1: p50/p90/p99/mean of GPU time between
CUDA events around ``execute_async_v3``, plus end-to-end time with host copies), ``throughput`` (images/s at
the profile's optimal batch), ``layers`` (name, type and precision of every engine layer, from the engine
inspector) and ``precision_counts``, ``accuracy`` (top-1 on the bundle's ``val.npz``), ``created``.

TensorRT API used (TensorRT 10; JetPack 6.1/6.2 ship 10.3): Builder/IBuilderConfig/OnnxParser/Runtime/
IExecutionContext (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), IEngineInspector;
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
    shapes = settings["shapes"]
    profile = builder.create_optimization_profile()
    profile.set_shape(settings["input_name"], shapes["min"], shapes["opt"], shapes["max"])
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


class Engine:
    """A deserialized engine with one execution context, its buffers and one CUDA stream."""

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
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        lo, _opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self._buffers: dict[tuple[int, ...], tuple[np.ndarray, Any, np.ndarray, Any]] = {}

    def _buffers_for(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Any, np.ndarray, Any]:
        if shape not in self._buffers:
            self.context.set_input_shape(self.input_name, shape)
            out_shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
            host_in = self.cuda.host_array(shape, self.in_dtype)
            host_out = self.cuda.host_array(out_shape, self.out_dtype)
            self._buffers[shape] = (host_in, self.cuda.malloc(host_in.nbytes), host_out, self.cuda.malloc(host_out.nbytes))
        return self._buffers[shape]

    def _bind(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Any, np.ndarray, Any]:
        if not self.min_batch <= shape[0] <= self.max_batch:
            raise DeviceError(f"batch {shape[0]} is outside the engine's batch range {self.min_batch}..{self.max_batch} "
                              "(options.tensorrt.opt_batch/max_batch in the profile; a DLA engine has one batch size)")
        buffers = self._buffers_for(shape)
        self.context.set_input_shape(self.input_name, shape)
        self.context.set_tensor_address(self.input_name, int(buffers[1]))
        self.context.set_tensor_address(self.output_name, int(buffers[3]))
        return buffers

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise DeviceError("TensorRT execute_async_v3 failed; see the TensorRT log")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for one batch (host copies included); a batch below a static engine's size is padded."""
        n = batch.shape[0]
        if n < self.min_batch:
            batch = np.concatenate([batch, np.zeros((self.min_batch - n, *batch.shape[1:]), batch.dtype)])
        host_in, dev_in, host_out, dev_out = self._bind(tuple(batch.shape))
        np.copyto(host_in, batch, casting="same_kind")
        self.cuda.htod(dev_in, host_in, self.stream)
        self._execute()
        self.cuda.dtoh(host_out, dev_out, self.stream)
        self.cuda.sync(self.stream)
        return np.array(host_out[:n], dtype=np.float32)

    def time(self, batch: int, sample_shape: tuple[int, ...], warmup: int, iterations: int,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """GPU time of ``execute_async_v3`` between CUDA events, and end-to-end time with host copies."""
        shape = (batch, *sample_shape)
        host_in, dev_in, host_out, dev_out = self._bind(shape)
        host_in[...] = np.random.default_rng(0).standard_normal(shape).astype(self.in_dtype)
        start, end = self.cuda.event(), self.cuda.event()
        gpu, e2e = [], []
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            self.cuda.htod(dev_in, host_in, self.stream)
            self.cuda.record(start, self.stream)
            self._execute()
            self.cuda.record(end, self.stream)
            self.cuda.dtoh(host_out, dev_out, self.stream)
            self.cuda.sync(self.stream)
            if i >= warmup:
                e2e.append((time.perf_counter() - t0) * 1e3)
                gpu.append(self.cuda.elapsed_ms(start, end))
            if progress and (i + 1) % 50 == 0:
                progress(i + 1, warmup + iterations)
        g, e = np.array(gpu), np.array(e2e)
        return {"batch": batch, "warmup": warmup, "iterations": iterations, "timer": "CUDA events around execute_async_v3",
                "p50_ms": float(np.percentile(g, 50)), "p90_ms": float(np.percentile(g, 90)),
                "p99_ms": float(np.percentile(g, 99)), "mean_ms": float(g.mean()),
                "end_to_end_p50_ms": float(np.percentile(e, 50)), "images_per_s": float(batch * 1e3 / np.percentile(g, 50))}


def validation_inputs(val: Any) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's ``val.npz`` as model input: raw pixels normalized exactly as edgepipe's data pipeline does
    (uint8 / 255, then (x - mean) / std per channel, in float32), and the labels."""
    images, labels = val["images"], val["labels"]
    if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise DeviceError(f"expected images (N,C,H,W) and labels (N,) with N > 0, got {images.shape} and {labels.shape}")
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x = x / np.float32(255.0)
    mean, std = (val[k].astype(np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    return (x - mean) / std, labels.astype(np.int64)


def evaluate(engine: Engine, val_path: Path | str, batch: int) -> dict[str, Any]:
    """Top-1 of the engine on the bundle's validation set."""
    try:
        with np.load(val_path, allow_pickle=False) as val:  # a bundle is data: never unpickle from it
            x, y = validation_inputs(val)
    except (KeyError, ValueError, OSError) as e:
        raise DeviceError(f"{val_path}: not a validation set written by edgepipe ({e}); copy the bundle again") from None
    correct = 0
    for i in range(0, len(x), batch):
        logits = engine.infer(x[i:i + batch])
        correct += int((logits.argmax(axis=1) == y[i:i + batch]).sum())
    return {"top1": correct / len(x), "images": int(len(x)), "source": Path(val_path).name, "batch": batch}


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
    sample = tuple(int(d) for d in settings["shapes"]["opt"][1:])
    opt_batch = int(settings["shapes"]["opt"][0])
    lat_batch = max(1, eng.min_batch)  # a static (DLA) engine runs only its own batch size

    def show(done: int, total: int) -> None:
        print(f"  timed {done}/{total}", file=sys.stderr)

    print(f"latency: batch {lat_batch}, {warmup} warm-up + {iterations} timed runs", file=sys.stderr)
    latency = eng.time(lat_batch, sample, warmup, iterations, show)
    print(f"throughput: batch {opt_batch}", file=sys.stderr)
    throughput = eng.time(opt_batch, sample, warmup, iterations, show)
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
        "latency": latency, "throughput": throughput,
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
                  + (f", top-1 {100 * acc['top1']:.2f}% on {acc['images']} images" if acc else ""))
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
