"""The pipeline under torchrun (issue 13), launched as a user launches it: ``torchrun --nproc-per-node=2 -m
edgepipe run ...`` on this machine (gloo, CPU, one thread per rank on 2 cores).

1. The digits recipe with 2 processes finishes, writes one run folder with one set of files, records the world
   size and backend, and every stage's top-1 is within 1.0 point of the single-process run (``default_run``).
2. A rank killed mid-distill stops the launch, non-zero, with one line from edgepipe; one process then finishes
   the run from the distill checkpoint the two processes wrote.
3. With --max-restarts, torchrun restarts the ranks after that kill and they resume from the checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from edgepipe.engine.stage import STAGE_ORDER
from tests.support import tiny_config

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _torchrun(ranks: int, args: list[str]) -> list[str]:
    return [str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}", "-m", "edgepipe", *args]


def _top1(run: Path) -> dict[str, float]:
    return {s: json.loads((run / s / "metrics.json").read_text())["accuracy"]["top1"] for s in STAGE_ORDER}


def test_two_processes_run_the_digits_recipe_like_one(default_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "digits-jetson-2"
    # --device cpu: two processes on the CPU even where a GPU is present (the default run trained on the CPU too)
    done = subprocess.run(_torchrun(2, ["run", "--config", "digits", "--target", "jetson", "--run-dir", str(run),
                                        "--no-report", "--device", "cpu"]), capture_output=True, text=True, timeout=1200,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["stages"]}
    assert all(entries[s]["status"] == "done" for s in STAGE_ORDER)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    for s in ("teacher", "distill", "prune", "qat", "export", "compile"):
        # host property: the process group adds NCCL (for CUDA tensors) where PyTorch sees a GPU, gloo alone otherwise
        assert entries[s]["launch"]["world_size"] == 2 and entries[s]["launch"]["backend"] == backend
        assert entries[s].get("torch_device", {"device": "cpu"})["device"] == "cpu"  # compile runs no PyTorch
    history = json.loads((run / "distill" / "metrics.json").read_text())["records"]["history"]
    assert {r["processes"] for r in history} == {2} and "synchronised across 2 ranks" in history[0]["batchnorm"]
    # One set of files: no checkpoints, temporary files or rank markers left, nothing a second rank wrote.
    left = [p.name for p in run.rglob("*") if p.name.endswith(".tmp") or p.name in ("checkpoints", ".edgepipe-ranks")]
    assert left == []
    one, two = _top1(default_run), _top1(run)
    for stage in STAGE_ORDER:
        assert abs(two[stage] - one[stage]) <= 0.010 + 1e-9, (stage, one[stage], two[stage])


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    for child in _children(launcher):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return child
    return None


def _kill_rank_1_mid_distill(launch: subprocess.Popen, run: Path) -> tuple[int, float]:
    """Kill rank 1 once distill has checkpointed its first epoch; the launch's exit code and seconds to exit."""
    try:
        checkpoint = run / "distill" / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 600
        while not checkpoint.exists() and launch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert checkpoint.exists(), "distill never wrote its first checkpoint"
        victim = _rank_pid(launch.pid, 1)
        assert victim is not None, "rank 1's process not found"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        code = launch.wait(timeout=300)
        return code, time.monotonic() - killed
    finally:
        if launch.poll() is None:
            launch.kill()


def _short_run_config(tmp_path: Path) -> Path:
    """tests.support.tiny_config (digits, 512 images, small models) with 30 short distill epochs: room to kill a
    rank mid-distill, and seconds to finish."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(distill__optim={"epochs": 30, "lr": 0.1}).model_dump(mode="json")))
    return config


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks' processes in /proc (Linux)")
def test_a_killed_rank_stops_the_launch_and_one_process_resumes(tmp_path: Path) -> None:
    config, run = _short_run_config(tmp_path), tmp_path / "run"
    log = (tmp_path / "launch.log").open("w+")
    launch = subprocess.Popen(_torchrun(2, ["run", "--config", str(config), "--target", "intel-xeon-amx",
                                            "--run-dir", str(run), "--no-report"]),
                              stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    code, stopped_after = _kill_rank_1_mid_distill(launch, run)
    log.seek(0)
    output = log.read()
    assert code != 0
    assert stopped_after < 120
    ours = [line for line in output.splitlines() if line.startswith("edgepipe: ")]
    assert len(ours) == 1, output[-3000:]
    assert "distill" in ours[0] and "resume from the last checkpoint" in ours[0]
    # torchrun prints its own summary (and its own traceback, ChildFailedError); edgepipe's ranks print none.
    assert not [line for line in output.splitlines() if "/edgepipe/" in line and line.strip().startswith("File ")]
    manifest = json.loads((run / "manifest.json").read_text())
    assert {e["name"]: e["status"] for e in manifest["stages"]}["distill"] in ("failed", "running")
    assert not [p for p in run.rglob("*.tmp")]
    # One process (no torchrun) finishes the run from the checkpoint the two processes wrote.
    again = subprocess.run([sys.executable, "-m", "edgepipe", "run", "--run", str(run), "--no-report"],
                           capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    history = json.loads((run / "distill" / "metrics.json").read_text())["records"]["history"]
    earlier = [r for r in history if r.get("earlier_invocation")]
    assert earlier and {r["processes"] for r in earlier} == {2}
    assert len(history) == 30 and {r["processes"] for r in history[len(earlier):]} == {1}
    assert all(e["status"] == "done" for e in json.loads((run / "manifest.json").read_text())["stages"])


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks' processes in /proc (Linux)")
def test_torchrun_restarts_resume_from_the_checkpoint(tmp_path: Path) -> None:
    config, run = _short_run_config(tmp_path), tmp_path / "run"
    launch = subprocess.Popen([*_torchrun(2, [])[:3], "--max-restarts=1", *_torchrun(2, [])[3:], "run", "--config",
                               str(config), "--target", "intel-xeon-amx", "--run-dir", str(run), "--no-report"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    code, _ = _kill_rank_1_mid_distill(launch, run)
    assert code == 0  # the restarted ranks finished the run
    history = json.loads((run / "distill" / "metrics.json").read_text())["records"]["history"]
    earlier = [r for r in history if r.get("earlier_invocation")]
    assert earlier and len(history) == 30 and {r["processes"] for r in history} == {2}
    assert all(e["status"] == "done" for e in json.loads((run / "manifest.json").read_text())["stages"])
