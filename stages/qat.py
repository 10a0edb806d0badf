"""Stage 4, qat: INT8 quantization-aware training, when the target device runs int8.

resolve the INT8 form for the target on this host (edgepipe.quant_form: int8 or uint8-after-ReLU
activations, 8- or 7-bit weights) -> place fake quantizers on the graph (edgepipe.quant: Conv/Linear
inputs, both inputs of residual adds, concat inputs with one scale; weights per-channel) ->
calibrate activation ranges (edgepipe.calibration) on ``qat.calibration_batches`` un-augmented
training batches -> snapshot the calibrated model with its BatchNorm folded and measure it (what
post-training quantization alone gives) -> fine-tune against the teacher's soft targets with the ranges
fixed and BatchNorm live -> fold BatchNorm into the convolutions (exact for per-channel scales, see
edgepipe.quant) and measure -> save the better of the two on the validation set (``kept``: calibrated or
fine-tuned; a tie keeps the fine-tuned one). Both are the same kind of model (the same quantizers and
ranges, BatchNorm folded the same way), so what is saved and exported is exactly what was measured. A
target without int8, or ``qat.enabled: false``, passes the input through.
"""
from __future__ import annotations

import copy
import json
import logging
from typing import Any

from torch import nn

from edgepipe.distillation import kd_step
from edgepipe.config import PipelineConfig
from edgepipe.errors import EdgepipeError
from edgepipe.models import load_torch_artifact, save_torch_artifact
from edgepipe.calibration import calibrate
from edgepipe.quant import (activation_quantizers, find_conv_bn_pairs, fold_batchnorm, insert_fake_quant,
                            placement_of, quant_layers, quant_settings)
from edgepipe.quant_form import form_key, resolve_form
from edgepipe.profiles import HardwareProfile
from edgepipe.stage import StageContext, StageResult
from edgepipe.training import autocast_dtype, evaluate, fit, seed_everything
from edgepipe.types import ArtifactKind

NAME = "qat"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("qat", "soft_targets", "data", "seed")
USES_TEACHER = True
MEASURED = True
DISTRIBUTED = True  # under torchrun: calibration on every rank (the same batches), fine-tuning under DDP
log = logging.getLogger(__name__)


def target_key(profile: HardwareProfile, config: PipelineConfig) -> dict[str, Any]:
    """Whether the target runs int8, and in which form on this host (edgepipe.quant_form): two targets
    that need the same form share one QAT model; anything else gets its own."""
    if not profile.supports_int8 or not config.qat.enabled:
        return {"supports_int8": profile.supports_int8}
    q = config.qat
    return {"supports_int8": True, "form": form_key(resolve_form(profile, q.activations, q.weight_bits))}


