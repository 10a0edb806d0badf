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
"""
from __future__ import annotations

from typing import Any

from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.host import host_cpu, host_isa
from edgepipe.types import Backend, DType

ACTIVATION_FORMS = ("int8", "uint8_after_relu")
INT32_ACCUMULATING_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")
"""x86 features whose u8 x s8 dot products accumulate in int32 without saturation."""


def exact_8bit_weights_on_cpu(isa: tuple[str, ...] | None = None) -> bool:
    """True when this CPU's int8 dot products cannot saturate with full 8-bit weights (VNNI or AMX)."""
    return any(f in (host_isa() if isa is None else isa) for f in INT32_ACCUMULATING_ISA)


def _openvino_facts(device: str) -> tuple[bool, list[str]]:
    """Is the OpenVINO device present here, and what OpenVINO reports as the CPU's capabilities."""
    try:
        import openvino as ov
    except ImportError:
        return False, []
    core = ov.Core()
    family = device.split(":")[0].split(".")[0].upper()
    present = any(d.split(".")[0] == family for d in core.available_devices)
    try:
        caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except RuntimeError:
        caps = []
    return present, caps


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
    if profile.backend is Backend.TENSORRT:
        if activations == "uint8_after_relu":
            raise EdgepipeError(f"qat.activations: uint8_after_relu cannot run on {profile.name} (TensorRT takes "
                                "int8 with zero-point 0 only); use auto or int8")
        auto_act, auto_bits = "int8", 8
        reason = ("TensorRT explicit quantization: int8 activations with zero-point 0, 8-bit per-channel weights "
                  "(int32 accumulation)")
    else:
        device = profile.options.openvino.device if profile.backend is Backend.OPENVINO else "CPU"
        present, caps = _openvino_facts(device) if profile.backend is Backend.OPENVINO else (False, [])
        if caps:
            host["openvino_cpu_capabilities"] = caps
        on_cpu = device.upper().startswith("CPU") or not present
        auto_act = "uint8_after_relu"
        if not on_cpu:
            auto_bits = 8
            reason = f"OpenVINO {device}: int8 kernels accumulate in int32; uint8 after ReLU as NNCF emits"
        else:
            exact = exact_8bit_weights_on_cpu(isa)
            auto_bits = 8 if exact else 7
            where = "" if device.upper().startswith("CPU") else f"{device} is not on this host, so compiled on the CPU: "
            reason = where + (f"this CPU has {', '.join(f for f in isa if f in INT32_ACCUMULATING_ISA)}: u8 x s8 "
                              "dot products accumulate in int32, full 8-bit weights are exact" if exact else
                              "this CPU has no VNNI/AMX: u8 x s8 pairs sum in int16 (vpmaddubsw) and saturate with "
                              "8-bit weights, so weights keep to [-63, 63]")
            reason += "; uint8 activations after ReLU (OpenVINO's and ONNX Runtime's x86 int8 kernels take u8 x s8)"
    form = {"activations": auto_act if activations == "auto" else activations,
            "weight_bits": auto_bits if weight_bits == "auto" else int(weight_bits),
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
    best = profile.best_float
    if profile.backend is Backend.ONNXRUNTIME:
        return {"dtype": DType.FP32.value, "source": "auto",
                "reason": "ONNX Runtime's CPU execution provider computes float ops in fp32"}
    if profile.backend is Backend.OPENVINO and profile.options.openvino.device.upper().startswith("CPU") \
            and best in (DType.BF16, DType.FP16):
        if caps is None:
            _, caps = _openvino_facts("CPU")
        tag = {DType.BF16: "BF16", DType.FP16: "FP16"}[best]
        if tag not in caps:
            return {"dtype": DType.FP32.value, "source": "auto",
                    "reason": f"{name} prefers {best.value}, but OpenVINO reports no {tag} on this CPU "
                              f"(capabilities: {', '.join(caps) or 'none'}), so its float layers run fp32"}
        return {"dtype": best.value, "source": "auto",
                "reason": f"{name} prefers {best.value} and OpenVINO reports {tag} on this CPU"}
    return {"dtype": best.value, "source": "auto", "reason": f"the best float dtype {name} lists"}
