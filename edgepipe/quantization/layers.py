"""The fake-quantized tensors and layers QAT trains, and the helpers that find, disable or undo them.

``ActQuant`` fake-quantizes one activation per tensor; ``QuantConv2d`` / ``QuantLinear`` fake-quantize their
weights per output channel. Where they are placed is ``edgepipe.quantization.placement``; the settings, the
BatchNorm folding and the whole contract are ``edgepipe.quantization.fakequant``. Kept apart so placement,
mixed precision (``edgepipe.quantization.mixed``) and the export can use the layers without importing each other.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgepipe.errors import EdgepipeError

QMIN, QMAX = -128, 127
QUANTIZERS = "act_quant"
"""The ModuleDict holding the activation quantizers of a traced model (``act_quant.<tensor>``)."""
MIN_RANGE = 1e-8
"""Smallest range: keeps every scale > 0 (an all-zero channel or input still quantizes to 0)."""


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model`` (in place)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def graph_part(model: nn.Module) -> tuple[str, nn.Module]:
    """The submodule that is the model's tensor graph, and its name: a model whose forward runs Python that fx cannot
    trace after that graph names it in ``graph_part`` (a one-stage detector: ``core``, before its decoding and NMS,
    which stay float); otherwise the model itself (name ``""``). Quantization traces, places and folds within it."""
    name = getattr(model, "graph_part", "") or ""
    return name, (model.get_submodule(name) if name else model)


# --- fake-quantized tensors and layers -----------------------------------------------------------------
def weight_scale(weight: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """Per-output-channel symmetric scale max|w| / qmax (127, or 63 for 7-bit weights), detached."""
    amax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim)))
    return amax.clamp_min(MIN_RANGE).float() / qmax


class ActQuant(nn.Module):
    """Per-tensor fake quantization of one activation, zero-point 0: int8 (signed) or uint8.

    ``amax`` is a buffer, not a parameter: the calibrated range stays fixed while fine-tuning.
    ``group`` names the quantizers that must share one scale (the inputs of one concat).
    """

    def __init__(self, signed: bool = True, group: str | None = None) -> None:
        super().__init__()
        self.register_buffer("amax", torch.zeros(()))
        self.signed, self.group, self.quantize = signed, group, True

    @property
    def range(self) -> tuple[int, int]:
        return (QMIN, QMAX) if self.signed else (0, 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return x
        if not torch.jit.is_tracing() and not bool(self.amax > 0):
            raise EdgepipeError("activation range not calibrated; run edgepipe.quantization.calibration.calibrate "
                                "(or load a calibrated state dict) first")
        lo, hi = self.range
        scale = (self.amax / hi).detach()
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        x = x if x.dtype == torch.float32 else x.float()  # the kernel is float32 (bf16 under autocast)
        if torch.jit.is_tracing():  # exported as QuantizeLinear -> DequantizeLinear
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, lo, hi)
        # PyTorch's kernel rounds x * (1 / scale); ONNX's QuantizeLinear (and every runtime) rounds x / scale.
        # Where x / scale is within an ulp of a .5 tie the two give integers one apart, and a deep network
        # carries each such flip on (see round_like_onnx in tests/test_quant.py). Dividing first and
        # quantizing with scale 1 rounds exactly as the exported graph does; the gradient is the same STE.
        return torch.fake_quantize_per_tensor_affine(x / scale, torch.ones((), device=x.device), zero, lo, hi) * scale

    def extra_repr(self) -> str:
        return f"{'int8' if self.signed else 'uint8'}, amax={float(self.amax):.4g}" + (f", group={self.group}"
                                                                                     if self.group else "")


class _WeightQuant:
    """Per-output-channel weight fake quantization shared by the two layer types; an input quantizer
    only where the model could not be traced (``input_quant``, else None)."""

    weight: nn.Parameter

    def _init_quant(self, weight_qmax: int = QMAX) -> None:
        self.quantize = True
        self.frozen_weight_scale: torch.Tensor | None = None
        self.weight_qmax = weight_qmax
        self.input_quant: ActQuant | None = None

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quant(x) if self.input_quant is not None else x

    def quant_weight(self) -> torch.Tensor:
        w = self.weight
        if not self.quantize:
            return w
        # While exporting, a precomputed constant: the TorchScript exporter cannot constant-fold
        # Abs/ReduceMax on an initializer, and export needs QuantizeLinear(initializer, constant scale).
        q = self.weight_qmax
        scale = self.frozen_weight_scale if self.frozen_weight_scale is not None else weight_scale(w, q)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        # |w| / scale <= q by construction, so the int8 range never clips; ONNX export accepts only that range
        if torch.jit.is_tracing():
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX)
        per_channel = scale.view(-1, *[1] * (w.ndim - 1))  # rounds w / scale, as the export's folding does
        return torch.fake_quantize_per_channel_affine(w / per_channel, torch.ones_like(scale), zero, 0,
                                                      QMIN, QMAX) * per_channel


class QuantConv2d(_WeightQuant, nn.Conv2d):
    """nn.Conv2d with fake-quantized weights (per output channel)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_qmax: int = QMAX) -> QuantConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q._init_quant(weight_qmax)
        return q.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)


class QuantLinear(_WeightQuant, nn.Linear):
    """nn.Linear with fake-quantized weights (per output feature)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_qmax: int = QMAX) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._init_quant(weight_qmax)
        return q.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quant_input(x), self.quant_weight(), self.bias)


QUANT_LAYER_OF = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
"""The float layer types QAT quantizes, and the fake-quantized type each becomes."""


def quant_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The weight-quantized layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}


def activation_quantizers(model: nn.Module) -> dict[str, ActQuant]:
    """The activation quantizers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}

def float_twin(layer: QuantConv2d | QuantLinear) -> nn.Conv2d | nn.Linear:
    """A plain nn.Conv2d / nn.Linear of ``layer``'s shape sharing its parameters (weight and bias)."""
    if isinstance(layer, QuantConv2d):
        plain: nn.Conv2d | nn.Linear = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                                 layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                                 layer.padding_mode, device="meta")
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain.train(layer.training)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose Quant* layers are plain nn.Conv2d / nn.Linear holding the fake-quantized weights.

    The activation quantizers become nn.Identity. For tools that dispatch on exact module types, such
    as Torch-Pruning's MAC counter (``tp.utils.count_ops_and_params`` counts nothing for a subclass).
    """
    plain = copy.deepcopy(model)
    for name, layer in quant_layers(plain).items():
        float_layer = float_twin(layer)
        float_layer.weight = nn.Parameter(layer.quant_weight().detach(), requires_grad=layer.weight.requires_grad)
        replace_module(plain, name, float_layer)
    for name in activation_quantizers(plain):
        if "." in name and name.rpartition(".")[2] != "input_quant":
            replace_module(plain, name, nn.Identity())
    return plain


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Run the float path of every fake-quantized layer and tensor inside the block."""
    parts = [*quant_layers(model).values(), *activation_quantizers(model).values()]
    before = [p.quantize for p in parts]
    for p in parts:
        p.quantize = False
    try:
        yield
    finally:
        for p, was in zip(parts, before):
            p.quantize = was


@contextmanager
def frozen_weight_scales(model: nn.Module) -> Iterator[None]:
    """Hand the ONNX exporter each layer's current weight scale as a constant (see ``quant_weight``)."""
    layers = quant_layers(model).values()
    for layer in layers:
        layer.frozen_weight_scale = weight_scale(layer.weight, layer.weight_qmax).clone()
    try:
        yield
    finally:
        for layer in layers:
            layer.frozen_weight_scale = None
