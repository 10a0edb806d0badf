"""The task seam (edgepipe.tasks): a second task, defined in one file (tests/two_head_task.py), runs teacher ->
distill -> export -> compile (ONNX Runtime) -> report through the engine with no other product file knowing it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgepipe.config import PipelineConfig
from edgepipe.engine.pipeline import run_pipeline, stage_key
from edgepipe.engine.run import Run
from edgepipe.errors import EdgepipeError
from edgepipe.reporting.report import write_report
from edgepipe.tasks import get_task, known_tasks, task_of
from tests.support import tiny_config

ORDER = ("teacher", "distill", "export", "compile")


def _two_head_config() -> PipelineConfig:
    import tests.two_head_task  # noqa: F401 - registers the task and its architecture

    model = {"arch": "two_head_cnn", "kwargs": {"width": 16, "in_channels": 1}}
    return tiny_config(task="digits-two-head", teacher={"model": model, "train": {"epochs": 4, "lr": 0.05}},
                       distill={"student": {"arch": "two_head_cnn", "kwargs": {"width": 8, "in_channels": 1}},
                                "optim": {"epochs": 3, "lr": 0.05}},
                       soft_targets={"runtime": "torch"})


def test_the_default_task_follows_the_data_and_keeps_old_keys(tmp_path: Path) -> None:
    config = tiny_config()
    assert config.task is None and task_of(config).name == "classification" and "classification" in known_tasks()
    run = Run.create(tmp_path / "run", config, "generic-cpu")
    assert run.config.task == "classification" and run.manifest["task"] == "classification"
    # the implicit task is not part of a stage key: a run made before tasks existed keeps its keys
    explicit = Run.create(tmp_path / "other", tiny_config(task="classification"), "generic-cpu")
    assert stage_key(run, "teacher", None, None) == stage_key(explicit, "teacher", None, None)


def test_an_unknown_task_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EdgepipeError, match=r"task: unknown task 'segmentation' \(known: .*classification"):
        Run.create(tmp_path / "run", tiny_config(task="segmentation"), "generic-cpu", write=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(EdgepipeError, match="unknown task"):
        get_task("segmentation")


def test_a_second_task_in_one_file_runs_through_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    config = _two_head_config()
    run = Run.create(tmp_path / "run", config, "generic-cpu", order=ORDER)
    metrics = run_pipeline(run)
    assert list(metrics) == list(ORDER)
    for name in ORDER:
        m = metrics[name]
        assert m["task"] == "digits-two-head" and m["metric"]["name"] == "value_mae"
        assert m["metric"]["higher_is_better"] is False
        assert 0 <= m["accuracy"]["value_mae"] < 10 and 0 <= m["accuracy"]["top1"] <= 1
        # every stage is timed on the target's runtime (ONNX Runtime), on the task's named timing inputs
        assert m["latency"]["backend"] == "onnxruntime" and m["latency"]["inputs"] == {"input": "float32[1,1,8,8]"}
        assert m["throughput"]["inputs"] == {"input": "float32[8,1,8,8]"}
    assert metrics["teacher"]["pytorch_latency"]["backend"] == "pytorch"
    # training recorded the task's own validation metric, and the student learned the value head
    history = metrics["distill"]["records"]["history"]
    assert all("val_value_mae" in h and "val_top1" not in h for h in history)
    assert metrics["distill"]["accuracy"]["value_mae"] < 2.5  # a constant guess of 4.5 scores ~2.5
    # the gain check reads the metric's direction: a lower MAE is a gain
    gain = metrics["distill"]["gain"]
    before, after = metrics["teacher"]["accuracy"]["value_mae"], metrics["distill"]["accuracy"]["value_mae"]
    assert gain["metric"] == "value_mae" and gain["delta_points"] == pytest.approx(before - after)
    assert "pts value MAE" in gain["verdict"]
    # the ONNX graph carries the task's names
    graph = onnx.load(str(run.artifact_of("export").path("onnx"))).graph
    assert [o.name for o in graph.output] == ["logits", "value"] and [i.name for i in graph.input] == ["input"]
    assert metrics["export"]["records"]["checks"]["tolerance"] > 0  # the generic every-output check ran
    # the compile stage's fidelity check is the task's paired test
    fidelity = metrics["compile"]["records"]["fidelity"]
    assert fidelity["checked"] and fidelity["metric"] == "value_mae" and "paired t-test" in fidelity["test"]
    assert fidelity["fails"] is False
    # the report speaks the task's metric
    md, _ = write_report(run.root)
    text = md.read_text()
    assert "value MAE (digits)" in text and "Δ value MAE vs teacher (pts)" in text and "top-1 (%)" not in text
    saved = json.loads((run.root / "distill" / "metrics.json").read_text())
    assert saved["accuracy"]["value_mae"] == metrics["distill"]["accuracy"]["value_mae"]


def test_the_task_is_part_of_every_stage_key(tmp_path: Path) -> None:
    two = Run.create(tmp_path / "a", _two_head_config(), "generic-cpu", order=ORDER, write=False)
    one = Run.create(tmp_path / "b", _two_head_config().model_copy(update={"task": "classification"}), "generic-cpu",
                     order=ORDER, write=False)
    assert stage_key(two, "teacher", None, None) != stage_key(one, "teacher", None, None)


def test_classification_metrics_and_fidelity_come_from_named_outputs() -> None:
    task = get_task("classification")
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 2.0], [1.0, 0.0, 0.0]], np.float32)
    labels = [np.array([0, 1]), np.array([1, 0])]
    rec = task.metrics({"logits": logits}, labels, ["a", "b", "c"])
    assert rec["top1"] == 0.75 and rec["samples"] == 4 and rec["per_class"] == {"a": 1.0, "b": 0.5, "c": None}
    verdict = task.fidelity({"logits": logits}, {"logits": logits[:, ::-1].copy()}, labels, 0.5)
    assert verdict["drop_points"] == verdict["top1_drop_points"] and "McNemar" in verdict["test"]
    assert task.headline.gain_points(0.9, 0.8) == pytest.approx(-10.0)
