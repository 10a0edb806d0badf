"""Self-check of the strict fake TensorRT 10.3 (tests/fake_tensorrt/tensorrt) and its names reference.

The fake is only ever imported in subprocesses with ``tests/fake_tensorrt`` first on ``sys.path``, so it
never shadows a real ``tensorrt`` in this process. Each subprocess takes well under a second.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NAMES = json.loads((HERE / "tensorrt_10_3_names.json").read_text())
REPO = HERE.parent.parent


def run_fake(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` with the fake importable as ``tensorrt``; it must print one JSON object last."""
    boot = f"import sys; sys.path.insert(0, {str(HERE)!r})\n" + code
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_TRT_")}
    proc = subprocess.run([sys.executable, "-c", boot], check=False, capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE = """
import json, tensorrt as trt
out = {"file": trt.__file__, "version": trt.__version__}
def probe(key, fn):
    try:
        value = fn()
        out[key] = ["ok", repr(value)]
    except Exception as e:
        out[key] = [type(e).__name__, str(e)]
builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
probe("Builder", lambda: trt.Builder)
probe("INT8", lambda: trt.BuilderFlag.INT8)
probe("WORKSPACE", lambda: trt.MemoryPoolType.WORKSPACE)
probe("severity", lambda: trt.Logger.WARNING is trt.Logger.Severity.WARNING is trt.ILogger.Severity.WARNING)
probe("NOT_A_FLAG", lambda: trt.BuilderFlag.NOT_A_FLAG)
probe("build_engine", lambda: builder.build_engine)  # removed in TensorRT 10
probe("class_build_engine", lambda: trt.Builder.build_engine)
probe("IEngineInspector", lambda: trt.IEngineInspector)  # the real class is EngineInspector
probe("set_unknown", lambda: setattr(builder.create_builder_config(), "not_a_setting", 1))
probe("set_readonly", lambda: setattr(builder, "num_DLA_cores", 4))
probe("set_writable", lambda: setattr(builder.create_builder_config(), "DLA_core", 1))
probe("no_constructor", lambda: trt.IBuilderConfig())
probe("unsimulated", lambda: builder.is_network_supported(None, None))
probe("enum_arg", lambda: builder.create_builder_config().set_flag(1))
probe("nptype", lambda: trt.nptype(trt.DataType.HALF).__name__)
probe("dla_cores", lambda: builder.num_DLA_cores)
module_names = sorted(n for n in dir(trt) if not n.startswith("__") or n == "__version__")
out["module_names"] = module_names
out["BuilderFlag"] = sorted(trt.BuilderFlag.__members__)
print(json.dumps(out))
"""


def test_names_reference_is_tensorrt_10_3_from_the_wheel() -> None:
    assert NAMES["version"].startswith("10.3")
    wheel = NAMES["wheel"]
    assert wheel["file"].startswith("tensorrt_cu12_bindings-10.3") and "cp311" in wheel["file"]
    assert len(wheel["sha256"]) == 64 and int(wheel["sha256"], 16) >= 0
    assert all(names == sorted(names) for names in [NAMES["module"], *NAMES["classes"].values(), *NAMES["enums"].values()])
    for name in ("Builder", "IBuilderConfig", "INetworkDefinition", "OnnxParser", "IOptimizationProfile", "Runtime",
                 "ICudaEngine", "IExecutionContext", "EngineInspector", "IHostMemory", "Logger", "Dims"):
        assert name in NAMES["module"] and name in NAMES["classes"], name
    assert "build_engine" not in NAMES["classes"]["Builder"]  # TensorRT 10 removed it
    assert {"INT8", "FP16", "GPU_FALLBACK"} <= set(NAMES["enums"]["BuilderFlag"])


def test_fake_has_exactly_the_real_names() -> None:
    out = run_fake(PROBE)
    assert Path(out["file"]).parent == HERE / "tensorrt"
    assert out["version"] == NAMES["version"]
    assert out["module_names"] == NAMES["module"]
    assert out["BuilderFlag"] == NAMES["enums"]["BuilderFlag"]
    for key in ("Builder", "INT8", "WORKSPACE", "set_writable"):
        assert out[key][0] == "ok", (key, out[key])
    assert out["severity"] == ["ok", "True"] and out["nptype"] == ["ok", "'float16'"] and out["dla_cores"] == ["ok", "2"]
    for key in ("NOT_A_FLAG", "build_engine", "class_build_engine", "IEngineInspector", "set_unknown", "set_readonly"):
        assert out[key][0] == "AttributeError", (key, out[key])
    assert out["no_constructor"][0] == "TypeError" and "No constructor defined" in out["no_constructor"][1]
    assert out["unsimulated"][0] == "NotImplementedError"
    assert out["enum_arg"][0] == "TypeError"


def test_fake_refuses_to_implement_a_name_tensorrt_lacks() -> None:
    out = run_fake("""
import json
from tensorrt import tensorrt as impl
class Liar:
    def build_engine(self):
        pass
try:
    impl._honesty_check("Builder", Liar, impl.Builder._fake_allowed)
    print(json.dumps({"raised": None}))
except ImportError as e:
    print(json.dumps({"raised": str(e)}))
""")
    assert out["raised"] and "Builder.build_engine" in out["raised"]


FLOW = """
import json, os, tensorrt as trt
onnx_path = os.environ["ONNX_PATH"]
logger = trt.Logger(trt.Logger.WARNING)
builder = trt.Builder(logger)
network = builder.create_network(0)
parser = trt.OnnxParser(network, logger)
out = {"parsed": parser.parse_from_file(onnx_path), "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)]}
config = builder.create_builder_config()
config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
for flag in ("INT8", "FP16"):
    config.set_flag(getattr(trt.BuilderFlag, flag))
config.builder_optimization_level = 2
config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
profile = builder.create_optimization_profile()
try:
    profile.set_shape("input", (8, 3, 4, 4), (4, 3, 4, 4), (16, 3, 4, 4))
except ValueError:
    out["bad_profile_rejected"] = True
profile.set_shape("input", (1, 3, 4, 4), (8, 3, 4, 4), (16, 3, 4, 4))
out["profile_index"] = config.add_optimization_profile(profile)
serialized = builder.build_serialized_network(network, config)
out["built"] = serialized is not None
if serialized is not None:
    data = bytes(memoryview(serialized))
    out["header"] = json.loads(data.split(b"\\n", 1)[0])
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    out["io"] = [[n, engine.get_tensor_mode(n).name, trt.nptype(engine.get_tensor_dtype(n)).__name__,
                  list(engine.get_tensor_shape(n))] for n in names]
    out["profile"] = [list(d) for d in engine.get_tensor_profile_shape("input", 0)]
    context = engine.create_execution_context()
    out["shape_in_range"] = context.set_input_shape("input", (4, 3, 4, 4))
    out["output_shape"] = list(context.get_tensor_shape("output"))
    out["run_without_addresses"] = context.execute_async_v3(0)
    context.set_tensor_address("input", 0x1000)
    context.set_tensor_address("output", 0x2000)
    out["run"] = context.execute_async_v3(0)
    out["shape_out_of_range"] = context.set_input_shape("input", (32, 3, 4, 4))
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    out["layers"] = [[x["LayerType"], x["Inputs"][0]["Format/Datatype"]] for x in info["Layers"]]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    init = [numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w"),
            numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
            numpy_helper.from_array(np.full((10, 4), 0.1, np.float32), "fw")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
             helper.make_node("Conv", ["x", "w"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="/pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="/flatten"),
             helper.make_node("Gemm", ["f", "fw"], ["output"], name="/fc/Gemm", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])], init)
    path = tmp_path_factory.mktemp("onnx") / "tiny_qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_simulated_build_and_run(qdq_onnx: Path) -> None:
    out = run_fake(FLOW, {"ONNX_PATH": str(qdq_onnx)})
    assert out["parsed"] and out["errors"] == [] and out["bad_profile_rejected"] and out["profile_index"] == 0
    assert out["built"]
    header = out["header"]
    assert header["version"] == NAMES["version"] and header["flags"] == ["FP16", "INT8"]
    assert header["workspace"] == 1 << 30 and header["builder_optimization_level"] == 2
    assert header["profiling_verbosity"] == "DETAILED" and header["default_device_type"] == "GPU"
    assert header["profile_shapes"] == [[1, 3, 4, 4], [8, 3, 4, 4], [16, 3, 4, 4]]
    assert out["io"] == [["input", "INPUT", "float32", [-1, 3, 4, 4]], ["output", "OUTPUT", "float32", [-1, 10]]]
    assert out["profile"] == header["profile_shapes"]
    assert out["shape_in_range"] and out["output_shape"] == [4, 10]
    assert out["run_without_addresses"] is False and out["run"] is True and out["shape_out_of_range"] is False
    assert out["layers"][0] == ["CaskConvolution", "Thirty-two wide channel vectorized row major Int8 format"]


def test_build_failure_and_dla_scenarios(qdq_onnx: Path) -> None:
    assert run_fake(FLOW, {"ONNX_PATH": str(qdq_onnx), "FAKE_TRT_BUILD": "fail"})["built"] is False
    dla = FLOW.replace('config.builder_optimization_level = 2',
                       'config.default_device_type = trt.DeviceType.DLA; config.DLA_core = 1')
    assert run_fake(dla, {"ONNX_PATH": str(qdq_onnx)})["built"] is False  # dynamic shapes on DLA, no GPU_FALLBACK
    fallback = dla.replace('("INT8", "FP16")', '("INT8", "FP16", "GPU_FALLBACK")')
    out = run_fake(fallback, {"ONNX_PATH": str(qdq_onnx)})
    assert out["built"] and out["header"]["default_device_type"] == "DLA" and out["header"]["DLA_core"] == 1
    assert run_fake(fallback, {"ONNX_PATH": str(qdq_onnx), "FAKE_TRT_DLA_CORES": "1"})["built"] is False  # no core 1


def test_edgepipe_uses_only_real_tensorrt_10_3_names() -> None:
    """Every ``trt.X.Y`` in the TensorRT backend modules, and the methods they call on TensorRT objects."""
    sources = [REPO / "edgepipe" / "backends" / name for name in ("tensorrt.py", "tensorrt_device.py")]
    chains = set()
    for source in (s for s in sources if s.is_file()):
        for node in ast.walk(ast.parse(source.read_text())):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if parts and isinstance(cur, ast.Name) and cur.id == "trt":
                chains.add(tuple(reversed(parts)))
    missing = []
    for chain in chains:
        members = NAMES["classes"].get(chain[0], []) + NAMES["enums"].get(chain[0], [])
        if chain[0] not in NAMES["module"] or (len(chain) > 1 and chain[1] not in members):
            missing.append(".".join(chain))
    used = {"Builder": ["create_network", "create_builder_config", "create_optimization_profile",
                        "build_serialized_network", "num_DLA_cores"],
            "OnnxParser": ["parse_from_file", "num_errors", "get_error"],
            "IBuilderConfig": ["set_memory_pool_limit", "set_flag", "builder_optimization_level", "profiling_verbosity",
                               "default_device_type", "DLA_core", "add_optimization_profile"],
            "IOptimizationProfile": ["set_shape"], "Runtime": ["deserialize_cuda_engine"],
            "ICudaEngine": ["num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                            "get_tensor_profile_shape", "create_execution_context", "create_engine_inspector"],
            "EngineInspector": ["get_engine_information"],
            "IExecutionContext": ["set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3"],
            "BuilderFlag": ["INT8", "FP16", "GPU_FALLBACK"]}
    for cls, names in used.items():
        have = NAMES["classes"].get(cls, []) + NAMES["enums"].get(cls, [])
        missing += [f"{cls}.{n}" for n in names if n not in have]
    assert not missing, f"not in TensorRT {NAMES['version']}: {sorted(missing)}"
