"""Enumerations that travel through edgepipe: precisions, backends, importance criteria.

Bare strings are parsed into these at the config/profile boundary, so a typo is rejected once,
with the list of allowed values, instead of silently matching nothing further down.
"""
from __future__ import annotations

from enum import Enum


class DType(str, Enum):
    """Numeric precision a model is compiled and run in."""

    INT8 = "int8"
    """8-bit integer: symmetric, zero-point 0, per-channel weights and per-tensor activations."""
    FP16 = "fp16"
    """IEEE half precision (TensorRT, GPUs, Intel GPU/NPU)."""
    BF16 = "bf16"
    """bfloat16 (CPUs with AVX512-BF16 or AMX)."""
    FP32 = "fp32"
    """Single precision: the reference every other dtype is compared with."""

    @property
    def is_float(self) -> bool:
        return self is not DType.INT8

    @property
    def bytes(self) -> int:
        return {DType.INT8: 1, DType.FP16: 2, DType.BF16: 2, DType.FP32: 4}[self]


class Backend(str, Enum):
    """Inference runtime a hardware profile compiles for."""

    TENSORRT = "tensorrt"
    """NVIDIA TensorRT engine (Jetson, discrete GPUs)."""
    OPENVINO = "openvino"
    """Intel OpenVINO IR (Intel CPU, iGPU, NPU)."""
    ONNXRUNTIME = "onnxruntime"
    """ONNX Runtime with an execution provider (generic CPUs)."""


class Importance(str, Enum):
    """Channel importance criterion for structured pruning (Torch-Pruning)."""

    MAGNITUDE = "magnitude"
    """L2 norm of each channel's weights (tp.importance.MagnitudeImportance(p=2))."""
    TAYLOR = "taylor"
    """First-order Taylor expansion |w * dL/dw| (tp.importance.TaylorImportance); needs gradients."""
    BN_SCALE = "bn_scale"
    """Magnitude of the BatchNorm scale gamma (tp.importance.BNScaleImportance)."""


class ArtifactKind(str, Enum):
    """What a stage hands to the next one."""

    TORCH = "torch"
    """A PyTorch nn.Module: model.json (how to build it) + model.pt (Torch-Pruning state dict)."""
    ONNX = "onnx"
    """An ONNX file (float, or QDQ INT8)."""
    OPENVINO_IR = "openvino_ir"
    """OpenVINO IR: model.xml + model.bin."""
    TENSORRT_ENGINE = "tensorrt_engine"
    """A serialized TensorRT engine (built on a CUDA device)."""
    TENSORRT_BUNDLE = "tensorrt_bundle"
    """A deploy bundle (ONNX + profile + build command) to build the engine on the device."""
    ORT_OPTIMIZED = "ort_optimized"
    """An ONNX graph optimized by ONNX Runtime for one execution provider."""
