"""A run folder, a bundle and a results file are data: nothing in them can run code or unpickle.

A ``factory`` or ``trust_pickle: true`` is honoured only when it comes from a config the user gives the command
(``--config FILE``, or a PipelineConfig passed to ``Run.create``); named by a run folder's ``config.yaml`` or a
stage's ``model.json`` it is refused with one line, before anything runs or is written. Every case here plants a
command that would create a marker file: the marker must never appear. Device results are schema-checked: finite,
non-negative figures, a known target, the one the run's deploy bundle was built for.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from edgepipe.engine.artifacts import Artifact
from edgepipe.backends.tensorrt_device import SCHEMA
from edgepipe.cli import main
from edgepipe.config import ModelSpec
from edgepipe.errors import EdgepipeError
from edgepipe.io import LOCK_FILE
from edgepipe.models.loading import build_from_spec, load_torch_artifact
from edgepipe.models.trust import from_run_folder, trust
from edgepipe.types import ArtifactKind, DType
from tests.reliability import TARGET, Finished, assert_refused, copy_run, tree, write_config
from tests.support import PickleMarker, program_with_pickled_weights

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _cache(finished: Finished, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))


def _touch(marker: Path) -> dict[str, Any]:
    return {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}


def _set_build(run: Path, stage: str, build: dict[str, Any]) -> None:
    """Rewrite ``stage``'s model.json build and make the manifest's recorded output hash match (as a prober would),
    so the engine's damage check does not catch it first."""
    path = run / stage / "model.json"
    desc = json.loads(path.read_text())
    desc["build"] = build
    path.write_text(json.dumps(desc))
    manifest = json.loads((run / "manifest.json").read_text())
    entry = next(e for e in manifest["stages"] if e["name"] == stage)
    entry["output_hash"] = Artifact.load(run / entry["artifact_dir"]).content_hash()
    (run / "manifest.json").write_text(json.dumps(manifest))


