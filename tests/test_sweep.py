"""Distillation you can tune: the held-out split (data.val_from_train) and `edgepipe sweep` (a 2 x 2 grid on digits in
seconds: the trials, the teacher trained once, the choice made on the held-out split)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from edgepipe.cli import main
from edgepipe.config import DataConfig
from edgepipe.data.loading import load_data
from edgepipe.engine.pipeline import _keyed_config
from tests.support import tiny_config

GRID = ["--set", "distill.temperature=2,4", "--set", "distill.alpha=0.5,0.9"]


# --- the held-out split ------------------------------------------------------------------------------------------
def test_held_out_split_is_stratified_disjoint_and_fixed_across_run_seeds():
    plain = load_data(DataConfig())
    carved = load_data(DataConfig(val_from_train=0.2))
    held = carved.choice_split()
    assert held is not carved and carved.choice_split() is held
    assert carved.train_size + held.val_size == plain.train_size
    assert torch.equal(carved.val_images, plain.val_images)  # the reported split is untouched
    # disjoint: no held-out image is a training image
    train = {bytes(x.numpy().tobytes()) for x in carved.train_images}
    assert not any(bytes(x.numpy().tobytes()) in train for x in held.val_images)
    counts = np.bincount(held.val_labels.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 1  # stratified (digits' classes are near equal)
    note = carved.notes["val_from_train"]
    assert note["images"] == held.val_size == round(0.2 * plain.train_size) and note["stratified"]
    # a count, and the same draw at another run seed (the split's own seed decides it)
    by_count = load_data(DataConfig(val_from_train=100))
    assert by_count.choice_split().val_size == 100
    other_seed = load_data(DataConfig(val_from_train=100), seed=0)
    assert torch.equal(other_seed.choice_split().val_labels, by_count.choice_split().val_labels)
    assert not torch.equal(load_data(DataConfig(val_from_train=100, val_from_train_seed=1)).choice_split().val_images,
                           by_count.choice_split().val_images)
    # limiting the data keeps the held-out split whole
    assert carved.subset(64, 32).choice_split().val_size == held.val_size


def test_held_out_split_refuses_impossible_sizes():
    from edgepipe.errors import EdgepipeError

    with pytest.raises(EdgepipeError, match="data.val_from_train: 5 holds out 5 of 1437"):
        load_data(DataConfig(val_from_train=5))  # fewer than one per class
    with pytest.raises(Exception, match="neither a fraction below 1 nor a whole number"):
        DataConfig(val_from_train=2.5)


def test_new_fields_at_their_defaults_leave_earlier_keys_alone():
    """Runs made before data.val_from_train and distill.loss existed keep their stage keys."""
    keyed = _keyed_config(tiny_config())
    assert "val_from_train" not in keyed["data"] and "loss" not in keyed["distill"]
    assert "dkd_beta" not in keyed["distill"]
    dkd = _keyed_config(tiny_config(distill={**tiny_config().distill.model_dump(), "loss": "dkd"}))
    assert dkd["distill"]["loss"] == "dkd" and dkd["distill"]["dkd_beta"] == 8.0


def test_training_validates_on_the_held_out_split(tmp_path):
    """Each epoch's validation metric, and the stage's choice figure, come from the held-out images; the reported
    metric from the validation split."""
    cfg = tiny_config(data={"kind": "digits", "batch_size": 64, "limit_train": 512, "limit_val": 128,
                            "val_from_train": 100})
    assert main(["teacher", "--config", _write(tmp_path, cfg), "--target", "intel-xeon-amx",
                 "--run", str(tmp_path / "run")]) == 0
    assert main(["distill", "--run", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "distill" / "metrics.json").read_text())
    assert metrics["accuracy"]["choice"]["images"] == 100
    assert metrics["accuracy"]["samples"] == 128
    from edgepipe.engine.run import Run
    from edgepipe.models.loading import load_torch_artifact
    from edgepipe.tasks.classification import evaluate

    run = Run.open(tmp_path / "run")
    model = load_torch_artifact(run.artifact_of("distill"))
    data = load_data(cfg.data, seed=cfg.seed, channels=1)
    assert metrics["records"]["history"][-1]["val_top1"] == pytest.approx(evaluate(model, data.choice_split()), abs=1e-6)
    assert metrics["accuracy"]["choice"]["top1"] == pytest.approx(evaluate(model, data.choice_split()), abs=1e-6)
    assert metrics["accuracy"]["top1"] == pytest.approx(evaluate(model, data), abs=1e-6)


# --- edgepipe sweep ----------------------------------------------------------------------------------------------
def _write(tmp_path, cfg) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def _sweep_config():
    return tiny_config(data={"kind": "digits", "batch_size": 64, "limit_train": 512, "limit_val": 128,
                             "val_from_train": 0.2},
                       teacher={"model": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 16, "in_channels": 1}},
                                "train": {"epochs": 4, "lr": 0.1}},
                       distill={"student": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "in_channels": 1}},
                                "optim": {"epochs": 3, "lr": 0.1}})


def _study(root):
    """The first study's folder (its default name: the fields, the seeds and a digest of the values)."""
    return next(p for p in (root / "run" / "sweeps").glob("temperature-alpha-seeds1-*")
                if json.loads((p / "sweep.json").read_text())["fields"]["distill.temperature"] == [2, 4])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = _write(root, _sweep_config())
    args = ["sweep", "--config", config, "--target", "intel-xeon-amx", "--run", str(root / "run"), *GRID]
    assert main(args) == 0
    return root, args


