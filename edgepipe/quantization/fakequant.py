"""INT8 fake quantization for QAT: where the quantizers sit, and the layers that simulate them.

Weights are quantized per output channel (axis 0), symmetric, scale = max|w| / qmax (127, or 63 for
7-bit weights, see ``edgepipe.quantization.form``) from the current weights. Activations are quantized per
tensor with zero-point 0: int8 [-128, 127] or, for tensors the graph proves non-negative under the
``uint8_after_relu`` form, uint8 [0, 255]. Ranges are calibrated once (``edgepipe.quantization.calibration.calibrate``) and then kept
fixed. The TorchScript ONNX exporter turns each fake-quant op into QuantizeLinear -> DequantizeLinear
(explicit quantization, the "QDQ" form), so QAT fine-tunes exactly the graph that is exported.

Placement: which tensors get a quantizer. It is decided on the torch.fx graph of the float model,
one quantizer per tensor, shared by all of that tensor's quantized consumers:

=====================  ====================================================================================
consumer               inputs quantized
=====================  ====================================================================================
Conv2d, Linear         the activation input (and the weight, per channel, inside QuantConv2d/QuantLinear)
residual Add           both inputs, when both are computed tensors of the same shape (x + shortcut)
Concat (torch.cat)     every input, with one shared scale, when the concat feeds a quantized consumer
anything else          nothing: it reads the float tensor
=====================  ====================================================================================

Why, with the sources:

- Conv/Linear inputs and weights: the layers that run as integer kernels in every runtime. This is the
  TensorRT Developer Guide's "Q/DQ Layer-Placement Recommendations" ("quantize all inputs of weighted
  operations"), and what ONNX Runtime's QDQ -> QLinearConv fusion matches.
- Residual Add, both inputs: NNCF's CPU hardware config quantizes both inputs of Add
  (nncf/common/hardware/configs/cpu.json, "Add" with quantized activations). With them OpenVINO's
  low-precision transformations fuse the add into the convolution as an int8 eltwise post-op. Without
  them, every block boundary keeps a standalone FakeQuantize and a precision Reorder: measured on a
  CIFAR ResNet-20, NNCF's form ran 1.43x our earlier conv-inputs-only form at batch 64. TensorRT's
  guide also asks for Q/DQ on the residual input so the add fuses into the convolution in INT8.
  NVIDIA's TensorFlow quantization toolkit ships ResNetV1QDQCase for exactly this.
- Concat, shared scale: OpenVINO keeps a concat in int8 only when its inputs share quantization
  parameters, and TensorRT requires it for a concat to run in INT8 (the same guide). NNCF unifies
  the scales of concat inputs the same way.
- One quantizer per tensor: a tensor read by a convolution and by a residual add (a ResNet block's
  input) gets one Q/DQ pair, as NNCF emits, not two with different scales.

A model torch.fx cannot trace (data-dependent control flow) falls back to quantizing the input of
every Conv2d/Linear, signed, inside the layer, and the stage records why its adds stay in float.

Under an accuracy budget (``qat.max_drop``) some Conv/Linear layers stay float (``float_layers`` in the
settings): ``edgepipe.quantization.mixed.keep_float`` takes away their weight quantizer and the quantizer on their input
edge, after the placement above, so loading a saved model places, then keeps the same layers in float.

This module holds the contract: the settings, the BN folding that must keep the integers, and
``insert_fake_quant``, which applies them. The layers live in edgepipe.quantization.layers, the placement
rule's code in edgepipe.quantization.placement; calibration, the form per target and the ONNX side live in
edgepipe.quantization.calibration, edgepipe.quantization.form and edgepipe.export.onnx_export.

Why this is written here and not taken from a library: it is a few hundred lines over PyTorch's own
fake-quant kernels (``torch.fake_quantize_per_*_affine``, whose backward is the straight-through
estimator and which the exporter maps to Q/DQ). ``torch.ao.quantization`` is deprecated. NNCF's
PyTorch QAT fixes one form (unsigned after ReLU), which TensorRT rejects. Owning placement and form
means every backend sees the integers the fine-tuning saw.

BatchNorm stays live while fine-tuning and is folded into the preceding convolution afterwards
(``fold_batchnorm``), so the exported graph is DQ(int8 weight) -> Conv(+bias). Folding *after* QAT
keeps the trained integers: with a per-channel symmetric scale s = max|w| / qmax, folding multiplies
each channel by c = gamma / sqrt(var + eps) and its scale by |c|, so
round(w c / s') = sign(c) round(w / s) (up to float rounding at exact ties). Folding *before* QAT
removes BN's normalisation from the fine-tuning: on digits, the configured SGD (lr 0.005) took a
ResNet-8 from 96% to 83% top-1 in one epoch even without quantization.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgepipe.errors import EdgepipeError
from edgepipe.quantization.layers import (QUANT_LAYER_OF, ActQuant, activation_quantizers, graph_part, quant_layers,
                                         replace_module)
from edgepipe.quantization.mixed import keep_float
from edgepipe.quantization.placement import apply_placement, plan_placement

log = logging.getLogger(__name__)

NUM_BITS = 8
WEIGHTS = "int8 per-channel symmetric axis 0"
ACTIVATIONS = "per-tensor zero-point 0: int8, or uint8 where non-negative (uint8_after_relu)"
PLACEMENT = "conv/linear inputs, residual add inputs, concat inputs (shared scale); one quantizer per tensor"
ACTIVATION_FORMS = ("int8", "uint8_after_relu")


def quant_settings(calibration: str = "percentile", percentile: float = 99.99, batches: int | None = None,
                   bn_folded: Iterable[tuple[str, str]] = (), weight_bits: int = NUM_BITS,
                   activations: str = "int8", form: dict[str, Any] | None = None,
                   float_layers: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON-able settings ``insert_fake_quant`` takes, and which a QAT artifact's model.json keeps.

    ``weight_bits`` and ``activations`` are the form (``edgepipe.quantization.form.resolve_form``); ``form`` is
    its full record (reason, host), kept for the reader. After QAT, ``activation_quantizers`` is added:
    the placement plan that was trained, which loading checks it reproduces. ``float_layers``: Conv/Linear
    layers kept in float under an accuracy budget (``edgepipe.quantization.mixed.keep_float``).
    """
    return {"num_bits": NUM_BITS, "weight_bits": weight_bits, "weights": WEIGHTS, "activations": activations,
            "placement": PLACEMENT, "calibration": {"method": calibration, "percentile": percentile, "batches": batches},
            "bn_folded": [[conv, bn] for conv, bn in bn_folded], **({"form": form} if form else {}),
            "float_layers": list(float_layers)}


