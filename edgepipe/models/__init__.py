"""Model registry and the torch model artifact.

Architectures are registered by name (CIFAR-style ResNets, torchvision's classifiers, a small CNN).
A teacher can also arrive as a ``torch.export`` program (.pt2) or from an explicit ``module:function``
factory. A torch artifact is ``model.json`` (how to build the architecture) plus ``model.pt``, a plain
state dict loadable with ``weights_only=True``; a pruned model is rebuilt from its original
architecture and its layers resized to the saved shapes (see ``restore_shapes``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import importlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepipe.engine.artifacts import Artifact
from edgepipe.config import ModelSpec
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_torch_save, atomic_write_json
from edgepipe.types import ArtifactKind, DType

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = fn
        return fn
    return deco


# --- CIFAR-style ResNets (He et al. 2016, section 4.2), 1x1 projection shortcuts -------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: widths w, 2w, 4w; parameter names match the shipped teacher."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise EdgepipeError(f"cifar_resnet: depth must be 6n+2 and >= 8 (20, 32, 44, 56, 110), got {depth}")
        for name, value in (("width", width), ("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, int) and value < 1:
                raise EdgepipeError(f"cifar_resnet: {name} must be >= 1, got {value}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            layers.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register("cifar_resnet")
def cifar_resnet(depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Module:
    """CIFAR-style ResNet; depth 20-110 (6n+2)."""
    return CifarResNet(depth, num_classes, width, in_channels)


for _d in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_d}_cifar")(lambda _d=_d, **kw: CifarResNet(depth=_d, **kw))


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            raise EdgepipeError(f"{name}: torchvision models take 3 input channels, got in_channels={in_channels}")
        return model
    build.__doc__ = f"torchvision.models.{name} (weights come from a state-dict file, never downloaded)."
    return build


_TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0", "convnext_tiny")
for _n in _TORCHVISION:
    register(f"tv_{_n}")(_torchvision(_n))


# --- torchvision's mobile students adapted to 32x32 inputs ---------------------------------------------
# torchvision's MobileNetV2/V3 and ShuffleNetV2 downsample 32x in total (a stride-2 stem, then stride-2
# stages), which leaves a 1x1 map at 32x32: the last stages' 3x3 depthwise convolutions then see mostly
# padding. The common CIFAR variants (kuangliu/pytorch-cifar) keep the blocks and widths and remove the
# first 4x of downsampling: stem stride 1 and the first strided stage (or ShuffleNet's max-pool) at stride
# 1, so the last stage runs at 4x4. Only those strides change here; everything else is torchvision's own
# code, so the blocks trace with torch.fx, prune with Torch-Pruning and export like the ImageNet models.
def _stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The stem convolution at stride 1, taking ``in_channels`` channels."""
    conv.stride = (1, 1)
    if in_channels != conv.in_channels:
        conv = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, 1, conv.padding, bias=conv.bias is not None)
    return conv


@register("mobilenet_v2_cifar")
def mobilenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3,
                       dropout: float = 0.2) -> nn.Module:
    """torchvision's MobileNetV2 for 32x32 inputs: stem stride 1 and the first 24-channel stage at stride 1
    (ImageNet: 2 and 2), so the map is 32x32 through the first stages and 4x4 at the end."""
    from torchvision.models import MobileNetV2

    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting,
                        dropout=dropout)
    model.features[0][0] = _stem(model.features[0][0], in_channels)
    return model


@register("mobilenet_v3_small_cifar")
def mobilenet_v3_small_cifar(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3,
                             dropout: float = 0.2, bn_momentum: float = 0.1) -> nn.Module:
    """torchvision's MobileNetV3-Small for 32x32 inputs: stem stride 1 and the first block (a squeeze-excite
    depthwise block) at stride 1 (ImageNet: 2 and 2), so the last stage runs at 4x4.

    BatchNorm momentum 0.1 (PyTorch's default), not torchvision's 0.01 for ImageNet-length training: at 0.01
    the running statistics keep ~10% of their initial 0/1 after 230 steps, so a student trained for a few
    hundred steps is evaluated with statistics it never had (near chance on a small CIFAR subset)."""
    from functools import partial

    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=width_mult)
    setting[0].stride = 1
    model = MobileNetV3(setting, last_channel, num_classes=num_classes, dropout=dropout,
                        norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=bn_momentum))
    model.features[0][0] = _stem(model.features[0][0], in_channels)
    return model


_SHUFFLENET_WIDTHS = {0.5: [24, 48, 96, 192, 1024], 1.0: [24, 116, 232, 464, 1024],
                      1.5: [24, 176, 352, 704, 1024], 2.0: [24, 244, 488, 976, 2048]}


