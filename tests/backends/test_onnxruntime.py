"""ONNX Runtime backend: the uint8 activation rewrite, offline optimization, measured speed-up, honest dtype."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgepipe.backends import onnxruntime as ortb
from edgepipe.errors import EdgepipeError
from edgepipe.export.onnx_graph import constant_values
from edgepipe.types import ArtifactKind, DType
from tests.backends.conftest import make_profile, random_batch


def cpu_profile(**onnxruntime_options: str):
    return make_profile("generic-cpu-test", "onnxruntime", (DType.INT8, DType.FP32),
                        {"onnxruntime": onnxruntime_options})


def reference_outputs(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """ONNX semantics without ONNX Runtime's graph rewrites."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def zero_points(model: onnx.ModelProto, op_type: str) -> list[np.ndarray]:
    values = constant_values(model.graph)
    return [values[n.input[2]] for n in model.graph.node if n.op_type == op_type and len(n.input) == 3]


def test_uint8_rewrite_keeps_outputs_identical(qdq_onnx: Path) -> None:
    model = onnx.load(str(qdq_onnx))
    rewritten, n = ortb.qdq_activations_to_uint8(model)

    assert n == 3  # input, after conv1, before fc
    for zp in zero_points(rewritten, "QuantizeLinear"):
        assert zp.dtype == np.uint8 and int(zp) == 128
    assert not [zp for zp in zero_points(rewritten, "QuantizeLinear") if zp.dtype == np.int8]
    weights = [t for t in rewritten.graph.initializer if t.name.endswith("weight_int8")]
    assert len(weights) == 3 and all(numpy_helper.to_array(t).dtype == np.int8 for t in weights)
    x = random_batch(64)
    diff = np.abs(reference_outputs(rewritten, x) - reference_outputs(model, x)).max()
    assert diff <= 1e-6


def test_uint8_rewrite_on_a_shape_inferred_model_still_loads(qdq_onnx: Path, tmp_path: Path) -> None:
    """The export stage saves shape-inferred models; their value_info must not keep the old int8 types."""
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(qdq_onnx)))
    assert inferred.graph.value_info  # the precondition that once broke ONNX Runtime
    path = tmp_path / "inferred.onnx"
    onnx.save(inferred, str(path))
    artifact, _ = ortb.compile(path, cpu_profile(), DType.INT8, tmp_path / "out", warmup=1, iterations=2)
    x = random_batch(8)
    assert np.abs(ortb.load(artifact).infer(x) - reference_outputs(inferred, x)).max() <= 1e-5


def test_int8_compile_writes_optimized_model_and_measures_speedup(qdq_onnx: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    artifact, records = ortb.compile(qdq_onnx, cpu_profile(), DType.INT8, tmp_path, warmup=2, iterations=5,
                                     progress=lambda task, done, total, values: calls.append((task, done, total)))

    assert artifact.kind is ArtifactKind.ORT_OPTIMIZED and artifact.files == {"onnx": "model.ort.onnx"}
    assert (tmp_path / "model.ort.onnx").is_file() and artifact.quantized
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ort.onnx"]  # no temp files left
    assert records["activation_qdq_pairs_rewritten"] == 3
    assert records["settings"]["graph_optimization_level"] == "all"
    assert records["settings"]["activation_type"] == "uint8"
    speedup = records["speedup"]
    assert speedup["batch"] == 1 and speedup["baseline_p50_ms"] > 0 and speedup["optimized_p50_ms"] > 0
    assert speedup["ratio_p50"] == pytest.approx(speedup["baseline_p50_ms"] / speedup["optimized_p50_ms"])
    assert speedup["optimized"]["iterations"] == 5 and speedup["baseline"]["warmup"] == 2
    assert len(calls) == 10 and calls[-1] == ("onnxruntime: time optimized (batch 1)", 5, 5)
    optimized = onnx.load(str(tmp_path / "model.ort.onnx"))
    assert not [zp for zp in zero_points(optimized, "QuantizeLinear") if zp.dtype == np.int8]

    runner = ortb.load(artifact, threads=1)
    x = random_batch(32)
    assert runner.threads == 1 and runner.device.startswith("cpu: ")
    # The rewrite is exact and offline optimization equals ONNX Runtime's online one: same outputs.
    np.testing.assert_allclose(runner.infer(x), ortb.OrtRunner(qdq_onnx).infer(x), rtol=0, atol=1e-6)


def test_dtype_is_what_onnxruntime_executes(qdq_onnx: Path, qdq_onnx_norelu: Path, tmp_path: Path) -> None:
    # A ReLU between Conv and a symmetric int8 QuantizeLinear blocks QLinearConv: the convs run in float.
    blocked = ortb.OrtRunner(qdq_onnx)
    assert blocked.dtype == "fp32" and not blocked.compute_ops["int8"]
    _, records = ortb.compile(qdq_onnx, cpu_profile(), DType.INT8, tmp_path / "relu", warmup=1, iterations=2)
    assert records["runtime_dtype"] == "fp32" and "requested int8" in records["note"]

    fused = ortb.OrtRunner(qdq_onnx_norelu)
    assert fused.dtype == "int8" and fused.compute_ops["int8"].get("QLinearConv", 0) >= 1
    artifact, records = ortb.compile(qdq_onnx_norelu, cpu_profile(), DType.INT8, tmp_path / "norelu",
                                     warmup=1, iterations=2)
    assert records["runtime_dtype"] == "int8" and artifact.dtype is DType.INT8 and "note" not in records


def test_int8_activation_type_keeps_exported_form(qdq_onnx: Path, tmp_path: Path) -> None:
    _, records = ortb.compile(qdq_onnx, cpu_profile(activation_type="int8", graph_optimization_level="basic"),
                              DType.INT8, tmp_path, warmup=1, iterations=2)
    assert records["activation_qdq_pairs_rewritten"] == 0
    assert records["settings"]["graph_optimization_level"] == "basic"
    optimized = onnx.load(str(tmp_path / "model.ort.onnx"))
    assert zero_points(optimized, "QuantizeLinear") and all(zp.dtype == np.int8 for zp in zero_points(optimized, "QuantizeLinear"))


def test_float_compile(float_onnx: Path, tmp_path: Path) -> None:
    artifact, records = ortb.compile(float_onnx, cpu_profile(), DType.FP32, tmp_path, warmup=1, iterations=2)
    assert artifact.dtype is DType.FP32 and not artifact.quantized
    assert records["activation_qdq_pairs_rewritten"] == 0 and records["settings"]["activation_type"] is None
    assert ortb.load(artifact).dtype == "fp32"


def test_dtype_must_match_the_model(float_onnx: Path, qdq_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgepipeError, match="has no QuantizeLinear"):
        ortb.compile(float_onnx, cpu_profile(), DType.INT8, tmp_path)
    with pytest.raises(EdgepipeError, match="has QuantizeLinear"):
        ortb.compile(qdq_onnx, cpu_profile(), DType.FP32, tmp_path)


def test_missing_execution_provider_is_refused(qdq_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgepipeError, match="NoSuchExecutionProvider.*available"):
        ortb.compile(qdq_onnx, cpu_profile(execution_provider="NoSuchExecutionProvider"), DType.INT8, tmp_path)
