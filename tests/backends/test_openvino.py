"""OpenVINO backend: IR on disk, runtime precisions read back from the compiled model, CPU fallback.

Every expectation about a float precision follows what OpenVINO reports about this host's CPU
(``OPTIMIZATION_CAPABILITIES``: "BF16" on CPUs with native bf16, AVX512-BF16 or AMX; "FP16" on CPUs
with native fp16), never a list of CPU flags, so the suite holds on AVX2-only, AVX-512 and AMX hosts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from edgepipe.backends import onnxruntime as ortb
from edgepipe.backends import openvino as ovb
from edgepipe.errors import EdgepipeError
from edgepipe.types import ArtifactKind, DType
from tests.backends.conftest import ACT_SCALE, make_profile, random_batch


def cpu_capabilities() -> set[str]:
    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def ov_profile(dtypes: tuple[DType, ...] = (DType.INT8, DType.FP32), **openvino_options: str):
    return make_profile("intel-cpu-test", "openvino", dtypes, {"openvino": openvino_options})


def test_qdq_model_runs_every_convolution_in_int8(qdq_onnx: Path, tmp_path: Path) -> None:
    steps: list[int] = []
    artifact, records = ovb.compile(qdq_onnx, ov_profile(), DType.INT8, tmp_path,
                                    progress=lambda task, done, total, values: steps.append(done))

    assert artifact.kind is ArtifactKind.OPENVINO_IR and artifact.files == {"xml": "model.xml", "bin": "model.bin"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]  # temp folder cleaned up
    assert records["int8_convolutions"] is True and artifact.dtype is DType.INT8
    assert records["conv_precisions"]["Convolution"] and set(records["conv_precisions"]["Convolution"]) <= {"i8", "u8"}
    assert records["measured_on"] == "CPU" and "note" not in records and steps == [1, 2, 3]

    runner = ovb.load(artifact, threads=1)
    convs = ovb.runtime_precisions(runner.compiled)["Convolution"]
    assert sum(convs.values()) == 2 and set(convs) <= {"i8", "u8"}
    assert runner.dtype == "int8" and runner.threads == 1
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1

    # Same model through ONNX Runtime: int8 rounding may differ by a step, the predictions may not.
    x = random_batch(256)
    ours, theirs = runner.infer(x), ortb.OrtRunner(qdq_onnx).infer(x)
    assert ours.shape == theirs.shape == (256, 10)
    assert np.abs(ours - theirs).max() < 4 * ACT_SCALE
    assert np.abs(ours - theirs).mean() < 0.1 * theirs.std()
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.97


def test_float_model_requested_int8_is_refused(float_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgepipeError,
                       match=r"not every convolution \(or, without any, fully connected layer\) runs int8"):
        ovb.compile(float_onnx, ov_profile(), DType.INT8, tmp_path)


def test_bf16_request_records_the_precision_that_runs(float_onnx: Path, tmp_path: Path) -> None:
    """Host property: "BF16" in OpenVINO's CPU capabilities -> bf16 really runs, else the request runs f32."""
    native = "BF16" in cpu_capabilities()
    artifact, records = ovb.compile(float_onnx, ov_profile((DType.BF16, DType.FP32)), DType.BF16, tmp_path)

    ran = "bf16" if native else "fp32"
    assert records["settings"]["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert records["compiled_inference_precision"] == ("bf16" if native else "f32")
    assert records["requested_dtype"] == "bf16" and records["runtime_dtype"] == ran
    assert artifact.dtype.value == ran
    assert artifact.meta["requested_dtype"] == "bf16" and artifact.meta["runtime_dtype"] == ran
    assert set(records["conv_precisions"]["Convolution"]) == {"bf16" if native else "f32"}
    assert ovb.load(artifact).dtype == ran


@pytest.mark.parametrize("device", ["GPU", "NPU"])
def test_absent_device_falls_back_to_cpu(device: str, float_onnx: Path, tmp_path: Path) -> None:
    if any(d.split(".")[0] == device for d in ov.Core().available_devices):
        pytest.skip(f"this host has a {device}, so there is nothing to fall back from")
    profile = ov_profile((DType.FP16, DType.FP32), device=device)
    artifact, records = ovb.compile(float_onnx, profile, DType.FP16, tmp_path)

    assert records["measured_on"] == "CPU" and records["note"] == f"target device {device} not present on this host"
    assert records["settings"]["device"] == device and artifact.meta["measured_on"] == "CPU"
    assert artifact.dtype.value == records["runtime_dtype"]  # what the CPU ran, not what the profile asked
    # Host property: the float precisions OpenVINO reports for this CPU. An fp16 request runs fp16 where the
    # CPU has it, else OpenVINO's next choice (bf16 where native), else fp32; what ran is what is recorded.
    caps = cpu_capabilities()
    allowed = {"fp32"} | ({"bf16"} if "BF16" in caps else set()) | ({"fp16"} if "FP16" in caps else set())
    assert records["runtime_dtype"] in allowed
    if not {"BF16", "FP16"} & caps:
        assert records["runtime_dtype"] == "fp32"
    assert artifact.meta["note"] == records["note"]
    runner = ovb.load(artifact)
    assert runner.device.startswith("cpu: ") and runner.infer(random_batch(2)).shape == (2, 10)


def test_runtime_precisions_counts_all_layers_on_request(qdq_onnx: Path) -> None:
    core = ov.Core()
    compiled = core.compile_model(ov.convert_model(str(qdq_onnx)), "CPU")
    every = ovb.runtime_precisions(compiled, layer_types=None)
    assert "FakeQuantize" in every and "Convolution" in every
    assert set(ovb.runtime_precisions(compiled)) <= set(ovb.COMPUTE_LAYERS)


def test_the_ir_does_not_depend_on_what_the_process_converted_before(qdq_onnx: Path, tmp_path: Path) -> None:
    """OpenVINO names the ops it creates from a process-wide counter: without stable_names the same ONNX gives another
    model.xml after other conversions (a resumed run's compile hash would then differ from an uninterrupted run's)."""
    first = ovb.save_ir(ovb.convert(qdq_onnx), tmp_path / "a")
    for _ in range(3):
        ovb.convert(qdq_onnx)  # advances the counter
    raw = ovb.convert(qdq_onnx)
    assert ovb.stable_names(raw) > 0  # the test means something: there were counter names to replace
    second = ovb.save_ir(ovb.convert(qdq_onnx), tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a" / "model.bin").read_bytes() == (tmp_path / "b" / "model.bin").read_bytes()
