"""Stage 4, qat: INT8 quantization-aware training, when the target device runs int8.

resolve the INT8 form for the target on this host (edgepipe.quantization.form: int8 or uint8-after-ReLU
activations, 8- or 7-bit weights) -> place fake quantizers on the graph (edgepipe.quantization.fakequant: Conv/Linear
inputs, both inputs of residual adds, concat inputs with one scale; weights per-channel) ->
calibrate activation ranges (edgepipe.quantization.calibration) on ``qat.calibration_batches`` un-augmented
training batches -> snapshot the calibrated model with its BatchNorm folded and measure it (what
post-training quantization alone gives) -> fine-tune against the teacher's soft targets with the ranges
fixed and BatchNorm live -> fold BatchNorm into the convolutions (exact for per-channel scales, see
edgepipe.quantization.fakequant) and measure -> save the better of the two on the validation set (``kept``: calibrated or
fine-tuned; a tie keeps the fine-tuned one). Both are the same kind of model (the same quantizers and
ranges, BatchNorm folded the same way), so what is saved and exported is exactly what was measured. A
target without int8, or ``qat.enabled: false``, passes the input through.

With an accuracy budget (``qat.max_drop``, edgepipe.quantization.mixed): after calibration, each Conv/Linear is measured
quantized alone (sensitivity), and when all-INT8 loses more than the budget the most sensitive layers return
to float (``qat.fallback_dtype``) one by one until it holds; QAT fine-tunes that mix, and selection goes on
from the fine-tuned model if it then misses the budget. If every layer in float still misses it, the stage
says so and passes the float model through. The chosen mix, all-INT8 and all-float are then compiled for the
target and timed, so the records show what the float layers cost.
"""
from __future__ import annotations

import copy
import json
import logging
from typing import Any

from torch import nn

from edgepipe.training.distillation import kd_step
from edgepipe.config import PipelineConfig
from edgepipe.errors import EdgepipeError
from edgepipe.models.loading import load_torch_artifact, save_torch_artifact
from edgepipe.quantization.calibration import calibrate
from edgepipe.quantization.mixed import Budget, copy_ranges, keep_float
from edgepipe.quantization.fakequant import find_conv_bn_pairs, fold_batchnorm, insert_fake_quant, quant_settings
from edgepipe.quantization.layers import activation_quantizers, quant_layers
from edgepipe.quantization.placement import placement_of
from edgepipe.quantization.form import form_key, resolve_fallback, resolve_form
from edgepipe.profiles import HardwareProfile
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.training.loop import autocast_dtype, fit, seed_everything
from edgepipe.types import ArtifactKind

NAME = "qat"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("qat", "soft_targets", "data", "seed")
USES_TEACHER = True
MEASURED = True
DISTRIBUTED = True  # under torchrun: calibration on every rank (the same batches), fine-tuning under DDP
log = logging.getLogger(__name__)


def target_key(profile: HardwareProfile, config: PipelineConfig) -> dict[str, Any]:
    """Whether the target runs int8, and in which form on this host (edgepipe.quantization.form): two targets
    that need the same form share one QAT model; anything else gets its own."""
    if not profile.supports_int8 or not config.qat.enabled:
        return {"supports_int8": profile.supports_int8}
    q = config.qat
    return {"supports_int8": True, "form": form_key(resolve_form(profile, q.activations, q.weight_bits)),
            "fallback_dtype": resolve_fallback(profile, q.fallback_dtype)["dtype"]}


