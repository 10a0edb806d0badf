"""`edgepipe compare` on a tiny recipe: every row measured, claims computed, files written, resumable."""
from __future__ import annotations

import json

import pytest

from edgepipe.cli import main
from edgepipe.reporting.benchmarks import ROW_KEYS, acceptance, pareto
from edgepipe.reporting.compare import compare
from tests.support import tiny_config

ROWS = ["teacher-fp32", "teacher-bf16", "teacher-int8", "scratch", "scratch-same-init", "distilled", "pruned", "ptq",
        "final"]


def _config():
    return tiny_config(
        teacher={"model": {"arch": "cifar_resnet", "kwargs": {"depth": 14, "width": 8, "in_channels": 1}},
                 "train": {"epochs": 1, "lr": 0.1}},
        distill={"student": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "in_channels": 1}},
                 "init": "teacher", "optim": {"epochs": 1, "lr": 0.05}},
        soft_targets={"runtime": "openvino", "cache": True},
        prune={"ratio": 0.6, "steps": 1, "optim": {"epochs": 1, "lr": 0.02}})


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    result = compare(_config(), root / "run", "intel-xeon-amx", "jetson", root / "out", "edgepipe compare (test)")
    return root, result


def test_every_row_is_measured_the_same_way(compared):
    root, result = compared
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    for r in rows.values():
        assert 0 <= r["top1"] <= 1 and r["params"] > 0 and r["macs"] > 0 and r["size_bytes"] > 0
        assert r["backend"] == "openvino" and r["latency_b1_p50_ms"] > 0 and r["throughput_b64_images_per_s"] > 0
        assert (r["threads"], r["warmup"], r["iterations"]) == (rows["final"]["threads"], 2, 5)
    assert rows["final"]["runtime_dtype"] == "int8" and rows["ptq"]["runtime_dtype"] == "int8"
    assert rows["teacher-int8"]["runtime_dtype"] == "int8" and rows["teacher-fp32"]["runtime_dtype"] == "fp32"
    assert rows["pruned"]["macs"] < rows["distilled"]["macs"] == rows["scratch"]["macs"] == rows["scratch-same-init"]["macs"]
    assert rows["ptq"]["macs"] == rows["pruned"]["macs"] and rows["teacher-int8"]["macs"] == rows["teacher-fp32"]["macs"]
    # a bf16 request on a CPU without bf16 says what it actually ran
    if rows["teacher-bf16"]["runtime_dtype"] != "bf16":
        assert "no native bf16" in rows["teacher-bf16"]["note"]


def test_gains_are_isolated(compared):
    """KD gain: distilled vs the same init trained on labels only; QAT gain: PTQ after the same fine-tuning epochs."""
    root, result = compared
    base = root / "run" / "baselines"
    import yaml

    cfg = {row: yaml.safe_load((base / row / "config.yaml").read_text()) for row in ("scratch", "scratch-same-init")}
    assert cfg["scratch-same-init"]["distill"]["init"] == "teacher" and cfg["scratch"]["distill"]["init"] == "random"
    assert cfg["scratch-same-init"]["distill"]["alpha"] == 0.0 == cfg["scratch"]["distill"]["alpha"]
    ptq = json.loads((base / "ptq" / "manifest.json").read_text())
    assert ptq["order"] == ["teacher", "distill", "prune", "finetune", "export", "ptq"]
    finetune = json.loads((base / "ptq" / "finetune" / "metrics.json").read_text())["records"]
    qat = json.loads((root / "run" / "qat" / "metrics.json").read_text())["records"]
    assert len(finetune["history"]) == len(qat["history"]) == finetune["epochs"]
    claims = {c["claim"] for c in result["checks"]}
    assert "KD gain: distilled top-1 >= scratch-same-init + 0.3 points" in claims


def test_per_class_accuracy(compared):
    root, result = compared
    final = result["per_class"]["final"]
    assert set(final) == set(result["per_class"]["teacher-fp32"]) and len(final) == 10
    assert all(v is None or 0 <= v <= 1 for v in final.values())
    assert "Where accuracy is lost (top-1 per class)" in (root / "out" / "BENCHMARKS.md").read_text()


def test_device_row_is_labelled_an_estimate(compared):
    _, result = compared
    d = result["device_row"]
    assert "ESTIMATE" in d["note"] and 0 <= d["top1"] <= 1  # its own QDQ graph's accuracy, in ONNX Runtime
    assert "form (int8 activations, 8-bit weights)" in d["method"]  # the device's QAT, not this host's
    assert all(e["kind"] == "estimate" for e in d["estimate"].values())


