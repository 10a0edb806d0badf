"""The Jetson side without a Jetson: a deploy bundle's ``edgepipe_trt.py`` run in an environment holding only
the device requirements (numpy; torch, openvino, matplotlib and edgepipe unimportable) against a strict fake
TensorRT 10.3 whose names are exactly the real bindings' (tests/fake_tensorrt, from the
tensorrt-cu12-bindings 10.3 wheel) and a fake cuda-python runtime (tests/fake_cuda).

What this proves: the device path imports nothing else, calls only names TensorRT 10.3 has, exits non-zero
with one line when no engine is built, writes a results JSON that ``edgepipe import-results`` accepts, and a
DLA profile builds with static shapes. What it cannot prove: that TensorRT builds this ONNX, or the speed
and top-1 of a real engine (the fake computes nothing); those need the device.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepipe.backends import tensorrt as trtb
from edgepipe.backends import tensorrt_plan as plan
from edgepipe.engine.device_results import load_results
from edgepipe.types import DType
from tests.backends.conftest import INPUT_SHAPE, make_profile
from tests.support import run_device_script, without_tensorrt

pytestmark = without_tensorrt  # with TensorRT and a GPU here, compile builds a real engine, not a bundle


def jetson(name: str, **tensorrt: object):
    return make_profile(name, "tensorrt", (DType.INT8, DType.FP16), {"tensorrt": tensorrt}, device="gpu")


def make_bundle(onnx: Path, out: Path, profile) -> Path:
    trtb.compile(onnx, profile, DType.INT8, out)
    rng = np.random.default_rng(0)
    arrays = plan.validation_arrays(rng.integers(0, 256, (40, *INPUT_SHAPE), dtype=np.uint8),
                                    rng.integers(0, 10, 40), np.full(3, 0.5), np.full(3, 0.25), limit=32)
    plan.write_validation_set(out, arrays)
    return out


FAST = ["--warmup", "2", "--iterations", "5"]


def test_device_run_writes_results_in_the_documented_schema(qdq_onnx: Path, tmp_path: Path) -> None:
    profile = jetson("jetson-orin-nano", workspace_mb=1024, dla_cores=0, opt_batch=8, max_batch=16)
    bundle = make_bundle(qdq_onnx, tmp_path / "bundle", profile)
    rc, out, err, forbidden = run_device_script(bundle, ["run", *FAST], fakes=True)
    assert rc == 0, err
    assert forbidden == []  # numpy, the fake TensorRT and the fake CUDA runtime only
    assert (bundle / "engine" / "model.engine").is_file() and "wrote" in out
    results = load_results(bundle / "results.json")  # the schema import-results checks
    assert results["tensorrt_version"].startswith("10.3") and results["target"] == "jetson-orin-nano"
    assert results["latency"]["batch"] == 1 and results["throughput"]["batch"] == 8
    assert results["latency"]["iterations"] == 5 and results["latency"]["timer"].startswith("CUDA events")
    assert 0 < results["latency"]["p50_ms"] <= results["latency"]["p99_ms"]
    assert results["accuracy"]["images"] == 32 and 0 <= results["accuracy"]["top1"] <= 1
    assert results["engine"]["onnx_sha256"] and results["gpu"] == "Fake Orin (simulated)"
    built = json.loads((bundle / "engine" / "model.engine").read_bytes().split(b"\n", 1)[0])
    assert set(built["flags"]) >= {"INT8", "FP16"} and built["workspace"] == 1024 * 1024 * 1024
    # a second run reuses the engine built from the same ONNX and settings
    rc, _, err, _ = run_device_script(bundle, ["run", *FAST], fakes=True)
    assert rc == 0 and "engine up to date" in err


def test_failed_build_exits_non_zero_with_one_line(qdq_onnx: Path, tmp_path: Path) -> None:
    bundle = make_bundle(qdq_onnx, tmp_path / "bundle", jetson("jetson-orin-nano", dla_cores=0))
    rc, _, err, forbidden = run_device_script(bundle, ["run", *FAST], fakes=True, env={"FAKE_TRT_BUILD": "fail"})
    assert rc == 2 and forbidden == []
    assert len(err.strip().splitlines()) == 2  # the progress line, then the error
    assert err.strip().splitlines()[-1].startswith("edgepipe_trt: error:") and "could not build an engine" in err
    assert not (bundle / "engine" / "model.engine").exists() and not (bundle / "results.json").exists()


def test_no_device_exits_non_zero_with_one_line(qdq_onnx: Path, tmp_path: Path) -> None:
    bundle = make_bundle(qdq_onnx, tmp_path / "bundle", jetson("jetson-orin-nano", dla_cores=0))
    rc, _, err, _ = run_device_script(bundle, ["run"], fakes=True, env={"FAKE_CUDA_DEVICES": "0"})
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no CUDA device" in err


def test_dla_build_uses_static_shapes_and_the_dla_core(qdq_onnx: Path, tmp_path: Path) -> None:
    profile = jetson("jetson-agx-orin", workspace_mb=4096, dla_cores=2, use_dla_core=1, opt_batch=4, max_batch=16)
    bundle = make_bundle(qdq_onnx, tmp_path / "bundle", profile)
    rc, _, err, forbidden = run_device_script(bundle, ["run", *FAST], fakes=True)
    assert rc == 0 and forbidden == [], err
    built = json.loads((bundle / "engine" / "model.engine").read_bytes().split(b"\n", 1)[0])
    assert built["profile_shapes"] == [[4, *INPUT_SHAPE]] * 3  # min = opt = max
    assert built["default_device_type"] == "DLA" and built["DLA_core"] == 1 and "GPU_FALLBACK" in built["flags"]
    results = load_results(bundle / "results.json")
    assert results["latency"]["batch"] == 4  # a static engine is timed at its one batch size
    assert results["accuracy"]["images"] == 32  # the last, partial batch was padded


@pytest.mark.parametrize("version, says", [("8.6.2", "JetPack 6.0 ships TensorRT 8.6"),
                                           ("11.0.0", "TensorRT 11 removed")])
def test_unsupported_tensorrt_version_names_the_jetpack_release(qdq_onnx: Path, tmp_path: Path, version: str,
                                                                says: str) -> None:
    bundle = make_bundle(qdq_onnx, tmp_path / "bundle", jetson("jetson-orin-nano", dla_cores=0))
    rc, _, err, _ = run_device_script(bundle, ["check"], fakes=True, env={"FAKE_TRT_VERSION": version})
    assert rc == 2 and len(err.strip().splitlines()) == 1 and says in err
