"""`edgepipe bench` on a run folder with real tiny artifacts: torch, float ONNX, a TensorRT bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgepipe.engine.artifacts import Artifact
from edgepipe.backends import get_backend
from edgepipe.measure.bench import run_bench
from edgepipe.config import BenchConfig
from edgepipe.models.loading import save_torch_artifact
from edgepipe.profiles import HardwareProfile
from edgepipe.host import host_has_native_bf16
from edgepipe.runtime.torch_runner import TorchRunner
from edgepipe.types import ArtifactKind, DType
from tests.support import TinyCNN

INPUT_SHAPE = (1, 8, 8)
BATCHES = [1, 4]


def _available(backend: str) -> bool:
    try:
        return get_backend(backend).available()[0]
    except ImportError:
        return False


def _profile(dtypes: tuple[DType, ...]) -> HardwareProfile:
    return HardwareProfile(name="test-cpu", backend="openvino", device="cpu", dtypes=dtypes,
                           peak_tops={d: 1.0 for d in dtypes}, memory_bandwidth_gbps=50.0, memory_gb=8.0)


def _export(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.eval(), (torch.randn(2, *INPUT_SHAPE),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def make_run(run: Path) -> Path:
    """teacher (torch), distill skipped (passes the teacher through), export (float ONNX), compile (TRT bundle)."""
    torch.manual_seed(0)
    model = TinyCNN()
    save_torch_artifact(model, {"factory": "tests.support:tiny_cnn", "kwargs": {}}, run / "teacher", INPUT_SHAPE, 10)
    _export(model, run / "export" / "model.onnx")
    # No input_shape in meta: bench reads C,H,W from the ONNX input.
    Artifact(kind=ArtifactKind.ONNX, root=run / "export", files={"onnx": "model.onnx"}).save()
    (run / "compile").mkdir()
    shutil.copyfile(run / "export" / "model.onnx", run / "compile" / "model.onnx")
    Artifact(kind=ArtifactKind.TENSORRT_BUNDLE, root=run / "compile", files={"onnx": "model.onnx"}, dtype=DType.FP32,
             meta={"target": "jetson-orin-nano", "reason": "engine not built: no CUDA device",
                   "build_command": "edgepipe compile --onnx model.onnx --target jetson-orin-nano --out engine"}).save()
    stages = [("teacher", "done", "teacher", None), ("distill", "skipped", "teacher", "distill.enabled is false"),
              ("export", "done", "export", None), ("compile", "done", "compile", None)]
    manifest = {"run": "tiny", "target": "test-cpu", "created": "2025-01-01T00:00:00+00:00", "stages": [
        {"name": n, "status": s, "dir": n, "artifact_dir": d, "skipped_reason": r} for n, s, d, r in stages]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[tuple], dict[str, set[str]]]:
    run = make_run(tmp_path_factory.mktemp("bench") / "run")
    before = {d.name: {p.name for p in d.iterdir()} for d in run.iterdir() if d.is_dir()}
    calls: list[tuple] = []
    result = run_bench(run, _profile((DType.INT8, DType.BF16, DType.FP32)),
                       BenchConfig(batch_sizes=BATCHES, warmup=1, iterations=3),
                       progress=lambda *a: calls.append(a), threads=1)
    return run, result, calls, before


def _rows(result: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in result["rows"] if all(r[k] == v for k, v in match.items())]


def _assert_timed(rows: list[dict[str, Any]]) -> None:
    assert sorted(r["batch"] for r in rows) == BATCHES
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["mean_ms"])
        assert (r["threads"], r["warmup"], r["iterations"]) == (1, 1, 3)
        assert r["device"].startswith("cpu: ")


def test_bench_times_torch_and_onnx_at_every_batch(bench: tuple) -> None:
    _, result, _, _ = bench
    torch_rows = _rows(result, stage="teacher", backend="pytorch", dtype="fp32")
    _assert_timed(torch_rows)
    assert all(r["status"] == "measured" and r["artifact_kind"] == "torch" for r in torch_rows)
    assert len(_rows(result, stage="teacher", backend="pytorch", dtype="bf16")) == (2 if host_has_native_bf16() else 0)
    _assert_timed(_rows(result, stage="export", backend="onnxruntime", dtype="fp32"))
    # a float torch stage is also exported for the bench and timed in the deployment runtimes
    teacher_ort = _rows(result, stage="teacher", backend="onnxruntime", dtype="fp32")
    _assert_timed(teacher_ort)
    assert all("exported to ONNX" in r["note"] for r in teacher_ort)
    if _available("openvino"):
        _assert_timed(_rows(result, stage="teacher", backend="openvino", dtype="fp32"))


@pytest.mark.skipif(not _available("openvino"), reason="requires the openvino backend")
def test_bench_compiles_float_onnx_with_openvino_and_records_the_achieved_dtype(bench: tuple) -> None:
    _, result, _, _ = bench
    ov_rows = _rows(result, stage="export", backend="openvino")
    assert {r["dtype"] for r in ov_rows} <= {"fp32", "bf16"}
    for dtype in {r["dtype"] for r in ov_rows}:
        _assert_timed(_rows(result, stage="export", backend="openvino", dtype=dtype))
    if not host_has_native_bf16():
        # bf16 falls back to fp32 here: measured once, and the note says so.
        assert {r["dtype"] for r in ov_rows} == {"fp32"}
        assert all("bf16 requested too: runs fp32 on this host" in r["note"] for r in ov_rows)


def test_bench_marks_skipped_stage_and_trt_bundle_as_not_run(bench: tuple) -> None:
    _, result, _, _ = bench
    (distill,) = _rows(result, stage="distill")
    assert distill["status"] == "not run: stage skipped (distill.enabled is false)" and distill["p50_ms"] is None
    assert distill["note"] == "passes teacher's artifact through"
    (trt,) = _rows(result, stage="compile", backend="tensorrt")
    assert trt["status"] == "not run: engine not built: no CUDA device" and trt["p50_ms"] is None
    assert "edgepipe compile --onnx model.onnx" in trt["note"]
    reference = _rows(result, stage="compile", backend="onnxruntime")
    _assert_timed(reference)
    assert all(r["status"] == "host reference" and r["note"].startswith("host reference: ") for r in reference)


def test_bench_writes_files_and_reports_progress(bench: tuple) -> None:
    run, result, calls, before = bench
    saved = json.loads((run / "bench" / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["conditions"] == {"batch_sizes": BATCHES, "warmup": 1, "iterations": 3, "threads": 1}
    assert saved["host"]["cpu"] and saved["target"] == "test-cpu"
    md = (run / "bench" / "bench.md").read_text()
    measured = [r for r in result["rows"] if r["p50_ms"] is not None]
    assert md.count("\n| teacher | torch | pytorch | fp32 |") == 2
    assert f"{measured[0]['p50_ms']:.3f}" in md
    assert "1 untimed warm-up + 3 timed iterations per figure, 1 thread;" in md
    assert (run / "bench" / "bench.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # One progress call per measurement, each with the figures just taken.
    timed = [c for c in calls if c[3]]
    assert len(timed) == len(measured)
    assert all(c[1] <= c[2] and c[3]["p50_ms"] > 0 for c in timed)
    # OpenVINO compiled into a temp folder: the run's stage folders are untouched.
    assert {d: {p.name for p in (run / d).iterdir()} for d in before} == before


def test_torch_runner_matches_the_model_and_restores_threads() -> None:
    model = TinyCNN().eval()
    x = np.random.default_rng(0).standard_normal((3, *INPUT_SHAPE)).astype(np.float32)
    threads = torch.get_num_threads()
    runner = TorchRunner(model, threads=1)
    out = runner.infer(x)
    assert torch.get_num_threads() == threads
    assert (runner.backend, runner.dtype, runner.threads) == ("pytorch", "fp32", 1)
    with torch.no_grad():
        np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    assert TorchRunner(model, autocast_dtype=torch.bfloat16).dtype == "bf16"
