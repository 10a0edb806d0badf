"""torchrun: the process group, what runs on every rank and what on rank 0 only, and DDP training pieces.

``torchrun --nproc_per_node=N -m edgepipe run ...`` starts N copies of the command. ``init_from_env`` reads the
launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT or the c10d rendezvous)
and joins the default process group with a collective timeout (``EDGEPIPE_DIST_TIMEOUT`` seconds, default 1800),
so a rank that hangs or dies stops every other one within that time instead of never.

The engine (edgepipe.engine.pipeline.run_stage) runs a stage that declares ``DISTRIBUTED = True`` (the training stages)
on every rank inside ``collective()``; every other stage, and all measuring and recording, on rank 0 only while
the other ranks wait at a barrier and then read rank 0's files. Only rank 0 writes (edgepipe.io), so a run folder
holds exactly one set of files, and it must be visible at the same path on every node (a shared filesystem) for a
multi-node run: ``check_shared_run_folder`` fails at once, naming the node, when it is not.

Inside a training stage, ``edgepipe.training.loop.fit`` wraps the model in ``DistributedDataParallel`` with its
BatchNorm layers synchronised (``synced_batchnorm``); the task's evaluation splits the validation
batches over the ranks and all-reduces the counts, so validation covers the whole set exactly once.

On GPUs (``device: auto`` or ``cuda``, edgepipe.device) each process trains on the GPU of its LOCAL_RANK; the process
group then runs NCCL for CUDA tensors (DDP's gradients, SyncBatchNorm) and gloo for the CPU ones (counts, decisions,
barriers): ``init_process_group("cpu:gloo,cuda:nccl")``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import types
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepipe.errors import EdgepipeError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "EDGEPIPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
"""Collective timeout: long enough for rank 0's measuring and compiling while the other ranks wait at a barrier
(minutes on CIFAR-size models), short enough that a hung rank does not hold a job for hours."""


@dataclass(frozen=True)
class Launch:
    """How this process was launched: what the manifest and the training records state."""

    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    backend: str
    timeout_s: float
    threads_per_rank: int
    host: str


_LAUNCH: Launch | None = None
_COLLECTIVE = False


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def backend_for(device: str) -> str:
    """The torch.distributed backend for a machine whose PyTorch sees ``device``: on a CUDA machine NCCL for the
    CUDA tensors and gloo for the CPU ones (the small counts and objects edgepipe exchanges, and barriers: PyTorch
    sends object collectives to the CPU backend when the group has one); gloo alone on a CPU machine. NCCL connects
    lazily, at the first CUDA collective, so a run with ``device: cpu`` on a GPU machine never touches it."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def _machine_device() -> str:
    from edgepipe.device import cuda_count
    import torch.distributed as dist

    return "cuda" if cuda_count() > 0 and dist.is_nccl_available() else "cpu"


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
        if value <= 0:
            raise ValueError
    except ValueError:
        raise EdgepipeError(f"{TIMEOUT_ENV}={raw!r}: not a positive number of seconds; e.g. {TIMEOUT_ENV}=600") from None
    return value


