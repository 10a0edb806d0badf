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

What can be computed and checked without TensorRT (the ONNX check, build settings, the ``trtexec`` line,
the version rule and the deploy bundle) lives in ``edgepipe.backends.tensorrt_plan``; this module holds
the code that needs TensorRT and a CUDA device (building, running) and the backend verbs.

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
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.artifacts import Artifact
from edgepipe.backends.tensorrt_plan import DTYPES  # noqa: F401 - the backend registry reads DTYPES here
from edgepipe.backends.tensorrt_plan import (BUNDLE_FILES, build_settings, check_onnx_for_tensorrt, copy_file,
                                             onnx_input_shape, version_problem, write_bundle)
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write
from edgepipe.profiles import HardwareProfile
from edgepipe.types import ArtifactKind, DType

log = logging.getLogger(__name__)
ENGINE_FILE = "model.engine"

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
    settings = build_settings(profile, dtype, onnx_input_shape(onnx_path))
    records: dict[str, Any] = {"settings": settings, "onnx_check": "passed"}
    ok, reason = available()
    if ok:
        import tensorrt as trt

        build_engine(onnx_path, settings, out_dir / ENGINE_FILE, progress)
        copy_file(onnx_path, out_dir / "model.onnx")
        records.update({"engine_built": True, "tensorrt_version": trt.__version__})
        artifact = Artifact(kind=ArtifactKind.TENSORRT_ENGINE, root=out_dir,
                            files={"engine": ENGINE_FILE, "onnx": "model.onnx"}, dtype=dtype,
                            quantized=dtype is DType.INT8, meta={"backend": "tensorrt", "target": profile.name,
                                                                 "settings": settings})
        return artifact, records
    command = write_bundle(onnx_path, profile, settings, out_dir, reason)
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