def run(ctx: StageContext) -> StageResult:
    cfg, qcfg = ctx.config, ctx.config.qat
    desc = _input_description(ctx)
    if not qcfg.enabled:
        return StageResult(artifact=ctx.input, skipped="disabled in config (qat.enabled: false)")
    if not ctx.profile.supports_int8:
        dtypes = ", ".join(d.value for d in ctx.profile.dtypes)
        return StageResult(artifact=ctx.input, skipped=f"target {ctx.profile.name} lists no int8 (dtypes: {dtypes})")
    if autocast_dtype(qcfg.optim, ctx.device) is not None:
        log.warning("qat: bf16 autocast rounds the fake-quantized values; qat.optim.autocast: off keeps them exact")
    form = resolve_form(ctx.profile, qcfg.activations, qcfg.weight_bits)
    log.info("qat: %s activations, %d-bit weights (%s)", form["activations"], form["weight_bits"], form["reason"])
    fallback = resolve_fallback(ctx.profile, qcfg.fallback_dtype)
    seed_everything(cfg.seed + 3)
    data, eval_bs, task = ctx.data, cfg.data.eval_batch_size, ctx.task
    def evaluate(net: Any, batches: Any, batch_size: int) -> float:
        """The task's headline metric on the split choices are made on (the held-out split of data.val_from_train, else
        the validation split): which INT8 model is kept is a choice."""
        return task.val_score(net, batches.choice_split(), batch_size)

    device = ctx.device
    # The graph work (tracing, placing quantizers, building the budget's mixes) runs on CPU models; calibration,
    # every evaluation and the fine-tuning on the training device.
    model = load_torch_artifact(ctx.input)
    task.graph_core(model)  # a model the task cannot quantize (a two-stage detector) is one line here
    # Without a teacher stage, the float model itself is the teacher (self-distillation).
    teacher = load_torch_artifact(ctx.teacher) if ctx.teacher else device.module(copy.deepcopy(model))
    float_top1 = evaluate(device.module(copy.deepcopy(model)), data, eval_bs)
    pairs, fold_note = find_conv_bn_pairs(model)  # traced on the float model, folded after fine-tuning
    input_shape = tuple(desc["input_shape"])
    float_model = copy.deepcopy(model)  # the quantized model shares (and fine-tunes) the parameters

    def settings(pairs_folded: list[tuple[str, str]], float_layers: list[str] | tuple = ()) -> dict[str, Any]:
        return quant_settings(qcfg.calibration, qcfg.percentile, qcfg.calibration_batches, pairs_folded,
                              form["weight_bits"], form["activations"], form, float_layers)

    model = device.module(insert_fake_quant(model, settings([]), input_shape))
    placement = placement_of(model)

    batches = data.calibration_batches(qcfg.calibration_batches, cfg.data.batch_size)
    amax = calibrate(model, [device.batch(b) for b in batches], qcfg.calibration, qcfg.percentile, task.forward)
    # The calibrated model as it would be saved: BN folded with its running statistics, as after fine-tuning.
    calibrated = copy.deepcopy(model)
    fold_batchnorm(calibrated, pairs)
    ptq_top1 = evaluate(calibrated, data, eval_bs)
    metric = task.headline.label
    log.info("qat: float %s %.4f, calibrated (PTQ) %s %.4f", metric, float_top1, metric, ptq_top1)
    budget: Budget | None = None
    if qcfg.max_drop is not None:
        def build(float_layers: list[str]) -> nn.Module:  # the calibrated mix, as it would be saved
            mix = insert_fake_quant(copy.deepcopy(float_model), settings([], float_layers), input_shape)
            mix = device.module(mix)
            copy_ranges(calibrated, mix)
            fold_batchnorm(mix, pairs)
            return mix

        batches_b, where = _budget_batches(ctx)
        budget = Budget(qcfg.max_drop, batches_b, where, device.module(copy.deepcopy(float_model)), calibrated, build,
                        lambda i, n: ctx.progress("sensitivity (one layer quantized at a time)", i, n, {}), task=task)
        float_layers = budget.select_after_calibration()
        if float_layers is None:
            return _keep_float_model(ctx, budget, fallback)
        if float_layers:
            model = device.module(insert_fake_quant(copy.deepcopy(float_model), settings([], float_layers),
                                                    input_shape))
            copy_ranges(calibrated, model)
            calibrated = copy.deepcopy(model)
            fold_batchnorm(calibrated, pairs)
            ptq_top1 = evaluate(calibrated, data, eval_bs)
            log.info("qat: the mix with %d layer(s) in %s: calibrated %s %.4f", len(float_layers),
                     fallback["dtype"], metric, ptq_top1)

    distiller = task.distiller(device.module(teacher), model, qcfg.temperature, qcfg.alpha, 0.0,
                               device.batch(batches[0]))  # a detector's own distillation, else the teacher's outputs
    targets = None if distiller is not None else ctx.soft_targets(teacher) if ctx.teacher else teacher
    history = fit(model, data, qcfg.optim,
                  distiller.step if distiller is not None else kd_step(targets, qcfg.temperature, qcfg.alpha, task=task),
                  batch_size=cfg.data.batch_size, checkpoint_dir=ctx.checkpoint_dir, task="qat",
                  progress=ctx.progress, eval_batch_size=eval_bs, evaluator=task, device=device)
    if distiller is not None:
        distiller.remove()
    fold_batchnorm(model, pairs)
    qat_top1 = evaluate(model, data, eval_bs)
    kept = "fine-tuned" if task.headline.gain_points(ptq_top1, qat_top1) >= 0 else "calibrated"
    if kept == "calibrated":
        log.warning("qat: fine-tuning lowered %s from %.4f (calibrated) to %.4f; keeping the calibrated model",
                    metric, ptq_top1, qat_top1)
        model = calibrated
    float_layers: list[str] = []
    kept_top1 = qat_top1 if kept == "fine-tuned" else ptq_top1
    if budget is not None:
        float_layers = budget.select_after_fine_tuning(model, kept)
        if float_layers is None:
            return _keep_float_model(ctx, budget, fallback)
        if len(float_layers) > len(budget.float_layers_calibrated):
            keep_float(model, float_layers[len(budget.float_layers_calibrated):])
            kept_top1 = evaluate(model, data, eval_bs)
    saved = {**settings(pairs, float_layers), "activation_quantizers": placement, "fallback_dtype": fallback["dtype"]}
    artifact = save_torch_artifact(model, desc["build"], ctx.out_dir, input_shape, desc["num_classes"],
                                   quantization=saved, meta=ctx.task_meta())
    return StageResult(artifact, records={
        "history": history,
        "calibration": {"method": qcfg.calibration, "percentile": qcfg.percentile, "batches": len(batches),
                        "samples": sum(len(next(iter(x.values())) if isinstance(x, dict) else x)
                                                       for x in batches), "amax": amax},
        "float_top1": float_top1, "ptq_top1": ptq_top1, "qat_top1": qat_top1, "kept": kept,
        "kept_top1": kept_top1,
        "bn_folded": len(pairs), "bn_unfolded": _remaining_batchnorms(model), "bn_note": fold_note,
        "quantized_layers": len(quant_layers(model)),
        "form": form, "placement": _placement_summary(placement, len(activation_quantizers(model))),
        "teacher": "teacher stage" if ctx.teacher else "float input (self-distillation)",
        "soft_targets": targets.record() if ctx.teacher and targets is not None else None,
        "distillation": distiller.record() if distiller is not None else None,
        "temperature": qcfg.temperature, "alpha": qcfg.alpha, "settings": saved, "fallback": fallback,
        "float_layers": float_layers,
        "mixed_precision": budget.record(float_layers, fallback, _variants(ctx, budget, model, float_model, fallback,
                                                                           input_shape)) if budget else None})


