"""The distillation-methods table (edgepipe.reporting.methods): comparisons read from finished sweeps, paired by seed,
across studies, with the verdict rule of the sweep report; bad specifications are one line and exit 2."""
from __future__ import annotations

import json

import pytest

from edgepipe.errors import EdgepipeError
from edgepipe.reporting import methods

METRIC = {"name": "top1", "label": "top-1", "unit": "%", "scale": 100.0, "higher_is_better": True}


def _study(run, name, settings):
    """``settings``: [(setting, {seed: (test, seconds)})] written as a sweep's sweep.json."""
    rows = [{"number": i, "state": "complete", "setting": setting, "seed": seed, "val": test, "test": test,
             "seconds": secs, "runtime": "pytorch fp32"}
            for i, (setting, by_seed) in enumerate(settings) for seed, (test, secs) in by_seed.items()]
    folder = run / "sweeps" / name
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"metric": METRIC, "rows": rows, "default": settings[0][0]}))


@pytest.fixture
def run(tmp_path):
    _study(tmp_path, "loss", [({"distill.loss": "kd"}, {0: (0.70, 40.0), 1: (0.71, 40.0), 2: (0.72, 40.0)}),
                              ({"distill.loss": "dkd"}, {0: (0.66, 41.0), 1: (0.67, 41.0), 2: (0.69, 41.0)})])
    _study(tmp_path, "chain", [({"distill.assistants": []}, {0: (0.70, 40.0), 1: (0.71, 40.0), 2: (0.72, 40.0)}),
                               ({"distill.assistants": [{"arch": "cifar_resnet", "kwargs": {"depth": 20}}]},
                                {0: (0.715, 150.0), 1: (0.72, 150.0), 2: (0.73, 150.0)})])
    _study(tmp_path, "epochs", [({"distill.optim.epochs": 4}, {0: (0.70, 40.0), 1: (0.71, 40.0), 2: (0.72, 40.0)}),
                                ({"distill.optim.epochs": 12}, {0: (0.79, 120.0), 1: (0.80, 121.0), 2: (0.79, 119.0)})])
    return tmp_path


def test_a_loss_that_hurts_beyond_its_spread_is_called_so(run):
    row = methods.comparison(run, *methods.parse_comparison("DKD vs KD=loss:distill.loss=dkd|loss:distill.loss=kd"))
    assert row["seeds"] == [0, 1, 2] and row["verdict"] == "hurts"
    assert row["gain"]["mean_points"] == pytest.approx(-3.67, abs=0.01)
    assert row["compute_ratio"] == pytest.approx(41 / 40)


def test_across_studies_at_equal_compute(run):
    """The chain against direct distillation at more epochs (another study), paired by seed; compute from both."""
    spec = ("assistant vs direct at its compute=chain:distill.assistants=[{arch: cifar_resnet, kwargs: {depth: 20}}]"
            "|epochs:distill.optim.epochs=12")
    row = methods.comparison(run, *methods.parse_comparison(spec))
    assert row["verdict"] == "hurts" and row["gain"]["mean_points"] < 0
    assert row["candidate"]["seconds_per_trial"] == 150.0 and row["reference"]["seconds_per_trial"] == 120.0
    text = methods.markdown([row], [run], "cmd")
    assert "**hurts**" in text and "1.25x" in text and "`chain`: assistants=" in text


def test_a_gain_within_its_spread_is_not_established(tmp_path):
    _study(tmp_path, "beta", [({"distill.beta": 0}, {0: (0.70, 1.0), 1: (0.71, 1.0), 2: (0.72, 1.0)}),
                              ({"distill.beta": 1}, {0: (0.705, 1.0), 1: (0.705, 1.0), 2: (0.725, 1.0)})])
    row = methods.comparison(tmp_path, *methods.parse_comparison("f=beta:distill.beta=1|beta:distill.beta=0"))
    assert row["verdict"] == "not established"


def test_cli_writes_the_section_and_refuses_bad_specs(run, tmp_path, capsys):
    out = tmp_path / "B.md"
    out.write_text("# doc\n")
    assert methods.main(["--run", str(run), "--compare", "d=loss:distill.loss=dkd|loss:distill.loss=kd",
                         "--out", str(out)]) == 0
    text = out.read_text()
    assert "<!-- begin: distillation-methods -->" in text and text.startswith("# doc")
    assert json.loads((tmp_path / "B-distillation-methods.json").read_text())["rows"][0]["verdict"] == "hurts"
    assert methods.main(["--run", str(run), "--compare", "d=loss:distill.loss=ce|loss:distill.loss=kd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study loss has no finished trial with loss=ce" in err[0] and "it ran:" in err[0]
    assert methods.main(["--run", str(run), "--compare", "d=nosuch:distill.loss=kd|loss:distill.loss=kd"]) == 2
    assert "no sweep nosuch under" in capsys.readouterr().err
    with pytest.raises(EdgepipeError, match="not NAME="):
        methods.parse_comparison("loss:distill.loss=kd")
