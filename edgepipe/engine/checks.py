"""Config and profile fields that a stage would otherwise check only mid-run, checked before a command writes.

``edgepipe.engine.prepare.preflight`` calls ``check_fields`` before ``Run.write_files``: a field that fails here leaves a
finished run byte for byte as it was, instead of failing after ``config.yaml`` was rewritten and earlier stages
were retrained. Each check mirrors the one the stage makes (the same function where there is one), limited to the
stages in the run's order that will use the field:

- every stage's ``target_key`` (qat: ``qat.activations``/``qat.weight_bits`` against the backend,
  ``qat.fallback_dtype`` against the profile);
- ``export.opset`` against the installed exporter, onnx and onnxruntime (edgepipe.export.onnx_export.check_opset);
- ``compile.dtype`` against the profile and the model the run will compile (stages.compile.compile_dtype);
- the backend and this host (``check`` in each edgepipe.backends module: ONNX Runtime's execution provider,
  OpenVINO installed and its device name, TensorRT's build settings); OpenVINO for ``soft_targets.runtime``;
- ``bench.batch_sizes`` (what a later ``edgepipe bench`` reads from the run's config);
- ``distill.feature_pairs`` (layer names in both models; feature hints need the PyTorch teacher),
  ``distill.init: teacher`` (the student's tensors in the teacher), ``prune.ignore`` (module names) and
  ``qat.budget_split``; ``distill.loss`` against the task, ``data.val_from_train`` and ``data.unlabeled`` against the
  data kind and task, ``distill.pseudo_label_threshold`` against ``data.unlabeled``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepipe.errors import EdgepipeError
from edgepipe.engine.stage import load_stage
from edgepipe.types import DType

if TYPE_CHECKING:
    from torch import nn

    from edgepipe.config import ModelSpec


def check_fields(run: Any) -> None:
    """Raise EdgepipeError (one line naming the field) for the first field of ``run`` a stage would refuse.
    ``run`` is an edgepipe.engine.run.Run (typed Any: prepare imports this module, and no import goes back).
    """
    config, profile, order = run.config, run.profile, run.order
    for name in order:
        module = load_stage(name)
        if module.target_key is not None:
            module.target_key(profile, config)
    if "export" in order:
        from edgepipe.export.onnx_export import check_opset

        check_opset(config.export.opset)
    from edgepipe.backends import get_backend
    from edgepipe.quantization.form import resolve_fallback

    dtype = expected_compile_dtype(run)
    fallback = None
    if dtype is DType.INT8 and "qat" in order and config.qat.enabled:
        fallback = DType(resolve_fallback(profile, config.qat.fallback_dtype)["dtype"])
    get_backend(profile.backend).check(profile, dtype, fallback)  # every stage's gain check compiles for the target
    if config.soft_targets.runtime == "openvino" and any(s in order for s in ("distill", "prune", "qat")):
        ok, reason = get_backend("openvino").available()
        if not ok:
            raise EdgepipeError(f"soft_targets.runtime: openvino: {reason}; or set soft_targets.runtime: torch")
    bad = [b for b in config.bench.batch_sizes if b < 1]
    if bad or not config.bench.batch_sizes:
        raise EdgepipeError(f"bench.batch_sizes: {config.bench.batch_sizes} must list batch sizes >= 1 "
                            "(e.g. [1, 8, 32])")
    _check_models(run)
    _check_budget_split(run)
    _check_task_fields(run)


def _check_task_fields(run: Any) -> None:
    """``distill.loss`` against what the task's distillation offers, ``data.val_from_train`` against the data kinds
    that carve one (classification's)."""
    from edgepipe.config import DETECTION_KINDS
    from edgepipe.tasks import task_of

    config = run.config
    task = task_of(config)
    if "distill" in run.order and config.distill.enabled and config.distill.loss not in task.distill_losses:
        raise EdgepipeError(f"distill.loss: {config.distill.loss} is not offered by task {task.name} (it offers "
                            f"{', '.join(task.distill_losses)}); set distill.loss: {task.distill_losses[0]}")
    if config.data.unlabeled is not None and config.data.unlabeled != "rest" and config.data.kind != "imagefolder":
        raise EdgepipeError(f"data.unlabeled: a folder of unlabeled images goes with data.kind: imagefolder, not "
                            f"{config.data.kind}; use 'rest' (the training images data.limit_train leaves out) or "
                            "remove data.unlabeled")
    if config.data.unlabeled is not None and task.name != "classification":
        raise EdgepipeError(f"data.unlabeled: distillation from unlabeled images is written for classification, not "
                            f"task {task.name}; remove data.unlabeled")
    if config.distill.pseudo_label_threshold is not None and config.data.unlabeled is None:
        raise EdgepipeError("distill.pseudo_label_threshold: set without data.unlabeled, so there is nothing to "
                            "pseudo-label; set data.unlabeled or remove the threshold")
    if config.data.val_from_train is not None and config.data.kind in DETECTION_KINDS:
        raise EdgepipeError(f"data.val_from_train: carves held-out images for classification data, not "
                            f"{config.data.kind} detection data; give the held-out images as their own split, or "
                            "remove data.val_from_train")


def expected_compile_dtype(run: Any) -> DType | None:
    """The dtype the compile stage will ask for (None: no compile stage); a fixed ``compile.dtype`` is checked as
    the stage checks it, against the profile and the kind of model the stages before it make."""
    if "compile" not in run.order:
        return None
    from stages.compile import compile_dtype

    cfg = run.config
    quantized = "qat" in run.order and cfg.qat.enabled and run.profile.supports_int8
    return compile_dtype(cfg, run.profile, quantized)


def _layer_names(model: nn.Module, limit: int = 8) -> str:
    """A few of the model's module names, shallowest first (what a feature pair or prune.ignore can name)."""
    names = [n for n, _ in model.named_modules() if n]
    names.sort(key=lambda n: n.count("."))  # stable: the model's own order within a depth
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _check_models(run: Any) -> None:
    config, order = run.config, run.order
    dcfg, pcfg = config.distill, config.prune
    distill = "distill" in order and dcfg.enabled
    pairs = dcfg.feature_pairs if distill else []
    init = distill and dcfg.init == "teacher"
    ignore = pcfg.ignore if "prune" in order and pcfg.enabled else []
    if not (pairs or init or ignore):
        return
    from edgepipe.models.loading import build_from_spec

    built: dict[str, nn.Module] = {}

    def model(role: str, spec: ModelSpec) -> nn.Module:
        if role not in built:
            built[role] = build_from_spec(spec, 2)  # layer names only: a Hugging Face head's size does not matter
        return built[role]

    if pairs and dcfg.beta > 0 and (config.soft_targets.runtime != "torch" or config.soft_targets.cache):
        raise EdgepipeError("distill.feature_pairs: feature hints read the teacher's PyTorch layers; set "
                            "soft_targets.runtime: torch and soft_targets.cache: false (or distill.beta: 0)")
    for i, pair in enumerate(pairs):
        for role, spec, layer in (("teacher", config.teacher.model, pair.teacher),
                                  ("student", dcfg.student, pair.student)):
            net = model(role, spec)
            if not _has_module(net, layer):
                raise EdgepipeError(f"distill.feature_pairs[{i}].{role}: the {role} model has no layer '{layer}' "
                                    f"(its layers include: {_layer_names(net)}); name one of its module names")
    if init:
        import copy

        from edgepipe.training.distillation import init_from_teacher

        init_from_teacher(copy.deepcopy(model("student", dcfg.student)), model("teacher", config.teacher.model))
    if ignore:
        role, spec = ("student", dcfg.student) if distill else ("teacher", config.teacher.model)
        net = model(role, spec)
        for name in ignore:
            if not _has_module(net, name):
                raise EdgepipeError(f"prune.ignore: the model pruning takes ({role}) has no module '{name}' (its "
                                    f"modules include: {_layer_names(net)}); name one of its module names")


def _check_budget_split(run: Any) -> None:
    config = run.config
    q, data = config.qat, config.data
    if not ("qat" in run.order and q.enabled and run.profile.supports_int8 and q.max_drop is not None
            and q.budget_split is not None):
        return
    if data.kind != "imagefolder":
        raise EdgepipeError(f"qat.budget_split: {q.budget_split!r} needs data.kind: imagefolder (the {data.kind} data "
                            "has no named splits); remove it to measure the budget on the validation set")
    if q.budget_split == data.train_split:
        raise EdgepipeError(f"qat.budget_split: {q.budget_split!r} is the training split; name a split held out "
                            "from training (a folder beside train and val under data.path), or remove it")
    folder = Path(data.path) / q.budget_split
    if not folder.is_dir():
        raise EdgepipeError(f"qat.budget_split: {folder} is not a folder; make that split (one sub-folder per class) "
                            "or remove qat.budget_split to measure the budget on the validation set")
