"""The recipes-tried section (edgepipe.reporting.frontier): accuracy read from each run folder, speed from the shape
probe matched by the shape the run ended with (pruned widths), bars checked, missing inputs refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgepipe.reporting import frontier


def _run(root: Path, depth: int, tops: dict[str, float], pruned_to: int | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "distill": {"student": {"arch": "cifar_resnet", "kwargs": {"depth": depth, "width": 16}}, "optim": {"epochs": 16}},
        "prune": {"optim": {"epochs": 8}}}))
    for stage, top1 in tops.items():
        (root / stage).mkdir()
        m: dict = {"status": "done", "accuracy": {"top1": top1}}
        if stage == "prune":
            m["records"] = {"channels": {"layer3.0.conv1": [64, pruned_to], "layer1.0.conv1": [16, 16]}}
        (root / stage / "metrics.json").write_text(json.dumps(m))
    return root


SHAPES = {"host": "Test CPU (2 cores)", "isa": ["amx_int8"], "date": "2026-12-06", "batch": 64, "rounds": 5,
          "rows": [{"shape": "20:16,32,48", "x_teacher_fp32": 18.9, "x_teacher_int8": 2.56},
                   {"shape": "20:16,32,64", "x_teacher_fp32": 17.7, "x_teacher_int8": 2.45}]}
BARS = {"gap_pts": 1.0, "x_fp32": 12.0, "x_int8": 2.5}


def test_rows_match_the_pruned_shape_and_check_every_bar(tmp_path: Path) -> None:
    pruned = _run(tmp_path / "a", 20, {"distill": 0.8813, "prune": 0.8745, "qat": 0.8743, "compile": 0.8737}, 48)
    whole = _run(tmp_path / "b", 20, {"distill": 0.8813, "qat": 0.8810, "compile": 0.8805})
    partial = _run(tmp_path / "c", 14, {"distill": 0.8696, "prune": 0.8619}, 48)
    text, rows = frontier.section([pruned, whole, partial], SHAPES, 0.8894, BARS, "cmd")
    assert [r["shape"] for r in rows] == ["20:16,32,48", "20:16,32,64", "14:16,32,48"]
    assert rows[0]["gap_pts"] == pytest.approx(-1.57) and rows[0]["last_stage"] == "compile"
    assert rows[2]["last_stage"] == "prune" and rows[2]["x_teacher_fp32"] is None
    assert "shape not probed" in text and "not run" in text and "Test CPU" in text
    # b is within 1 point and 12x, but below 2.5x teacher-int8; a is fast enough but 1.57 points behind
    assert "Every bar met by: none of the recipes tried." in text
    fast = dict(SHAPES, rows=[dict(SHAPES["rows"][1], x_teacher_int8=2.6)])
    assert f"Every bar met by: `{whole}`" in frontier.section([whole], fast, 0.8894, BARS, "cmd")[0]
    # the run's own benchmark (paired final vs teacher rows) decides over the probe where it exists
    (whole / "benchmark").mkdir()
    (whole / "benchmark" / "BENCHMARKS.json").write_text(json.dumps({"paired": {
        "teacher-fp32": {"by_batch": {"64": {"ratio": 16.6}}}, "teacher-int8": {"by_batch": {"64": {"ratio": 2.4}}}}}))
    text, rows = frontier.section([whole], fast, 0.8894, BARS, "cmd")
    assert rows[0]["paired"] == {"teacher-fp32": 16.6, "teacher-int8": 2.4} and "16.60x / 2.40x" in text
    assert "none of the recipes tried" in text


def test_missing_inputs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "a", 20, {"distill": 0.88})
    assert frontier.main(["--run", str(run), "--shapes", str(tmp_path / "shapes.json"), "--teacher-metrics",
                          str(run / "distill" / "metrics.json"), "--out", str(tmp_path / "B.md")]) == 2
    assert "shapes.json: not found" in capsys.readouterr().out and not (tmp_path / "B.md").exists()
    (tmp_path / "shapes.json").write_text(json.dumps(SHAPES))
    assert frontier.main(["--run", str(run), "--shapes", str(tmp_path / "shapes.json"), "--teacher-metrics",
                          str(run / "distill" / "metrics.json"), "--out", str(tmp_path / "B.md")]) == 0
    assert "<!-- begin: frontier -->" in (tmp_path / "B.md").read_text() and (tmp_path / "B-frontier.png").stat().st_size
