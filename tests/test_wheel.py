"""A built wheel carries the stages, the hardware profiles and the recipes, so `pip install edgepipe` works
outside a checkout."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_stages_profiles_and_configs(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("edgepipe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for stage in ("teacher", "distill", "prune", "qat", "export", "compile"):
        assert f"stages/{stage}.py" in names
    for profile in ROOT.glob("hardware_profiles/*.yaml"):
        assert f"hardware_profiles/{profile.name}" in names
    assert "configs/digits.yaml" in names
    assert {"edgepipe/cli/__init__.py", "edgepipe/engine/pipeline.py", "edgepipe/backends/openvino.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgepipe = edgepipe.__main__:entry" in zipfile.ZipFile(wheel).read(entry).decode()
