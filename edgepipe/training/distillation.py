"""Knowledge distillation: the teacher's outputs (``SoftTargets``: cached, or computed by OpenVINO), the task's loss
against them (``Task.distill_loss``; for classification Hinton et al. 2015, edgepipe.tasks.classification.kd_terms)
and optional feature hints (FitNets, Romero et al. 2015):

loss = task's distillation loss + beta * sum_pairs MSE(adapter(student_feature), teacher_feature)

Adapters are learned 1x1 convolutions from the student's channels to the teacher's; when spatial sizes differ the
student map is resized to the teacher's.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import torch
from torch import nn
from torch.nn import functional as F

from edgepipe.config import FeaturePair, SoftTargetsConfig
from edgepipe import device as devices
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write, is_main_process

if TYPE_CHECKING:
    from edgepipe.tasks.base import Task

log = logging.getLogger(__name__)


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise EdgepipeError(f"distill.feature_pairs: {role} has no module '{name}' (top-level: {', '.join(names)})") from None


class FeatureHints(nn.Module):
    """Captures configured teacher/student feature maps with forward hooks and scores them through adapters."""

    def __init__(self, teacher: nn.Module, student: nn.Module, pairs: list[FeaturePair], example: torch.Tensor) -> None:
        super().__init__()
        self.pairs = pairs
        self._feats: dict[str, torch.Tensor] = {}
        self._hooks = []
        for i, p in enumerate(pairs):
            self._hooks.append(_module(teacher, p.teacher, "teacher").register_forward_hook(self._keep(f"t{i}")))
            self._hooks.append(_module(student, p.student, "student").register_forward_hook(self._keep(f"s{i}")))
        with torch.no_grad():
            was = student.training
            teacher.eval(), student.eval()
            teacher(example), student(example)
            student.train(was)
        for i, p in enumerate(pairs):
            for role, key, name in (("teacher", f"t{i}", p.teacher), ("student", f"s{i}", p.student)):
                if key not in self._feats:
                    self.remove()
                    raise EdgepipeError(
                        f"distill.feature_pairs: the {role}'s module '{name}' is never called in a forward pass, so "
                        "its output cannot be read" + (" (a torch.export program runs as one graph; its submodules "
                        "hold weights only): give the teacher as arch + weights or a factory for feature hints"
                        if role == "teacher" and name.startswith("program.") else "; name a module the model calls"))
        self.adapters = nn.ModuleList(
            nn.Conv2d(self._feats[f"s{i}"].shape[1], self._feats[f"t{i}"].shape[1], 1, bias=False)
            for i in range(len(pairs)))
        self._feats.clear()

    def _keep(self, key: str) -> Callable:
        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            self._feats[key] = out
        return hook

    def loss(self) -> torch.Tensor:
        total = torch.zeros((), device=self.adapters[0].weight.device if len(self.adapters) else "cpu")
        for i, adapter in enumerate(self.adapters):
            s, t = self._feats[f"s{i}"], self._feats[f"t{i}"].detach()
            s = adapter(s.float())
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            total = total + F.mse_loss(s, t.float())
        self._feats.clear()
        return total

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


# Teacher logits kept across stages of one process: {(teacher key, runtime): {batch digest: logits}}.
_LOGITS_CACHE: dict[tuple[str, str], dict[bytes, torch.Tensor]] = {}
_CACHE_LIMIT_BYTES = 512 * 2**20
_SHARD_ENTRIES = 64  # batches per file on disk: a kill loses at most this many teacher forwards


class SoftTargets:
    """The frozen teacher's logits for a batch, from PyTorch or from the teacher compiled by OpenVINO.

    The teacher never trains, so its forward pass is pure inference: OpenVINO FP32 computes the same
    logits (checked against PyTorch when built) at a fraction of PyTorch's CPU cost, which is most of
    a distillation step's time for a deep teacher. With ``cache``, each batch's logits are kept in
    memory keyed by a digest of the batch's bytes; fine-tuning stages that replay the same seeded
    epochs then skip the teacher entirely. With a ``cache_dir`` (the run's ``cache/``) they are also
    written to disk in small shards, so a later process (a resumed run, a single-stage command, the
    baselines) reuses them too. The key is the digest of the input itself, so a hit can only return
    this teacher's logits for these very pixels. The hit/miss counts are reported in the stage records.

    With ``device`` (an edgepipe.device.Device) a PyTorch teacher runs there; whatever its runtime, the logits come
    back on the batch's device, and the cache holds them on the CPU (keyed by the batch's bytes, wherever it is).
    """

    def __init__(self, teacher: nn.Module, runtime: str = "torch", cache: bool = False, key: str = "",
                 example: torch.Tensor | None = None, cache_dir: Path | None = None, device: Any = None) -> None:
        if device is not None and runtime == "torch":
            device.module(teacher)
        elif device is not None and device.is_cuda:
            log.warning("soft_targets.runtime: openvino runs the teacher on the CPU while the student trains on %s; "
                        "runtime: torch runs it on the GPU", device.label)
        self.teacher, self.runtime = teacher.eval(), runtime
        self.device = device
        self.forward: Callable[[nn.Module, Any], Any] | None = None
        """How a batch's inputs are given to the PyTorch teacher (a task's ``forward``; None: ``teacher(x)``)."""
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.hits = self.misses = self.loaded = 0
        self.max_abs_diff: float | None = None
        self._store = _LOGITS_CACHE.setdefault((key, runtime), {}) if cache and key else None
        self._disk: Path | None = None
        self._pending: list[tuple[bytes, torch.Tensor]] = []
        if self._store is not None and cache_dir is not None:
            self._disk = Path(cache_dir) / "soft_targets" / hashlib.sha256(f"{key}|{runtime}".encode()).hexdigest()[:16]
            self.loaded = _load_shards(self._disk, self._store)
        self._request = None
        if runtime == "openvino":
            if example is None:
                raise ValueError("SoftTargets: the openvino runtime needs an example input")
            self._request = _openvino_request(teacher, example)
            with torch.no_grad():
                ref = teacher(example)
            if not isinstance(ref, torch.Tensor):
                raise EdgepipeError("soft_targets.runtime: openvino computes a one-output teacher's logits; this teacher "
                                    f"returns a {type(ref).__name__}: use runtime: torch")
            self.max_abs_diff = float((self._openvino(example) - ref).abs().max())
            if self.max_abs_diff > 1e-2:
                raise EdgepipeError(f"soft_targets.runtime: OpenVINO's teacher logits differ from PyTorch's by "
                                    f"{self.max_abs_diff:.3g}; use runtime: torch")

    @property
    def caching(self) -> bool:
        return self._store is not None

    def _openvino(self, x: torch.Tensor) -> torch.Tensor:
        out = self._request.infer({0: x.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(next(iter(out.values())).copy()).to(x.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        digest = None
        if self._store is not None:
            digest = hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
            found = self._store.get(digest)
            if found is not None:
                self.hits += 1
                return found.to(x.device)
        self.misses += 1
        on = _batch_device(x)
        if self._request is None and devices.module_device(self.teacher) != on:  # the teacher follows the batches
            self.teacher.to(on)
        if self._request is not None:
            logits = self._openvino(x)
        else:
            logits = self.forward(self.teacher, x) if self.forward is not None else self.teacher(x)
        if not isinstance(logits, torch.Tensor):  # a several-output teacher (a task's named outputs): not cached
            return logits
        logits = logits.float()
        if digest is not None and len(self._store) * logits.numel() * 4 < _CACHE_LIMIT_BYTES:
            self._store[digest] = logits.cpu()
            if self._disk is not None:
                self._pending.append((digest, self._store[digest]))
                if len(self._pending) >= _SHARD_ENTRIES:
                    self.flush()
        return logits

    def flush(self) -> None:
        """Write the logits computed since the last flush as one shard (atomically; rank 0 only)."""
        if not self._pending or self._disk is None:
            return
        pending, self._pending = self._pending, []
        if not is_main_process():
            return
        digests = np.frombuffer(b"".join(d for d, _ in pending), dtype=np.uint8).reshape(len(pending), 16)
        rows = np.array([len(t) for _, t in pending], dtype=np.int64)  # batch sizes (the last batch may be smaller)
        logits = torch.cat([t for _, t in pending]).float().numpy()
        name = hashlib.sha256(digests.tobytes()).hexdigest()[:16]

        def write(p: Path) -> None:
            with p.open("wb") as fh:
                np.savez(fh, digests=digests, rows=rows, logits=logits)
        try:
            atomic_write(self._disk / f"{name}.npz", write)
        except OSError as e:  # the cache only saves time: a full disk must not stop training
            log.warning("soft targets: cannot write the logits cache in %s (%s); continuing without it", self._disk,
                        e.strerror)
            self._disk = None

    def record(self) -> dict[str, Any]:
        self.flush()
        return {"runtime": self.runtime, "cache": self.caching, "cache_hits": self.hits,
                "teacher_forwards": self.misses, "openvino_max_abs_diff": self.max_abs_diff,
                "loaded_from_disk": self.loaded}


def _load_shards(folder: Path, store: dict[bytes, torch.Tensor]) -> int:
    """Add the logits saved in ``folder`` to ``store``; a shard that does not read back whole is ignored."""
    added = 0
    for shard in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        try:
            with np.load(shard, allow_pickle=False) as z:
                digests, rows, logits = z["digests"], z["rows"], z["logits"]
            if digests.dtype != np.uint8 or digests.ndim != 2 or digests.shape[1] != 16 or logits.ndim != 2 \
                    or logits.dtype != np.float32 or rows.shape != (len(digests),) or rows.sum() != len(logits):
                raise ValueError("unexpected arrays")
        except Exception as e:  # noqa: BLE001 - a damaged shard is recomputed, never trusted
            log.warning("soft targets: ignoring damaged cache file %s (%s)", shard, type(e).__name__)
            continue
        for d, t in zip(digests, np.split(logits, np.cumsum(rows)[:-1])):
            if len(store) * t.size * 4 >= _CACHE_LIMIT_BYTES:
                return added
            key = d.tobytes()
            if key not in store:
                store[key] = torch.from_numpy(t.copy())
                added += 1
    return added


def _openvino_request(teacher: nn.Module, example: torch.Tensor) -> Any:
    import openvino as ov

    from edgepipe.engine import signals

    with signals.deferred():  # the PyTorch frontend calls Python from C++: a Ctrl-C there becomes a RuntimeError
        model = ov.convert_model(teacher, example_input=example, input=[(-1, *example.shape[1:])])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return compiled.create_infer_request()


def _batch_device(x: Any) -> torch.device:
    """The device of a batch's inputs (a tensor, or the first tensor of a dict of named inputs)."""
    if isinstance(x, torch.Tensor):
        return x.device
    first = next((v for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, torch.Tensor)), None)
    return first.device if first is not None else torch.device("cpu")