def test_sweep_runs_every_trial_and_trains_the_teacher_once(swept):
    root, _ = swept
    result = json.loads((_study(root) / "sweep.json").read_text())
    rows = result["rows"]
    assert len(rows) == 4 and all(r["state"] == "complete" for r in rows)
    assert sorted((r["setting"]["distill.temperature"], r["setting"]["distill.alpha"]) for r in rows) == \
        [(2, 0.5), (2, 0.9), (4, 0.5), (4, 0.9)]
    for r in rows:
        assert 0 <= r["val"] <= 1 and 0 <= r["test"] <= 1 and r["seconds"] > 0 and len(r["history"]) == 3
        folder = root / "run" / "sweeps" / "trials" / \
            f"distill.temperature={r['setting']['distill.temperature']}_distill.alpha={r['setting']['distill.alpha']}_seed=0"
        manifest = json.loads((folder / "manifest.json").read_text())
        teacher, distill = manifest["stages"]
        assert teacher["shared_from"] and "shared_from" not in distill  # the teacher is the base run's
        trial_cfg = yaml.safe_load((folder / "config.yaml").read_text())
        assert trial_cfg["distill"]["temperature"] == r["setting"]["distill.temperature"]
        assert trial_cfg["distill"]["alpha"] == r["setting"]["distill.alpha"]
    base = json.loads((root / "run" / "manifest.json").read_text())
    assert [e["name"] for e in base["stages"] if e.get("status") == "done"] == ["teacher"]
    for name in ("sweep.md", "convergence.png", "heatmap.png"):
        assert (_study(root) / name).stat().st_size > 0


def test_sweep_chooses_on_the_held_out_split(swept):
    root, _ = swept
    result = json.loads((_study(root) / "sweep.json").read_text())
    summary = result["summary"]
    best = max(result["rows"], key=lambda r: (r["val"], r["setting"] == result["default"]))
    assert summary["chosen"]["setting"] == best["setting"]
    assert summary["chosen"]["val_mean"] == max(r["val"] for r in result["rows"])
    assert result["default"] == {"distill.temperature": 4.0, "distill.alpha": 0.9}
    assert result["held_out"]["images"] == round(0.2 * 512)
    md = (_study(root) / "sweep.md").read_text()
    from edgepipe.host import host_cpu

    assert "Chosen on the held-out split" in md and f"Host: {host_cpu()}" in md


def test_a_second_sweep_reuses_every_trial(swept, monkeypatch):
    """The same study again trains nothing; a wider one shares the finished settings and trains only the new ones."""
    root, args = swept
    import stages.distill as distill_stage

    original, trained = distill_stage.run, []

    def counting(ctx):
        trained.append((ctx.config.distill.temperature, ctx.config.distill.alpha))
        return original(ctx)
    monkeypatch.setattr(distill_stage, "run", counting)
    assert main(args) == 0
    assert trained == []
    assert main([*args[:7], "--set", "distill.temperature=2,4,8", "--set", "distill.alpha=0.5,0.9"]) == 0
    assert sorted(trained) == [(8.0, 0.5), (8.0, 0.9)]
    wider = json.loads((_study(root) / "sweep.json").read_text())
    assert len(wider["rows"]) == 4  # the first study is left as it was


