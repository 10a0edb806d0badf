"""Mixed precision under an accuracy budget (``qat.max_drop``): which Conv/Linear layers stay in float.

Users state what they can afford to lose ("at most 1 point of top-1", in the task's headline metric and its
direction: ``Budget`` takes the task), not which layers to quantize. The
QAT stage (stages/qat.py) quantizes every Conv/Linear; when that loses more than the budget, layers go back
to the float fallback dtype, the most INT8-sensitive first, until the budget holds.

Sensitivity: each Conv/Linear quantized alone (its per-channel weights and the activation quantizer on its
input; every other layer and tensor in float), on the calibrated model with its BatchNorm folded, as it would
be saved. Recorded per layer: the top-1 drop against the float model on the budget images, and the mean
KL divergence of its softmax from the float model's. Layers rank by top-1 drop; ties (common: one layer
alone rarely moves top-1 on a few thousand images) by the KL divergence, which moves with every image.
One evaluation per layer, so for N layers N passes over the budget images (``qat.budget_images`` caps them).
This is the per-layer analysis of AIMET and the ranking NNCF's accuracy control does by reverting one layer
at a time; ranking by one-at-a-time is the "quantize one layer at a time" the issue names, not a proxy.

Selection: with the layers in that order, keep the first k in float for k = 1, 2, ... and measure the mixed
model (quantizers re-placed for the mix, ranges from the all-INT8 calibration) until its drop is within the
budget. QAT fine-tunes the chosen mix; if the fine-tuned model then misses the budget, selection goes on from
there on the fine-tuned weights. If every layer in float still misses it, the stage keeps the float model.

What "kept in float" means in the graph (``keep_float``): the layer is a plain nn.Conv2d/nn.Linear again (no
weight quantizer), and it reads its input tensor unquantized, even where that tensor is quantized for another
consumer (a residual add, an INT8 sibling). So the exported ONNX has no QuantizeLinear/DequantizeLinear on
that layer's input or weight. Quantizers left without an INT8 consumer (an average pool or a concat that now
feeds only float layers) are removed too. The quantizers on residual adds stay: they belong to the add, whose
INT8 form lets the runtime fuse it into the INT8 convolution before it.

Written here, not taken from NNCF's accuracy control: that works on NNCF's post-training OpenVINO/ONNX
graphs, while this stage's graph is the QAT model it fine-tunes and exports with its own placement
(edgepipe.quantization.fakequant), and the mix must carry on into the fine-tuning and the export.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from edgepipe.errors import EdgepipeError
from edgepipe.quantization.layers import (QUANTIZERS, QuantConv2d, QuantLinear, activation_quantizers, float_twin,
                                          quant_layers, quantization_disabled, replace_module)
from edgepipe.quantization.placement import is_dropout, is_shape_only
from edgepipe.tasks.metric import TOP1, Metric

if TYPE_CHECKING:
    from edgepipe.tasks.base import Task

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], tuple[float, torch.Tensor | None]]
"""model -> (top-1 on the budget images, their logits)."""


def _is_quantizer(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(f"{QUANTIZERS}.")


def _input_edge(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(the node that reads the quantizer, the quantizer) above a layer's input, through reshapes and dropouts."""
    modules = dict(gm.named_modules())
    consumer, src = node, node.args[0] if node.args else None
    while (isinstance(src, fx.Node) and not _is_quantizer(src)
           and (is_shape_only(src, modules) or is_dropout(src, modules))
           and len(src.users) == 1 and src.args and isinstance(src.args[0], fx.Node)):
        consumer, src = src, src.args[0]
    return consumer, src if _is_quantizer(src) else None


def layer_input_quantizers(model: nn.Module) -> dict[str, list[str]]:
    """Each weight-quantized layer's input quantizers (module names), for quantizing one layer alone."""
    layers = quant_layers(model)
    out: dict[str, list[str]] = {name: [] for name in layers}
    if isinstance(model, fx.GraphModule) and hasattr(model, QUANTIZERS):
        for node in model.graph.nodes:
            if node.op == "call_module" and node.target in layers:
                _, q = _input_edge(model, node)
                if q is not None:
                    out[node.target].append(str(q.target))
    else:  # the untraced fallback: the quantizer sits inside the layer
        for name, layer in layers.items():
            if layer.input_quant is not None:
                out[name].append(f"{name}.input_quant")
    return out


