"""The engine reads what each stage declares: a new stage is one file in stages/ plus its name in the order,
a stage that breaks the protocol fails at import with one line, and measurement settings key the metrics."""
from __future__ import annotations

import json
import textwrap
import types
from pathlib import Path

import pytest

import stages
from edgepipe.engine import stage as stage_mod
from edgepipe.errors import EdgepipeError
from edgepipe.engine.pipeline import run_pipeline
from edgepipe.engine.run import Run
from tests.support import tiny_config

# A stage as a user would add it: it copies the teacher's model (its "transformation") and counts its calls.
TRIVIAL = '''
"""A trivial stage for the engine test: re-saves its input model."""
import json

from edgepipe.models.loading import load_torch_artifact, save_torch_artifact
from edgepipe.engine.stage import StageResult
from edgepipe.types import ArtifactKind

NAME = "resave"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("seed",)
USES_TEACHER = False
MEASURED = True
DISTRIBUTED = False
target_key = None
CALLS = []


def run(ctx):
    CALLS.append(ctx.out_dir)
    desc = json.loads(ctx.input.path("build").read_text())
    art = save_torch_artifact(load_torch_artifact(ctx.input), desc["build"], ctx.out_dir,
                              tuple(desc["input_shape"]), desc["num_classes"])
    return StageResult(art, records={"calls": len(CALLS)})
'''


@pytest.fixture
def extra_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """stages/resave.py (in a folder added to the stages package) and "resave" after the teacher in the order."""
    folder = tmp_path / "stage_files"
    folder.mkdir()
    (folder / "resave.py").write_text(textwrap.dedent(TRIVIAL))
    monkeypatch.setattr(stages, "__path__", [*stages.__path__, str(folder)])
    monkeypatch.setattr(stage_mod, "STAGE_ORDER", ("teacher", "resave"))
    monkeypatch.setattr(stage_mod, "_LOADED", {})
    yield
    import sys

    sys.modules.pop("stages.resave", None)


def _config(**measure):
    return tiny_config(teacher={"model": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 4, "in_channels": 1}},
                                "train": {"epochs": 1, "lr": 0.1}},
                       measure={"warmup": 1, "iterations": 3, "throughput_batch": 4, **measure})


def test_a_new_stage_is_one_file_and_its_name_in_the_order(tmp_path: Path, extra_stage) -> None:
    run = Run.create(tmp_path / "run", _config(), "generic-cpu")
    first = run_pipeline(run)
    module = stage_mod.load_stage("resave")
    assert list(first) == ["teacher", "resave"] and len(module.CALLS) == 1
    m = first["resave"]
    assert m["records"] == {"calls": 1} and 0 <= m["accuracy"]["top1"] <= 1 and m["latency"]["iterations"] == 3
    assert [e["name"] for e in json.loads((run.root / "manifest.json").read_text())["stages"]] == ["teacher", "resave"]

    again = run_pipeline(Run.open(run.root))  # cached: same key, same output
    assert len(module.CALLS) == 1 and again["resave"] == m

    # measure settings are not the stage's key: the stored model is re-measured, not rebuilt
    run = Run.create(run.root, _config(iterations=7), "generic-cpu")
    remeasured = run_pipeline(run)
    assert len(module.CALLS) == 1
    assert remeasured["resave"]["latency"]["iterations"] == 7 and remeasured["teacher"]["latency"]["iterations"] == 7
    assert remeasured["resave"]["records"] == {"calls": 1}
    assert remeasured["teacher"]["records"]["history"] == first["teacher"]["records"]["history"]

    # its declared section is its key: a new seed rebuilds it (and the teacher, which declares seed too)
    run = Run.create(run.root, _config(iterations=7).model_copy(update={"seed": 1}), "generic-cpu")
    run_pipeline(run)
    assert len(module.CALLS) == 2


def test_stage_protocol_is_checked_at_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = stage_mod.load_stage("export")
    assert good.SECTIONS == ("export", "data") and good.target_key is None
    for name in stage_mod.known_stages():  # every shipped stage passes
        stage_mod.check_stage(stage_mod.load_stage(name))
    broken = types.ModuleType("stages.broken")
    broken.__file__ = "stages/broken.py"
    for attr, value in vars(good).items():
        if attr.isupper() or attr in ("run", "target_key"):
            setattr(broken, attr, value)
    broken.NAME = "broken"
    stage_mod.check_stage(broken)
    del broken.SECTIONS
    with pytest.raises(EdgepipeError, match=r"stages/broken.py: a stage must declare SECTIONS"):
        stage_mod.check_stage(broken)
    broken.SECTIONS = ("export", "nonsense")
    with pytest.raises(EdgepipeError, match="SECTIONS names nonsense, not config sections"):
        stage_mod.check_stage(broken)
    with pytest.raises(EdgepipeError, match="unknown stage 'nope'"):
        stage_mod.load_stage("nope")


