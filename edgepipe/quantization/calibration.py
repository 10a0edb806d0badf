"""Activation-range calibration for the fake quantizers of ``edgepipe.quantization.fakequant``.

Each activation quantizer gets its range (``amax``) from the float model's tensors over a few
un-augmented training batches, once, before QAT fine-tuning keeps it fixed. ``max`` takes the largest
|x|; ``percentile`` clips the rarest outliers, which usually costs less accuracy than the resolution a
single outlier takes from every other value. Quantizers of one shared-scale group (a concat's inputs)
end with the largest range among them.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.quantization.layers import MIN_RANGE, activation_quantizers, quantization_disabled

CALIBRATION_METHODS = ("max", "percentile")
HISTOGRAM_BINS = 2048


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], method: str = "percentile",
              percentile: float = 99.99, forward: Any = None) -> dict[str, float]:
    """Set every activation quantizer's ``amax`` from the float model's tensors over ``batches``.

    ``max`` takes max|x|. ``percentile`` takes that percentile of |x| over all samples, from a
    2048-bin histogram on [0, max|x|] (a second pass), so the error is at most max|x| / 2048 and
    memory does not grow with the data (as TensorRT's and pytorch-quantization's calibrators do).
    Quantizers of one group (the inputs of a concat) then share the largest range among them.
    Returns {quantizer name: amax}.
    """
    if method not in CALIBRATION_METHODS:
        raise EdgepipeError(f"qat.calibration: unknown method '{method}' (supported: {', '.join(CALIBRATION_METHODS)})")
    if not 0 < percentile <= 100:
        raise EdgepipeError(f"qat.percentile: must be in (0, 100], got {percentile}")
    batches = list(batches)
    quantizers = activation_quantizers(model)
    if not batches:
        raise EdgepipeError("calibrate: no calibration batches; set qat.calibration_batches >= 1")
    if not quantizers:
        raise EdgepipeError("calibrate: the model has no fake-quantized layers; call insert_fake_quant first")
    was_training = model.training
    model.eval()
    maxima = dict.fromkeys(quantizers, 0.0)

    def observe_max(name: str, x: torch.Tensor) -> None:
        maxima[name] = max(maxima[name], float(x.detach().abs().max()))

    with quantization_disabled(model):
        _observe(model, quantizers, batches, observe_max, forward)
        amax = dict(maxima)
        if method == "percentile" and percentile < 100:
            hists = {n: torch.zeros(HISTOGRAM_BINS, dtype=torch.float64) for n in quantizers}

            def observe_hist(name: str, x: torch.Tensor) -> None:
                if maxima[name] > 0:
                    hists[name] += torch.histc(x.detach().abs().float().cpu(), HISTOGRAM_BINS, 0, maxima[name]).double()

            _observe(model, quantizers, batches, observe_hist, forward)
            amax = {n: _histogram_percentile(hists[n], maxima[n], percentile) for n in quantizers}
    shared: dict[str, float] = {}
    for name, q in quantizers.items():
        if q.group is not None:
            shared[q.group] = max(shared.get(q.group, 0.0), amax[name])
    for name, q in quantizers.items():
        amax[name] = shared[q.group] if q.group is not None else amax[name]
        q.amax.fill_(max(amax[name], MIN_RANGE))
    model.train(was_training)
    return amax


def _observe(model: nn.Module, quantizers: dict[str, nn.Module], batches: list[torch.Tensor], fn: Any,
             forward: Any = None) -> None:
    """Run ``batches`` through ``model`` (``forward(model, x)``: a task's, for inputs that are not one tensor) with
    ``fn(name, tensor)`` called on every quantizer's input."""
    hooks = [q.register_forward_pre_hook(lambda _m, args, name=name: fn(name, args[0]))
             for name, q in quantizers.items()]
    try:
        for x in batches:
            forward(model, x) if forward is not None else model(x)
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