def _budget_batches(ctx: StageContext) -> tuple[list[tuple[Any, Any]], str]:
    """The images the budget is measured on: ``qat.budget_split`` (a held-out ImageFolder split), the split carved by
    data.val_from_train or the validation split, limited to ``qat.budget_images`` (every class in turn)."""
    from edgepipe.data.loading import run_data

    cfg, q = ctx.config, ctx.config.qat
    data, where = ctx.data, f"validation ({cfg.data.val_split})" if cfg.data.kind == "imagefolder" else "validation"
    if data.choice_split() is not data:
        data = data.choice_split()
        where = f"{data.val_size} images held out from training (data.val_from_train)"
    if q.budget_split is not None:
        if cfg.data.kind != "imagefolder":
            raise EdgepipeError(f"qat.budget_split: {q.budget_split!r} needs data.kind: imagefolder (the {cfg.data.kind} "
                                "data has no named splits); remove it to measure the budget on the validation set")
        if q.budget_split == cfg.data.train_split:
            raise EdgepipeError(f"qat.budget_split: {q.budget_split!r} is the training split; name a split held out "
                                "from training (a folder beside train and val under data.path), or remove it")
        data = run_data(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"val_split": q.budget_split, "limit_val": None})}))
        where = f"held-out split {q.budget_split}"
    if q.budget_images is not None and q.budget_images < data.val_size:
        data = data.subset(data.train_size, q.budget_images)
    return list(data.val_batches(cfg.data.eval_batch_size)), where


