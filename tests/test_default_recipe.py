"""The embedded default recipe (digits), run for real once: the issue's acceptance figures.

Student params <= 1/3 of the teacher's, pruned MACs <= 60% of the unpruned student's, final accuracy
within 2 points of the teacher's, and every stage folder has its metrics. ~4 minutes on 2 cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepipe.cli import main
from edgepipe.stage import STAGE_ORDER

pytestmark = pytest.mark.e2e


def test_default_digits_pipeline_meets_targets(tmp_path: Path) -> None:
    run = tmp_path / "digits-jetson"
    assert main(["run", "--config", "digits", "--target", "jetson", "--run", str(run)]) == 0
    m = {s: json.loads((run / s / "metrics.json").read_text()) for s in STAGE_ORDER}
    assert m["distill"]["params"] <= m["teacher"]["params"] / 3
    assert m["prune"]["macs"] <= 0.60 * m["distill"]["macs"]
    teacher_top1 = m["teacher"]["accuracy"]["top1"]
    for final in ("qat", "export", "compile"):
        assert m[final]["accuracy"]["top1"] >= teacher_top1 - 0.02, final
    assert m["export"]["artifact"]["dtype"] == "int8"
    assert m["compile"]["artifact"]["kind"] == "tensorrt_bundle"