def _feeds_int8(node: fx.Node, modules: dict[str, nn.Module], seen: set[fx.Node]) -> bool:
    """Does ``node``'s output reach a weight-quantized layer through quantizers, reshapes and pooling?"""
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        module = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(module, QuantConv2d | QuantLinear):
            return True
        if (_is_quantizer(user) or is_shape_only(user, modules) or is_dropout(user, modules)
                or isinstance(module, nn.AdaptiveAvgPool2d | nn.AvgPool2d | nn.MaxPool2d | nn.AdaptiveMaxPool2d)
                or (user.op == "call_function" and getattr(user.target, "__name__", "") in
                    ("cat", "concat", "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "flatten"))):
            if _feeds_int8(user, modules, seen):
                return True
    return False


def keep_float(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """Return ``layers`` (Conv/Linear module names) of a fake-quantized model to float, in place (see the
    module docstring: no Q/DQ on their inputs or weights); quantizers left without an INT8 consumer go too."""
    layers = list(dict.fromkeys(layers))
    if not layers:
        return model
    quantized = quant_layers(model)
    unknown = [n for n in layers if n not in quantized]
    if unknown:
        raise EdgepipeError(f"qat: cannot keep {', '.join(unknown)} in float: not a quantized Conv2d/Linear of the "
                            f"model (quantized layers: {', '.join(list(quantized)[:6])}...)")
    for name in layers:
        replace_module(model, name, float_twin(quantized[name]))
    if not (isinstance(model, fx.GraphModule) and hasattr(model, QUANTIZERS)):
        return model  # untraced: the input quantizer left with the layer
    graph, wanted = model.graph, set(layers)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in wanted:
            consumer, q = _input_edge(model, node)
            if q is not None:
                consumer.replace_input_with(q, q.args[0])
    changed = True
    while changed:  # an avg-pool or concat quantizer is there for the INT8 layer after it; without one, it goes
        changed = False
        modules = dict(model.named_modules())
        for q in [n for n in graph.nodes if _is_quantizer(n)]:
            for user in list(q.users):
                is_pool_or_cat = (user.op == "call_function" and getattr(user.target, "__name__", "") in
                                  ("cat", "concat", "avg_pool2d", "adaptive_avg_pool2d")) or \
                    isinstance(modules.get(user.target) if user.op == "call_module" else None,
                               nn.AvgPool2d | nn.AdaptiveAvgPool2d)
                if is_pool_or_cat and not _feeds_int8(user, modules, {user}):
                    user.replace_input_with(q, q.args[0])
                    changed = True
            if not q.users:
                graph.erase_node(q)
                model.delete_submodule(str(q.target))
                changed = True
    graph.lint()
    model.recompile()
    return model


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean KL(reference || model) of the softmax outputs, in nats."""
    ref = torch.log_softmax(reference.float(), 1)
    return float(torch.nn.functional.kl_div(torch.log_softmax(logits.float(), 1), ref, log_target=True,
                                            reduction="batchmean"))


def sensitivity(model: nn.Module, evaluate: Evaluate, float_top1: float, float_logits: torch.Tensor | None,
                progress: Callable[[int, int], None] | None = None, metric: Metric | None = None,
                ) -> list[dict[str, Any]]:
    """Each Conv/Linear of a calibrated fake-quantized ``model`` quantized alone: its top-1 drop (points)
    and KL divergence against the float model, most sensitive first (see the module docstring)."""
    inputs = layer_input_quantizers(model)
    acts = activation_quantizers(model)
    layers = quant_layers(model)
    rows = []
    with quantization_disabled(model):
        for i, (name, layer) in enumerate(layers.items()):
            on: list[Any] = [layer, *(acts[q] for q in inputs[name] if q in acts)]
            for part in on:
                part.quantize = True
            try:
                top1, logits = evaluate(model)
            finally:
                for part in on:
                    part.quantize = False
            rows.append({"layer": name, "index": i, "op": type(layer).__name__.removeprefix("Quant"),
                         "top1": top1, "top1_drop_points": (metric or TOP1).drop_points(float_top1, top1),
                         "kl_divergence": _kl(logits, float_logits) if float_logits is not None else 0.0,
                         "params": layer.weight.numel()})
            if progress:
                progress(i + 1, len(layers))
    rows.sort(key=lambda r: (-round(r["top1_drop_points"], 6), -r["kl_divergence"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def copy_ranges(source: nn.Module, target: nn.Module) -> None:
    """Give ``target``'s activation quantizers the calibrated ranges of the same-named ones in ``source``."""
    ranges = {n: q.amax for n, q in activation_quantizers(source).items()}
    for name, q in activation_quantizers(target).items():
        if name not in ranges:
            raise EdgepipeError(f"qat: quantizer {name} of the mixed model has no calibrated range")
        q.amax.copy_(ranges[name])


def select(order: Sequence[str], start: int, float_top1: float, max_drop: float,
           measure: Callable[[list[str]], float], log_as: str, metric: Metric | None = None,
           ) -> tuple[list[str], list[dict[str, Any]], bool]:
    """Keep the first k of ``order`` in float, k = start, start + 1, ..., until the drop is within ``max_drop``.

    ``measure(float_layers)`` builds and measures that mix and returns its top-1. Returns (the float layers,
    one record per mix tried, whether the budget holds).
    """
    steps = []
    for k in range(start, len(order) + 1):
        top1 = measure(list(order[:k]))
        drop = (metric or TOP1).drop_points(float_top1, top1)
        steps.append({"phase": log_as, "float_layers": k, "top1": top1, "drop_points": drop,
                      "within_budget": drop <= max_drop})
        log.info("qat: %s, %d layer(s) in float: top-1 %.4f, %.2f points below float (budget %.2f)",
                 log_as, k, top1, drop, max_drop)
        if drop <= max_drop:
            return list(order[:k]), steps, True
    return list(order), steps, False


def _evaluate(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], task: Task,
              ) -> tuple[float, torch.Tensor | None]:
    """The task's headline on the budget images (``Task.score_outputs``), and the outputs as one tensor when the
    model has one (a classifier's logits: the KL tie-break of the sensitivity ranking), else None."""
    from edgepipe import device as devices

    was = model.training
    model.eval()
    on = devices.module_device(model)
    with torch.no_grad():  # on the model's device; the outputs back on the CPU, beside the labels
        outputs = [devices.to_device(task.forward(model, devices.to_device(x, on)), torch.device("cpu")) for x, _ in batches]
    model.train(was)
    score = task.score_outputs(outputs, [y for _, y in batches])
    logits = torch.cat([o.float() for o in outputs]) if all(isinstance(o, torch.Tensor) for o in outputs) else None
    return score, logits


class Budget:
    """One accuracy budget through the QAT stage: the images it is measured on, the per-layer sensitivity of
    the calibrated all-INT8 model, and the layers kept in float after calibration and after fine-tuning.

    Args:
        max_drop: ``qat.max_drop``, points of top-1 against the float model on ``batches``.
        batches: The budget images, (normalized images, labels); ``where`` says which split they are.
        float_model: The stage's float input.
        calibrated: The calibrated all-INT8 model, BatchNorm folded (as it would be saved).
        build: float layers -> the calibrated mix with BatchNorm folded (the stage re-places the quantizers).
        progress: ``progress(done, total)`` over the sensitivity passes.
    """

    def __init__(self, max_drop: float, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], where: str,
                 float_model: nn.Module, calibrated: nn.Module, build: Callable[[list[str]], nn.Module],
                 progress: Callable[[int, int], None] | None = None, *, task: Task) -> None:
        self.task = task
        self.metric = task.headline
        self.max_drop, self.batches, self.where, self.build = max_drop, list(batches), where, build
        self.images = sum(len(y) for _, y in self.batches)
        self.float_top1, self.float_logits = self.evaluate(float_model)
        self.all_int8 = calibrated
        self.all_int8_top1 = self.evaluate(calibrated)[0]
        log.info("qat: budget %.2f points on %d %s images: float top-1 %.4f, all-INT8 (calibrated) %.4f; measuring "
                 "each of %d layers quantized alone", max_drop, self.images, where, self.float_top1,
                 self.all_int8_top1, len(quant_layers(calibrated)))
        self.sensitivity = sensitivity(calibrated, self.evaluate, self.float_top1, self.float_logits, progress,
                                       self.metric)
        self.order = [r["layer"] for r in self.sensitivity]
        self.steps: list[dict[str, Any]] = [self._step("calibrated", 0, self.all_int8_top1)]
        self.float_layers_calibrated: list[str] = []
        self.outcome = "int8"

    def evaluate(self, model: nn.Module) -> tuple[float, torch.Tensor | None]:
        return _evaluate(model, self.batches, self.task)

    def drop_points(self, score: float) -> float:
        """How much worse than the float model ``score`` is, in points of the task's headline metric."""
        return self.metric.drop_points(self.float_top1, score)

    def _step(self, phase: str, k: int, top1: float) -> dict[str, Any]:
        drop = self.drop_points(top1)
        return {"phase": phase, "float_layers": k, "top1": top1, "drop_points": drop, "within_budget": drop <= self.max_drop}

    def select_after_calibration(self) -> list[str] | None:
        """The layers the calibrated model keeps in float (none when all-INT8 holds the budget); None when even
        every Conv/Linear in float misses it."""
        if self.steps[-1]["within_budget"]:
            return []
        layers, steps, ok = select(self.order, 1, self.float_top1, self.max_drop,
                                   lambda fl: self.evaluate(self.build(fl))[0], "calibrated", self.metric)
        self.steps += steps
        if not ok:
            return self._give_up()
        self.float_layers_calibrated = layers
        self.outcome = "mixed"
        return layers

    def select_after_fine_tuning(self, model: nn.Module, kept: str) -> list[str] | None:
        """The layers the saved model keeps in float: the calibrated choice, plus more (the next most sensitive)
        when the model QAT kept misses the budget; None when even all of them in float miss it."""
        k0 = len(self.float_layers_calibrated)
        phase = f"after fine-tuning ({kept} kept)"
        self.steps.append(self._step(phase, k0, self.evaluate(model)[0]))
        if self.steps[-1]["within_budget"]:
            return list(self.float_layers_calibrated)
        layers, steps, ok = select(self.order, k0 + 1, self.float_top1, self.max_drop,
                                   lambda fl: self.evaluate(keep_float(copy.deepcopy(model), fl[k0:]))[0], phase,
                                   self.metric)
        self.steps += steps
        if not ok:
            return self._give_up()
        self.outcome = "mixed"
        return layers

    def _give_up(self) -> None:
        self.outcome = "float"
        log.warning("qat: even with all %d Conv/Linear layers in float the model misses the budget of %.2f points "
                    "(the quantized residual adds and concats alone cost more); keeping the float model",
                    len(self.order), self.max_drop)
        return None

    def record(self, float_layers: list[str], fallback: dict[str, Any], variants: list[dict[str, Any]] | None = None,
               ) -> dict[str, Any]:
        return {"max_drop_points": self.max_drop, "metric": self.metric.as_dict(), "measured_on": self.where,
                "images": self.images,
                "float_top1": self.float_top1, "all_int8_top1": self.all_int8_top1, "outcome": self.outcome,
                "float_layers": float_layers, "fallback_dtype": fallback["dtype"], "fallback_reason": fallback["reason"],
                "sensitivity_method": "each Conv/Linear quantized alone (weights + input); top-1 drop against float, "
                                      "ties by KL divergence", "sensitivity": self.sensitivity,
                "selection": self.steps, "variants": variants or []}
