"""Loading models and the torch model artifact.

A teacher arrives as a registered architecture (``edgepipe.models.zoo``), a ``torch.export`` program (.pt2,
loaded without unpickling unless trusted) or an explicit ``module:function`` factory. A torch artifact is
``model.json`` (how to build the architecture) plus ``model.pt``, a plain state dict loadable with
``weights_only=True``; a pruned model is rebuilt from its original architecture and its layers resized to the
saved shapes (see ``restore_shapes``). Whether a spec read from a run folder may run code is
``edgepipe.models.trust``'s call.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgepipe.config import ModelSpec
from edgepipe.engine.artifacts import Artifact
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_torch_save, atomic_write_json
from edgepipe.models.trust import check_trusted, from_run_folder, trust
from edgepipe.models.weights import load_state_dict_file
from edgepipe.models.zoo import build_arch
from edgepipe.types import ArtifactKind, DType

if TYPE_CHECKING:
    from edgepipe.tasks.base import Task

class ExportedProgramModel(nn.Module):
    """An inference-only wrapper around ``torch.export.load(path).module()``.

    The exported module was captured in one mode and raises NotImplementedError on ``.eval()`` /
    ``.train()``; every stage switches modes, so the wrapper keeps its own flag and never forwards the
    switch. Such a model can teach, be measured and be exported, but not be trained.
    """

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> ExportedProgramModel:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


# --- building, saving, loading -----------------------------------------------------------------------
def resolve_factory(ref: str) -> Callable[..., nn.Module]:
    """Import ``module:function`` (the only way user code enters edgepipe)."""
    mod_name, _, fn_name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise EdgepipeError(f"factory '{ref}': cannot import ({e}); check PYTHONPATH and the name") from None
    if not callable(fn):
        raise EdgepipeError(f"factory '{ref}': not callable")
    return fn


class _Refused(Exception):
    pass


def load_program(path: Path, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.load`` without running code from the file, unless ``trust_pickle``.

    A .pt2 archive is JSON (the graph) plus raw tensor bytes, but ``torch.export.load`` also unpickles some
    entries in full: tensors or constants saved "with pickle" (``torch.load(weights_only=False)``), opaque
    constants (``pickle.loads``), custom script objects, and a fallback in the serde code. A crafted archive
    can run any code that way. torch offers no weights-only switch for programs (2.14), so edgepipe loads
    with those entry points restricted: ``torch.load`` is forced to ``weights_only=True`` (tensors only) and
    the object unpicklers refuse. A program that needs them is refused with one line naming
    ``trust_pickle: true`` (off by default), the option for a file from a source the user trusts.
    """
    from unittest import mock

    from torch.export.pt2_archive import _package

    real_load = torch.load

    def tensors_only(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError:
            raise _Refused("a pickled entry is not a plain tensor") from None

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _Refused("it holds pickled Python objects")

    class _NoPickle:  # stands in for the pickle module inside torch.export's archive reader
        loads = load = staticmethod(refuse)

    patches = [] if trust_pickle else [mock.patch.object(torch, "load", tensors_only),
                                       mock.patch.object(_package, "pickle", _NoPickle),
                                       mock.patch.object(torch._C, "_pickle_load_obj", refuse)]
    quiet = logging.getLogger("torch.export")  # it logs a traceback for a damaged file; the one line below says it
    level = quiet.level
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            quiet.setLevel(logging.CRITICAL)
            stack.callback(quiet.setLevel, level)
            return torch.export.load(path)
    except _Refused as e:
        raise EdgepipeError(f"{path}: loading this program would unpickle arbitrary Python objects ({e}), which can "
                            "run code from the file; if you trust its source, set trust_pickle: true next to "
                            "program: in the config") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign archive
        raise EdgepipeError(f"{path}: not a torch.export program ({type(e).__name__}: {str(e)[:200]})") from None


def artifact_spec(artifact: Artifact) -> tuple[dict[str, Any], ModelSpec]:
    """A torch artifact's model.json and the ModelSpec it names (marked as read from the run folder)."""
    path = artifact.path("build")
    try:
        desc = json.loads(path.read_bytes())
        spec = _build_spec(desc["build"], artifact.root)
    except (ValueError, TypeError, KeyError) as e:  # ValueError: JSON, UTF-8 and pydantic's ValidationError
        raise EdgepipeError(f"{path}: damaged model description ({type(e).__name__}); rerun the stage that wrote "
                            "it with --force") from None
    return desc, from_run_folder(spec, path)


def _build_spec(build: dict[str, Any], root: Path) -> ModelSpec:
    """The ModelSpec of a model.json ``build`` (a program's path is relative to the artifact's folder)."""
    build = dict(build)
    if build.get("program") and not Path(build["program"]).is_absolute():
        build["program"] = str(root / build["program"])  # copied into the stage folder
    return ModelSpec.model_validate({k: v for k, v in build.items() if k in ModelSpec.model_fields and k != "weights"})


def check_artifact_trusted(artifact: Artifact) -> None:
    """``check_trusted`` for a torch artifact's model.json, before anything is built or written."""
    if artifact.kind is not ArtifactKind.TORCH:
        return
    try:
        spec = artifact_spec(artifact)[1]
    except EdgepipeError:
        return  # damaged: whatever loads it gets that error (the engine redoes the stage)
    check_trusted(spec)


def build_from_spec(spec: ModelSpec, num_classes: int | None = None) -> nn.Module:
    """Build the model a config's ModelSpec describes (weights loaded when given); ``num_classes``: the data's classes,
    the size of a Hugging Face model's new classification head unless its kwargs name ``num_labels``."""
    check_trusted(spec)
    if spec.hf:
        from edgepipe.models.hf import load_classifier

        return load_classifier(spec.hf, spec.kwargs.get("num_labels") or num_classes,
                               {k: v for k, v in spec.kwargs.items() if k != "num_labels"})
    if spec.program:
        p = Path(spec.program)
        if not p.exists():
            raise EdgepipeError(f"{p}: torch.export program not found")
        return ExportedProgramModel(load_program(p, trust_pickle=spec.trust_pickle).module())
    if spec.factory:
        fn = resolve_factory(spec.factory)
        try:
            model = fn(**spec.kwargs)
        except TypeError as e:  # wrong or missing kwargs (or not a model factory at all, e.g. os:system)
            raise EdgepipeError(f"factory '{spec.factory}': calling it with kwargs {spec.kwargs} failed ({e}); give "
                                "the function that builds your nn.Module and the kwargs it takes") from None
    else:
        model = build_arch(spec.arch, spec.kwargs)
    if not isinstance(model, nn.Module):
        raise EdgepipeError(f"{spec.factory or spec.arch}: returned {type(model).__name__}, not an nn.Module")
    if spec.weights:
        sd = load_state_dict_file(spec.weights)
        broken = first_non_finite(sd)
        if broken is not None:  # a NaN teacher scores chance and passes NaN soft targets on: refuse it here
            raise EdgepipeError(f"{spec.weights}: tensor '{broken}' holds NaN or inf values (damaged weights, or saved "
                                "from a training that diverged); give a weights file whose tensors are all finite")
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise EdgepipeError(f"{spec.weights}: does not fit architecture '{spec.arch}': {first}") from None
    return model


def restore_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize Conv/BatchNorm/LayerNorm/Linear/Embedding layers to the shapes in ``state`` (a pruned model's weights).

    Torch-Pruning's own ``tp.state_dict`` pickles module objects, which ``torch.load(weights_only=True)``
    refuses; structured pruning only changes channel counts, so the shapes in a plain state dict are
    enough to rebuild the pruned model from its original architecture.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state.get(prefix + "weight")
        if w is None:
            continue
        if isinstance(module, nn.Conv2d) and w.shape != module.weight.shape:
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            module.out_channels = w.shape[0]
            module.groups = w.shape[0] if depthwise else module.groups
            module.in_channels = w.shape[1] * module.groups
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d | nn.LayerNorm) and w.shape != module.weight.shape:
            if isinstance(module, nn.LayerNorm):
                module.normalized_shape = tuple(w.shape)
            else:
                module.num_features = w.shape[0]
        elif isinstance(module, nn.Linear) and w.shape != module.weight.shape:
            module.out_features, module.in_features = w.shape
        elif isinstance(module, nn.Embedding) and w.shape != module.weight.shape:
            module.num_embeddings, module.embedding_dim = w.shape
            if module.padding_idx is not None and module.padding_idx >= module.num_embeddings:
                module.padding_idx = None  # a trimmed vocabulary's pad row moved; it only masks gradients
        else:
            continue
        for pname, tensor in list(module.named_parameters(recurse=False)):
            setattr(module, pname, nn.Parameter(torch.empty_like(state[prefix + pname])))
        for bname, tensor in list(module.named_buffers(recurse=False)):
            if prefix + bname in state:
                module.register_buffer(bname, torch.empty_like(state[prefix + bname]))


def save_torch_artifact(model: nn.Module, build: dict[str, Any], out_dir: Path, input_shape: tuple[int, ...],
                        num_classes: int, meta: dict[str, Any] | None = None,
                        quantization: dict[str, Any] | None = None,
                        extra_files: dict[str, str] | None = None) -> Artifact:
    """Write model.json + model.pt into ``out_dir`` atomically and return the artifact.

    ``build`` is the ModelSpec (as a dict) of the *original* architecture; ``quantization`` the settings
    edgepipe.quantization.fakequant.insert_fake_quant was called with, for a QAT model.
    """
    out_dir = Path(out_dir)
    if build.get("hf") and not (build.get("kwargs") or {}).get("num_labels"):  # the head's size, for loading it back
        build = {**build, "kwargs": {**(build.get("kwargs") or {}), "num_labels": num_classes}}
    atomic_torch_save(out_dir / "model.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    atomic_write_json(out_dir / "model.json", {"build": build, "input_shape": list(input_shape),
                                               "num_classes": num_classes, "quantization": quantization})
    art = Artifact(kind=ArtifactKind.TORCH, root=out_dir,
                   files={"model": "model.pt", "build": "model.json", **(extra_files or {})},
                   quantized=bool(quantization),
                   dtype=DType.INT8 if quantization else DType.FP32,
                   meta={"input_shape": list(input_shape), "num_classes": num_classes, **(meta or {})})
    art.save()
    with contextlib.suppress(ValueError, TypeError):  # a build no one can load back needs no trust either
        trust(_build_spec(build, out_dir))  # what this process built and saved, it may load back
    return art


