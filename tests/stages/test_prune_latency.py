"""prune.target: latency on digits: the pruner measures candidates on the target's backend (OpenVINO here) and
stops at the budget; an independent measurement of the saved model meets it too."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from edgepipe.config import MeasureConfig
from edgepipe.errors import EdgepipeError
from edgepipe.measure.figures import candidate_latency
from edgepipe.models.loading import load_torch_artifact
from edgepipe.engine.pipeline import run_pipeline
from edgepipe.engine.run import Run
from edgepipe.profiles import get_profile
from tests.support import tiny_config

MEASURE = {"warmup": 20, "iterations": 200, "throughput_batch": 8}
NOISE = 1.3
"""An independent re-measurement on a 2-core machine may differ from the pruner's by this factor."""


def _config(**prune):
    # digits upscaled to 64x64 and a width-32 student: enough compute (~200M MACs) that pruning, not the
    # runtime's fixed per-inference overhead, decides the latency on a 2-core host
    return tiny_config(
        data={"kind": "digits", "batch_size": 64, "limit_train": 512, "limit_val": 128, "image_size": 64},
        distill={"student": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 32, "in_channels": 1}},
                 "optim": {"epochs": 1, "lr": 0.1}},
        prune={"target": "latency", "steps": 1, "max_layer_ratio": 0.9, "optim": {"epochs": 1, "lr": 0.02}, **prune},
        measure=MEASURE)


def test_latency_budget_is_met_on_openvino(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "run", _config(speedup=1.5), "intel-xeon-amx")
    run_pipeline(run, stages=["teacher", "distill", "prune"])
    lat = run.metrics_of("prune")["records"]["latency"]
    assert lat["kind"] == "measured" and lat["conditions"]["backend"] == "openvino"
    assert lat["conditions"]["batch"] == 1 and lat["conditions"]["iterations"] == MEASURE["iterations"]
    assert lat["budget_ms"] == pytest.approx(lat["unpruned_ms"] / 1.5)
    assert lat["final_ms"] <= lat["budget_ms"] and len(lat["measurements"]) >= 2
    assert lat["measurements"][-1]["macs_ratio"] < 1
    model = load_torch_artifact(run.artifact_of("prune"))
    with tempfile.TemporaryDirectory() as tmp:
        again = candidate_latency(model, (1, 64, 64), get_profile("intel-xeon-amx"), MeasureConfig(**MEASURE),
                                  Path(tmp))
    assert again["p50_ms"] <= lat["budget_ms"] * NOISE
    from edgepipe.reporting.report import write_report

    write_report(run.root)  # the report plots every candidate against the budget
    assert (run.root / "report_assets" / "prune_latency.png").read_bytes()[:4] == b"\x89PNG"


def test_unreachable_budget_is_one_clear_error(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "run", _config(latency_ms=1e-6), "intel-xeon-amx")
    run_pipeline(run, stages=["teacher", "distill"])
    with pytest.raises(EdgepipeError, match=r"prune.latency_ms: pruning reached .* ms at batch 1 on openvino"):
        run_pipeline(run, stages=["prune"])


def test_budget_fields_are_validated() -> None:
    with pytest.raises(EdgepipeError, match="exactly one of latency_ms"):
        _config()
    with pytest.raises(EdgepipeError, match="apply to target: latency"):
        tiny_config(prune={"target": "macs", "speedup": 2.0})