@register("shufflenet_v2_cifar")
def shufflenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3) -> nn.Module:
    """torchvision's ShuffleNetV2 for 32x32 inputs: stem stride 1 and no max-pool (ImageNet: stride 2 and a
    stride-2 max-pool), so stages 2-4 run at 16, 8 and 4 pixels. ``width_mult`` is one of torchvision's
    widths (0.5, 1.0, 1.5, 2.0: the x0_5 ... x2_0 channel tables)."""
    from torchvision.models import ShuffleNetV2

    if width_mult not in _SHUFFLENET_WIDTHS:
        raise EdgepipeError(f"shufflenet_v2_cifar: width_mult must be one of {sorted(_SHUFFLENET_WIDTHS)} "
                            f"(torchvision's channel tables), got {width_mult}")
    model = ShuffleNetV2([4, 8, 4], _SHUFFLENET_WIDTHS[width_mult], num_classes=num_classes)
    model.conv1[0] = _stem(model.conv1[0], in_channels)
    model.maxpool = nn.Identity()
    return model


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
def build_arch(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise EdgepipeError(f"unknown architecture '{arch}' (known: {', '.join(sorted(ARCHITECTURES))})")
    try:
        return ARCHITECTURES[arch](**kwargs)
    except TypeError as e:
        raise EdgepipeError(f"architecture '{arch}': bad kwargs {kwargs} ({e})") from None
    except (RuntimeError, ValueError, ZeroDivisionError) as e:  # torch's layers reject e.g. a negative channel count
        first = (str(e).splitlines() or [""])[0][:200]
        raise EdgepipeError(f"architecture '{arch}': kwargs {kwargs} rejected ({type(e).__name__}: {first})") from None


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


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EdgepipeError(f"{p}: weights file not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many unpickling errors; all mean "not a state dict"
        raise EdgepipeError(f"{p}: not a loadable state dict ({type(e).__name__}); "
                            "save it with torch.save(model.state_dict(), path)") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise EdgepipeError(f"{p}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


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


# --- what may run code: a factory or trust_pickle, only from the user's own config ------------------------------
_TRUSTED: set[str] = set()
"""Trust keys (``_trust_key``) of the factories and trust_pickle programs this command may honour when a file in a
run folder names them: those of a config the user gave it (``trust_config``) and the builds this process saved."""
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"missing:{path}"
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _trust_key(spec: ModelSpec) -> str | None:
    """What must be trusted for ``spec`` to build: a factory with its kwargs, or the very bytes of a program to
    unpickle (a run folder's copy of it may have been swapped). None: it runs no code from anywhere (a registered
    architecture, or a program loaded by ``load_program``'s restricted loader)."""
    if spec.factory:
        return json.dumps({"factory": spec.factory, "kwargs": spec.kwargs}, sort_keys=True, default=str)
    if spec.program and spec.trust_pickle:
        return f"program-sha256:{_file_digest(Path(spec.program))}"
    return None


def trust(spec: ModelSpec) -> None:
    """Honour ``spec``'s factory or trust_pickle when a run-folder file names the same this command."""
    key = _trust_key(spec)
    if key is not None:
        _TRUSTED.add(key)


def trust_config(config: Any) -> None:
    """Trust the models of a config the user gave this command (a ``PipelineConfig``); a config read back from a
    run folder (its specs carry their origin) trusts nothing."""
    for spec in (config.teacher.model, config.distill.student):
        if spec._origin is None:
            trust(spec)


def forget_trusted() -> None:
    """Start a command trusting nothing (edgepipe.cli.main)."""
    _TRUSTED.clear()


def from_run_folder(spec: ModelSpec, origin: str | Path) -> ModelSpec:
    """Mark ``spec`` as read from ``origin``, a file in a run folder (see ``check_trusted``)."""
    spec._origin = str(origin)
    return spec


def check_trusted(spec: ModelSpec) -> None:
    """Refuse a factory or trust_pickle read from a run folder unless the user's config for this command names it.

    A run folder is data that travels between machines and people (and back from a device); a ``model.json`` or a
    ``config.yaml`` in it naming ``os:system`` must not run it. Specs given in code or in the user's config (no
    ``_origin``) pass; so do registered architectures and programs loaded without trust_pickle."""
    if spec._origin is None:
        return
    key = _trust_key(spec)
    if key is None or key in _TRUSTED:
        return
    if spec.factory:
        raise EdgepipeError(f"{spec._origin} names factory {spec.factory[:200]!r} (kwargs {str(spec.kwargs)[:200]}): "
                            "edgepipe runs code only from a config you give this command, never from a run folder; "
                            "if you trust it, rerun with --config FILE that names this factory")
    raise EdgepipeError(f"{spec._origin} sets trust_pickle: true for {spec.program}: edgepipe unpickles a program only "
                        "when a config you give this command says so for that very file; if you trust it, rerun with "
                        "--config FILE naming it with trust_pickle: true")


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


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """Build the model a config's ModelSpec describes (weights loaded when given)."""
    check_trusted(spec)
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
    """Resize Conv/BatchNorm/Linear layers to the shapes in ``state`` (a pruned model's weights).

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


def check_fits(model: nn.Module, field: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Forward passes on dummy batches of 1 and 2 (the pipeline runs batch 1 for latency and its batch sizes for the
    rest): the model must have finite weights, take the data's images at any batch size and return one logits
    tensor [N, classes]."""
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
                out = model(torch.zeros(n, *input_shape))
        except Exception as e:  # noqa: BLE001 - any failure here means the model and data don't match
            raise EdgepipeError(f"{field}: does not accept inputs of shape {list(input_shape)} from data "
                                f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); check "
                                "in_channels/image_size") from None
        if not isinstance(out, torch.Tensor):
            raise EdgepipeError(f"{field}: returns a {type(out).__name__}, not one tensor; the model must return one "
                                f"logits tensor [N, {num_classes}] (return only the logits from forward, or re-export "
                                "a wrapper that does)")
        if out.ndim != 2 or out.shape[1] != num_classes or out.shape[0] != n:
            raise EdgepipeError(f"{field}: outputs shape {list(out.shape)} for a batch of {n}, but the data has "
                                f"{num_classes} classes; set num_classes in the model kwargs (logits [N, classes])")