@pytest.mark.parametrize("extra, message", [
    (["--set", "distill.temprature=1,2"], "--set distill.temprature: no such config field ('temprature' not found)"),
    (["--set", "distill.alpha=0.5,2"], "distill.alpha"),
    (["--set", "teacher.train.lr=0.1,0.2"], "--set teacher.train.lr: every trial shares the base run's teacher"),
    (["--set", "bench.warmup=1,2"], "--set bench.warmup: no stage after the teacher reads bench"),
    (["--set", "distill.alpha"], "expected FIELD=V1,V2"),
])
def test_bad_sweeps_are_one_line_and_change_nothing(tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    assert main(["sweep", "--config", _write(tmp_path, _sweep_config()), "--target", "intel-xeon-amx",
                 "--run", str(run), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not run.exists()


def test_a_sweep_without_a_held_out_split_is_refused(tmp_path, capsys):
    assert main(["sweep", "--config", _write(tmp_path, tiny_config()), "--target", "intel-xeon-amx",
                 "--run", str(tmp_path / "run"), *GRID]) == 2
    assert "data.val_from_train is not set: a sweep would choose on the split it reports" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_values_may_be_lists_and_the_report_goes_into_a_document(swept, tmp_path):
    from edgepipe.engine.sweep import parse_sets, trial_name

    fields = parse_sets(["distill.assistants=[],[{arch: cifar_resnet, kwargs: {depth: 8, width: 8}}]",
                         "distill.loss=kd,dkd"])
    assert fields["distill.assistants"] == [[], [{"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8}}]]
    assert "/" not in trial_name({"distill.assistants": fields["distill.assistants"][1]}, 0)
    root, args = swept
    doc = tmp_path / "BENCH.md"
    doc.write_text("# Benchmarks\n\nkept text\n")
    assert main([*args[:7], "--set", "distill.loss=kd,dkd", "--into", str(doc), "--title", "DKD vs KD"]) == 0
    text = doc.read_text()
    assert "kept text" in text and "<!-- begin: sweep-loss-seeds1-" in text and ": DKD vs KD" in text
    png = next(tmp_path.glob("BENCH-sweep-loss-seeds1-*-convergence.png"))
    assert png.name in text


def test_a_field_given_one_value_is_set_in_every_trial(swept):
    root, args = swept
    assert main([*args[:7], "--set", "distill.loss=dkd", "--set", "distill.alpha=0.5,0.9", "--study", "dkd"]) == 0
    result = json.loads((root / "run" / "sweeps" / "dkd" / "sweep.json").read_text())
    assert result["fixed"] == {"distill.loss": "dkd"} and list(result["fields"]) == ["distill.alpha"]
    assert [sorted(r["setting"]) for r in result["rows"]] == [["distill.alpha"]] * 2
    folders = list((root / "run" / "sweeps" / "trials").glob("distill.loss=dkd_distill.alpha=*"))
    assert len(folders) == 2
    for folder in folders:
        assert yaml.safe_load((folder / "config.yaml").read_text())["distill"]["loss"] == "dkd"


def test_pruned_trials_stop_early_and_are_reported(swept, monkeypatch):
    """--prune-trials reports each epoch's held-out metric to Optuna's pruner; a pruned trial stops after that epoch
    (its stage resumable from the checkpoint), is recorded as pruned and never chosen. The pruner here prunes every
    trial at its first report, so the outcome does not depend on the trials' figures."""
    import optuna

    root, args = swept
    monkeypatch.setattr(optuna.pruners, "MedianPruner",
                        lambda **kw: optuna.pruners.ThresholdPruner(lower=1.01, n_warmup_steps=0))
    assert main([*args[:7], "--set", "distill.temperature=3,5", "--study", "pruned", "--prune-trials"]) == 0
    result = json.loads((root / "run" / "sweeps" / "pruned" / "sweep.json").read_text())
    assert [r["state"] for r in result["rows"]] == ["pruned", "pruned"]
    assert result["summary"]["chosen"] is None and result["summary"]["pruned"] == 2
    study = optuna.load_study(study_name="pruned", storage=result["storage"])
    assert all(list(t.intermediate_values) == [1] for t in study.trials)  # stopped after the first epoch
    for r in result["rows"]:
        folder = root / "run" / "sweeps" / "trials" / f"distill.temperature={r['setting']['distill.temperature']}_seed=0"
        assert (folder / "distill" / "checkpoints" / "last.pt").exists()


def test_a_trial_runs_through_the_first_stage_that_reads_each_field():
    from edgepipe.engine.stage import STAGE_ORDER
    from edgepipe.engine.sweep import Space, stages_of
    from edgepipe.errors import EdgepipeError

    cfg, order = _sweep_config(), tuple(STAGE_ORDER)
    assert stages_of(cfg, Space({"data.unlabeled": [None, "rest"]}, [0]), order) == (("teacher",), ("distill",))
    assert stages_of(cfg, Space({"prune.ratio": [0.5, 0.6]}, [0]), order) == (("teacher", "distill"), ("prune",))
    assert stages_of(cfg, Space({"prune.ratio": [0.5, 0.6]}, [0, 1]), order)[1] == ("distill", "prune")  # the seed
    assert stages_of(cfg, Space({"distill.alpha": [0.5, 0.9]}, [0]), order, until="compile")[1] == \
        ("distill", "prune", "qat", "export", "compile")
    with pytest.raises(EdgepipeError, match="--until distill: prune.ratio is first read by the prune stage"):
        stages_of(cfg, Space({"prune.ratio": [0.5, 0.6]}, [0]), order, until="distill")


def test_an_interrupted_sweep_resumes_its_unfinished_trials(swept, monkeypatch):
    """Ctrl-C in a trial (the stage records it interrupted, Optuna the trial failed): the same command again runs the
    grid points without a finished trial, and only those."""
    root, args = swept
    import stages.distill as distill_stage

    original, trained = distill_stage.run, []

    def interrupted(ctx):
        raise KeyboardInterrupt
    monkeypatch.setattr(distill_stage, "run", interrupted)
    command = [*args[:7], "--set", "distill.temperature=6,7", "--study", "resumed"]
    assert main(command) == 130
    monkeypatch.setattr(distill_stage, "run", lambda ctx: trained.append(ctx.config.distill.temperature) or original(ctx))
    assert main(command) == 0
    assert sorted(trained) == [6.0, 7.0]
    result = json.loads((root / "run" / "sweeps" / "resumed" / "sweep.json").read_text())
    assert sorted(r["setting"]["distill.temperature"] for r in result["rows"]) == [6, 7]
    assert all(r["state"] == "complete" for r in result["rows"])