def run(ctx: StageContext) -> StageResult:
    cfg, qcfg = ctx.config, ctx.config.qat
    desc = _input_description(ctx)
    if not qcfg.enabled:
        return StageResult(artifact=ctx.input, skipped="disabled in config (qat.enabled: false)")
    if not ctx.profile.supports_int8:
        dtypes = ", ".join(d.value for d in ctx.profile.dtypes)
        return StageResult(artifact=ctx.input, skipped=f"target {ctx.profile.name} lists no int8 (dtypes: {dtypes})")
    if autocast_dtype(qcfg.optim) is not None:
        log.warning("qat: bf16 autocast rounds the fake-quantized values; qat.optim.autocast: off keeps them exact")
    form = resolve_form(ctx.profile, qcfg.activations, qcfg.weight_bits)
    log.info("qat: %s activations, %d-bit weights (%s)", form["activations"], form["weight_bits"], form["reason"])
    seed_everything(cfg.seed + 3)
    data, eval_bs = ctx.data, cfg.data.eval_batch_size

    model = load_torch_artifact(ctx.input)
    # Without a teacher stage, the float model itself is the teacher (self-distillation).
    teacher = load_torch_artifact(ctx.teacher) if ctx.teacher else copy.deepcopy(model)
    float_top1 = evaluate(model, data, eval_bs)
    pairs, fold_note = find_conv_bn_pairs(model)  # traced on the float model, folded after fine-tuning
    input_shape = tuple(desc["input_shape"])

    def settings(pairs_folded: list[tuple[str, str]]) -> dict[str, Any]:
        return quant_settings(qcfg.calibration, qcfg.percentile, qcfg.calibration_batches, pairs_folded,
                              form["weight_bits"], form["activations"], form)

    model = insert_fake_quant(model, settings([]), input_shape)
    placement = placement_of(model)

    batches = data.calibration_batches(qcfg.calibration_batches, cfg.data.batch_size)
    amax = calibrate(model, batches, qcfg.calibration, qcfg.percentile)
    # The calibrated model as it would be saved: BN folded with its running statistics, as after fine-tuning.
    calibrated = copy.deepcopy(model)
    fold_batchnorm(calibrated, pairs)
    ptq_top1 = evaluate(calibrated, data, eval_bs)
    log.info("qat: float top-1 %.4f, calibrated (PTQ) top-1 %.4f", float_top1, ptq_top1)

    targets = ctx.soft_targets(teacher) if ctx.teacher else teacher
    history = fit(model, data, qcfg.optim, kd_step(targets, qcfg.temperature, qcfg.alpha),
                  batch_size=cfg.data.batch_size, checkpoint_dir=ctx.checkpoint_dir, task="qat",
                  progress=ctx.progress, eval_batch_size=eval_bs)
    fold_batchnorm(model, pairs)
    qat_top1 = evaluate(model, data, eval_bs)
    kept = "fine-tuned" if qat_top1 >= ptq_top1 else "calibrated"
    if kept == "calibrated":
        log.warning("qat: fine-tuning lowered top-1 from %.4f (calibrated) to %.4f; keeping the calibrated model",
                    ptq_top1, qat_top1)
        model = calibrated
    saved = {**settings(pairs), "activation_quantizers": placement}
    artifact = save_torch_artifact(model, desc["build"], ctx.out_dir, input_shape, desc["num_classes"],
                                   quantization=saved)
    return StageResult(artifact, records={
        "history": history,
        "calibration": {"method": qcfg.calibration, "percentile": qcfg.percentile, "batches": len(batches),
                        "samples": sum(len(x) for x in batches), "amax": amax},
        "float_top1": float_top1, "ptq_top1": ptq_top1, "qat_top1": qat_top1, "kept": kept,
        "kept_top1": max(ptq_top1, qat_top1),
        "bn_folded": len(pairs), "bn_unfolded": _remaining_batchnorms(model), "bn_note": fold_note,
        "quantized_layers": len(quant_layers(model)),
        "form": form, "placement": _placement_summary(placement, len(activation_quantizers(model))),
        "teacher": "teacher stage" if ctx.teacher else "float input (self-distillation)",
        "soft_targets": targets.record() if ctx.teacher else None,
        "temperature": qcfg.temperature, "alpha": qcfg.alpha, "settings": saved})


def _input_description(ctx: StageContext) -> dict[str, Any]:
    """The input artifact's model.json (build spec, input shape, classes); refuses what QAT cannot take."""
    art = ctx.input
    if art is None or art.kind not in INPUT_KINDS:
        got = "nothing" if art is None else f"an artifact of kind {art.kind.value}"
        raise EdgepipeError(f"qat: needs a torch model from an earlier stage, got {got}")
    desc = json.loads(art.path("build").read_text())
    if desc.get("quantization"):
        raise EdgepipeError(f"{art.path('build')}: the model is already quantized; QAT takes a float model")
    return desc


def _remaining_batchnorms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _placement_summary(placement: list[dict[str, Any]] | None, quantizers: int) -> dict[str, Any]:
    """How many tensors are quantized, for which consumers, and in which sign (for the stage records)."""
    if placement is None:
        return {"traced": False, "quantizers": quantizers,
                "note": "torch.fx cannot trace the model: only Conv2d/Linear inputs are quantized, adds stay float"}
    consumers: dict[str, int] = {}
    for entry in placement:
        for _, op in entry["consumers"]:
            consumers[op] = consumers.get(op, 0) + 1
    return {"traced": True, "quantizers": len(placement), "unsigned": sum(not p["signed"] for p in placement),
            "signed": sum(p["signed"] for p in placement), "consumers": consumers,
            "shared_scale_groups": len({p["group"] for p in placement if p["group"]})}
