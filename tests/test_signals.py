"""Ctrl-C and SIGTERM at random moments of every stage: one line, exit 130/143, no traceback, no crash, the stage
recorded ``interrupted``, and the same command then finishes with the uninterrupted run's output hashes.

Each command runs in its own session (``start_new_session``) so that a Ctrl-C can be imitated as a terminal sends
it: SIGINT to the whole process group (DataLoader workers and any other children included)."""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgepipe.engine.stage import STAGE_ORDER
from tests.reliability import TARGET, Finished

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 600  # generous: other test runs may share the machine's cores
OPENVINO_TARGET = "intel-xeon-amx"  # OpenVINO's CPU plugin compiles it on any x86 host (`edgepipe profiles`)


def _manifest(run: Path) -> dict | None:
    try:
        return json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):  # not written yet (replaced atomically, never half-written)
        return None


def _statuses(run: Path) -> dict[str, str]:
    m = _manifest(run)
    return {e["name"]: e.get("status") for e in m["stages"]} if m else {}


def _outputs(run: Path) -> dict[str, str]:
    return {e["name"]: e.get("output_hash") for e in _manifest(run)["stages"]}


def _start(argv: list[str], env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    proc = subprocess.Popen([sys.executable, "-m", "edgepipe", *argv], env=env, cwd=ROOT, start_new_session=True,
                            stdout=out.open("w"), stderr=err.open("w"))
    return proc, out, err


def _send(proc: subprocess.Popen, signum: int, group: bool) -> bool:
    """SIGINT as a terminal's Ctrl-C sends it (the process group), SIGTERM as `kill PID`; False if it had exited."""
    if proc.poll() is not None:
        return False
    try:
        os.killpg(proc.pid, signum) if group else os.kill(proc.pid, signum)
    except ProcessLookupError:
        return False
    return True


MODES = {  # name: (first signal, to the process group, second signal or None)
    "ctrl-c": (signal.SIGINT, True, None),
    "sigterm": (signal.SIGTERM, False, None),
    "ctrl-c twice": (signal.SIGINT, True, signal.SIGINT),
    "sigterm then ctrl-c": (signal.SIGTERM, False, signal.SIGINT),
}


def _interrupt(argv: list[str], run: Path, stage: str, mode: str, delay: float, rng: random.Random,
               env: dict[str, str], tmp: Path) -> str | None:
    """Start ``edgepipe argv``, wait for ``stage`` to be recorded running, signal after ``delay`` s as ``mode`` says
    and check the contract. Returns the stage the signal interrupted (None: it landed between stages, or the command
    had finished)."""
    proc, out, err = _start(argv, env, tmp)
    try:
        deadline = time.monotonic() + POLL_S
        while proc.poll() is None and time.monotonic() < deadline and _statuses(run).get(stage) != "running":
            time.sleep(0.01)
        assert proc.poll() is not None or _statuses(run).get(stage) == "running", f"{stage} never started"
        time.sleep(delay)
        first, group, second = MODES[mode]
        sent = _send(proc, first, group)
        if sent and second is not None:
            time.sleep(rng.uniform(0.0, 0.3))
            _send(proc, second, True)
        code = proc.wait(timeout=POLL_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout, stderr = out.read_text(), err.read_text()
    what = f"{mode} {delay:.3f} s into {stage}"
    assert code >= 0 and code != 139, f"{what}: crashed (exit {code}): {stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr, f"{what}: {stdout[-1500:]}{stderr[-3000:]}"
    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".ov-save-")]
    assert not leftovers, f"{what}: half-written files left: {leftovers}"  # every write is atomic, cut or not
    if not sent:  # finished before the signal was sent
        assert code == 0, f"{what}: exit {code}: {stderr[-2000:]}"
        return None
    lines = [line for line in stderr.splitlines() if line.strip()]
    statuses = _statuses(run)
    if code == 0:  # it finished before the signal landed: the work is complete, nothing to resume
        assert all(s == "done" for s in statuses.values()), statuses
        return None
    assert code == 128 + first, f"{what}: exit {code}, expected {128 + first}: {stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("edgepipe: "), f"{what}: {stderr[-3000:]}"
    assert f"`edgepipe {shlex.join(argv)}`" in lines[0], lines[0]
    stopped = [name for name, s in statuses.items() if s == "interrupted"]
    assert len(stopped) <= 1 and "running" not in statuses.values() and "failed" not in statuses.values(), \
        f"{what}: {statuses}"
    if stopped:
        assert f"during the {stopped[0]} stage of {run}" in lines[0], lines[0]
        entry = next(e for e in _manifest(run)["stages"] if e["name"] == stopped[0])
        assert entry["error"] == f"interrupted by {signal.Signals(first).name}", entry
        return stopped[0]
    return None


