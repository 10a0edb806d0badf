"""INT8 fake quantization for QAT, in the one form TensorRT, OpenVINO and ONNX Runtime all accept.

Weights are quantized per output channel (axis 0), symmetric, scale = max|w| / 127 taken from the
current weights; the input activation of every Conv2d and Linear is quantized per tensor, symmetric,
zero-point 0, int8 [-128, 127], with a range calibrated once (``calibrate``) and then kept fixed.
Exported with the TorchScript ONNX exporter, each fake-quant op becomes QuantizeLinear ->
DequantizeLinear with int8 zero-points of 0 (explicit quantization, the "QDQ" form).

Why this is written here and not taken from a library: it is ~150 lines over PyTorch's own
fake-quant kernels (``torch.fake_quantize_per_*_affine``, whose backward is the straight-through
estimator and which the exporter maps to Q/DQ); ``torch.ao.quantization`` is deprecated; NNCF's
PyTorch QAT picks *unsigned* activations after a ReLU, which TensorRT's explicit quantization
rejects (it takes int8 with zero-point 0 only). Owning the form means every backend sees the same
integers the fine-tuning saw.

BatchNorm stays live while fine-tuning and is folded into the preceding convolution afterwards
(``fold_batchnorm``), so the exported graph is DQ(int8 weight) -> Conv(+bias), the pattern TensorRT's
and OpenVINO's INT8 fusions expect (the TorchScript exporter does not fold a BN behind a
fake-quantized weight). Folding *after* QAT keeps the trained integers: with a per-channel symmetric
scale s = max|w| / 127, folding multiplies each channel by c = gamma / sqrt(var + eps) and its scale
by |c|, so round(w c / s') = sign(c) round(w / s) (up to float rounding at exact ties). Folding
*before* QAT, the other common recipe, removes BN's normalisation from the fine-tuning: on digits the
configured SGD (lr 0.005) took a ResNet-8 from 96% to 83% top-1 in one epoch even without quantization,
while fine-tuning with BN kept 97%. Pairs are found by tracing the float model with torch.fx; a model
fx cannot trace keeps its BatchNorms, and ``find_conv_bn_pairs`` says why.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgepipe.errors import EdgepipeError

log = logging.getLogger(__name__)

NUM_BITS = 8
QMIN, QMAX = -128, 127
WEIGHTS = "int8 per-channel symmetric axis 0"
ACTIVATIONS = "int8 per-tensor symmetric zp 0"
CALIBRATION_METHODS = ("max", "percentile")
HISTOGRAM_BINS = 2048
_EPS = 1e-8
"""Smallest range: keeps every scale > 0 (an all-zero channel or input still quantizes to 0)."""


def quant_settings(calibration: str = "percentile", percentile: float = 99.99, batches: int | None = None,
                   bn_folded: Iterable[tuple[str, str]] = (), weight_bits: int = NUM_BITS) -> dict[str, Any]:
    """The JSON-able settings ``insert_fake_quant`` takes, and which a QAT artifact's model.json keeps.

    ``weight_bits`` 7 keeps weights in [-63, 63] (still int8 with zero-point 0): a CPU without VNNI
    multiplies u8 activations by s8 weights with vpmaddubsw, whose int16 pair sums saturate with full
    8-bit weights (the overflow NNCF's ``overflow_fix`` avoids the same way). Measured here on an AVX2
    CPU: a CIFAR ResNet-20 QDQ model fell from 86% (ONNX Runtime) to 68% top-1 in OpenVINO INT8 with
    8-bit weights; halving its weights to 7 bits restored it."""
    return {"num_bits": NUM_BITS, "weight_bits": weight_bits, "weights": WEIGHTS, "activations": ACTIVATIONS,
            "calibration": {"method": calibration, "percentile": percentile, "batches": batches},
            "bn_folded": [[conv, bn] for conv, bn in bn_folded]}


def _check_settings(settings: dict[str, Any]) -> list[tuple[str, str]]:
    if not isinstance(settings, dict):
        raise EdgepipeError(f"quantization settings: expected a mapping, got {type(settings).__name__}")
    wanted = {"num_bits": NUM_BITS, "weights": WEIGHTS, "activations": ACTIVATIONS}
    for key, value in wanted.items():
        if settings.get(key, value) != value:
            raise EdgepipeError(f"quantization settings: {key} {settings[key]!r} is not supported "
                                f"(edgepipe quantizes {value!r} only)")
    if settings.get("weight_bits", NUM_BITS) not in (7, 8):
        raise EdgepipeError(f"quantization settings: weight_bits must be 7 or 8, got {settings['weight_bits']!r}")
    pairs = settings.get("bn_folded") or []
    if not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise EdgepipeError(f"quantization settings: bn_folded must list [conv, batchnorm] name pairs, got {pairs!r}")
    return [(str(c), str(b)) for c, b in pairs]


# --- BatchNorm folding -------------------------------------------------------------------------------
def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str | None]:
    """Conv2d -> BatchNorm2d pairs where the conv feeds only that BN and each module is called once.

    Returns (pairs, note): the note says why nothing could be looked for (torch.fx cannot trace the
    model), else None.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors on untraceable Python
        note = f"torch.fx cannot trace the model ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        log.warning("BatchNorm stays unfolded: %s", note)
        return [], note
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or not node.args:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if (type(conv) is nn.Conv2d and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1
                and conv.out_channels == bn.num_features):
            pairs.append((src.target, node.target))
    return pairs, None


def fold_batchnorm(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> int:
    """Fold each BN into its conv (float or fake-quantized) with the BN's running statistics; returns the count.

    The BN becomes nn.Identity and the conv gains a bias. A model being rebuilt for ``load_state_dict`` (edgepipe.models.load_torch_artifact on a pruned
    model) may hold a BN whose size was never restored, because the saved state has no BN entries;
    there only the structure changes and the values come from the state dict.
    """
    count = 0
    for conv_name, bn_name in pairs:
        conv, bn = _get(model, conv_name), _get(model, bn_name)
        if isinstance(bn, nn.Identity):
            continue  # already folded
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise EdgepipeError(f"bn_folded: expected Conv2d '{conv_name}' -> BatchNorm2d '{bn_name}', "
                                f"found {type(conv).__name__} -> {type(bn).__name__}; the model does not "
                                "match its quantization settings")
        if bn.num_features == conv.out_channels:
            training = conv.training
            fused = fuse_conv_bn_eval(conv.eval(), bn.eval()).train(training)  # eval: running statistics
        else:
            fused = conv
            if conv.bias is None:
                fused.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
        _set(model, conv_name, fused)
        _set(model, bn_name, nn.Identity())
        count += 1
    return count


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise EdgepipeError(f"quantization settings name module '{name}', which the model does not have") from None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --- fake-quantized layers ---------------------------------------------------------------------------
def weight_scale(weight: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """Per-output-channel symmetric scale max|w| / qmax (127, or 63 for 7-bit weights), detached."""
    amax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim)))
    return amax.clamp_min(_EPS).float() / qmax


