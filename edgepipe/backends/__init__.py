"""Compile backends, registered by name and chosen by the hardware profile's ``backend`` field.

Each backend is one module with the same few verbs:

- ``DTYPES``: the precisions it can compile to; anything else is refused at once.
- ``available() -> tuple[bool, str]``: can it compile *and run* here, and if not, why.
- ``compile(onnx_path, profile, dtype, out_dir, progress=None) -> tuple[Artifact, dict]``: build the
  deployable artifact in ``out_dir`` and return it with records (settings used, runtime checks).
- ``load(artifact, threads=None) -> Runner``: a runner (see ``edgepipe.runtime.runner``) for measurement.
- ``BUILDS_ON_DEVICE``: where it is not ``available()``, compile writes a bundle the device builds (TensorRT),
  so a latency taken here is the profile's roofline estimate instead.
- ``SHAPE_RANGES``: its compile takes ``dynamic_dims`` (each named axis after the batch: min, opt, max; a text
  model's sequence length, ``Task.dynamic_dims``) and builds for that range (TensorRT optimization profiles); the
  others run any size the graph allows.
- ``TIMING_FEEDS``: its compile times the model itself and takes ``timing_feeds`` (``Task.timing_inputs`` at batch
  1), so a graph with a dynamic axis after the batch is timed at a stated size (ONNX Runtime).
- ``timing_runner(onnx_path, profile, dtype, out_dir, threads, float_dtype=None) -> Runner``: a candidate ONNX
  made ready to time as this target runs it (latency-constrained pruning, the gain check, the QAT variants).
- ``int8_form(profile, activations, isa) -> dict``: the automatic INT8 form (activations, weight bits, reason,
  host facts) its int8 kernels want on this host; refuses a pinned form it cannot run
  (edgepipe.quantization.form asks it).
- ``fallback_dtype(profile, caps=None) -> dict | None``: the float dtype an INT8 model's float layers run in
  here, or None for the profile's best float dtype.
- ``POST_TRAINING_QUANTIZATION``: it defines ``post_training_quantize(onnx_path, images, preset, profile, out_dir,
  meta, progress) -> tuple[Artifact, dict]`` (OpenVINO: NNCF), which the ``ptq`` stage and ``compare``'s
  baselines need.

Callers ask these instead of comparing ``profile.backend`` with a backend's name.

This module is also the one registry from artifact kind to runtime (``runner_for``, ``backend_of``):
the engine's measurements, ``edgepipe bench``, the compile stage's fidelity check and ``compare`` all
load a model through it, so one artifact always runs in the same runtime.

Heavy imports (tensorrt, pycuda, openvino) happen inside the backend modules' functions, so importing
this registry, and ``edgepipe --help``, stays fast.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgepipe.errors import EdgepipeError
from edgepipe.types import ArtifactKind, Backend, DType

if TYPE_CHECKING:
    from edgepipe.engine.artifacts import Artifact
    from edgepipe.runtime.runner import Runner

_MODULES = {
    Backend.ONNXRUNTIME: "edgepipe.backends.onnxruntime",
    Backend.OPENVINO: "edgepipe.backends.openvino",
    Backend.TENSORRT: "edgepipe.backends.tensorrt",
}


def get_backend(backend: Backend | str) -> ModuleType:
    """The backend module for ``backend`` (an enum member or its name)."""
    try:
        key = Backend(backend)
    except ValueError:
        raise EdgepipeError(f"unknown backend '{backend}' (known: {', '.join(b.value for b in Backend)})") from None
    return importlib.import_module(_MODULES[key])


def check_dtype(backend: Backend, dtype: DType) -> None:
    allowed = get_backend(backend).DTYPES
    if dtype not in allowed:
        raise EdgepipeError(f"backend {backend.value} cannot compile {dtype.value} "
                            f"(supported: {', '.join(d.value for d in allowed)})")


# --- artifact kind -> runtime ------------------------------------------------------------------------
_COMPILED = {ArtifactKind.OPENVINO_IR: Backend.OPENVINO, ArtifactKind.ORT_OPTIMIZED: Backend.ONNXRUNTIME,
             ArtifactKind.TENSORRT_ENGINE: Backend.TENSORRT}
HOST_REFERENCE_NOTE = ("host reference: the bundle's ONNX in ONNX Runtime on this CPU; the TensorRT engine is built "
                       "and measured on the device (see the bundle's README.md)")


def backend_of(kind: ArtifactKind) -> Backend | None:
    """The backend that runs a compiled artifact kind (None for torch models, ONNX files and TensorRT bundles)."""
    return _COMPILED.get(kind)


def runner_for(artifact: Artifact, threads: int | None, device: Any = None) -> tuple[Runner, str | None]:
    """A runner for ``artifact`` on this host, and a note when it is a stand-in for the target runtime.

    PyTorch runs torch models (on ``device``, an edgepipe.device.Device; None: the CPU), ONNX Runtime runs ONNX
    files, a compiled artifact runs in its backend. A TensorRT bundle holds no engine, so its ONNX runs in ONNX
    Runtime as a labelled host reference.
    """
    kind = artifact.kind
    if kind is ArtifactKind.TORCH:
        from edgepipe.runtime.torch_runner import TorchRunner

        note = ("PyTorch runs the QAT model with fake quantization in fp32; INT8 speed shows after compile"
                if artifact.quantized else None)
        return TorchRunner.from_artifact(artifact, threads, device=device), note
    if kind in (ArtifactKind.ONNX, ArtifactKind.TENSORRT_BUNDLE):
        from edgepipe.backends.onnxruntime import OrtRunner

        return (OrtRunner(artifact.path("onnx"), threads),
                HOST_REFERENCE_NOTE if kind is ArtifactKind.TENSORRT_BUNDLE else None)
    return get_backend(_COMPILED[kind]).load(artifact, threads=threads), None
