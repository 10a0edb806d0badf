"""The student-shape throughput probe (edgepipe.measure.shapes, `make bench-shapes`): every shape's INT8 graph timed
against the teacher's FP32 and INT8 graphs in alternating rounds, ratios per round, bad shapes refused."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgepipe.errors import EdgepipeError
from edgepipe.measure import shapes
from edgepipe.models.zoo import build_arch
from edgepipe.profiles import get_profile


def test_parse_shape() -> None:
    assert shapes.parse_shape("14:16,32,48") == (14, (16, 32, 48))
    for bad in ("14", "15:16,32,48", "14:16,32", "14:a,b,c", "2:16,32,64"):
        with pytest.raises(EdgepipeError, match="DEPTH:W1,W2,W3"):
            shapes.parse_shape(bad)


def test_measure_shapes_pairs_every_round(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    teacher = build_arch("cifar_resnet", {"depth": 14, "width": 4}).eval()
    result = shapes.measure_shapes(teacher, [(8, (4, 8, 16)), (8, (4, 8, 8))], get_profile("intel-xeon-amx"),
                                   batch=4, rounds=2, warmup=1, iterations=2, threads=1)
    assert [r["shape"] for r in result["rows"]] == ["8:4,8,16", "8:4,8,8"]
    assert len(result["per_round"]) == 2 and set(result["per_round"][0]) == {
        "teacher/fp32", "teacher/int8", "8:4,8,16/int8", "8:4,8,8/int8"}
    for row in result["rows"]:  # the ratio is the median of the per-round ratios, not a ratio of medians
        per = sorted(r[f"{row['shape']}/int8"] / r["teacher/fp32"] for r in result["per_round"])
        assert row["x_teacher_fp32"] == pytest.approx(sum(per) / 2)
        assert row["params"] > 0 and row["macs"] > 0
    assert result["rows"][1]["params"] < result["rows"][0]["params"]
    text = shapes.markdown(result, "cmd", "tiny.pt2")
    assert "| 8:4,8,16 |" in text and result["host"] in text and "alternating rounds" in text


def test_bad_teacher_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shapes.main(["--teacher", str(tmp_path / "missing.pt2"), "--shape", "14:16,32,48"]) == 2
    assert "missing.pt2: no such file" in capsys.readouterr().out
    assert shapes.main(["--teacher", str(tmp_path / "missing.pt2"), "--shape", "14:16"]) == 2
    assert not (tmp_path / "BENCHMARKS.md").exists()