def soft_targets_for(teacher: nn.Module, cfg: SoftTargetsConfig, key: str, input_shape: tuple[int, ...],
                     cache_dir: Path | None = None, device: Any = None) -> SoftTargets:
    return SoftTargets(teacher, cfg.runtime, cfg.cache, key, torch.randn(2, *input_shape), cache_dir=cache_dir,
                       device=device)


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Copy the teacher's weights into a shallower student of the same widths.

    Names match except for block indices inside a stage (``layerK.i``): a student stage with m blocks
    takes m evenly spaced teacher blocks, always including the first (it holds the stride and the
    projection shortcut). Residual networks degrade gracefully when blocks are dropped (Veit et al.
    2016), so the student starts far above chance and distillation converges in fewer epochs; the same
    idea initialises DistilBERT from every other teacher layer (Sanh et al. 2019).
    """
    from edgepipe.models.hf import HFClassifier, init_from_teacher as init_hf_from_teacher

    if isinstance(student, HFClassifier) and isinstance(teacher, HFClassifier):  # a transformer: drop layers
        return init_hf_from_teacher(student, teacher)
    t_state = teacher.state_dict()
    if t_state and all(k.startswith("program.") for k in t_state):
        t_state = {k[len("program."):]: v for k, v in t_state.items()}
    stages: dict[str, int] = {}
    for k in t_state:
        parts = k.split(".")
        if len(parts) > 2 and parts[1].isdigit():
            stages[parts[0]] = max(stages.get(parts[0], 0), int(parts[1]) + 1)
    s_counts: dict[str, int] = {}
    for k in student.state_dict():
        parts = k.split(".")
        if len(parts) > 2 and parts[1].isdigit():
            s_counts[parts[0]] = max(s_counts.get(parts[0], 0), int(parts[1]) + 1)
    chosen: dict[str, list[int]] = {}
    for stage, m in s_counts.items():
        n = stages.get(stage, 0)
        if m > n:
            raise EdgepipeError(f"distill.init: teacher: student stage '{stage}' has {m} blocks, the teacher {n}")
        chosen[stage] = [round(i * (n - 1) / (m - 1)) if m > 1 else 0 for i in range(m)]
    new = {}
    for k, v in student.state_dict().items():
        parts = k.split(".")
        if len(parts) > 2 and parts[0] in chosen and parts[1].isdigit():
            parts[1] = str(chosen[parts[0]][int(parts[1])])
        src = t_state.get(".".join(parts))
        if src is None or src.shape != v.shape:
            got = "missing" if src is None else f"shape {tuple(src.shape)}"
            raise EdgepipeError(f"distill.init: teacher: student tensor '{k}' {tuple(v.shape)} has no match in the "
                                f"teacher ('{'.'.join(parts)}' {got}); use the teacher's widths or init: random")
        new[k] = src.clone()
    student.load_state_dict(new)
    return {"init": "teacher", "blocks": chosen, "tensors": len(new)}


def kd_step(teacher: nn.Module | SoftTargets, temperature: float, alpha: float, beta: float = 0.0,
            hints: FeatureHints | None = None, task: Task | None = None, method: str = "kd",
            weights: tuple[float, ...] = (), pseudo_threshold: float | None = None,
            ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """A ``loss_step`` for edgepipe.training.loop.fit: the teacher's outputs (no grad, eval mode) and the task's
    distillation loss (``Task.distill_loss`` with ``method`` and its ``weights``; default classification's KD terms).

    Images labelled -1 (data.unlabeled) count in the soft term only, or, with ``pseudo_threshold``, also in the hard
    term with the teacher's class where its probability reaches the threshold; the fraction of each batch that is
    unlabeled and pseudo-labelled is logged (``unlabeled``, ``pseudo_labeled``)."""
    from edgepipe.tasks import DEFAULT, get_task

    task = task or get_task(DEFAULT)
    targets = teacher if isinstance(teacher, SoftTargets) else SoftTargets(teacher)
    if targets.forward is None:
        targets.forward = task.forward
    if hints is not None and (targets.runtime != "torch" or targets.caching):
        raise EdgepipeError("distill.feature_pairs: feature hints read the teacher's PyTorch layers; "
                            "set soft_targets.runtime: torch and soft_targets.cache: false")

    def step(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = targets(x)
        unlabeled = y < 0 if isinstance(y, torch.Tensor) and y.dtype != torch.bool else None
        if unlabeled is not None and bool(unlabeled.any()):  # data.unlabeled: soft targets, and confident classes
            fraction = unlabeled.float().mean()
            if pseudo_threshold is not None:
                confidence, top = torch.softmax(t_logits.float(), dim=1).max(1)
                take = unlabeled & (confidence >= pseudo_threshold)
                y = torch.where(take, top, y)
                pseudo = take.float().mean()
        # KD keeps the five-argument call a task written before distill.loss existed implements
        extra = (method, weights) if method != "kd" else ()
        terms = task.distill_loss(task.forward(student, x), t_logits, y, temperature, alpha, *extra)
        if hints is not None and beta > 0:
            feature = hints.loss()
            terms["feature"] = feature.detach()
            terms["loss"] = terms["loss"] + beta * feature
        terms["soft"], terms["hard"] = terms["soft"].detach(), terms["hard"].detach()
        if unlabeled is not None and bool(unlabeled.any()):
            terms["unlabeled"] = fraction
            if pseudo_threshold is not None:
                terms["pseudo_labeled"] = pseudo
        return terms
    return step
