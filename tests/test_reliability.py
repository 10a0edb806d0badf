"""Bad input never damages a finished run, damage is detected and redone, a full disk is one line.

The matrix runs every bad command against one finished run (a small ImageFolder, so damaged images can
be tried too) and asserts, for each: exit code 2, stderr is one ``edgepipe: error:`` line, and every
file of the run folder is byte-identical afterwards.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from edgepipe.cli import main
from edgepipe.io import LOCK_FILE
from edgepipe.engine.stage import STAGE_ORDER
from tests.reliability import (TARGET, Case, Finished, assert_refused, copy_run, damaged_run, profile_file, run_target,
                               run_with, run_with_data, run_with_file, tree, write_config)

pytestmark = pytest.mark.e2e


def _class_missing_in_test(d: Path) -> None:
    shutil.rmtree(d / "test" / "owl")


def _empty_class(d: Path) -> None:
    (d / "train" / "emu").mkdir()
    (d / "test" / "emu").mkdir()


def _no_classes(d: Path) -> None:
    shutil.rmtree(d / "train")
    (d / "train").mkdir()


def _garbage_image(d: Path) -> None:
    (d / "train" / "dog" / "07.png").write_bytes(os.urandom(300))


def _truncated_image(d: Path) -> None:
    p = d / "test" / "cat" / "03.png"
    p.write_bytes(p.read_bytes()[:60])


def _unreadable_class(d: Path) -> None:
    for p in (d / "test" / "owl").iterdir():
        p.write_bytes(b"")


def _other_size(d: Path) -> None:
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(d / "train" / "owl" / "99.png")


def _write(rel: str, content: bytes) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        (run / rel).write_bytes(content)
    return mutate


def _delete(rel: str) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        (run / rel).unlink()
    return mutate


def _truncate(rel: str) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        p = run / rel
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return mutate


def _garbage_onnx(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
    bad = tmp / "model.onnx"
    bad.write_bytes(os.urandom(500))
    return ["compile", "--onnx", str(bad), "--target", TARGET, "--out", str(tmp / "out")], f.run, "not an ONNX model"


def _missing_onnx(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
    return (["compile", "--onnx", str(tmp / "none.onnx"), "--target", TARGET, "--out", str(tmp / "out")], f.run,
            "ONNX file not found")


def _run_is_a_file(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
    (tmp / "afile").write_text("x")
    return ["run", "--config", str(f.config_file), "--target", TARGET, "--run", str(tmp / "afile")], f.run, "is a file"


def _results_garbage(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
    (tmp / "results.json").write_text("{not json")
    return ["import-results", "--run", str(f.run), str(tmp / "results.json")], f.run, "not valid JSON"


def _single_stage_bad_config(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
    cfg = write_config(tmp / "bad.yaml", f.config, **{"qat.optim.lr": -1})
    return ["qat", "--config", str(cfg), "--target", TARGET, "--run", str(f.run)], f.run, "qat.optim.lr"


def _garbage(n: int = 400) -> bytes:
    return os.urandom(n)


CASES: dict[str, Case] = {
    # config values (validated before anything is written)
    "unknown-key": run_with({"distill.foo": 1}, "distill.foo: unknown key"),
    "wrong-type": run_with({"distill.optim.epochs": "many"}, "distill.optim.epochs"),
    "alpha-out-of-range": run_with({"distill.alpha": 3}, "distill.alpha"),
    "lr-inf": run_with({"distill.optim.lr": math.inf}, "distill.optim.lr"),
    "lr-nan": run_with({"prune.optim.lr": math.nan}, "prune.optim.lr"),
    "std-zero": run_with({"data.std": [0.0, 0.0, 0.0]}, "data: std: every value must be > 0"),
    "std-mean-lengths-differ": run_with({"data.std": [0.2, 0.2]}, "data"),
    "std-wrong-for-images": run_with({"data.std": [0.2], "data.mean": [0.4]}, "data.mean"),
    "seed-negative": run_with({"seed": -1}, "seed"),
    "seed-too-large": run_with({"seed": 2**32}, "seed"),
    "batch-size-zero": run_with({"data.batch_size": 0}, "data.batch_size"),
    "unknown-arch": run_with({"distill.student.arch": "resnet9000"}, "unknown architecture"),
    "bad-arch-kwargs": run_with({"distill.student.kwargs.depth": 9}, "depth must be 6n+2"),
    "student-wrong-channels": run_with({"distill.student.kwargs.in_channels": 1}, "distill.student: does not accept"),
    "teacher-wrong-classes": run_with({"teacher.model.kwargs.num_classes": 7}, "teacher.model: outputs shape"),
    "factory-os-system-no-kwargs": run_with({"teacher.model": {"factory": "os:system"}}, "factory 'os:system'"),
    "factory-not-importable": run_with({"distill.student": {"factory": "no_such_module:build"}}, "cannot import"),
    "factory-returns-no-module": run_with({"teacher.model": {"factory": "builtins:dict"}}, "not an nn.Module"),
    "program-missing": run_with({"teacher.model": {"program": "/nonexistent/t.pt2"}, "teacher.train.epochs": 0},
                                 "program not found"),
    "program-with-training": run_with({"teacher.model": {"program": "/nonexistent/t.pt2"}}, "inference-only"),
    "program-garbage": run_with_file("t.pt2", _garbage(), "teacher.model", lambda p: {"program": str(p)},
                                      "not a torch.export program", **{"teacher.train.epochs": 0}),
    "weights-garbage": run_with_file("w.pt", _garbage(), "teacher.model.weights", str, "not a loadable state dict"),
    # config files
    "config-bad-yaml": lambda f, t: (["run", "--config", str(_bytes(t / "c.yaml", b"distill: [oops\n")), "--target",
                                      TARGET, "--run", str(f.run)], f.run, "not valid YAML"),
    "config-not-a-mapping": lambda f, t: (["run", "--config", str(_bytes(t / "c.yaml", b"- a\n- b\n")), "--target",
                                           TARGET, "--run", str(f.run)], f.run, "expected a mapping"),
    "config-missing": lambda f, t: (["run", "--config", str(t / "none.yaml"), "--target", TARGET, "--run",
                                     str(f.run)], f.run, "config file not found"),
    # data (decoded before the run folder changes)
    "data-folder-missing": run_with({"data.path": "/nonexistent/images"}, "image folder not found"),
    "data-empty-class": run_with_data(_empty_class, "every class needs a sub-folder"),
    "data-no-classes": run_with_data(_no_classes, "every class needs a sub-folder"),
    "data-damaged-image": run_with_data(_garbage_image, "07.png: cannot decode this image", **{"data.strict": True}),
    "data-truncated-image": run_with_data(_truncated_image, "03.png: cannot decode this image",
                                           **{"data.strict": True}),
    "data-class-all-unreadable": run_with_data(_unreadable_class, "none of its 6 image file(s) could be read"),
    "data-classes-differ": run_with_data(_class_missing_in_test, "class folders"),
    "data-mixed-sizes": run_with_data(_other_size, "data.image_size"),
    # targets and profiles
    "unknown-target": run_target(lambda f, t: "no-such-board", "unknown target"),
    "profile-file-missing": run_target(lambda f, t: str(t / "none.yaml"), "profile file not found"),
    "profile-bad-yaml": run_target(lambda f, t: str(_bytes(t / "p.yaml", b"backend: [x\n")), "not valid YAML"),
    "profile-unknown-key": run_target(lambda f, t: str(profile_file(f, t / "p.yaml", TARGET, turbo=True)), "unknown key"),
    "profile-onnxruntime-fp16": run_target(
        lambda f, t: str(profile_file(f, t / "p.yaml", TARGET, dtypes=["fp16", "fp32"], peak_tops={"fp16": 1, "fp32": 1})),
        "backend onnxruntime cannot compile"),
    "profile-tensorrt-bf16": run_target(
        lambda f, t: str(profile_file(f, t / "p.yaml", "jetson", dtypes=["int8", "bf16", "fp32"],
                                  peak_tops={"int8": 1, "bf16": 1, "fp32": 1})),
        "backend tensorrt cannot compile", stage="export"),
    # the run folder itself
    "run-is-a-file": _run_is_a_file,
    "manifest-random-bytes": damaged_run(_write("manifest.json", b"\xff\xfe" + _garbage()), "damaged manifest"),
    "manifest-empty-object": damaged_run(_write("manifest.json", b"{}"), "damaged manifest"),
    "manifest-list": damaged_run(_write("manifest.json", b"[]"), "damaged manifest"),
    "run-config-bad-yaml": damaged_run(_write("config.yaml", b"distill: [oops\n"), "run's own copy of its config"),
    "run-config-invalid": damaged_run(_write("config.yaml", b"distill: 3\n"), "run's own copy of its config"),
    "run-profile-damaged": damaged_run(_write("profile.yaml", b"backend: [x\n"), "run's own copy of its profile"),
    "input-model-damaged": damaged_run(_truncate("prune/model.pt"), "changed or was damaged", ["qat"]),
    "input-descriptor-missing": damaged_run(_delete("prune/artifact.json"), "no artifact here", ["qat"]),
    "input-descriptor-empty": damaged_run(_write("prune/artifact.json", b"{}"), "damaged descriptor", ["qat"]),
    "single-stage-bad-config": _single_stage_bad_config,
    # standalone commands
    "compile-garbage-onnx": _garbage_onnx,
    "compile-missing-onnx": _missing_onnx,
    "import-results-garbage": _results_garbage,
}


def _bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_the_matrix_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_the_run_stays_byte_identical(name: str, finished: Finished, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    assert_refused(*CASES[name](finished, tmp_path), capsys)


def test_the_lock_holder_is_refused_and_nothing_changes(finished: Finished, capsys: pytest.CaptureFixture) -> None:
    before = tree(finished.run)
    fd = os.open(finished.run / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        capsys.readouterr()
        assert main(["run", "--run", str(finished.run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"(PID {os.getpid()})" in err
    finally:
        os.close(fd)
    assert tree(finished.run) == before


def _outputs(run: Path) -> dict[str, str]:
    manifest = json.loads((run / "manifest.json").read_text())
    return {e["name"]: e["output_hash"] for e in manifest["stages"]}


def test_damaged_artifacts_and_metrics_are_detected_and_redone(finished: Finished, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A truncated model.pt, a metrics.json edited by hand and an emptied artifact.json: `edgepipe run` names each,
    redoes exactly those stages (the others are reused) and arrives at the same outputs as the untouched run."""
    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    run = copy_run(finished, tmp_path / "run")
    _truncate("distill/model.pt")(run)
    metrics = json.loads((run / "qat" / "metrics.json").read_text())
    metrics["accuracy"]["top1"] = 1.0  # a flattering edit is damage too
    (run / "qat" / "metrics.json").write_text(json.dumps(metrics))
    _write("export/artifact.json", b"{}")(run)
    with caplog.at_level("INFO", logger="edgepipe"):
        assert main(["run", "--run", str(run), "--no-report"]) == 0
    text = caplog.text
    assert "distill: " in text and "redoing the stage" in text
    for stage in ("distill", "qat", "export"):
        assert any(r.getMessage().startswith(f"{stage}: ") and "redoing the stage" in r.getMessage()
                   for r in caplog.records), stage
    for stage in ("teacher", "prune", "compile"):  # unchanged inputs and intact outputs: reused, not redone
        assert any(r.getMessage().startswith(f"{stage}: unchanged") for r in caplog.records), stage
    assert _outputs(run) == _outputs(finished.run)
    redone = json.loads((run / "qat" / "metrics.json").read_text())["accuracy"]["top1"]
    assert redone == json.loads((finished.run / "qat" / "metrics.json").read_text())["accuracy"]["top1"]