class _FakeQuant:
    """Input (per tensor) and weight (per channel) fake quantization shared by the two layer types."""

    weight: nn.Parameter
    input_amax: torch.Tensor

    def _init_quant(self) -> None:
        # A buffer, not a parameter: the calibrated range stays fixed while fine-tuning.
        self.register_buffer("input_amax", torch.zeros((), device=self.weight.device))
        self.quantize = True
        self.frozen_weight_scale: torch.Tensor | None = None
        self.weight_qmax = QMAX

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return x
        if not torch.jit.is_tracing() and not bool(self.input_amax > 0):
            raise EdgepipeError(f"{type(self).__name__}: activation range not calibrated; "
                                "run edgepipe.quant.calibrate (or load a calibrated state dict) first")
        scale = (self.input_amax / QMAX).detach()
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        x = x if x.dtype == torch.float32 else x.float()  # the kernel is float32 (bf16 under autocast)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, QMIN, QMAX)

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
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX)


class QuantConv2d(_FakeQuant, nn.Conv2d):
    """nn.Conv2d with fake-quantized input (per tensor) and weight (per output channel)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> QuantConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q._init_quant()
        return q.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)


class QuantLinear(_FakeQuant, nn.Linear):
    """nn.Linear with fake-quantized input (per tensor) and weight (per output feature)."""

    @classmethod
    def from_float(cls, linear: nn.Linear) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._init_quant()
        return q.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quant_input(x), self.quant_weight(), self.bias)


_WRAP = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quant_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The fake-quantized layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}


def insert_fake_quant(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Fold the BN pairs ``settings`` lists, then replace every nn.Conv2d / nn.Linear by its Quant* twin.

    Folding first reproduces the structure of a saved QAT model (whose BNs were folded after
    fine-tuning); for QAT itself pass settings without pairs and fold afterwards. In place and keeping
    module names, so the state dict holds ``<name>.weight``, ``<name>.bias`` and
    ``<name>.input_amax``. Subclasses of Conv2d/Linear (e.g. attention's out_proj) are left as they are.
    """
    if quant_layers(model):
        raise EdgepipeError("insert_fake_quant: the model already holds fake-quantized layers")
    fold_batchnorm(model, _check_settings(settings))
    targets = [(n, m) for n, m in model.named_modules() if type(m) in _WRAP]
    if not targets:
        raise EdgepipeError(f"insert_fake_quant: {type(model).__name__} has no nn.Conv2d or nn.Linear to quantize")
    qmax = 2 ** (int(settings.get("weight_bits", NUM_BITS)) - 1) - 1
    for name, module in targets:
        layer = _WRAP[type(module)].from_float(module)
        layer.weight_qmax = qmax
        _set(model, name, layer)
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose Quant* layers are plain nn.Conv2d / nn.Linear holding the fake-quantized weights.

    The activation quantizers are dropped. For tools that dispatch on exact module types, such as
    Torch-Pruning's MAC counter (``tp.utils.count_ops_and_params`` counts nothing for a subclass).
    """
    plain = copy.deepcopy(model)
    for name, layer in quant_layers(plain).items():
        if isinstance(layer, QuantConv2d):
            float_layer = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                    layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                    layer.padding_mode, device="meta")
        else:
            float_layer = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        float_layer.weight = nn.Parameter(layer.quant_weight().detach(), requires_grad=layer.weight.requires_grad)
        float_layer.bias = layer.bias
        _set(plain, name, float_layer.train(layer.training))
    return plain


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Run the float path of every fake-quantized layer inside the block."""
    layers = quant_layers(model).values()
    before = [layer.quantize for layer in layers]
    for layer in layers:
        layer.quantize = False
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.quantize = was


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


