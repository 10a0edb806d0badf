"""TensorRT backend: pure build settings and ONNX checks here; engine build and run on a CUDA device only."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import yaml

from edgepipe.backends import onnxruntime as ortb
from edgepipe.backends import tensorrt as trtb
from edgepipe.backends import tensorrt_device as device
from edgepipe.backends import tensorrt_plan as plan
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.types import ArtifactKind, DType
from tests.backends.conftest import INPUT_SHAPE, make_profile, random_batch

TRT_OK, TRT_REASON = trtb.available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=TRT_REASON or "requires TensorRT and a CUDA device")
without_trt = pytest.mark.skipif(TRT_OK, reason="TensorRT and a CUDA device are here: compile builds an engine, "
                                                "not a deploy bundle (see the engine tests)")


def jetson(name: str, dtypes: tuple[DType, ...] = (DType.INT8, DType.FP16), **tensorrt: object) -> HardwareProfile:
    return make_profile(name, "tensorrt", dtypes, {"tensorrt": tensorrt}, device="gpu")


# Shaped like the shipped Jetson profiles (their YAMLs are not relied on here).
ORIN_NANO = jetson("jetson-orin-nano", workspace_mb=1024, dla_cores=0)
ORIN_NX = jetson("jetson-orin-nx", workspace_mb=2048, dla_cores=2, max_batch=16, opt_batch=4)
AGX_ORIN_DLA = jetson("jetson-agx-orin", workspace_mb=4096, dla_cores=2, use_dla_core=1, builder_optimization_level=5)


@pytest.mark.parametrize(("profile", "dtype", "flags", "device_type", "workspace"), [
    (ORIN_NANO, DType.INT8, ["INT8", "FP16"], "GPU", 1 << 30),
    (ORIN_NANO, DType.FP16, ["FP16"], "GPU", 1 << 30),
    (ORIN_NX, DType.FP32, [], "GPU", 2 << 30),
    (AGX_ORIN_DLA, DType.INT8, ["INT8", "FP16", "GPU_FALLBACK"], "DLA", 4 << 30),
    (AGX_ORIN_DLA, DType.FP16, ["FP16", "GPU_FALLBACK"], "DLA", 4 << 30),
])
def test_build_settings(profile: HardwareProfile, dtype: DType, flags: list[str], device_type: str,
                        workspace: int) -> None:
    s = plan.build_settings(profile, dtype, INPUT_SHAPE)
    opts = profile.options.tensorrt
    assert s["flags"] == flags and s["device_type"] == device_type and s["workspace_bytes"] == workspace
    assert s["dla_core"] == opts.use_dla_core and s["input_name"] == "input" and s["dtype"] == dtype.value
    if device_type == "DLA":  # DLA engines are static: min = opt = max
        assert s["shapes"] == dict.fromkeys(("min", "opt", "max"), [opts.opt_batch, *INPUT_SHAPE])
    else:
        assert s["shapes"] == {"min": [1, *INPUT_SHAPE], "opt": [opts.opt_batch, *INPUT_SHAPE],
                               "max": [opts.max_batch, *INPUT_SHAPE]}
    assert s["builder_optimization_level"] == opts.builder_optimization_level
    json.dumps(s)  # plain data: goes into build_settings.json as is


@pytest.mark.parametrize(("profile", "dtype", "match"), [
    (jetson("orin-dla", dla_cores=2, use_dla_core=2), DType.INT8, r"use_dla_core is 2 but dla_cores is 2 \(valid: 0..1\)"),
    (jetson("orin-nano-dla", dla_cores=0, use_dla_core=0), DType.INT8, "the device has no DLA"),
    (jetson("orin-dla-fp32", dla_cores=2, use_dla_core=0), DType.FP32, "DLA runs only fp16 and int8"),
    (jetson("orin-batches", opt_batch=8, max_batch=4), DType.FP16, r"opt_batch \(8\) exceeds max_batch \(4\)"),
    (ORIN_NANO, DType.BF16, "cannot compile bf16"),
])
def test_build_settings_rejects_impossible_profiles(profile: HardwareProfile, dtype: DType, match: str) -> None:
    with pytest.raises(EdgepipeError, match=match):
        plan.build_settings(profile, dtype, INPUT_SHAPE)


def test_check_passes_on_exported_models(qdq_onnx: Path, float_onnx: Path) -> None:
    assert plan.check_onnx_for_tensorrt(qdq_onnx) == []
    assert plan.check_onnx_for_tensorrt(float_onnx) == []


@pytest.fixture(scope="module")
def uint8_onnx(qdq_onnx: Path, models_dir: Path) -> Path:
    model, n = ortb.qdq_activations_to_uint8(onnx.load(str(qdq_onnx)))
    assert n == 3
    onnx.save(model, str(models_dir / "qdq_uint8.onnx"))
    return models_dir / "qdq_uint8.onnx"


def test_check_reports_uint8_zero_point_128(uint8_onnx: Path) -> None:
    problems = plan.check_onnx_for_tensorrt(uint8_onnx)
    assert len([p for p in problems if "zero-point type is uint8" in p]) == 6  # 3 Q + 3 DQ
    assert len([p for p in problems if "zero-point is [128]" in p]) == 6
    assert len(problems) == 12 and all(p.split()[0] in ("QuantizeLinear", "DequantizeLinear") for p in problems)


def test_check_reports_weight_axis_1(qdq_onnx_axis1: Path) -> None:
    problems = plan.check_onnx_for_tensorrt(qdq_onnx_axis1)
    assert len(problems) == 2 and all("per-channel weight scales on axis 1" in p for p in problems)


def test_check_reports_opset_fixed_batch_and_unsupported_ops(float_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(float_onnx))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 12
    model.graph.node.append(onnx.helper.make_node("Unique", ["logits"], ["boxes"], name="unique"))
    model.graph.node.append(onnx.helper.make_node("QLinearConv", ["logits"], ["q"], name="qconv"))
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    problems = plan.check_onnx_for_tensorrt(path)
    assert any(p.startswith("opset 12 < 13") for p in problems)
    assert any("input 'input': batch dim is 8, not dynamic" in p for p in problems)
    assert any("Unique 'unique'" in p for p in problems) and any("QLinearConv 'qconv'" in p for p in problems)
    assert len(problems) == 4


def test_compile_refuses_an_incompatible_model(uint8_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgepipeError, match=r"not compatible with TensorRT \(12 problem\(s\)\)"):
        trtb.compile(uint8_onnx, ORIN_NANO, DType.INT8, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(TRT_OK, reason="TensorRT and a CUDA device are present: compile builds an engine instead")
@without_trt
def test_compile_without_cuda_writes_a_bundle(qdq_onnx: Path, tmp_path: Path) -> None:
    artifact, records = trtb.compile(qdq_onnx, ORIN_NANO, DType.INT8, tmp_path)

    files = {"onnx": "model.onnx", "profile": "profile.yaml", "settings": "build_settings.json",
             "readme": "README.md", "script": "build_engine.sh", "device_script": "edgepipe_trt.py"}
    assert artifact.kind is ArtifactKind.TENSORRT_BUNDLE and artifact.files == files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files.values())  # no engine, no temp files
    assert records["engine_built"] is False
    assert records["reason"] == f"engine not built: {TRT_REASON}"
    assert records["reason"].startswith("engine not built: requires TensorRT and a CUDA device")
    assert (tmp_path / "model.onnx").read_bytes() == qdq_onnx.read_bytes()
    assert HardwareProfile.model_validate(yaml.safe_load((tmp_path / "profile.yaml").read_text())) == ORIN_NANO
    settings = json.loads((tmp_path / "build_settings.json").read_text())
    expected = plan.build_settings(ORIN_NANO, DType.INT8, INPUT_SHAPE)
    assert settings == {"onnx": "model.onnx", "target": ORIN_NANO.name, **expected,
                        "trtexec": plan.trtexec_command(expected)}
    # the device script is the library's device module, verbatim
    assert (tmp_path / "edgepipe_trt.py").read_text() == Path(device.__file__).read_text()
    script = (tmp_path / "build_engine.sh").read_text()
    assert os.access(tmp_path / "build_engine.sh", os.X_OK)
    assert script.rstrip().endswith("python3 edgepipe_trt.py run")
    readme = (tmp_path / "README.md").read_text()
    assert "python3 edgepipe_trt.py run" in readme and "edgepipe import-results --run" in readme
    assert plan.trtexec_command(expected) in readme and "--system-site-packages" in readme and "JetPack 6.1" in readme
    assert "cuda-python" in readme
    with pytest.raises(EdgepipeError, match="bundle holds no engine; build it on the device with: python3 edgepipe_trt"):
        trtb.load(artifact)


@needs_trt
@pytest.mark.gpu
def test_engine_build_and_run_match_onnxruntime(qdq_onnx: Path, tmp_path: Path) -> None:
    artifact, records = trtb.compile(qdq_onnx, ORIN_NANO, DType.INT8, tmp_path)
    assert artifact.kind is ArtifactKind.TENSORRT_ENGINE and records["engine_built"] is True
    assert (tmp_path / "model.engine").stat().st_size > 0
    runner = trtb.load(artifact)
    x = random_batch(8)
    ours, theirs = runner.infer(x), ortb.OrtRunner(qdq_onnx).infer(x)
    assert ours.shape == (8, 10) and (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9
    assert runner.infer(x[:1]).shape == (1, 10)


@needs_trt
@pytest.mark.gpu
def test_engine_build_reports_parser_errors(float_onnx: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(float_onnx.read_bytes()[:100])
    settings = plan.build_settings(ORIN_NANO, DType.FP16, INPUT_SHAPE)
    with pytest.raises(EdgepipeError, match="ONNX parser failed"):
        trtb.build_engine(bad, settings, tmp_path / "x.engine")
    assert not (tmp_path / "x.engine").exists()


def test_trtexec_command_builds_the_same_engine() -> None:
    gpu = plan.build_settings(ORIN_NANO, DType.INT8, INPUT_SHAPE)
    line = plan.trtexec_command(gpu)
    opts = ORIN_NANO.options.tensorrt
    dims = "x".join(str(d) for d in INPUT_SHAPE)
    assert line.startswith("trtexec --onnx=model.onnx --saveEngine=engine/model.engine")
    assert f"--minShapes=input:1x{dims}" in line and f"--maxShapes=input:{opts.max_batch}x{dims}" in line
    assert "--int8 --fp16" in line and f"--memPoolSize=workspace:{opts.workspace_mb}M" in line
    assert "--exportLayerInfo=engine/layers.json" in line and "--useDLACore" not in line
    dla = plan.trtexec_command(plan.build_settings(AGX_ORIN_DLA, DType.INT8, INPUT_SHAPE))
    batch = AGX_ORIN_DLA.options.tensorrt.opt_batch
    assert "--useDLACore=1" in dla and "--allowGPUFallback" in dla
    assert all(f"--{k}Shapes=input:{batch}x{dims}" in dla for k in ("min", "opt", "max"))


@pytest.mark.parametrize("version, ok, says", [("10.3.0", True, ""), ("10.7.0.post1", True, ""),
                                               ("8.6.2", False, "JetPack 6.0 ships TensorRT 8.6"),
                                               ("11.0.0", False, "TensorRT 11 removed the INT8/FP16 builder flags")])
def test_tensorrt_version_check(version: str, ok: bool, says: str) -> None:
    problem = plan.version_problem(version)
    assert (problem is None) == ok and says in (problem or "")