def _store(timeout: float) -> Any:
    """The launcher's rendezvous store (env://), with keys under this restart attempt's own prefix.

    Without the prefix, ranks restarted by torchrun --max-restarts failed to join: "Gloo connectFullMesh failed ...
    Connection refused" (PyTorch 2.14.1, gloo, --standalone), as if they read the first attempt's addresses; the
    same symptom on NCCL is pytorch/pytorch#167288. TORCHELASTIC_RESTART_COUNT names the attempt."""
    import torch.distributed as dist
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", timeout=timedelta(seconds=timeout)))
    return dist.PrefixStore(f"edgepipe/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_from_env() -> Launch | None:
    """Join the process group torchrun describes in the environment; None for a single process (WORLD_SIZE
    unset or 1). CPU threads per rank: the usable cores shared among this node's ranks, unless the user set
    OMP_NUM_THREADS (torchrun sets it to 1 for several ranks per node)."""
    global _LAUNCH
    if _LAUNCH is not None:
        return _LAUNCH
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise EdgepipeError("WORLD_SIZE is set (torchrun) but this PyTorch build has no torch.distributed; "
                            "install a build with it or run a single process")
    timeout = _timeout_s()
    backend = backend_for(_machine_device())
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "nccl" in backend and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # NCCL's communicators bind to the current device: this rank's GPU
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() \
        else max(1, usable_cores() // local_world)
    torch.set_num_threads(max(1, threads))
    try:
        dist.init_process_group(backend, store=_store(timeout), rank=int(os.environ["RANK"]), world_size=world,
                                timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError, KeyError) as e:
        raise EdgepipeError(f"torch.distributed: cannot join the process group ({str(e).splitlines()[0][:200]}); "
                            "check MASTER_ADDR/MASTER_PORT or --rdzv-endpoint and that every node can reach it"
                            ) from None
    _LAUNCH = Launch(world_size=dist.get_world_size(), rank=dist.get_rank(),
                     local_rank=local_rank, local_world_size=local_world,
                     backend=backend, timeout_s=timeout, threads_per_rank=torch.get_num_threads(),
                     host=socket.gethostname())
    return _LAUNCH


def launch() -> Launch | None:
    """This process's launch, or None when it is the only process."""
    return _LAUNCH


def world_size() -> int:
    return _LAUNCH.world_size if _LAUNCH else 1


def rank() -> int:
    return _LAUNCH.rank if _LAUNCH else 0


def is_main() -> bool:
    return rank() == 0


def describe() -> dict[str, Any]:
    """For the manifest: the launch (world size, backend, timeout, threads per rank)."""
    if _LAUNCH is None:
        return {"world_size": 1, "backend": None, "note": "single process"}
    d = asdict(_LAUNCH)
    d.pop("rank"), d.pop("local_rank"), d.pop("host")
    return d


def barrier() -> None:
    if _LAUNCH is not None:
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a small, JSON-like value: a decision, a token)."""
    if _LAUNCH is None:
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    global _LAUNCH
    if _LAUNCH is None:
        return
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    _LAUNCH = None


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """Every rank runs the enclosed stage: training shards its batches and validation splits over the ranks."""
    global _COLLECTIVE
    was, _COLLECTIVE = _COLLECTIVE, _LAUNCH is not None
    try:
        yield
    finally:
        _COLLECTIVE = was


def collective_active() -> bool:
    """True inside ``collective()`` of a multi-process launch: collectives may be called (every rank is here)."""
    return _COLLECTIVE


@contextlib.contextmanager
def main_only_threads() -> Iterator[None]:
    """Rank 0 working alone (measuring, exporting, compiling) while the others wait at a barrier uses all of
    this node's cores, as a single process would, so its latency figures mean what a single run's mean."""
    if _LAUNCH is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64; the inputs are per-rank counts and sums)."""
    if not collective_active():
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def check_shared_run_folder(run_dir: Path) -> None:
    """Every rank reads rank 0's artifacts and checkpoints from the run folder: prove that each rank sees the
    folder rank 0 writes (a multi-node run needs it on a shared filesystem at the same path)."""
    if _LAUNCH is None:
        return
    token = broadcast(uuid.uuid4().hex if is_main() else None)
    marker = Path(run_dir) / ".edgepipe-ranks"
    if is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    barrier()
    try:
        seen = marker.read_text()
    except OSError:
        seen = None
    ok = all_ok([seen == token])
    barrier()
    if is_main():
        marker.unlink(missing_ok=True)
    if not ok:
        raise EdgepipeError(f"{run_dir}: rank {rank()} on {_LAUNCH.host} cannot see the run folder rank 0 writes; "
                            "a multi-node launch needs --run on a filesystem shared by every node, at the same path")


def all_ok(flags: list[bool]) -> bool:
    """True on every rank only if every rank's flags are all true."""
    if _LAUNCH is None:
        return all(flags)
    import torch.distributed as dist

    t = torch.tensor([0.0 if all(flags) else 1.0])
    dist.all_reduce(t)
    return float(t) == 0.0


# --- BatchNorm -------------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of every rank's sum is the sum of the ranks' gradients. On
    the default process group, as torch.nn.SyncBatchNorm's: its all-reduces are issued in the same order on every
    rank (the same graph), interleaved with DDP's gradient buckets, and gloo matches collectives by that order.
    (A separate group from ``new_group`` does not survive torchrun's --max-restarts: the restarted ranks find the
    first attempt's addresses under the same group name in the rendezvous store.)
    (torch.distributed.nn.functional.all_reduce does this but is deprecated in PyTorch 2.14 in favour of a private
    module, so the two collectives are written out here.)"""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def _synced_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm with the batch statistics of every rank's batch together (sum, sum of squares and
    count all-reduced); eval mode, and BatchNorm without running statistics in eval, are the module's own."""
    if not self.training:
        return type(self).forward(self, x)
    dims = [d for d in range(x.dim()) if d != 1]
    xf = x.float()
    local = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                       torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32)])
    total = _AllReduceSum.apply(local)
    c = x.shape[1]
    n = total[-1]
    mean = total[:c] / n
    var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y.to(x.dtype)


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, device: Any = None) -> Iterator[str]:
    """BatchNorm synchronised across the ranks while training ``model`` on ``device`` (an edgepipe.device.Device;
    None: the CPU); yields what the records state.

    On CUDA: PyTorch's own ``torch.nn.SyncBatchNorm`` (its fused kernels, over NCCL), put in place of each BatchNorm
    for the training and the originals put back after (``_torch_sync_batchnorm``). On the CPU ``torch.nn.SyncBatchNorm``
    raises ("expected input tensor to be on GPU", PyTorch 2.14), so each BatchNorm's forward is swapped for
    ``_synced_forward`` (the same statistics SyncBatchNorm computes: global mean and biased variance for normalising,
    unbiased variance into the running estimate) and put back afterwards. Either way the modules, their parameters
    and their state dict stay exactly as they were, so checkpoints and artifacts do not change with the world size."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if _LAUNCH is None or not collective_active() or not norms:
        yield ("single process" if _LAUNCH is None else "no BatchNorm layers")
        return
    if device is not None and device.is_cuda:
        swapped = _torch_sync_batchnorm(model)
        try:
            yield (f"synchronised across {_LAUNCH.world_size} ranks: {len(swapped)} BatchNorm layer(s) trained as "
                   "torch.nn.SyncBatchNorm (NCCL)")
        finally:
            for parent, child, original in swapped:
                setattr(parent, child, original)
        return
    for m in norms:
        m.forward = types.MethodType(_synced_forward, m)
    try:
        yield (f"synchronised across {_LAUNCH.world_size} ranks: {len(norms)} BatchNorm layer(s) normalise with the "
               "global batch's statistics (edgepipe.training.distributed.synced_batchnorm; torch.nn.SyncBatchNorm refuses "
               "CPU tensors)")
    finally:
        for m in norms:
            del m.forward


def _torch_sync_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every BatchNorm under ``model`` by a ``torch.nn.SyncBatchNorm`` holding the very same parameter and
    buffer tensors (so its updates are the original's), and return (parent, name, original) to put back.
    (torch.nn.SyncBatchNorm.convert_sync_batchnorm does the replacing but has no way back, and the stages after
    training need the plain modules: export, pruning's graph.)"""
    swapped = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.SyncBatchNorm) or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        sync = nn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        for attr in ("weight", "bias"):
            if getattr(m, attr, None) is not None:
                setattr(sync, attr, getattr(m, attr))
        for attr in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, attr, getattr(m, attr))
        sync.train(m.training)
        setattr(parent, child, sync)
        swapped.append((parent, child, m))
    return swapped


