"""Training where users train (issue 26): the device setting, its errors, mixed precision per GPU, checkpoints that
move between devices, and every training stage placing its model, batches and teacher on the device.

Here (no GPU) the GPU is faked strictly (tests/fake_gpu.py); the tests marked ``gpu`` run the same on a real one."""
from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import pytest
import torch

import edgepipe.device as devices
from edgepipe.config import OptimConfig
from edgepipe.device import Device, precision, resolve
from edgepipe.engine.pipeline import run_pipeline
from edgepipe.engine.run import Run
from edgepipe.errors import EdgepipeError
from edgepipe.host import host_has_native_bf16
from edgepipe.training.loop import fit
from tests.fake_gpu import FakeGPU, fake_gpu
from tests.support import tiny_cnn, tiny_config, tiny_data

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA made unavailable, whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _gpu(capability: tuple[int, int] = (8, 0)) -> Device:
    return Device(torch.device("cuda", 0), "Fake GPU", "cuda", capability, 80.0)


# --- the setting ---------------------------------------------------------------------------------------------------


def test_auto_and_cpu_resolve_to_the_cpu_without_cuda(no_cuda: None) -> None:
    for setting in ("auto", "cpu", "AUTO"):
        d = resolve(setting)
        assert d.torch == torch.device("cpu") and not d.is_cuda and d.setting == setting
        assert d.label.startswith("cpu (")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cpu:0", "cuda:-1", "mps", ""])
def test_a_device_that_is_no_device_is_refused_in_the_config(bad: str) -> None:
    with pytest.raises(EdgepipeError, match="is not a device; give one of auto | cpu | cuda | cuda:N"):
        tiny_config(device=bad)
    assert tiny_config(device="CUDA:1").device == "cuda:1"
    assert tiny_config().device == "auto"


def test_cuda_without_a_gpu_is_one_clear_error(no_cuda: None) -> None:
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(EdgepipeError, match=rf"^device: {setting}: no CUDA GPU here: .*set device: auto \(or cpu\)"):
            resolve(setting)


def test_a_gpu_index_that_does_not_exist_names_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_gpu(monkeypatch, FakeGPU(count=2)):
        assert resolve("cuda:1").torch == torch.device("cuda", 1)
        assert resolve("auto").label == "cuda:0 (Fake GPU)"
        with pytest.raises(EdgepipeError, match=r"device: cuda:2: no such GPU; this machine has 2 \(cuda:0 \(Fake GPU\), "
                                                r"cuda:1 \(Fake GPU\)\); give an index below 2"):
            resolve("cuda:2")