def _check_settings(settings: dict[str, Any]) -> list[tuple[str, str]]:
    if not isinstance(settings, dict):
        raise EdgepipeError(f"quantization settings: expected a mapping, got {type(settings).__name__}")
    if settings.get("num_bits", NUM_BITS) != NUM_BITS or settings.get("weights", WEIGHTS) != WEIGHTS:
        bad = "num_bits" if settings.get("num_bits", NUM_BITS) != NUM_BITS else "weights"
        raise EdgepipeError(f"quantization settings: {bad} {settings[bad]!r} is not supported "
                            f"(edgepipe quantizes {NUM_BITS}-bit, {WEIGHTS} only)")
    if "placement" not in settings:
        raise EdgepipeError("quantization settings: this QAT model was made by an older edgepipe (Conv/Linear "
                            "inputs only); rerun the qat stage (`edgepipe run --run RUN --force qat`)")
    if settings.get("activations") not in ACTIVATION_FORMS:
        raise EdgepipeError(f"quantization settings: activations must be one of {', '.join(ACTIVATION_FORMS)}, "
                            f"got {settings.get('activations')!r}")
    if settings.get("weight_bits", NUM_BITS) not in (7, 8):
        raise EdgepipeError(f"quantization settings: weight_bits must be 7 or 8, got {settings['weight_bits']!r}")
    floats = settings.get("float_layers") or []
    if not isinstance(floats, list) or not all(isinstance(n, str) for n in floats):
        raise EdgepipeError(f"quantization settings: float_layers must list layer names, got {floats!r}")
    pairs = settings.get("bn_folded") or []
    if not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise EdgepipeError(f"quantization settings: bn_folded must list [conv, batchnorm] name pairs, got {pairs!r}")
    return [(str(c), str(b)) for c, b in pairs]