def test_ctrl_c_and_sigterm_in_every_stage_give_one_line_and_resume_to_the_same_artifacts(
        finished: Finished, tmp_path: Path) -> None:
    """`edgepipe run` interrupted at seeded random moments inside each of the six stages (training, measuring,
    recording; Ctrl-C to the process group, SIGTERM, and a second signal), then run once more to the end: every
    stage's output hash equals the uninterrupted run's."""
    rng = random.Random(20261205)
    run = tmp_path / "run"
    env = {**os.environ, "EDGEPIPE_CACHE": str(finished.tmp / "cache")}
    argv = ["run", "--config", str(finished.config_file), "--target", TARGET, "--run", str(run), "--no-report"]
    modes = list(MODES)
    done: list[tuple[str, str, float]] = []
    for stage in STAGE_ORDER:
        landed = 0
        for attempt in range(5):  # two interruptions per stage, while it lasts (a stage takes under a second here)
            if _statuses(run).get(stage) == "done" or landed == 2:  # on to the next stage
                break
            mode = modes[len(done) % len(modes)] if attempt == 0 else rng.choice(modes)
            delay = rng.uniform(0.0, 0.05 if attempt == 0 else 0.3)
            stopped = _interrupt(argv, run, stage, mode, delay, rng, env, tmp_path)
            if stopped:
                done.append((stopped, mode, round(delay, 3)))
                landed += stopped == stage
    assert len(done) >= 10, done
    assert "compile" in {s for s, _, _ in done}, done
    again = subprocess.run([sys.executable, "-m", "edgepipe", *argv], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=POLL_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(_statuses(run).values()) == {"done"}
    assert _outputs(run) == _outputs(finished.run), done


def test_interrupting_an_openvino_compile_gives_one_line_and_resumes(finished: Finished, tmp_path: Path) -> None:
    """`edgepipe compile` on an OpenVINO target (where Ctrl-C used to segfault, and OpenVINO's telemetry processes
    printed tracebacks), interrupted while it converts, compiles and measures: one line each time, and the same
    command then compiles what the uninterrupted `edgepipe run` compiled (the same IR bytes: OpenVINO's own op
    names are made independent of the process, edgepipe.backends.openvino.stable_names)."""
    rng = random.Random(4471)
    env = {**os.environ, "EDGEPIPE_CACHE": str(finished.tmp / "cache")}
    base = tmp_path / "base"
    made = subprocess.run([sys.executable, "-m", "edgepipe", "run", "--config", str(finished.config_file), "--target",
                           OPENVINO_TARGET, "--run", str(base), "--no-report"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=POLL_S)
    assert made.returncode == 0, made.stderr[-3000:]
    assert not made.stderr.strip(), made.stderr[-3000:]  # no telemetry, no network errors: nothing on stderr
    run = tmp_path / "run"  # the uninterrupted run is the reference: its compile output is what must come back
    shutil.copytree(base, run, symlinks=True)
    argv = ["compile", "--run", str(run), "--force"]
    done = []
    for mode in ("ctrl-c twice", "sigterm"):
        delay = rng.uniform(0.0, 1.0)
        stopped = _interrupt(argv, run, "compile", mode, delay, rng, env, tmp_path)
        if stopped:
            done.append((mode, round(delay, 3)))
    assert done, "no signal landed inside the compile stage"
    again = subprocess.run([sys.executable, "-m", "edgepipe", *argv], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=POLL_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _outputs(run) == _outputs(base), done


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3])
def test_ctrl_c_while_the_console_script_starts_is_one_line(delay: float, tmp_path: Path) -> None:
    """The `edgepipe` console script takes over the signals before it imports the CLI (edgepipe.__main__.entry):
    a Ctrl-C while Python still imports gives the one line too, never a KeyboardInterrupt traceback."""
    script = Path(sys.executable).with_name("edgepipe")
    if not script.is_file():
        pytest.skip(f"no console script next to {sys.executable} (edgepipe not installed into this environment)")
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    proc = subprocess.Popen([str(script), "profiles"], cwd=ROOT, start_new_session=True, stdout=out.open("w"),
                            stderr=err.open("w"))
    time.sleep(delay)
    sent = _send(proc, signal.SIGINT, True)
    code = proc.wait(timeout=POLL_S)
    text = err.read_text()
    assert "Traceback" not in text and code >= 0, text
    if sent and code != 0:  # 0: it listed the profiles before the signal came
        lines = [line for line in text.splitlines() if line.strip()]
        assert code == 130 and len(lines) == 1 and lines[0].startswith("edgepipe: interrupted by Ctrl-C"), text
