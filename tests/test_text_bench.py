"""`edgepipe compare` for a text config (issue 29, deliverable 8), on the embedded text default shrunk to seconds: every
row is built and measured, the teacher's INT8 row is NNCF's transformer PTQ, latency is timed at the shapes text
needs, and the claims are computed from the rows."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgepipe.cli import main

pytest.importorskip("transformers", reason="the text task needs transformers (pip install -e '.[text]')")
pytest.importorskip("nncf", reason="compare's teacher-int8 row is NNCF post-training quantization (pip install nncf)")
from tests.test_text_pipeline import shrunk  # noqa: E402


def _host_runs_int8() -> bool:
    """What OpenVINO reports about this host's CPU: INT8 among its optimization capabilities (AVX2-only, AVX-512 VNNI
    and AMX hosts all report it; the int8 kernels differ, the precision does not)."""
    import openvino as ov

    return "INT8" in [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


pytestmark = pytest.mark.skipif(not _host_runs_int8(), reason="OpenVINO reports no INT8 capability on this CPU; "
                                "compare needs an INT8 final model")


def test_mcnemar_counts_wins_and_losses_two_sided():
    from edgepipe.reporting.text_bench import mcnemar

    a = np.array([1, 1, 1, 1, 0, 0, 1, 1], bool)
    b = np.array([1, 0, 0, 0, 1, 0, 1, 1], bool)
    out = mcnemar(a, b)
    assert (out["wins"], out["losses"]) == (1, 3) and out["p_value"] == pytest.approx(0.625)
    assert mcnemar(a, a)["p_value"] == 1.0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text-bench")
    config = shrunk(tmp, ptq={"subset_size": 32}, measure={"warmup": 1, "iterations": 3, "throughput_batch": 32})
    out = tmp / "out"
    assert main(["compare", "--config", str(config), "--target", "intel-xeon-amx", "--run", str(tmp / "run"),
                 "--out", str(out)]) == 0
    return json.loads((out / "BENCHMARKS-text.json").read_text()), out


def test_every_row_is_measured_at_the_shapes_text_needs(result):
    data, out = result
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["teacher-fp32", "teacher-int8", "scratch-same-init", "distilled", "pruned", "final"]
    for r in rows.values():
        # max_length 32 here: batch 1 at 32 tokens and throughput at batch 32 (128 is cut to the model's longest)
        assert [(t["batch"], t["sequence"]) for t in r["timings"]] == [(1, 32), (32, 32)]
        assert r["timings"][0]["inputs"]["input_ids"] == [1, 32] and r["timings"][0]["p50_ms"] > 0
        assert 0 <= r["accuracy"] <= 1 and r["sentences"] == data["conditions"]["sentences"]
        assert 0 <= r["vs_teacher"]["p_value"] <= 1
    # INT8 where OpenVINO reports it for this host (the module's precondition): the PTQ teacher and the QAT student
    assert rows["teacher-int8"]["runtime_dtype"] == "int8"
    assert "model_type TRANSFORMER" in rows["teacher-int8"]["method"]
    assert rows["final"]["runtime_dtype"] == "int8" and rows["final"]["params"] < rows["distilled"]["params"]
    assert rows["teacher-fp32"]["vs_teacher"]["p_value"] == 1.0


def test_claims_come_from_the_rows_and_the_section_is_written(result):
    data, out = result
    rows = {r["row"]: r for r in data["rows"]}
    claims = {c["claim"].split(" (")[0]: c for c in data["checks"]}
    params = claims["final params / teacher params"]
    assert params["measured"] == pytest.approx(rows["final"]["params"] / rows["teacher-fp32"]["params"])
    assert params["pass"] == (params["measured"] <= 0.5)
    speed = data["paired"]["teacher-fp32"]["b1-s32"]["by_batch"]["1"]
    assert len(speed["per_round"]) == 5 and speed["p50_ratio"] > 0
    assert data["kd_test"]["wins"] + data["kd_test"]["losses"] <= data["conditions"]["sentences"]
    assert data["structure"]["after"]["heads"] == [2]
    text = (out / "BENCHMARKS.md").read_text()
    assert "<!-- begin: text -->" in text and "b1 s32 p50" in text and "### Claims" in text
    assert (out / "BENCHMARKS-text.png").read_bytes()[:4] == b"\x89PNG"