# --- BatchNorm folding -------------------------------------------------------------------------------
def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str | None]:
    """Conv2d -> BatchNorm2d pairs where the conv feeds only that BN and each module is called once (names in
    ``model``, within its ``graph_part``).

    Returns (pairs, note): the note says why nothing could be looked for (torch.fx cannot trace the
    model), else None.
    """
    prefix, model = graph_part(model)
    graph, note = _trace(model)
    if graph is None:
        log.warning("BatchNorm stays unfolded: %s", note)
        return [], note
    prefix = f"{prefix}." if prefix else ""
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or not node.args:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if (type(conv) is nn.Conv2d and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1
                and conv.out_channels == bn.num_features):
            pairs.append((prefix + src.target, prefix + node.target))
    return pairs, None


def _trace(model: nn.Module) -> tuple[fx.Graph | None, str | None]:
    try:
        return fx.symbolic_trace(model).graph, None
    except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors on untraceable Python
        return None, f"torch.fx cannot trace the model ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"


def fold_batchnorm(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> int:
    """Fold each BN into its conv (float or fake-quantized) with the BN's running statistics; returns the count.

    The BN becomes nn.Identity and the conv gains a bias. A model being rebuilt for ``load_state_dict``
    (a pruned model) may hold a BN whose size was never restored, because the saved state has no BN
    entries; there only the structure changes and the values come from the state dict.
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
        replace_module(model, conv_name, fused)
        replace_module(model, bn_name, nn.Identity())
        count += 1
    return count


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise EdgepipeError(f"quantization settings name module '{name}', which the model does not have") from None


def insert_fake_quant(model: nn.Module, settings: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """The model with BN pairs folded, activation quantizers placed and Conv2d/Linear weights quantized.

    Folding the pairs ``settings`` lists first reproduces a saved QAT model (whose BNs were folded after
    fine-tuning); for QAT itself pass settings without pairs and fold afterwards. The result is a
    torch.fx GraphModule that keeps the original module names (``<name>.weight``, ``<name>.bias``) plus
    one ``act_quant.<tensor>.amax`` buffer per quantized tensor. A settings dict that holds the trained
    plan (``activation_quantizers``) must be reproduced exactly, else the model does not match it.
    A model fx cannot trace keeps its structure and quantizes each Conv2d/Linear input inside the layer.
    """
    pairs = _check_settings(settings)
    if quant_layers(model) or activation_quantizers(model):
        raise EdgepipeError("insert_fake_quant: the model already holds fake-quantized layers")
    fold_batchnorm(model, pairs)
    whole = model
    prefix, model = graph_part(whole)  # the quantized part; a detector's decoding and NMS stay float
    targets = [(n, m) for n, m in model.named_modules() if type(m) in QUANT_LAYER_OF]
    if not targets:
        raise EdgepipeError(f"insert_fake_quant: {type(model).__name__} has no nn.Conv2d or nn.Linear to quantize")
    qmax = 2 ** (int(settings.get("weight_bits", NUM_BITS)) - 1) - 1
    try:
        traced = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - see _trace
        traced, note = None, _trace(model)[1] or str(e)
    if traced is not None:
        plan = plan_placement(traced, torch.zeros(2, *input_shape), settings["activations"])
        trained = settings.get("activation_quantizers")
        if trained is not None and [(p["name"], p["signed"], p["group"]) for p in plan] != \
                [(p["name"], p["signed"], p["group"]) for p in trained]:
            raise EdgepipeError("quantization settings: the model's graph no longer gives the quantizer placement "
                                "it was trained with; rerun the qat stage")
        apply_placement(traced, plan)
        model = traced
    else:
        log.warning("qat: residual adds and concats stay float, only Conv2d/Linear inputs are quantized: %s", note)
    for name, module in targets:
        layer = QUANT_LAYER_OF[type(module)].from_float(module, qmax)
        if traced is None:
            layer.input_quant = ActQuant(signed=True)
        replace_module(model, name, layer)
    if prefix:
        replace_module(whole, prefix, model)
        model = whole
    if settings.get("float_layers"):
        keep_float(model, settings["float_layers"])
    return model