def test_torchrun_takes_one_gpu_per_local_rank_and_refuses_sharing(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_gpu(monkeypatch, FakeGPU(count=2)):
        assert resolve("auto", local_rank=1, local_world=2).torch == torch.device("cuda", 1)
        assert resolve("cuda", local_rank=0, local_world=2).torch == torch.device("cuda", 0)
        with pytest.raises(EdgepipeError, match=r"torchrun started 3 processes on this node, which has 2 CUDA GPU\(s\): "
                                                r"one process per GPU; give --nproc-per-node=2"):
            resolve("auto", local_rank=2, local_world=3)
        with pytest.raises(EdgepipeError, match="would put them all on one GPU"):
            resolve("cuda:0", local_rank=0, local_world=2)
        assert resolve("cpu", local_rank=0, local_world=4).torch == torch.device("cpu")  # gloo on the CPU, as before


# --- mixed precision -----------------------------------------------------------------------------------------------


def test_cpu_precision_follows_the_cpus_native_bf16() -> None:
    """Host property: the CPU's native bf16 (AMX or AVX512-BF16 in /proc/cpuinfo) decides 'auto', as before."""
    cpu = devices.cpu_device()
    assert precision(cpu, "auto").dtype == (torch.bfloat16 if host_has_native_bf16() else None)
    assert precision(cpu, "bf16").dtype == torch.bfloat16 and precision(cpu, "off").dtype is None
    assert not precision(cpu, "auto").scaler
    with pytest.raises(EdgepipeError, match="fp16 autocast needs a CUDA device"):
        precision(cpu, "fp16")


@pytest.mark.parametrize("capability, setting, dtype, scaler", [
    ((9, 0), "auto", torch.bfloat16, False),   # Hopper
    ((8, 0), "auto", torch.bfloat16, False),   # Ampere
    ((7, 5), "auto", torch.float16, True),     # Turing: no bf16, fp16 with a gradient scaler
    ((7, 0), "auto", torch.float16, True),     # Volta
    ((8, 6), "fp16", torch.float16, True),
    ((8, 0), "bf16", torch.bfloat16, False),
    ((7, 5), "off", None, False),
])
def test_gpu_precision_per_compute_capability(capability, setting, dtype, scaler) -> None:
    p = precision(_gpu(capability), setting)
    assert (p.dtype, p.scaler) == (dtype, scaler)


def test_bf16_on_a_gpu_without_it_is_refused() -> None:
    with pytest.raises(EdgepipeError, match=r"bf16: cuda:0 \(Fake GPU\) \(compute capability 7.5\) has no bf16; use fp16"):
        precision(_gpu((7, 5)), "bf16")


@pytest.mark.parametrize("capability, autocast, scaler", [((8, 0), "bfloat16", False), ((7, 0), "float16", True)])
def test_the_loop_records_what_ran_and_where(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capability, autocast,
                                              scaler) -> None:
    torch.manual_seed(0)
    with fake_gpu(monkeypatch, FakeGPU(capability=capability)) as gpu, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.autocast/GradScaler("cuda") warn that this PyTorch has no GPU
        device = resolve("auto")
        history = fit(tiny_cnn(num_classes=4), tiny_data(), OptimConfig(epochs=1, lr=0.05, autocast="auto"),
                      lambda m, x, y: {"loss": torch.nn.functional.cross_entropy(m(x), y)}, batch_size=32,
                      checkpoint_dir=tmp_path, device=device)
    row = history[0]
    assert row["device"] == "cuda:0 (Fake GPU)" and row["autocast"] == autocast
    assert row.get("grad_scaler", False) is scaler
    assert gpu.mismatches == [] and gpu.on_gpu() > 0 and gpu.pinned > 0  # batches pinned, model and batches placed
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    if scaler:
        assert "scaler" in torch.load(tmp_path / "last.pt", weights_only=True)


# --- checkpoints across devices ------------------------------------------------------------------------------------


def _as_if_written_on_a_gpu(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewrite ``path`` with every tensor storage tagged cuda:0, as torch.save writes a checkpoint on a GPU."""
    state = torch.load(path, weights_only=True)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           no_cuda: None) -> None:
    data, step = tiny_data(), (lambda m, x, y: {"loss": torch.nn.functional.cross_entropy(m(x), y)})
    cfg = OptimConfig(epochs=2, lr=0.05, autocast="off")
    torch.manual_seed(0)
    whole = tiny_cnn(num_classes=4)
    fit(whole, data, cfg, step, batch_size=32, checkpoint_dir=tmp_path / "whole")

    class Stop(Exception):
        pass

    def progress(task: str, done: int, total: int, values: dict) -> None:
        if task.endswith("2/2"):
            raise Stop  # killed in the second epoch: epoch 1's checkpoint stays
    torch.manual_seed(0)
    with pytest.raises(Stop):
        fit(tiny_cnn(num_classes=4), data, cfg, step, batch_size=32, checkpoint_dir=tmp_path / "cut", progress=progress)
    ckpt = tmp_path / "cut" / "last.pt"
    _as_if_written_on_a_gpu(ckpt, monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):  # what loading it without map_location does here
        torch.load(ckpt, weights_only=True)
    torch.manual_seed(0)
    resumed = tiny_cnn(num_classes=4)
    history = fit(resumed, data, cfg, step, batch_size=32, checkpoint_dir=tmp_path / "cut")
    assert [r.get("earlier_invocation", False) for r in history] == [True, False]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # the same weights as the run that was never cut


def test_checkpoints_and_artifacts_hold_cpu_tensors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever device trained it, a checkpoint's tensors are written from the CPU (loadable anywhere)."""
    saved = {}
    import edgepipe.training.loop as loop

    monkeypatch.setattr(loop, "atomic_torch_save", lambda path, state: saved.update(state))
    fit(tiny_cnn(num_classes=4), tiny_data(), OptimConfig(epochs=1, lr=0.05, autocast="off"),
        lambda m, x, y: {"loss": torch.nn.functional.cross_entropy(m(x), y)}, batch_size=32, checkpoint_dir=tmp_path)
    tensors = [v for v in saved["model"].values()] + [
        t for s in saved["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


# --- CUDA out of memory --------------------------------------------------------------------------------------------


def test_out_of_memory_is_one_line_and_the_stage_resumes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = tiny_data()
    calls = {"n": 0}

    def step(m, x, y):
        calls["n"] += 1
        if calls["n"] == 6:  # the second epoch (4 batches of 32 per epoch)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"loss": torch.nn.functional.cross_entropy(m(x), y)}

    cfg = OptimConfig(epochs=2, lr=0.05, autocast="off")
    with fake_gpu(monkeypatch):
        device = resolve("cuda")
        with pytest.raises(EdgepipeError) as err:
            fit(tiny_cnn(num_classes=4), data, cfg, step, batch_size=32, checkpoint_dir=tmp_path, task="distill",
                eval_batch_size=64, device=device)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("distill: CUDA out of memory on cuda:0 (Fake GPU), 80 GiB (epoch 2) with data.batch_size 32")
    assert "lower data.batch_size" in line and "resumes from its last finished epoch" in line
    history = fit(tiny_cnn(num_classes=4), data, cfg, step, batch_size=32, checkpoint_dir=tmp_path, task="distill")
    assert [r.get("earlier_invocation", False) for r in history] == [True, False]


def test_out_of_memory_outside_training_is_one_line_and_recorded(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """Out of memory in an evaluation or a teacher forward (not inside the training loop): the engine names the
    stage and the batch sizes, records the stage failed, and the CLI prints one line with exit 2."""
    import stages.teacher as teacher_stage
    from edgepipe.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config().model_dump_json())

    def boom(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(teacher_stage, "run", boom)
    assert main(["teacher", "--config", str(cfg), "--target", "generic-cpu", "--run", str(tmp_path / "run")]) == 2
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    entry = next(s for s in manifest["stages"] if s["name"] == "teacher")
    assert entry["status"] == "failed" and "teacher: CUDA out of memory" in entry["error"]
    assert "data.batch_size 64 (data.eval_batch_size 256)" in entry["error"]


# --- the CLI -------------------------------------------------------------------------------------------------------


def test_device_cuda_without_a_gpu_stops_before_anything_is_written(tmp_path: Path, no_cuda: None,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from edgepipe.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(device="cuda").model_dump_json())
    run = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--target", "generic-cpu", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgepipe: error: device: cuda: no CUDA GPU here")
    assert not (run / "manifest.json").exists()
    cfg.write_text(tiny_config().model_dump_json())
    assert main(["run", "--config", str(cfg), "--target", "generic-cpu", "--run", str(run), "--device", "cuda:1"]) == 2
    assert capsys.readouterr().err.strip().startswith("edgepipe: error: device: cuda:1: no CUDA GPU here")
    assert main(["teacher", "--run", str(run), "--device", "gpu"]) == 2
    assert "--device: 'gpu' is not a device" in capsys.readouterr().err


# --- every training stage on the device ---------------------------------------------------------------------------

TRAINING_STAGES = ("teacher", "distill", "prune", "qat")


def _placed_run(tmp_path: Path, device: str, **overrides) -> Run:
    config = tiny_config(device=device, distill__feature_pairs=[{"teacher": "layer2", "student": "layer2"}],
                         distill__beta=1.0, **overrides)
    run = Run.create(tmp_path / "run", config, "generic-cpu", order=["teacher", "distill", "prune", "finetune", "qat"])
    run_pipeline(run)
    return run


def _check_records(run: Run, label: str) -> None:
    manifest = json.loads((run.root / "manifest.json").read_text())
    for name in (*TRAINING_STAGES, "finetune"):
        entry = next(s for s in manifest["stages"] if s["name"] == name)
        assert entry["status"] == "done", (name, entry.get("error"))
        assert entry["torch_device"]["device"] == label.split(" ")[0], name
        rows = json.loads((run.root / name / "metrics.json").read_text())["records"]["history"]
        assert rows and all(r["device"] == label for r in rows), name


def test_each_training_stage_places_model_batches_and_teacher_on_the_device(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    """With a (strictly) fake GPU: teacher training, distillation with feature hints (teacher forward, adapters),
    pruning (Torch-Pruning's graph, fine-tuning), QAT (calibration, fine-tuning) and finetune put every model and
    batch they run on the GPU (no module is ever called with an input on another device) and record it."""
    with fake_gpu(monkeypatch) as gpu, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = _placed_run(tmp_path, "auto")
    assert gpu.mismatches == []
    assert gpu.on_gpu() > 100 and gpu.pinned > 0
    _check_records(run, "cuda:0 (Fake GPU)")
    distill = json.loads((run.root / "distill" / "metrics.json").read_text())["records"]
    assert "feature" in distill["history"][0]


def test_a_forgotten_placement_is_caught(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fake is strict: a teacher left on the CPU while the student trains on the GPU is a mismatch."""
    from edgepipe.training.distillation import SoftTargets

    with fake_gpu(monkeypatch) as gpu:
        device = resolve("cuda")
        teacher = tiny_cnn(num_classes=4)
        targets = SoftTargets(teacher)  # no device: the teacher stays on the CPU
        monkeypatch.setattr(devices, "module_device", lambda m: torch.device("cpu"))  # nor does it follow the batch
        targets(device.batch(torch.zeros(2, 1, 8, 8)))
    assert gpu.mismatches and "TinyCNN on cpu called with an input on cuda:0" in gpu.mismatches[0]


@pytest.mark.gpu
@needs_cuda
def test_on_a_real_gpu_every_training_stage_runs_there(tmp_path: Path) -> None:
    calls: list[tuple[str, bool, bool]] = []
    depth = [0]

    def pre(module, args):
        depth[0] += 1
        if depth[0] == 1 and args and isinstance(args[0], torch.Tensor):
            p = next(module.parameters(), None)
            calls.append((type(module).__name__, args[0].is_cuda, p is not None and p.is_cuda))

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: depth.__setitem__(0, depth[0] - 1),
                                                                  always_call=True)]
    try:
        run = _placed_run(tmp_path, "cuda")
    finally:
        for h in hooks:
            h.remove()
    name = torch.cuda.get_device_name(0)
    _check_records(run, f"cuda:0 ({name})")
    assert any(x and p for _, x, p in calls)
    assert all(x == p for _, x, p in calls if p is not None)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_on_a_real_gpu_a_cut_training_resumes_on_the_other_device(tmp_path: Path, first: str, then: str) -> None:
    data, step = tiny_data(), (lambda m, x, y: {"loss": torch.nn.functional.cross_entropy(m(x), y)})
    cfg = OptimConfig(epochs=2, lr=0.05, autocast="off")

    class Stop(Exception):
        pass

    def progress(task: str, done: int, total: int, values: dict) -> None:
        if task.endswith("2/2"):
            raise Stop
    with pytest.raises(Stop):
        fit(tiny_cnn(num_classes=4), data, cfg, step, batch_size=32, checkpoint_dir=tmp_path, progress=progress,
            device=resolve(first))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in state["model"].values())
    model = tiny_cnn(num_classes=4)
    history = fit(model, data, cfg, step, batch_size=32, checkpoint_dir=tmp_path, device=resolve(then))
    assert [r.get("earlier_invocation", False) for r in history] == [True, False]
    assert history[0]["device"].startswith(first) and history[1]["device"].startswith(then)
    assert next(model.parameters()).device.type == then


# --- torchrun on GPUs ----------------------------------------------------------------------------------------------


def test_torch_sync_batchnorm_replaces_and_restores_the_very_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, training under torchrun swaps every BatchNorm for torch.nn.SyncBatchNorm holding the same tensors,
    and puts the originals back: checkpoints, export and pruning see the model as it was."""
    from edgepipe.training import distributed

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4)))
    before = dict(model.named_modules())
    keys = list(model.state_dict())
    monkeypatch.setattr(distributed, "_LAUNCH", types.SimpleNamespace(world_size=2))
    with distributed.collective(), fake_gpu(monkeypatch):  # collective() puts the flag back as it found it
        assert distributed.collective_active()
        with distributed.synced_batchnorm(model, resolve("cuda")) as note:
            inside = dict(model.named_modules())
            assert isinstance(inside["1"], torch.nn.SyncBatchNorm) and isinstance(inside["3.1"], torch.nn.SyncBatchNorm)
            assert inside["1"].weight is before["1"].weight and inside["3.1"].running_var is before["3.1"].running_var
            assert list(model.state_dict()) == keys
    assert "2 BatchNorm layer(s) trained as torch.nn.SyncBatchNorm (NCCL)" in note
    assert all(model.get_submodule(n) is m for n, m in before.items() if n)


@pytest.mark.gpu
@needs_cuda
def test_on_a_real_gpu_nccl_carries_ddp_and_edgepipes_cpu_collectives(tmp_path: Path) -> None:
    """A process group of one, as edgepipe forms it on a GPU machine ("cpu:gloo,cuda:nccl"): DDP's gradient
    all-reduce goes over NCCL on this GPU, the small CPU counts over gloo."""
    import torch.distributed as dist

    from edgepipe.training.distributed import backend_for, data_parallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend_for("cuda"), store=store, rank=0, world_size=1)
    try:
        device = resolve("cuda")
        model = device.module(tiny_cnn(num_classes=4))
        net = data_parallel(model, None, device)
        loss = net(device.batch(torch.randn(8, 1, 8, 8))).sum()
        loss.backward()
        t = torch.ones(3, device=device.torch)
        dist.all_reduce(t)
        counts = torch.tensor([1.0, 2.0], dtype=torch.float64)
        dist.all_reduce(counts)
        assert t.is_cuda and counts.tolist() == [1.0, 2.0]
        assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_on_two_real_gpus_torchrun_trains_with_nccl(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config().model_dump_json())
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "edgepipe", "run", "--config",
                           str(cfg), "--target", "jetson", "--run-dir", str(run), "--no-report", "--device", "cuda"],
                          capture_output=True, text=True, timeout=1200, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = {e["name"]: e for e in json.loads((run / "manifest.json").read_text())["stages"]}
    assert entries["distill"]["launch"]["backend"] == "cpu:gloo,cuda:nccl"
    history = json.loads((run / "distill" / "metrics.json").read_text())["records"]["history"]
    assert "torch.nn.SyncBatchNorm (NCCL)" in history[0]["batchnorm"] and history[0]["device"].startswith("cuda:0")
