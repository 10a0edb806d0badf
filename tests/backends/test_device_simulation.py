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


def named_io_onnx(path: Path) -> Path:
    """Three named inputs of three dtypes (int64 ids, a bool mask, float pixels), two outputs (float ``logits``,
    int64 ``count``), a dynamic batch: what a text or detection model hands the device script."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    batch = "batch"
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"], name="/mul"),
             helper.make_node("Flatten", ["pixels"], ["flat"], name="/flatten"),
             helper.make_node("Concat", ["masked", "flat"], ["joined"], name="/concat", axis=1),
             helper.make_node("Gemm", ["joined", "w"], ["logits"], name="/fc/Gemm", transB=1),
             helper.make_node("Cast", ["mask"], ["mask_i"], to=TensorProto.INT64),
             helper.make_node("ReduceSum", ["mask_i", "axes"], ["count"], name="/count", keepdims=0)]
    graph = helper.make_graph(
        nodes, "named_io",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, 8]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [batch, 8]),
         helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10]),
         helper.make_tensor_value_info("count", TensorProto.INT64, [batch])],
        [numpy_helper.from_array(np.full((10, 56), 0.01, np.float32), "w"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# Runs as a bundle's edgepipe_trt.py (numpy, fake TensorRT and fake CUDA only) and drives the device module's
# Engine directly; prints one JSON object.
NAMED_IO_DRIVER = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("edgepipe_trt_device", {device!r})
d = importlib.util.module_from_spec(spec)
spec.loader.exec_module(d)
out = {{}}
def error(fn):
    try:
        fn()
    except d.DeviceError as e:
        return str(e)
    return None
shapes = {{"input_ids": [[1, 8], [4, 8], [16, 8]], "mask": [[1, 8], [4, 8], [16, 8]],
          "pixels": [[1, 3, 4, 4], [4, 3, 4, 4], [16, 3, 4, 4]]}}
settings = {{"workspace_bytes": 1 << 28, "flags": ["FP16"], "builder_optimization_level": 3,
            "input_name": "input_ids", "shapes": dict(zip(("min", "opt", "max"), shapes["input_ids"])),
            "input_shapes": {{n: dict(zip(("min", "opt", "max"), s)) for n, s in shapes.items()}}}}
d.build_engine({onnx!r}, settings, "named.engine")
eng = d.Engine("named.engine")
out["inputs"], out["outputs"] = list(eng.input_names), list(eng.output_names)
out["dtypes"] = {{n: str(t) for n, t in eng.dtypes.items()}}
rng = np.random.default_rng(0)
feeds = {{"input_ids": rng.integers(0, 100, (3, 8)).astype(np.int32), "mask": np.ones((3, 8), bool),
         "pixels": rng.standard_normal((3, 3, 4, 4)).astype(np.float32), "unused": np.zeros(1)}}
res = eng.run(feeds)
out["run"] = {{n: [str(a.dtype), list(a.shape)] for n, a in res.items()}}
out["run_other_batch"] = {{n: list(a.shape) for n, a in eng.run({{k: v[:2] for k, v in feeds.items()}}).items()}}
out["missing"] = error(lambda: eng.run({{"input_ids": feeds["input_ids"]}}))
out["wrong_kind"] = error(lambda: eng.run({{**feeds, "input_ids": feeds["input_ids"].astype(np.float32)}}))
out["too_big"] = error(lambda: eng.run({{k: np.repeat(v, 6, axis=0) for k, v in feeds.items() if k != "unused"}}))
ex = eng.example_feeds(2)
out["example"] = {{n: [str(a.dtype), list(a.shape), float(np.abs(a).sum())] for n, a in ex.items()}}
seed0 = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
out["example_pixels_seed0"] = bool(np.array_equal(ex["pixels"], seed0))
call = eng.bind(feeds)
eng.run({{k: v[:2] for k, v in feeds.items()}})  # other shapes in between: the bound call binds its own again
call()
out["bound_shape"] = list(eng.context.get_tensor_shape("input_ids"))
t = eng.time(2, 1, 3)
out["time"] = {{k: t[k] for k in ("batch", "iterations", "inputs")}}
out["time_feeds"] = eng.time(3, 0, 2, feeds=feeds)["inputs"]
out["time_mismatch"] = error(lambda: eng.time(4, 0, 1, feeds=feeds))
out["evaluate_multi_input"] = error(lambda: d.evaluate(eng, "val.npz", 4))
print(json.dumps(out))
"""