def load_torch_artifact(artifact: Artifact) -> nn.Module:
    """Rebuild the nn.Module of a torch artifact (eval mode)."""
    desc, spec = artifact_spec(artifact)
    model = build_from_spec(spec)  # refuses a factory or trust_pickle the user did not give this command
    state = load_state_dict_file(artifact.path("model"))
    restore_shapes(model, state)
    if hasattr(model, "sync_shapes"):  # attributes that follow the weights' shapes (a pruned transformer's heads)
        model.sync_shapes()
    if desc.get("quantization"):
        # A QAT model: re-insert the same fake-quant wrappers so their calibrated ranges load too.
        from edgepipe.quantization.fakequant import insert_fake_quant

        model = insert_fake_quant(model, desc["quantization"], tuple(desc["input_shape"]))
    model.load_state_dict(state)
    return model.eval()


def first_non_finite(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or inf (None when all are finite)."""
    return next((k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                 and not v.is_meta and not bool(torch.isfinite(v).all())), None)


def fixed_batch(model: nn.Module) -> int | None:
    """The batch size a torch.export program was captured with when its batch dimension is static (None: dynamic,
    or not a program)."""
    if not isinstance(model, ExportedProgramModel):
        return None
    graph = getattr(model.program, "graph", None)
    for node in graph.nodes if graph is not None else ():
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.ndim >= 1:
            return val.shape[0] if type(val.shape[0]) is int else None
    return None


def check_fits(model: nn.Module, field: str, task: Task, meta: Mapping[str, Any]) -> None:
    """Forward passes on dummy batches of 1 and 2 (the pipeline runs batch 1 for latency and its batch sizes for the
    rest): the model must have finite weights, take the task's inputs (``meta``: input_shape, num_classes) at any
    batch size and return what the task's models return (``Task.check_outputs``: for classification one logits
    tensor [N, classes])."""
    model.eval()
    broken = first_non_finite(model.state_dict())
    if broken is not None:
        raise EdgepipeError(f"{field}: weight tensor '{broken}' holds NaN or inf values (damaged weights, or saved "
                            "from a training that diverged); give a model whose weights are all finite")
    batch = fixed_batch(model)
    if batch is not None:
        raise EdgepipeError(f"{field}: the program was exported with a fixed batch of {batch}, but edgepipe runs it at "
                            "batch 1 and at the data's batch sizes; re-export it with a dynamic batch dimension "
                            "(torch.export.export(..., dynamic_shapes=({0: torch.export.Dim('batch')},)))")
    for n in (1, 2):
        try:
            with torch.no_grad():
                out = model(*task.example_inputs(meta, n))
        except Exception as e:  # noqa: BLE001 - any failure here means the model and data don't match
            raise EdgepipeError(f"{field}: does not accept inputs of shape {list(meta['input_shape'])} from data "
                                f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); check "
                                "in_channels/image_size") from None
        task.check_outputs(out, field, meta, n)
