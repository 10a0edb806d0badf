"""The run report, on a synthetic run folder (manifest + metrics as the pipeline writes them)."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgepipe.errors import EdgepipeError
from edgepipe.reporting.report import stage_table_rows, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_NAME = '<script>alert("x")</script> & tiny'
SKIP_REASON = "target <b>has</b> no int8"


def _latency(p50: float, batch: int = 1) -> dict[str, Any]:
    # Unusual warm-up/iteration/thread figures, so the report can only have taken them from here.
    return {"backend": "onnxruntime", "device": "cpu: Test CPU (2 cores)", "dtype": "fp32", "batch": batch,
            "threads": 3, "warmup": 7, "iterations": 33, "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.5,
            "mean_ms": p50 * 1.05, "images_per_s": batch * 1000 / (p50 * 1.05)}


def _metrics(stage: str, top1: float | None, p50: float | None, dtype: str = "fp32", **extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"stage": stage, "status": "done", "skipped_reason": None,
                         "artifact": {"kind": "torch", "dtype": dtype, "files": {}},
                         "params": 270_000, "macs": 40_500_000, "size_bytes": 1_100_000, "wall_time_s": 12.5,
                         "estimate": None, "records": {}}
    if top1 is not None:
        m["accuracy"] = {"top1": top1, "samples": 321, "backend": "pytorch", "dtype": dtype}
    if p50 is not None:
        m["latency"] = _latency(p50)
        m["throughput"] = _latency(p50 * 8, batch=16)
    m.update(extra)
    return m


def _history(feature: bool) -> list[dict[str, Any]]:
    return [{"epoch": e, "lr": 0.1, "loss": 2.0 / e, "soft": 1.5 / e, "hard": 0.4 / e,
             **({"feature": 0.1 / e} if feature else {}), "val_top1": 0.5 + 0.1 * e, "images_per_s": 900.0,
             "seconds": 1.0} for e in (1, 2, 3)]


def make_run(run_dir: Path, with_plot_data: bool = True) -> Path:
    """teacher, distill, prune (done); qat skipped; export without latency; compile with a target estimate."""
    estimate = {"kind": "estimate", "label": "estimate: roofline from jetson-orin-nano peak figures (not measured)",
                "device": "jetson-orin-nano", "dtype": "int8", "batch": 1, "latency_ms": 0.0421,
                "images_per_s": 23752.0, "bound": "memory"}
    metrics = {
        "teacher": _metrics("teacher", 0.9012, 4.0, records={"history": _history(False)}),
        "distill": _metrics("distill", 0.8850, 1.0,
                            records={"history": _history(True)} if with_plot_data else {}),
        "prune": _metrics("prune", 0.8731, 0.5, records={
            "channels": {"conv1": [16, 8], "layer1.0.conv1": [16, 10]} if with_plot_data else {},
            "steps": [{"step": 1, "macs": 30_000_000, "params": 200_000}]}),
        "qat": {"stage": "qat", "status": "skipped", "skipped_reason": SKIP_REASON},
        "export": _metrics("export", 0.8725, None),
        "compile": _metrics("compile", 0.8702, 0.25, dtype="int8", size_bytes=300_000, estimate=estimate,
                            measure_note="host reference: the bundle's ONNX in ONNX Runtime on this CPU"),
    }
    if with_plot_data:
        for name, per_class in (("teacher", {"cat": 0.9, "dog": 0.8}), ("compile", {"cat": 0.85, "dog": 0.7})):
            metrics[name]["accuracy"]["per_class"] = per_class
    else:
        metrics["distill"]["status"] = "skipped"
    stages = []
    for name, m in metrics.items():
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        (run_dir / name / "metrics.json").write_text(json.dumps(m))
        stages.append({"name": name, "status": m["status"], "started": "2025-01-01T00:00:00", "ended":
                       "2025-01-01T00:00:10", "wall_time_s": 10.0, "key": "k", "input_hash": None,
                       "output_hash": "h", "dir": name, "skipped_reason": m.get("skipped_reason")})
    manifest = {"run": RUN_NAME, "target": "jetson-orin-nano", "created": "2025-01-01T00:00:00+00:00",
                "git_revision": "abc1234", "versions": {"torch": "2.9.0", "onnx": "1.19.0"},
                "host": {"cpu": "Test CPU (2 cores)", "isa": ["avx2"]}, "stages": stages}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


def _table(md: str) -> dict[str, list[str]]:
    """Stage name -> cells of its row in the report's stage table."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and cells[0] in ("teacher", "distill", "prune", "qat", "export", "compile"):
            rows[cells[0]] = cells
    return rows