def test_files_and_claims(compared):
    root, result = compared
    out = root / "out"
    doc = json.loads((out / "BENCHMARKS.json").read_text())
    assert [r["row"] for r in doc["rows"]] == [*ROWS, "device-jetson-orin-nano"]
    assert all(set(ROW_KEYS) <= set(r) for r in doc["rows"])
    assert doc["command"] == "edgepipe compare (test)" and doc["date"] and doc["host"]["cpu"]
    md = (out / "BENCHMARKS.md").read_text()
    assert "edgepipe compare (test)" in md and "(estimate)" in md and "BENCHMARKS.png" in md
    assert (out / "BENCHMARKS.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["checks"]) == 11 and all(isinstance(c["pass"], bool) for c in result["checks"])
    t = result["training_throughput"]
    assert t["pipeline_images_per_s"] > 0 and t["plain_images_per_s"] > 0
    soft = json.loads((root / "run" / "distill" / "metrics.json").read_text())["records"]["soft_targets"]
    assert soft["runtime"] == "openvino" and soft["openvino_max_abs_diff"] < 1e-3
    prune_soft = json.loads((root / "run" / "prune" / "metrics.json").read_text())["records"]["soft_targets"]
    assert prune_soft["cache_hits"] > 0  # fine-tuning replays distill's seeded epochs


def test_second_invocation_reuses_every_row(compared):
    root, first = compared
    again = compare(_config(), root / "run", "intel-xeon-amx", "jetson", root / "out", "edgepipe compare (test)")
    assert [r["fingerprint"] for r in again["rows"]] == [r["fingerprint"] for r in first["rows"]]
    assert [r["seconds"] for r in again["rows"]] == [r["seconds"] for r in first["rows"]]


def test_claims_follow_the_numbers(compared):
    _, result = compared
    doctored = json.loads(json.dumps(result))
    rows = {r["row"]: r for r in doctored["rows"]}
    rows["final"]["top1"] = rows["teacher-fp32"]["top1"] - 0.03
    # speed-up claims come from the paired back-to-back rounds...
    paired = doctored["paired"]["teacher-fp32"]["by_batch"]
    assert len(paired["64"]["per_round"]) == 5 and paired["64"]["ratio"] > 0 and paired["1"]["p50_ratio"] > 0
    paired["64"]["ratio"] = 9.0
    rows["final"]["throughput_b64_images_per_s"] = 2 * rows["teacher-fp32"]["throughput_b64_images_per_s"]
    checks = {c["claim"]: c["pass"] for c in acceptance(doctored)}
    assert checks["final INT8 top-1 >= teacher-fp32 - 2.0 points"] is False
    assert checks["final INT8 throughput (b64) >= 8x teacher-fp32"] is True
    # ...and from the two rows' own figures where no paired timing exists
    doctored.pop("paired")
    checks = {c["claim"]: c["pass"] for c in acceptance(doctored)}
    assert checks["final INT8 throughput (b64) >= 8x teacher-fp32"] is False


def test_pareto_front():
    pts = [(1.0, 80.0), (2.0, 90.0), (1.5, 70.0), (0.5, 60.0), (3.0, 89.0)]
    assert sorted(pareto(pts)) == [0, 1, 3]


def test_cli_refuses_a_non_openvino_target(tmp_path, capsys):
    assert main(["compare", "--config", "digits", "--target", "jetson", "--run", str(tmp_path / "r")]) == 2
    assert "OpenVINO profile" in capsys.readouterr().err


def test_cli_names_a_missing_data_folder(tmp_path, capsys):
    assert main(["compare", "--config", "cifar10", "--target", "intel-xeon-amx", "--run", str(tmp_path / "r"),
                 "--data", str(tmp_path / "nope")]) == 2
    assert "--data" in capsys.readouterr().err


def test_the_kd_gain_is_stated_over_seeds(compared):
    """--seeds 2: the distill stage with and without the teacher at a second seed (two derived runs), each seed's gain
    from the stage's own history, the mean against its spread as a claim; the first seed is the rows' own runs."""
    root, first = compared
    result = compare(_config(), root / "run", "intel-xeon-amx", None, root / "out2", "edgepipe compare (test)", seeds=2)
    seeds = result["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    history = json.loads((root / "run" / "distill" / "metrics.json").read_text())["records"]["history"]
    assert seeds[0]["distilled"] == history[-1]["val_top1"]
    for row in ("distilled-seed1", "scratch-same-init-seed1"):
        cfg = json.loads((root / "run" / "baselines" / row / "manifest.json").read_text())
        assert [e["name"] for e in cfg["stages"]] == ["teacher", "distill"]
    assert seeds[1]["gain"] == pytest.approx(seeds[1]["distilled"] - seeds[1]["scratch_same_init"])
    claims = {c["claim"]: c for c in result["checks"]}
    assert any(c.startswith("KD gain over 2 seeds") for c in claims)
    assert "KD gain over seeds" in (root / "out2" / "BENCHMARKS.md").read_text()
    assert [r["top1"] for r in result["rows"]] == [r["top1"] for r in first["rows"]]  # every row reused


@pytest.mark.parametrize("enabled", [True, False])
def test_method_strings_follow_whether_pruning_ran(enabled):
    """With prune.enabled: false the pruned row is the distilled student passed through: no row may call it pruned."""
    from edgepipe.engine.baselines import BASELINES, prune_wording
    from edgepipe.reporting.compare import FINAL_METHOD, _method
    from edgepipe.reporting.detection_bench import _method as detection_method

    config = _config().model_copy(deep=True)
    config.prune.enabled = enabled

    class _NoRecords:
        def metrics_of(self, stage):
            return {"records": {"method": "NNCF nncf.quantize"}}

    runs = {b.row: _NoRecords() for b in BASELINES}
    texts = [_method(b, runs, config) for b in BASELINES] + [detection_method(b, config) for b in BASELINES]
    texts.append(FINAL_METHOD.format(**prune_wording(config)))
    joined = " | ".join(texts)
    if enabled:
        assert "pruned student fine-tuned" in joined and "distill -> prune -> QAT" in joined
    else:
        assert "pruned student" not in joined and "-> prune ->" not in joined and "pipeline prune stage" not in joined
        assert "prune stage disabled (prune.enabled: false)" in joined and "distill -> QAT INT8" in joined
