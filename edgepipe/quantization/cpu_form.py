"""The INT8 form for a model compiled and run on this host's CPU (OpenVINO's CPU plugin, ONNX Runtime's CPU EP).

The rule and its sources are in ``edgepipe.quantization.form``'s docstring: uint8 activations after ReLU,
and 8-bit weights only where the CPU's u8 x s8 dot products accumulate in int32 (VNNI, AMX), else 7-bit.
It lives apart from ``form`` because the backends that compile on this CPU apply it
(``int8_form`` in edgepipe.backends), while ``form`` asks the backends.
"""
from __future__ import annotations

from typing import Any

from edgepipe.host import host_isa

INT32_ACCUMULATING_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")
"""x86 features whose u8 x s8 dot products accumulate in int32 without saturation."""


def exact_8bit_weights_on_cpu(isa: tuple[str, ...] | None = None) -> bool:
    """True when this CPU's int8 dot products cannot saturate with full 8-bit weights (VNNI or AMX)."""
    return any(f in (host_isa() if isa is None else isa) for f in INT32_ACCUMULATING_ISA)


def cpu_int8_form(isa: tuple[str, ...], where: str = "") -> dict[str, Any]:
    """The automatic form on a CPU with features ``isa``: {"activations", "weight_bits", "reason"}.

    ``where`` prefixes the reason (e.g. why a GPU target is compiled on this CPU instead)."""
    exact = exact_8bit_weights_on_cpu(isa)
    reason = where + (f"this CPU has {', '.join(f for f in isa if f in INT32_ACCUMULATING_ISA)}: u8 x s8 "
                      "dot products accumulate in int32, full 8-bit weights are exact" if exact else
                      "this CPU has no VNNI/AMX: u8 x s8 pairs sum in int16 (vpmaddubsw) and saturate with "
                      "8-bit weights, so weights keep to [-63, 63]")
    reason += "; uint8 activations after ReLU (OpenVINO's and ONNX Runtime's x86 int8 kernels take u8 x s8)"
    return {"activations": "uint8_after_relu", "weight_bits": 8 if exact else 7, "reason": reason}
