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
tensor name with ``set_input_shape``/``set_tensor_address``/``execute_async_v3``).

Three modules: ``edgepipe.backends.tensorrt_plan`` computes and checks on any host (the ONNX check, build
settings, the ``trtexec`` line, the deploy bundle); ``edgepipe.backends.tensorrt_device`` is the device code
(build, run, time, evaluate; TensorRT + numpy + cuda-python or pycuda, nothing else), shipped in every
bundle as ``edgepipe_trt.py``; this module is the backend verbs (compile, load) on top of both.

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

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.engine.artifacts import Artifact
from edgepipe.backends import tensorrt_device as device
from edgepipe.backends.tensorrt_plan import DTYPES  # noqa: F401 - the backend registry reads DTYPES here
from edgepipe.backends.tensorrt_plan import (BUNDLE_FILES, build_settings, check_onnx_for_tensorrt, copy_file,
                                             onnx_input_name, onnx_input_shape, onnx_inputs, write_bundle)
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.runtime.runner import RunnerBase
from edgepipe.types import ArtifactKind, DType

log = logging.getLogger(__name__)
ENGINE_FILE = device.ENGINE_FILE


@contextmanager
def _as_edgepipe_error() -> Iterator[None]:
    """The device module raises its own DeviceError (it imports nothing from edgepipe); the CLI wants ours."""
    try:
        yield
    except device.DeviceError as e:
        raise EdgepipeError(str(e)) from None


def available() -> tuple[bool, str]:
    missing = device.missing()
    return (False, f"requires TensorRT and a CUDA device: {'; '.join(missing)}") if missing else (True, "")


def check(profile: HardwareProfile, dtype: DType | None, float_dtype: DType | None = None) -> None:
    """Before a run changes anything: the build settings this profile and dtype give are valid (batch range, DLA,
    the float layers' precision). No TensorRT here is no error: compile then writes a deploy bundle."""
    if dtype is not None:
        build_settings(profile, dtype, (1, 1, 1), float_dtype=float_dtype)


def build_engine(onnx_path: Path | str, settings: dict[str, Any], out_path: Path | str,
                 progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> Path:
    """Build and write a serialized engine (``edgepipe.backends.tensorrt_device.build_engine``)."""
    with _as_edgepipe_error():
        return device.build_engine(onnx_path, settings, out_path, progress)


class TrtRunner(RunnerBase):
    """A TensorRT engine behind the Runner protocol (the device module's Engine: cuda-python or pycuda), its
    tensors by name."""

    backend = "tensorrt"

    def __init__(self, engine_path: Path | str, threads: int | None = None, dtype: str | None = None) -> None:
        with _as_edgepipe_error():
            self._engine = device.Engine(engine_path)
            self.device = f"cuda:0 {self._engine.cuda.device_name()}"
        self.dtype = device.compute_precision(device.engine_layers(self._engine.engine)) or dtype or "unknown"
        self.threads = threads
        self.input_names = self._engine.input_names
        self.output_names = self._engine.output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with _as_edgepipe_error():
            return self._engine.run(feeds)

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """Inputs copied to the GPU once; the call runs the engine and waits for it, outputs left on the GPU."""
        with _as_edgepipe_error():
            return self._engine.bind(feeds)


def compile(onnx_path: Path, profile: HardwareProfile, dtype: DType, out_dir: Path,
            progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
            float_dtype: DType | None = None, dynamic_dims: dict[str, tuple[int, int, int]] | None = None,
            ) -> tuple[Artifact, dict[str, Any]]:
    """Build a TensorRT engine when TensorRT and a CUDA device are here, else write a deploy bundle.
    ``float_dtype``: the precision of an INT8 model's float layers (``build_settings``); ``dynamic_dims``: the
    (min, opt, max) of each named axis after the batch (a text model's sequence), one optimization-profile range per
    input.

    Raises:
        EdgepipeError: the ONNX fails ``check_onnx_for_tensorrt`` (every problem is listed).
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    problems = check_onnx_for_tensorrt(onnx_path)
    if problems:
        raise EdgepipeError(f"{onnx_path}: not compatible with TensorRT ({len(problems)} problem(s)):\n  - "
                            + "\n  - ".join(problems))
    inputs = onnx_inputs(onnx_path)
    several = len(inputs) > 1 or any(not isinstance(d, int) for dims in inputs.values() for d in dims)
    settings = build_settings(profile, dtype, () if several else onnx_input_shape(onnx_path),
                              onnx_input_name(onnx_path), float_dtype=float_dtype, inputs=inputs if several else None,
                              dynamic_dims=dynamic_dims)
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


# --- what edgepipe asks every backend besides compile/load (the verbs listed in edgepipe.backends) ---------
SHAPE_RANGES = True
"""compile takes ``dynamic_dims``: one optimization-profile range per input axis after the batch."""
TIMING_FEEDS = False
"""compile times nothing on inputs of its own choosing (the engine measures every stage with the task's inputs)."""
BUILDS_ON_DEVICE = True
"""Where TensorRT is not ``available()``, compile writes a deploy bundle the device builds; a latency taken
here is then the profile's roofline estimate, labelled so."""
POST_TRAINING_QUANTIZATION = False
"""No ``post_training_quantize``: the PTQ baselines (NNCF) build OpenVINO IR."""


def int8_form(profile: HardwareProfile, activations: str, isa: tuple[str, ...]) -> dict[str, Any]:
    """The automatic INT8 form on any host: TensorRT's explicit quantization takes int8 with zero-point 0
    only (a pinned ``uint8_after_relu`` is refused) and accumulates 8-bit weights in int32."""
    if activations == "uint8_after_relu":
        raise EdgepipeError(f"qat.activations: uint8_after_relu cannot run on {profile.name} (TensorRT takes "
                            "int8 with zero-point 0 only); use auto or int8")
    return {"activations": "int8", "weight_bits": 8,
            "reason": ("TensorRT explicit quantization: int8 activations with zero-point 0, 8-bit per-channel weights "
                       "(int32 accumulation)")}


def fallback_dtype(profile: HardwareProfile, caps: list[str] | None = None) -> dict[str, Any] | None:
    """None: an INT8 engine's float layers run in the profile's best float dtype."""
    return None


def timing_runner(onnx_path: Path, profile: HardwareProfile, dtype: DType, out_dir: Path, threads: int | None,
                  float_dtype: DType | None = None) -> TrtRunner:
    """A runner to time a candidate ONNX on the device: an engine built into ``out_dir``, then loaded
    (only where ``available()``; elsewhere callers use the roofline estimate, see BUILDS_ON_DEVICE)."""
    artifact, _ = compile(onnx_path, profile, dtype, out_dir, float_dtype=float_dtype)
    return load(artifact, threads=threads)