def test_engine_takes_and_returns_named_tensors_of_their_own_dtypes(tmp_path: Path) -> None:
    onnx = named_io_onnx(tmp_path / "named.onnx")
    bundle = tmp_path / "driver"
    bundle.mkdir()
    device = Path(trtb.device.__file__)
    (bundle / "edgepipe_trt.py").write_text(NAMED_IO_DRIVER.format(device=str(device), onnx=str(onnx)))
    rc, out, err, forbidden = run_device_script(bundle, [], fakes=True)
    assert rc == 0 and forbidden == [], err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["inputs"] == ["input_ids", "mask", "pixels"] and got["outputs"] == ["logits", "count"]
    assert got["dtypes"] == {"input_ids": "int64", "mask": "bool", "pixels": "float32", "logits": "float32",
                             "count": "int64"}
    assert got["run"] == {"logits": ["float32", [3, 10]], "count": ["int64", [3]]}  # int32 ids cast up to int64
    assert got["run_other_batch"] == {"logits": [2, 10], "count": [2]}
    assert "no value for input(s) ['mask', 'pixels']" in got["missing"]
    assert "input 'input_ids' is float32; the engine takes int64" in got["wrong_kind"]
    assert "batch 18 of input 'input_ids' is outside the engine's batch range 1..16" in got["too_big"]
    assert got["example"]["input_ids"][:2] == ["int64", [2, 8]] and got["example"]["input_ids"][2] >= 5 * 16
    assert got["example"]["mask"] == ["bool", [2, 8], 0.0]  # only a text model's attention_mask is all ones
    assert got["example"]["pixels"][:2] == ["float32", [2, 3, 4, 4]] and got["example_pixels_seed0"]
    assert got["bound_shape"] == [3, 8]
    assert got["time"] == {"batch": 2, "iterations": 3, "inputs": {"input_ids": "int64[2,8]", "mask": "bool[2,8]",
                                                                   "pixels": "float32[2,3,4,4]"}}
    assert got["time_feeds"] == {"input_ids": "int32[3,8]", "mask": "bool[3,8]", "pixels": "float32[3,3,4,4]"}
    assert "timing feeds have batch 3, not 4" in got["time_mismatch"]
    assert "val.npz holds images for one input" in got["evaluate_multi_input"]


EVALUATE_DRIVER = """
import importlib.util, json
spec = importlib.util.spec_from_file_location("edgepipe_trt_device", {device!r})
d = importlib.util.module_from_spec(spec)
spec.loader.exec_module(d)
settings = {{"workspace_bytes": 1 << 28, "flags": ["INT8", "FP16"], "builder_optimization_level": 3,
            "input_name": "input", "shapes": {{"min": [4, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [4, 3, 16, 16]}}}}
d.build_engine({onnx!r}, settings, "static.engine")
eng = d.Engine("static.engine")
read = []
class Spy(dict):
    def __getitem__(self, key):
        read.append(key)
        return dict.__getitem__(self, key)
run = eng.run
eng.run = lambda feeds: Spy(run(feeds))
acc = d.evaluate(eng, "val.npz", 4)
print(json.dumps({{"outputs": list(eng.output_names), "read": sorted(set(read)), "images": acc["images"]}}))
"""