def test_a_full_disk_is_one_line_recorded_as_failed_and_resumes(finished: Finished, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """ENOSPC while the qat stage writes its model: one line, the manifest says failed (not running), no partial
    model.pt is left, and the same command finishes once there is space again, with the same output."""
    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    run = copy_run(finished, tmp_path / "run")
    real_save = torch.save

    def full_disk(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        if str(f).endswith(".tmp") and "/qat/" in str(f):
            Path(f).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        real_save(obj, f, *a, **k)

    old_model = (run / "qat" / "model.pt").read_bytes()
    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert main(["qat", "--run", str(run), "--force"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("edgepipe: error: ") and "No space left on device" in err[0], err
    assert "free some space" in err[0]
    entry = next(e for e in json.loads((run / "manifest.json").read_text())["stages"] if e["name"] == "qat")
    assert entry["status"] == "failed" and "No space left on device" in entry["error"]
    assert (run / "qat" / "model.pt").read_bytes() == old_model  # the earlier model was not half-overwritten
    assert not list((run / "qat").rglob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["run", "--run", str(run), "--no-report"]) == 0
    assert _outputs(run) == _outputs(finished.run)


def test_a_damaged_checkpoint_restarts_the_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edgepipe.config import OptimConfig
    from edgepipe.training.loop import fit
    from edgepipe.tasks.classification import cross_entropy_step
    from tests.support import tiny_cnn, tiny_data

    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level("WARNING"):
        history = fit(tiny_cnn(num_classes=4), tiny_data(), OptimConfig(epochs=1, lr=0.05), cross_entropy_step,
                      batch_size=32, checkpoint_dir=tmp_path)
    assert "is damaged" in caplog.text and len(history) == 1 and "earlier_invocation" not in history[0]


def test_every_pipeline_stage_is_in_the_finished_run(finished: Finished) -> None:
    assert set(_outputs(finished.run)) == set(STAGE_ORDER)


def _status(run: Path, stage: str) -> str | None:
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):  # not written yet (the manifest is replaced atomically, never half-written)
        return None
    return next((e.get("status") for e in manifest["stages"] if e["name"] == stage), None)


def test_sigkill_in_every_stage_resumes_to_the_same_artifacts(finished: Finished, tmp_path: Path) -> None:
    """`edgepipe run` killed with SIGKILL at a random moment inside each of the six stages (training, measuring,
    recording), then run once more to the end: every stage's output hash equals the uninterrupted run's."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(20261124)
    run = tmp_path / "run"
    env = {**os.environ, "EDGEPIPE_CACHE": str(finished.tmp / "cache")}
    cmd = [sys.executable, "-c", "import sys; from edgepipe.cli import main; sys.exit(main())", "run", "--config",
           str(finished.config_file), "--target", TARGET, "--run", str(run), "--no-report"]
    kills = []
    for stage in STAGE_ORDER:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and _status(run, stage) != "running":
            time.sleep(0.01)
        if proc.poll() is None and _status(run, stage) == "running":
            delay = rng.uniform(0.0, 0.3)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills.append((stage, round(delay, 2)))
        proc.wait(timeout=300)
        if proc.returncode == 0:  # finished before a kill landed: nothing left to interrupt
            break
    assert len(kills) >= 5, kills
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
    assert _outputs(run) == _outputs(finished.run), kills


def test_a_read_only_run_folder_is_one_line_and_untouched(finished: Finished, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Every write refused with EACCES (what a read-only folder gives a normal user; root ignores chmod, so the
    refusal is simulated in the one writer every run file goes through)."""
    import edgepipe.io

    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    run = copy_run(finished, tmp_path / "run")
    before = tree(run)

    def refuse(*args: Any, dir: Any = None, **kwargs: Any) -> Any:  # noqa: A002 - mkstemp's own keyword
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))

    monkeypatch.setattr(edgepipe.io.tempfile, "mkstemp", refuse)  # the first step of every run-file write
    capsys.readouterr()
    assert main(["run", "--run", str(run)]) == 2  # every stage is cached; the report is the first write
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Permission denied; the folder is not writable" in err[0], err
    assert tree(run) == before