class _Trained(nn.Module):
    """The model and its companion modules (feature-hint adapters) as one module, so DDP averages all their
    gradients; calling it is calling the model."""

    def __init__(self, model: nn.Module, extra: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)  # a text model takes its named token tensors positionally


def data_parallel(model: nn.Module, extra: nn.Module | None, device: Any = None) -> nn.Module:
    """``model`` (with ``extra``) under DistributedDataParallel on ``device`` (an edgepipe.device.Device; None: the
    CPU), for the loss step to call like the model."""
    from torch.nn.parallel import DistributedDataParallel

    # forward_sync_buffers=False: DDP's construction gives every rank rank 0's buffers, and after that the
    # synchronised BatchNorm keeps the running statistics equal on every rank, so re-sending them before each
    # forward is waste. On a GPU, device_ids names this rank's one GPU (PyTorch's single-device DDP).
    ids = [device.torch.index] if device is not None and device.is_cuda else None
    return DistributedDataParallel(_Trained(model, extra), device_ids=ids, forward_sync_buffers=False)


def share_model(model: nn.Module, path: Path) -> None:
    """Rank 0 changed ``model``'s structure alone (Torch-Pruning's graph surgery): it writes the weights to
    ``path`` (atomically), and every other rank waits at a barrier, then resizes its copy to them and loads them
    (edgepipe.models.loading.restore_shapes, ``weights_only=True``)."""
    if not collective_active():
        return
    from edgepipe.io import atomic_torch_save
    from edgepipe.models.loading import restore_shapes

    if is_main():
        atomic_torch_save(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    barrier()
    if not is_main():
        from edgepipe import device as devices

        where = devices.module_device(model)
        state = torch.load(path, map_location="cpu", weights_only=True)
        restore_shapes(model, state)  # resized layers get new (CPU) tensors: the model goes back where it was
        model.load_state_dict(state)
        model.to(where)
    barrier()  # every rank has read it before rank 0 may replace it


def local_batch(batch_size: int) -> int:
    """Each rank's share of the configured (global) batch; a clear error when it does not divide."""
    world = world_size() if collective_active() else 1
    if batch_size % world:
        raise EdgepipeError(f"data.batch_size: {batch_size} does not split evenly over {world} processes; give a batch "
                            f"size divisible by {world} (the configured batch is the global batch, each process takes "
                            f"batch / {world})")
    return batch_size // world


class Stopped(BaseException):
    """SIGTERM under torchrun (the launcher stops every rank when one fails): unwinds like KeyboardInterrupt, so
    the manifest records the stage as failed and nothing is left half-written."""


_STAGE: str | None = None


def note_stage(name: str | None) -> None:
    """The stage this process is in, for the one line a failure prints."""
    global _STAGE
    _STAGE = name


def current_stage() -> str | None:
    return f"the {_STAGE} stage" if _STAGE else None