def test_device_evaluation_reads_the_logits_output_and_pads_a_static_engine(qdq_onnx: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    model = onnx.load(str(qdq_onnx))  # a second output ahead of logits: the top-1 still reads "logits"
    model.graph.node.append(helper.make_node("Identity", [model.graph.output[0].name], ["aux"], name="/aux"))
    model.graph.output.insert(0, helper.make_tensor_value_info("aux", onnx.TensorProto.FLOAT, ["batch", 10]))
    onnx.save(model, str(tmp_path / "two_outputs.onnx"))
    bundle = tmp_path / "driver"
    bundle.mkdir()
    rng = np.random.default_rng(0)
    plan.write_validation_set(bundle, plan.validation_arrays(rng.integers(0, 256, (10, *INPUT_SHAPE), dtype=np.uint8),
                                                             rng.integers(0, 10, 10), np.full(3, 0.5),
                                                             np.full(3, 0.25), limit=10))
    (bundle / "edgepipe_trt.py").write_text(EVALUATE_DRIVER.format(device=str(Path(trtb.device.__file__)),
                                                                   onnx=str(tmp_path / "two_outputs.onnx")))
    rc, out, err, forbidden = run_device_script(bundle, [], fakes=True)
    assert rc == 0 and forbidden == [], err
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"outputs": ["aux", "logits"], "read": ["logits"], "images": 10}  # 4 + 4 + 2 padded to 4


def test_text_bundle_builds_sequence_profiles_and_evaluates_token_ids(tmp_path: Path) -> None:
    """A BERT-family classifier's bundle: one optimization-profile range per input over batch and sequence, the
    trtexec line naming every input, and on the (fake) device accuracy on the shipped token ids, each batch cut to
    its longest sentence, and batch-1 latency at sequence 32 and at the profile's opt length."""
    pytest.importorskip("transformers", reason="the text task needs transformers (pip install -e '.[text]')")
    import onnx
    import torch

    from edgepipe.data.text import TextBundle, tokenize, synthetic_split
    from edgepipe.export.onnx_export import export_onnx
    from edgepipe.models import hf
    from edgepipe.tasks import get_task

    task = get_task("text")
    torch.manual_seed(0)
    model = hf.load_classifier(hf.EMBEDDED, 2)
    path = tmp_path / "text.onnx"
    onnx.save(export_onnx(model, (48,), 17, task=task, num_classes=2), str(path))
    profile = jetson("jetson-orin-nano", workspace_mb=512, dla_cores=0, opt_batch=8, max_batch=32)
    dims = task.dynamic_dims({"input_shape": [48]})
    assert dims == {"sequence": (1, 48, 48)}
    bundle = tmp_path / "bundle"
    trtb.compile(path, profile, DType.FP16, bundle, dynamic_dims=dims)
    settings = json.loads((bundle / "build_settings.json").read_text())
    assert set(settings["input_shapes"]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert settings["input_shapes"]["attention_mask"] == {"min": [1, 1], "opt": [8, 48], "max": [32, 48]}
    assert "--minShapes=input_ids:1x1,attention_mask:1x1,token_type_ids:1x1" in settings["trtexec"]
    split = synthetic_split(20, 0, "val")
    tokens = tokenize(hf.load_tokenizer(hf.EMBEDDED), split, 48)
    data = TextBundle(tokens, torch.zeros(20, dtype=torch.int64), tokens,
                      torch.tensor([int(lab == "positive") for lab in split.labels]), ["negative", "positive"],
                      pad_id=0, max_length=48)
    arrays, _ = task.device_validation(data, 16)
    assert arrays["input_ids"].shape == (16, 48) and arrays["input_ids"].dtype == np.int32
    plan.write_validation_set(bundle, arrays)
    rc, out, err, forbidden = run_device_script(bundle, ["run", *FAST], fakes=True)
    assert rc == 0 and forbidden == [], err
    results = load_results(bundle / "results.json")
    assert results["accuracy"]["sentences"] == 16 and 0 <= results["accuracy"]["top1"] <= 1
    assert [r["sequence"] for r in results["latency_by_sequence"]] == [32, 48]
    assert results["latency_by_sequence"][0]["inputs"]["input_ids"].endswith("[1,32]")
    assert results["throughput"]["batch"] == 8