def test_report_table_has_every_stage_with_its_figures(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    md_path, html_path = write_report(run)
    md = md_path.read_text()
    rows = _table(md)
    assert list(rows) == ["teacher", "distill", "prune", "qat", "export", "compile"]
    # stage, status, precision, top-1, delta, params, MACs, size, p50/p99, measured with, throughput, estimate, wall
    assert rows["teacher"][1:5] == ["done", "fp32", "90.12", "ref"]
    assert rows["distill"][3:5] == ["88.50", "-1.62"]
    assert rows["prune"][3:5] == ["87.31", "-2.81"]
    assert rows["compile"][2:5] == ["int8", "87.02", "-3.10"]
    assert rows["teacher"][5:8] == ["270.00 K", "40.50 M", "1.05 MiB"]
    assert rows["compile"][7] == "293.0 KiB"
    assert rows["teacher"][8] == "4.000 / 6.000"
    assert rows["teacher"][9] == "onnxruntime fp32 · cpu: Test CPU (2 cores) · 3 threads"
    assert rows["teacher"][10].endswith("img/s @ batch 16")
    assert rows["teacher"][12] == "10.0 s"
    # A skipped stage and a stage without latency show dashes, not zeros.
    assert rows["qat"][1] == "skipped" and set(rows["qat"][2:12]) == {"—"}
    assert rows["export"][8:11] == ["—", "—", "—"]
    # The target figure is labelled an estimate wherever it appears.
    assert rows["compile"][11] == "estimate: 0.042 ms (int8, batch 1, memory-bound)"
    assert rows["compile"][9].endswith("3 threads (host reference, see notes)")
    assert "compile: host reference: the bundle's ONNX in ONNX Runtime on this CPU" in md
    assert "target estimate (not measured)" in md
    assert "estimate: roofline from jetson-orin-nano peak figures (not measured)" in md
    # Conditions come from the metrics, never typed: 7 warm-up, 33 iterations, 3 threads.
    assert "latency at batch 1: 7 untimed warm-up + 33 timed iterations, 3 threads" in md
    assert "throughput at batch 16: 7 untimed warm-up + 33 timed iterations" in md
    assert "top-1 on 321 validation images" in md
    assert "qat skipped: target &lt;b&gt;has&lt;/b&gt; no int8" in md
    assert "Test CPU (2 cores)" in md and "avx2" in md and "abc1234" in md and "torch 2.9.0" in md


def test_report_html_embeds_plots_and_escapes_user_text(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    md_path, html_path = write_report(run)
    page = html_path.read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 4
    assert all(base64.b64decode(u).startswith(PNG_MAGIC) for u in uris)
    assert "<script>" not in page and "<b>has</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; tiny" in page
    assert "target &lt;b&gt;has&lt;/b&gt; no int8" in page
    # The Markdown links the same four plots, saved as PNG files.
    for name in ("accuracy_vs_latency.png", "distillation_losses.png", "pruning_channels.png", "per_class_top1.png"):
        assert f"](report_assets/{name})" in md_path.read_text()
        assert (run / "report_assets" / name).read_bytes().startswith(PNG_MAGIC)


def test_report_skips_plots_without_data_with_a_note(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    write_report(run)  # a first report with all plots, so stale assets must be removed below
    make_run(run, with_plot_data=False)
    md_path, html_path = write_report(run)
    md, page = md_path.read_text(), html_path.read_text()
    assert "Plot skipped: the distill stage recorded no per-epoch history (status: skipped)." in md
    assert "Plot skipped: the prune stage recorded no per-layer channel counts (status: done)." in md
    assert "Plot skipped: the distill stage recorded no per-epoch history" in page
    assert page.count("data:image/png;base64,") == 1
    assert (run / "report_assets" / "accuracy_vs_latency.png").is_file()
    assert not (run / "report_assets" / "distillation_losses.png").exists()
    assert not (run / "report_assets" / "pruning_channels.png").exists()


def test_stage_table_rows_give_raw_figures(tmp_path: Path) -> None:
    rows = {r["stage"]: r for r in stage_table_rows(make_run(tmp_path / "run"))}
    keys = {"stage", "status", "precision", "top1", "delta", "params", "macs", "size_bytes", "p50_ms",
            "throughput", "estimate_ms"}
    assert all(keys <= set(r) for r in rows.values())
    assert rows["distill"]["top1"] == pytest.approx(0.8850)
    assert rows["distill"]["delta"] == pytest.approx(-0.0162)
    assert rows["teacher"]["delta"] == 0.0
    assert rows["qat"]["status"] == "skipped" and rows["qat"]["top1"] is None and rows["qat"]["p50_ms"] is None
    assert rows["export"]["p50_ms"] is None and rows["export"]["top1"] == pytest.approx(0.8725)
    assert rows["compile"]["estimate_ms"] == pytest.approx(0.0421)
    assert rows["teacher"]["params"] == 270_000 and isinstance(rows["teacher"]["params"], int)
    assert rows["teacher"]["throughput"] == pytest.approx(16 * 1000 / (32 * 1.05))


def test_report_without_manifest_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(EdgepipeError, match="manifest.json: not found"):
        write_report(tmp_path)


def _mark_done(run: Path, stage: str) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    for entry in manifest["stages"]:
        if entry["name"] == stage:
            entry.update(status="done", skipped_reason=None)
    (run / "manifest.json").write_text(json.dumps(manifest))


def test_report_says_which_qat_model_was_kept(tmp_path: Path) -> None:
    """stages/qat.py keeps the better of the calibrated and the fine-tuned INT8 model; the report names it."""
    run = make_run(tmp_path / "run")
    qat = {**_metrics("qat", 0.8635, 0.3, dtype="int8"), "records": {
        "float_top1": 0.8731, "ptq_top1": 0.8635, "qat_top1": 0.8470, "kept": "calibrated", "kept_top1": 0.8635}}
    (run / "qat" / "metrics.json").write_text(json.dumps(qat))
    _mark_done(run, "qat")
    md = write_report(run)[0].read_text()
    assert ("qat kept the calibrated INT8 model, the better on the validation set (calibrated 86.35%, fine-tuned "
            "84.70% top-1, PyTorch fake-quant with BatchNorm folded)") in md
    assert _table(md)["qat"][3] == "86.35"


def test_report_shows_the_accuracy_budget_its_mix_and_the_sensitivity_plot(tmp_path: Path) -> None:
    """qat.max_drop (edgepipe.quantization.mixed): the outcome, the float layers, the mix against all-INT8 and all-float with
    each latency's conditions, the selection steps, and the per-layer plot."""
    run = make_run(tmp_path / "run")
    lat = {**_latency(0.123), "backend": "openvino", "dtype": "int8", "kind": "measured", "rounds": 3,
           "float_dtype": "bf16"}
    mix = {"max_drop_points": 0.5, "measured_on": "validation (test)", "images": 321, "float_top1": 0.9,
           "all_int8_top1": 0.88, "outcome": "mixed", "float_layers": ["layer1.conv2"], "fallback_dtype": "bf16",
           "fallback_reason": "OpenVINO reports BF16 on this CPU",
           "sensitivity": [{"layer": "layer1.conv2", "index": 1, "top1_drop_points": 1.5, "rank": 1},
                           {"layer": "conv1", "index": 0, "top1_drop_points": 0.1, "rank": 2}],
           "selection": [{"phase": "calibrated", "float_layers": 0, "top1": 0.88, "drop_points": 2.0,
                          "within_budget": False},
                         {"phase": "calibrated", "float_layers": 1, "top1": 0.897, "drop_points": 0.3,
                          "within_budget": True}],
           "variants": [{"variant": "all-int8", "float_layers": 0, "top1": 0.88, "drop_points": 2.0, "latency": lat},
                        {"variant": "chosen", "float_layers": 1, "top1": 0.897, "drop_points": 0.3,
                         "latency": {**lat, "p50_ms": 0.2}},
                        {"variant": "all-float", "float_layers": 2, "top1": 0.9, "drop_points": 0.0,
                         "latency": {**lat, "dtype": "bf16", "p50_ms": 0.4}}]}
    qat = {**_metrics("qat", 0.897, 0.3, dtype="int8"), "records": {"mixed_precision": mix}}
    (run / "qat" / "metrics.json").write_text(json.dumps(qat))
    _mark_done(run, "qat")
    md = write_report(run)[0].read_text()
    assert "Mixed precision under the accuracy budget (qat.max_drop)" in md
    assert "**Outcome:** 1 layer(s) kept in float" in md and "**Float layers:** layer1.conv2" in md
    assert ("| chosen | 1 | 89.70% | 0.30 | 0.200 ms | measured: openvino int8, float parts bf16, cpu: Test CPU (2 cores), "
            "3 threads, 7 warm-up + 33 runs, best p50 of 3 rounds |") in md
    assert "calibrated: 0 layer(s) in float, top-1 88.00%, 2.00 points below float (over budget)" in md
    assert (run / "report_assets" / "int8_sensitivity.png").read_bytes().startswith(PNG_MAGIC)