def test_each_model_stage_is_checked_against_its_input_on_the_target(tmp_path: Path) -> None:
    """distill vs teacher and prune vs distill, both compiled for the target and timed the same way; the verdict
    follows the rule (less accurate and not faster by the profile's min_speedup -> flagged) and reaches the report."""
    from edgepipe.reporting.report import write_report

    run = Run.create(tmp_path / "run", _config(), "generic-cpu")
    metrics = run_pipeline(run, stages=["teacher", "distill", "prune"])
    assert metrics["teacher"]["gain"] is None  # nothing before it
    for name, against in (("distill", "teacher"), ("prune", "distill")):
        gain = metrics[name]["gain"]
        assert gain["against"] == against and gain["kind"] == "measured" and gain["measured_on"].startswith("onnxruntime")
        delta = 100 * (metrics[name]["accuracy"]["top1"] - metrics[against]["accuracy"]["top1"])
        assert gain["top1_delta_points"] == pytest.approx(delta)
        assert gain["speedup"] == pytest.approx(gain["before_ms"] / gain["after_ms"])
        assert gain["earned"] == (delta >= 0 or gain["speedup"] >= run.profile.min_speedup)
        assert gain["verdict"].startswith("kept" if gain["earned"] else "flagged")
    md, _ = write_report(run.root)
    text = md.read_text()
    assert "Does each stage earn its place?" in text and f"prune {metrics['prune']['gain']['verdict'][:20]}" in text


def test_on_no_gain_skip_passes_the_input_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage that does not earn its place is skipped: the next stage takes its input, the report says why,
    and its key follows the target (the verdict was measured there)."""
    import edgepipe.measure.figures
    from edgepipe.engine.pipeline import stage_key

    real = edgepipe.measure.figures.stage_gain

    def prune_loses(before, after, before_top1, after_top1, profile, cfg, shape, before_stage):
        gain = real(before, after, before_top1, after_top1, profile, cfg, shape, before_stage)
        if before_stage == "distill":  # pretend prune made the model less accurate and no faster
            gain.update(earned=False, verdict="flagged: made up by the test; it does not earn its place")
        return gain

    monkeypatch.setattr(edgepipe.measure.figures, "stage_gain", prune_loses)
    config = _config().model_copy(update={"on_no_gain": "skip"})
    run = Run.create(tmp_path / "run", config, "generic-cpu")
    metrics = run_pipeline(run, stages=["teacher", "distill", "prune", "qat"])
    prune = run.entry("prune")
    assert prune["status"] == "skipped" and prune["skipped_reason"].startswith("on_no_gain: skip: flagged")
    assert prune["output_hash"] == run.entry("distill")["output_hash"]  # distill's model passes through
    assert metrics["prune"]["gain"]["earned"] is False and metrics["qat"]["gain"]["against"] == "distill"
    assert run.artifact_of("prune").root == run.artifact_of("distill").root
    # the skip was decided on this target: another target keys prune anew
    inp = run.artifact_of("distill").content_hash()
    other = Run.create(tmp_path / "other", config, "intel-xeon-amx")
    assert stage_key(run, "prune", inp, run.artifact_of("teacher")) != stage_key(other, "prune", inp,
                                                                                 run.artifact_of("teacher"))
    flag = Run.create(tmp_path / "flag", _config(), "generic-cpu")
    flag_other = Run.create(tmp_path / "flag-other", _config(), "intel-xeon-amx")
    assert stage_key(flag, "prune", inp, None) == stage_key(flag_other, "prune", inp, None)


def test_checkpoints_outlive_a_kill_between_trained_and_recorded(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher trains, then the process dies while its artifact is measured: the rerun resumes from the
    last epoch's checkpoint (no retraining); checkpoints go only once the manifest says done."""
    from edgepipe.engine import pipeline
    from edgepipe.engine.pipeline import run_stage

    run = Run.create(tmp_path / "run", _config(), "generic-cpu")
    real = pipeline._metrics

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for SIGKILL after training, before the manifest records it

    monkeypatch.setattr(pipeline, "_metrics", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stage(run, "teacher")
    ckpts = run.root / "teacher" / "checkpoints"
    assert (ckpts / "last.pt").is_file()
    monkeypatch.setattr(pipeline, "_metrics", real)
    run = Run.open(run.root)
    m = run_stage(run, "teacher")
    history = m["records"]["history"]
    assert history and all(row.get("earlier_invocation") for row in history)  # nothing retrained
    assert not ckpts.exists()  # recorded done: now they go


def test_checkpoints_of_other_inputs_are_discarded(tmp_path: Path) -> None:
    from edgepipe.engine.pipeline import _checkpoints_for

    folder = tmp_path / "checkpoints"
    _checkpoints_for(folder, "key-a", "distill")
    (folder / "last.pt").write_bytes(b"epoch 3 of a distill against the old teacher")
    _checkpoints_for(folder, "key-a", "distill")
    assert (folder / "last.pt").exists()  # same stage key: resume
    _checkpoints_for(folder, "key-b", "distill")  # the teacher (or data, or config) changed
    assert not (folder / "last.pt").exists() and (folder / "stage_key").read_text().strip() == "key-b"


def test_replaced_images_change_every_data_stage_key(tmp_path: Path) -> None:
    import os

    from edgepipe.config import DataConfig
    from edgepipe.data.loading import data_fingerprint

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / "0.png").write_bytes(b"x" * 10)
    cfg = DataConfig(kind="imagefolder", path=str(tmp_path))
    before = data_fingerprint(cfg)
    assert data_fingerprint(cfg) == before
    img = tmp_path / "train" / "a" / "0.png"
    img.write_bytes(b"y" * 10)  # same size, new content: the modification time tells
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 1_000_000))
    assert data_fingerprint(cfg) != before