def _keep_float_model(ctx: StageContext, budget: Budget, fallback: dict[str, Any]) -> StageResult:
    reason = (f"qat.max_drop {budget.max_drop}: even with every Conv/Linear in {fallback['dtype']} the quantized model "
              f"misses the budget on {budget.where}; the float model passes through")
    return StageResult(artifact=ctx.input, skipped=reason,
                       records={"mixed_precision": budget.record(list(budget.order), fallback), "fallback": fallback})


def _variants(ctx: StageContext, budget: Budget, model: nn.Module, float_model: nn.Module, fallback: dict[str, Any],
              input_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """The chosen mix, all-INT8 (calibrated) and all-float, compiled for the target and timed the same way
    (``ctx.measure.candidate_latencies``: batch 1, in alternating rounds, the lowest of 5 rounds' p50 each), with
    top-1 on the budget images."""
    import tempfile
    from pathlib import Path

    from edgepipe.types import DType

    from edgepipe.training import distributed

    if not distributed.is_main():  # under torchrun every rank selects alike; rank 0 alone times and records
        return []
    float_dtype = DType(fallback["dtype"])
    n_all = len(quant_layers(budget.all_int8))
    n_mix = n_all - len(quant_layers(model))
    chosen_top1 = budget.evaluate(model)[0]
    rows = [("all-int8", budget.all_int8, True, budget.all_int8_top1, 0),
            ("chosen", model, True, chosen_top1, n_mix),
            ("all-float", float_model, False, budget.float_top1, n_all)]
    if n_mix == 0:  # the chosen mix is the all-INT8 model: timed once
        rows.pop(1)
    ctx.progress("latency of all-INT8, the mix and all-float (alternating rounds)", 0, 1, {})
    with tempfile.TemporaryDirectory(prefix="edgepipe-mix-") as tmp:
        lats = ctx.measure.candidate_latencies([(net, quantized, float_dtype) for _, net, quantized, _, _ in rows],
                                               input_shape, Path(tmp), rounds=5)
    ctx.progress("latency of all-INT8, the mix and all-float (alternating rounds)", 1, 1, {})
    out = []
    for (name, _, _, top1, n_float), lat in zip(rows, lats):
        if lat["kind"] == "estimate" and name == "chosen":
            lat["note"] = (f"the roofline estimate prices every layer at {lat['dtype']}: it does not see the "
                           f"{n_float} layer(s) kept in {float_dtype.value}; measure the engine on the device")
        out.append({"variant": name, "float_layers": n_float, "top1": top1,
                    "drop_points": budget.drop_points(top1), "latency": lat})
    if n_mix == 0:  # its own top-1 (fine-tuned or calibrated, whichever QAT kept), the all-INT8 graph's latency
        out.insert(1, {**out[0], "variant": "chosen", "top1": chosen_top1,
                       "drop_points": budget.drop_points(chosen_top1), "same_as": "all-int8"})
    return out


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