# --- (1) a factory in a stage's model.json ---------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["teacher", "prune"])
def test_a_factory_in_model_json_never_runs(stage: str, finished: Finished, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "MARKER"
    run = copy_run(finished, tmp_path / "run")
    _set_build(run, stage, _touch(marker))
    expect = f"{stage}/model.json names factory 'os:system'"
    line = assert_refused(["bench", "--run", str(run)], run, expect, capsys)
    assert "--config FILE" in line
    assert_refused(["run", "--run", str(run)], run, expect, capsys)
    assert_refused(["run", "--run", str(run), "--target", TARGET], run, expect, capsys)
    assert_refused(["export", "--run", str(run)], run, expect, capsys)
    assert_refused(["bench", "--run", str(run), "--config", str(finished.config_file)], run, expect, capsys)
    with pytest.raises(EdgepipeError, match="names factory 'os:system'"):  # the library's own loader refuses it too
        load_torch_artifact(Artifact.load(run / stage))
    assert not marker.exists()


def test_a_factory_in_model_json_never_runs_with_another_config(finished: Finished, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """With the user's --config (which names no such factory) the stage whose model.json names it would be reused:
    refused before anything is written (exit 2, one line, the run byte-identical)."""
    marker = tmp_path / "MARKER"
    run = copy_run(finished, tmp_path / "run")
    _set_build(run, "teacher", _touch(marker))
    assert_refused(["run", "--config", str(finished.config_file), "--target", TARGET, "--run", str(run), "--no-report"],
                   run, "teacher/model.json names factory 'os:system'", capsys)
    assert not marker.exists()


# --- (2) trust_pickle with a program that unpickles ------------------------------------------------------------
def test_trust_pickle_in_model_json_never_unpickles(finished: Finished, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "MARKER"
    run = copy_run(finished, tmp_path / "run")
    program_with_pickled_weights(run / "teacher" / "teacher.pt2", PickleMarker(str(marker)))
    _set_build(run, "teacher", {"program": "teacher.pt2", "trust_pickle": True})
    expect = "teacher/model.json sets trust_pickle: true"
    assert_refused(["bench", "--run", str(run)], run, expect, capsys)
    assert_refused(["run", "--run", str(run)], run, expect, capsys)
    with pytest.raises(EdgepipeError, match="sets trust_pickle: true"):
        load_torch_artifact(Artifact.load(run / "teacher"))
    # without trust_pickle the restricted loader reads it, and refuses the pickled object
    _set_build(run, "teacher", {"program": "teacher.pt2"})
    with pytest.raises(EdgepipeError, match="would unpickle arbitrary Python objects"):
        load_torch_artifact(Artifact.load(run / "teacher"))
    assert not marker.exists()


def test_trust_pickle_is_honoured_for_the_very_file_the_users_config_names(tmp_path: Path) -> None:
    """Trust is for the program's bytes: the run folder's copy of the user's file loads, a swapped file does not."""
    plain = program_with_pickled_weights(tmp_path / "user.pt2")
    copy = tmp_path / "run" / "teacher.pt2"
    copy.parent.mkdir()
    copy.write_bytes(plain.read_bytes())
    from_folder = from_run_folder(ModelSpec(program=str(copy), trust_pickle=True), tmp_path / "run" / "model.json")
    with pytest.raises(EdgepipeError, match="sets trust_pickle: true"):
        build_from_spec(from_folder)
    trust(ModelSpec(program=str(plain), trust_pickle=True))  # what a config given to this command does
    assert build_from_spec(from_folder)(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)
    other = program_with_pickled_weights(tmp_path / "other.pt2", torch.zeros(4, 3, 3, 3))
    swapped = from_run_folder(ModelSpec(program=str(other), trust_pickle=True), tmp_path / "run" / "model.json")
    with pytest.raises(EdgepipeError, match="sets trust_pickle: true"):
        build_from_spec(swapped)


# --- (3) a factory in the run folder's config.yaml --------------------------------------------------------------
def test_a_factory_in_the_run_config_never_runs(finished: Finished, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "MARKER"
    run = copy_run(finished, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["teacher"]["model"] = _touch(marker)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    expect = "config.yaml names factory 'os:system'"
    assert_refused(["run", "--run", str(run)], run, expect, capsys)
    assert_refused(["run", "--run", str(run), "--target", "intel-xeon-amx"], run, expect, capsys)
    assert_refused(["distill", "--run", str(run)], run, expect, capsys)
    assert not marker.exists()


def test_a_factory_runs_from_the_users_config_only(finished: Finished, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """A run whose teacher comes from a factory: the user's --config builds it; the same run without --config says
    to pass it, one line, nothing changed."""
    teacher = {"factory": "tests.support:tiny_cnn", "kwargs": {"width": 4, "num_classes": 3, "in_channels": 3}}
    cfg = write_config(tmp_path / "factory.yaml", finished.config, **{  # teacher -> export -> compile: seconds
        "teacher.model": teacher, "distill.enabled": False, "prune.enabled": False, "qat.enabled": False})
    run = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--target", TARGET, "--run", str(run), "--no-report"]) == 0
    expect = "config.yaml names factory 'tests.support:tiny_cnn'"
    line = assert_refused(["run", "--run", str(run)], run, expect, capsys)
    assert "rerun with --config FILE" in line
    assert_refused(["bench", "--run", str(run)], run, "teacher/model.json names factory 'tests.support:tiny_cnn'",
                   capsys)
    before = tree(run)
    assert main(["run", "--config", str(cfg), "--run", str(run), "--no-report"]) == 0  # every stage reused
    assert {k: v for k, v in tree(run).items() if k != "manifest.json"} == \
           {k: v for k, v in before.items() if k != "manifest.json"}
    assert main(["bench", "--run", str(run), "--config", str(cfg)]) == 0
    rows = json.loads((run / "bench" / "bench.json").read_text())["rows"]
    assert any(r["stage"] == "teacher" and r["status"] == "measured" for r in rows)


# --- (4) device results are schema-checked ----------------------------------------------------------------------
BUNDLE_TARGET = "jetson-orin-nano"


def _bundle_run(root: Path) -> Path:
    """A run folder whose compile stage wrote a TensorRT deploy bundle for BUNDLE_TARGET (what import-results reads)."""
    (root / "compile").mkdir(parents=True)
    (root / "compile" / "model.onnx").write_bytes(b"an onnx model")
    Artifact(kind=ArtifactKind.TENSORRT_BUNDLE, root=root / "compile", files={"onnx": "model.onnx"},
             dtype=DType.INT8, meta={"target": BUNDLE_TARGET}).save()
    (root / "manifest.json").write_text(json.dumps({"run": root.name, "target": BUNDLE_TARGET, "stages": []}))
    (root / LOCK_FILE).touch()
    return root


def _results(run: Path, **changes: Any) -> dict[str, Any]:
    """Valid results for ``run``'s bundle (as edgepipe_trt.py writes them), with dotted ``changes`` applied."""
    timing = {"batch": 1, "warmup": 2, "iterations": 5, "timer": "CUDA events around execute_async_v3",
              "p50_ms": 0.5, "p90_ms": 0.6, "p99_ms": 0.7, "mean_ms": 0.55, "end_to_end_p50_ms": 0.8,
              "images_per_s": 2000.0}
    onnx = run / "compile" / "model.onnx"
    data: dict[str, Any] = {
        "schema": SCHEMA, "created": "2026-01-01T00:00:00+00:00", "target": BUNDLE_TARGET, "tensorrt_version": "10.3.0",
        "gpu": "Orin", "engine": {"file": "model.engine",
                                  "onnx_sha256": hashlib.sha256(onnx.read_bytes()).hexdigest() if onnx.is_file() else ""},
        "latency": timing, "throughput": {**timing, "batch": 8, "images_per_s": 9000.0},
        "accuracy": {"top1": 0.9, "images": 32, "source": "val.npz", "batch": 8}}
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node[p] = dict(node[p])
            node = node[p]
        node[last] = value
    return data


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))  # NaN and inf as Python's json writes and reads them: NaN, Infinity
    return path


BAD_RESULTS = {
    "nan-latency": ({"latency.p50_ms": float("nan")}, "latency.p50_ms is NaN"),
    "infinite-latency": ({"latency.p99_ms": float("inf")}, "latency.p99_ms is Infinity"),
    "minus-infinite-throughput": ({"throughput.images_per_s": float("-inf")}, "throughput.images_per_s is -Infinity"),
    "negative-latency": ({"latency.p90_ms": -0.2}, "latency.p90_ms is -0.2"),
    "nan-end-to-end": ({"latency.end_to_end_p50_ms": float("nan")}, "latency.end_to_end_p50_ms is NaN"),
    "bool-latency": ({"latency.p50_ms": True}, "latency.p50_ms is true"),
    "bool-batch": ({"throughput.batch": True}, "throughput.batch is true"),
    "zero-batch": ({"latency.batch": 0}, "latency.batch is 0, expected a whole number >= 1"),
    "zero-iterations": ({"throughput.iterations": 0}, "throughput.iterations is 0"),
    "fractional-batch": ({"latency.batch": 1.5}, "latency.batch is 1.5"),
    "missing-p50": ({"latency.p50_ms": None}, "latency.p50_ms is missing"),
    "nan-top1": ({"accuracy.top1": float("nan")}, "accuracy.top1 must be a fraction in [0, 1]"),
    "top1-above-1": ({"accuracy.top1": 1.5}, "accuracy.top1 must be a fraction in [0, 1]"),
    "bool-top1": ({"accuracy.top1": True}, "accuracy.top1 must be a fraction in [0, 1]"),
    "unknown-target": ({"target": "jetson-nano-2gb"}, "target 'jetson-nano-2gb' is not a known hardware profile"),
    "path-target": ({"target": "../../escape"}, "is not a known hardware profile"),
    "wrong-target": ({"target": "jetson-agx-orin"}, f"was built for '{BUNDLE_TARGET}'"),
}


@pytest.mark.parametrize("name", sorted(BAD_RESULTS))
def test_bad_device_results_are_refused_and_nothing_is_written(name: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run = _bundle_run(tmp_path / "run")
    changes, expect = BAD_RESULTS[name]
    results = _write(tmp_path / "results.json", _results(run, **changes))
    assert_refused(["import-results", "--run", str(run), str(results)], run, expect, capsys)
    assert not (run / "device").exists() and not (tmp_path / "escape.json").exists()


def test_good_device_results_import(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The control for the refusals above: the same file, unchanged, is imported."""
    run = _bundle_run(tmp_path / "run")
    results = _write(tmp_path / "results.json", _results(run))
    assert main(["import-results", "--run", str(run), str(results)]) == 0
    stored = json.loads((run / "device" / f"{BUNDLE_TARGET}.json").read_text())
    assert stored["latency"]["p50_ms"] == 0.5


def test_results_into_a_run_without_a_bundle_say_so(finished: Finished, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    results = _write(tmp_path / "results.json", _results(finished.run))
    line = assert_refused(["import-results", "--run", str(finished.run), str(results)], finished.run,
                          f"{finished.run} has no TensorRT deploy bundle: its compile stage built", capsys)
    assert f"for target {TARGET}" in line and "import" in line and "None" not in line
    assert not (finished.run / "device").exists()
