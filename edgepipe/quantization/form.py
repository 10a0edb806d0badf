"""Which INT8 form a target gets: activation signedness and weight bits, from its backend and this host.

The placement of the quantizers (which tensors; ``edgepipe.quantization.fakequant``) is the same for every target. Two
choices are not, and a wrong one costs speed or accuracy on some device:

- **Activations.** ``int8``: every activation int8 with zero-point 0. ``uint8_after_relu``: activations
  the graph proves non-negative (after ReLU, ReLU6, sigmoid, and pooling/flatten of those) are uint8
  with zero-point 0, so a ReLU output uses all 256 levels instead of 128, and the rest stay int8 zero-point 0.
- **Weight bits.** 8: weights in [-127, 127]. 7: weights in [-63, 63], still int8 with zero-point 0.

What decides, per backend:

- TensorRT: ``int8`` activations and 8-bit weights, always. TensorRT's explicit quantization accepts
  only int8 with zero-point 0 (TensorRT Developer Guide, "Working with Quantized Types": Q/DQ scales
  must be positive and zero-points 0). Its int8 kernels accumulate in int32 and never saturate.
- OpenVINO or ONNX Runtime on a CPU (the device where the model is compiled and measured: this host):
  ``uint8_after_relu``. That is what NNCF emits for OpenVINO's CPU plugin (unsigned quantizers after
  ReLU). It is also what ONNX Runtime's ReluQuantFusion needs to remove the ReLU and fuse
  DQ->Conv->Relu->Q into QLinearConv: the Q's zero-point must be the lowest value of its type
  (onnxruntime/core/optimizer/qdq_transformer/relu_quantizelinear.cc).
  The weight bits follow the CPU. Its u8 x s8 multiply-adds are vpdpbusd (VNNI, AVX-512 VNNI or
  AVX-VNNI) or AMX TMUL where the CPU has them, which accumulate in int32 and are exact with 8-bit
  weights. Without them, oneDNN's and MLAS's x86 kernels use vpmaddubsw, whose int16 sum of two
  u8 x s8 products saturates when 255 x 127 x 2 > 32767. Weights in [-63, 63] keep that sum within
  255 x 63 x 2 = 32130. This is NNCF's ``overflow_fix`` and ONNX Runtime's ``reduce_range``.
  Measured on a Zen 3 (AVX2-only) host: 68% top-1 with 8-bit weights against 86% in ONNX Runtime for
  the same QDQ graph; 7-bit weights gave back the 86%.
- OpenVINO on a GPU or NPU present on this host: ``uint8_after_relu`` with 8-bit weights. Those
  devices' int8 kernels accumulate in int32. If the device is absent, the model is compiled and measured
  on this CPU, so the CPU rule applies, and the reason says so.

The CPU facts come from the host itself: the CPU flags in /proc/cpuinfo (VNNI is not among the
capabilities OpenVINO reports) and OpenVINO's own ``OPTIMIZATION_CAPABILITIES`` for the CPU, which
is recorded beside them. A recipe may pin either choice (``qat.activations``, ``qat.weight_bits``);
``auto``, the default, resolves here. The resolved form is part of the QAT stage's cache key, so two
targets that need different forms never share a QAT model.

Each rule is applied by its backend (``int8_form`` and ``fallback_dtype`` in edgepipe.backends); the CPU
rule they share is edgepipe.quantization.cpu_form. This module validates the recipe's choices and asks.
"""
from __future__ import annotations

from typing import Any

from edgepipe.backends import get_backend
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.host import host_cpu, host_isa
from edgepipe.types import DType

ACTIVATION_FORMS = ("int8", "uint8_after_relu")


def resolve_form(profile: HardwareProfile, activations: str = "auto", weight_bits: str | int = "auto",
                 isa: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The INT8 form for ``profile`` on this host: {"activations", "weight_bits", "reason", "source", "host"}.

    Args:
        profile: The target; its backend (and OpenVINO device) decide which rule applies.
        activations: ``auto``, ``int8`` or ``uint8_after_relu`` (``qat.activations``).
        weight_bits: ``auto``, 7 or 8 (``qat.weight_bits``).
        isa: CPU features to decide from (default: this host's), for tests.

    Raises:
        EdgepipeError: a pinned choice the target cannot run (uint8 activations on TensorRT).
    """
    isa = host_isa() if isa is None else tuple(isa)
    host: dict[str, Any] = {"cpu": host_cpu(), "isa": list(isa)}
    if activations not in ("auto", *ACTIVATION_FORMS):
        raise EdgepipeError(f"qat.activations: '{activations}' is not one of auto, {', '.join(ACTIVATION_FORMS)}")
    if weight_bits not in ("auto", 7, 8):
        raise EdgepipeError(f"qat.weight_bits: '{weight_bits}' is not one of auto, 7, 8")
    auto = get_backend(profile.backend).int8_form(profile, activations, isa)
    host.update(auto.get("host", {}))
    reason = auto["reason"]
    form = {"activations": auto["activations"] if activations == "auto" else activations,
            "weight_bits": auto["weight_bits"] if weight_bits == "auto" else int(weight_bits),
            "source": {"activations": "auto" if activations == "auto" else "config",
                       "weight_bits": "auto" if weight_bits == "auto" else "config"},
            "reason": reason, "host": host}
    return form


def form_key(form: dict[str, Any]) -> dict[str, Any]:
    """The part of a form that changes the QAT model (for cache keys)."""
    return {"activations": form["activations"], "weight_bits": form["weight_bits"]}


def resolve_fallback(profile: HardwareProfile, want: str | DType = "auto",
                     caps: list[str] | None = None) -> dict[str, Any]:
    """The float dtype an INT8 model's float layers compile to on ``profile``: {"dtype", "source", "reason"}.

    ``auto`` takes the profile's best float dtype, then asks the runtime what this host runs: OpenVINO's CPU
    plugin runs bf16 only where it reports BF16 among OPTIMIZATION_CAPABILITIES (a bf16 hint elsewhere silently
    runs f32), and ONNX Runtime's CPU execution provider computes float ops in fp32. ``caps`` overrides the
    capabilities OpenVINO reports, for tests. A pinned dtype must be a float dtype the profile lists.
    """
    name = f"hardware_profiles/{profile.name}.yaml"
    if want != "auto":
        dtype = DType(want)
        if not dtype.is_float or dtype not in profile.dtypes:
            floats = ", ".join(d.value for d in profile.dtypes if d.is_float)
            raise EdgepipeError(f"qat.fallback_dtype: {dtype.value} is not a float dtype of {name} "
                                f"(it lists {floats}); use auto or one of those")
        return {"dtype": dtype.value, "source": "config", "reason": "qat.fallback_dtype"}
    own = get_backend(profile.backend).fallback_dtype(profile, caps)
    if own is not None:  # the backend knows what this host runs
        return own
    return {"dtype": profile.best_float.value, "source": "auto", "reason": f"the best float dtype {name} lists"}