# --- calibration -------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], method: str = "percentile",
              percentile: float = 99.99) -> dict[str, float]:
    """Set every layer's ``input_amax`` from the float model's inputs over ``batches``; returns them.

    ``max`` takes max|x|. ``percentile`` takes that percentile of |x| over all samples, from a
    2048-bin histogram on [0, max|x|] (a second pass), so the error is at most max|x| / 2048 and
    memory does not grow with the data (as TensorRT's and pytorch-quantization's calibrators do).
    """
    if method not in CALIBRATION_METHODS:
        raise EdgepipeError(f"qat.calibration: unknown method '{method}' (supported: {', '.join(CALIBRATION_METHODS)})")
    if not 0 < percentile <= 100:
        raise EdgepipeError(f"qat.percentile: must be in (0, 100], got {percentile}")
    batches = list(batches)
    layers = quant_layers(model)
    if not batches:
        raise EdgepipeError("calibrate: no calibration batches; set qat.calibration_batches >= 1")
    if not layers:
        raise EdgepipeError("calibrate: the model has no fake-quantized layers; call insert_fake_quant first")
    was_training = model.training
    model.eval()
    maxima = dict.fromkeys(layers, 0.0)

    def observe_max(name: str, x: torch.Tensor) -> None:
        maxima[name] = max(maxima[name], float(x.detach().abs().max()))

    with quantization_disabled(model):
        _observe(model, layers, batches, observe_max)
        amax = dict(maxima)
        if method == "percentile" and percentile < 100:
            hists = {n: torch.zeros(HISTOGRAM_BINS, dtype=torch.float64) for n in layers}

            def observe_hist(name: str, x: torch.Tensor) -> None:
                if maxima[name] > 0:
                    hists[name] += torch.histc(x.detach().abs().float().cpu(), HISTOGRAM_BINS, 0, maxima[name]).double()

            _observe(model, layers, batches, observe_hist)
            amax = {n: _histogram_percentile(hists[n], maxima[n], percentile) for n in layers}
    for name, layer in layers.items():
        layer.input_amax.fill_(max(amax[name], _EPS))
    model.train(was_training)
    return amax


def _observe(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor], fn: Any) -> None:
    hooks = [layer.register_forward_pre_hook(lambda _m, args, name=name: fn(name, args[0]))
             for name, layer in layers.items()]
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()


def _histogram_percentile(hist: torch.Tensor, top: float, percentile: float) -> float:
    """The value below which ``percentile`` % of the histogram's mass lies (linear within a bin)."""
    total = float(hist.sum())
    if total == 0 or top == 0:
        return 0.0
    target = percentile / 100 * total
    cum = hist.cumsum(0)
    k = min(int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype))), len(hist) - 1)
    below = float(cum[k - 1]) if k else 0.0
    frac = (target - below) / float(hist[k]) if hist[k] > 0 else 1.0
    return (k + min(max(frac, 0.0), 1.0)) * top / len(hist)
