"""Mixed precision under an accuracy budget (qat.max_drop, edgepipe.quantization.mixed): the sensitivity, the selection,
Q/DQ only around the INT8 layers in the exported ONNX, the fallback dtype per target and host.

The model: a depthwise-separable CNN whose pointwise layer reads an outlier channel. One channel of the
depthwise block's output is scaled up 1000x (BatchNorm's gamma and beta; ReLU is positively homogeneous) and
the pointwise weights that read it are scaled down 1000x, so the float function is unchanged; but the one
per-tensor INT8 range of that tensor is then set by the outlier channel, every other channel rounds to zero,
and the pointwise layer's per-channel weight scales zero the small weights. All-INT8 collapses; keeping
the pointwise layer in float restores it. This is the activation-outlier case the issue names.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import stages.compile as compile_stage
import stages.export as export_stage
import stages.qat as qat
from edgepipe.engine.artifacts import Artifact
from edgepipe.config import OptimConfig
from edgepipe.data.batches import DataBundle
from edgepipe.errors import EdgepipeError
from edgepipe.models.loading import load_torch_artifact, save_torch_artifact
from edgepipe.export.onnx_graph import float_layers, producers
from edgepipe.profiles import get_profile
from edgepipe.quantization.layers import QuantConv2d
from edgepipe.quantization.form import resolve_fallback
from edgepipe.engine.stage import StageContext
from edgepipe.training.loop import fit
from edgepipe.tasks.classification import cross_entropy_step
from edgepipe.types import DType
from tests.support import tiny_config, tiny_data

OUTLIER = 1000.0


class DepthwiseNet(nn.Module):
    """stem conv -> depthwise 3x3 -> pointwise 1x1 -> pool -> linear, BatchNorm + ReLU after each conv."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn2 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.bn2(self.pw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def depthwise_net(num_classes: int = 10) -> nn.Module:
    """Factory for the artifact's build spec: ``tests.test_mixed:depthwise_net``."""
    return DepthwiseNet(num_classes)


BUILD = {"factory": "tests.test_mixed:depthwise_net", "kwargs": {}}


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return tiny_data(n_train=256, n_val=256)


def _student(root: Path, data: DataBundle, outlier: bool) -> Artifact:
    torch.manual_seed(0)
    model = DepthwiseNet()
    fit(model, data, OptimConfig(epochs=8, lr=0.1, autocast="off"), cross_entropy_step, batch_size=32,
        checkpoint_dir=root / "checkpoints")
    if outlier:  # the same function, one channel 1000x larger between dw and pw
        with torch.no_grad():
            model.bn1.weight[0] *= OUTLIER
            model.bn1.bias[0] *= OUTLIER
            model.pw.weight[:, 0] /= OUTLIER
    return save_torch_artifact(model, BUILD, root / ("outlier" if outlier else "plain"), data.input_shape,
                               data.num_classes)


@pytest.fixture(scope="module")
def outlier_student(tmp_path_factory: pytest.TempPathFactory, data: DataBundle) -> Artifact:
    return _student(tmp_path_factory.mktemp("outlier"), data, outlier=True)


@pytest.fixture(scope="module")
def plain_student(tmp_path_factory: pytest.TempPathFactory, data: DataBundle) -> Artifact:
    return _student(tmp_path_factory.mktemp("plain"), data, outlier=False)


def _run_qat(out: Path, student: Artifact, data: DataBundle, **qat_fields) -> tuple:
    ctx = StageContext("qat", tiny_config(qat={"calibration_batches": 2, "calibration": "max",
                                               "optim": {"epochs": 1, "lr": 0.002, "autocast": "off"}, **qat_fields}),
                       get_profile("intel-xeon-amx"), out, student, teacher=student)
    ctx.__dict__["data"] = data
    return qat.run(ctx), ctx


def _export(out: Path, art: Artifact, data: DataBundle) -> Artifact:
    ctx = StageContext("export", tiny_config(), get_profile("intel-xeon-amx"), out, art)
    ctx.__dict__["data"] = data
    return export_stage.run(ctx).artifact


def _qdq_around(graph: onnx.GraphProto) -> dict[str, tuple[bool, bool]]:
    """Conv/Gemm node -> (input from a DequantizeLinear, weight from a DequantizeLinear)."""
    made_by = producers(graph)

    def dq(name: str) -> bool:
        node = made_by.get(name)
        while node is not None and node.op_type in ("Reshape", "Flatten"):
            node = made_by.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"
    return {n.name: (dq(n.input[0]), dq(n.input[1])) for n in graph.node if n.op_type in ("Conv", "Gemm")}


def test_a_budget_all_int8_misses_keeps_the_sensitive_layer_in_float_and_only_it_loses_its_qdq(
        tmp_path: Path, outlier_student: Artifact, data: DataBundle) -> None:
    result, _ = _run_qat(tmp_path / "qat", outlier_student, data, max_drop=1.0)
    rec, mix = result.records, result.records["mixed_precision"]
    assert result.skipped is None and result.artifact.quantized
    # all-INT8 collapses on the outlier, and the pointwise layer is the most sensitive by far
    assert mix["float_top1"] - mix["all_int8_top1"] > 0.2
    assert mix["sensitivity"][0]["layer"] == "pw" and mix["sensitivity"][0]["top1_drop_points"] > 20
    assert len(mix["sensitivity"]) == 4 and [r["rank"] for r in mix["sensitivity"]] == [1, 2, 3, 4]
    # the budget holds with at least one layer in float, pw first
    assert mix["outcome"] == "mixed" and rec["float_layers"][0] == "pw" and mix["selection"][-1]["within_budget"]
    assert mix["selection"][-1]["drop_points"] <= 1.0
    assert rec["fallback"]["dtype"] == mix["fallback_dtype"] == resolve_fallback(get_profile("intel-xeon-amx"))["dtype"]
    # saved, reloaded: the float layers are plain convolutions, the rest still quantized, outputs identical
    settings = json.loads(result.artifact.path("build").read_text())["quantization"]
    assert settings["float_layers"] == rec["float_layers"] and settings["fallback_dtype"] == rec["fallback"]["dtype"]
    model = load_torch_artifact(result.artifact)
    for name in ("stem", "dw", "pw"):
        assert isinstance(model.get_submodule(name), QuantConv2d) is (name not in rec["float_layers"])
    # the exported ONNX: no Q/DQ on the input or weight of exactly the float layers, on every other one both
    exported = _export(tmp_path / "export", result.artifact, data)
    graph = onnx.load(str(exported.path("onnx"))).graph
    around = _qdq_around(graph)
    float_nodes = {f"/{n}/{'Gemm' if n == 'fc' else 'Conv'}" for n in rec["float_layers"]}
    assert set(around) == {"/stem/Conv", "/dw/Conv", "/pw/Conv", "/fc/Gemm"}
    for node, (input_q, weight_q) in around.items():
        assert (input_q, weight_q) == ((False, False) if node in float_nodes else (True, True)), node
    assert {f["name"] for f in float_layers(graph)} == float_nodes
    assert exported.meta["fallback_dtype"] == rec["fallback"]["dtype"]
    # the report's comparison: the mix, all-INT8 and all-float, each timed on the target's runtime
    variants = {v["variant"]: v for v in mix["variants"]}
    assert set(variants) == {"all-int8", "chosen", "all-float"}
    assert variants["chosen"]["float_layers"] == len(rec["float_layers"]) and variants["all-float"]["float_layers"] == 4
    for v in variants.values():
        assert v["latency"]["kind"] == "measured" and v["latency"]["backend"] == "openvino" and v["latency"]["p50_ms"] > 0
        assert v["latency"]["interleaved_with"] == 2  # the three timed in alternating rounds, not one after another
    assert variants["chosen"]["drop_points"] <= 1.0 < variants["all-int8"]["drop_points"]


def test_the_mixed_model_compiles_with_its_float_layers_in_the_fallback_dtype(
        tmp_path: Path, outlier_student: Artifact, data: DataBundle) -> None:
    result, _ = _run_qat(tmp_path / "qat", outlier_student, data, max_drop=1.0, fallback_dtype="fp32")
    exported = _export(tmp_path / "export", result.artifact, data)
    ctx = StageContext("compile", tiny_config(), get_profile("intel-xeon-amx"), tmp_path / "compile", exported)
    ctx.__dict__["data"] = data
    rec = compile_stage.run(ctx).records
    n_float = sum(not n.startswith("fc") for n in result.records["float_layers"])
    assert rec["requested_dtype"] == "int8" and rec["runtime_dtype"] == "int8"
    assert rec["settings"]["config"]["INFERENCE_PRECISION_HINT"] == "f32"  # qat.fallback_dtype: fp32
    assert rec["float_convolutions"]["exported"] == n_float >= 1
    assert 1 <= rec["float_convolutions"]["runtime"] <= n_float
    assert not rec["fidelity"]["fails"]


def test_a_generous_budget_keeps_every_layer_int8(tmp_path: Path, plain_student: Artifact, data: DataBundle) -> None:
    result, _ = _run_qat(tmp_path / "qat", plain_student, data, max_drop=50.0)
    rec, mix = result.records, result.records["mixed_precision"]
    assert mix["outcome"] == "int8" and rec["float_layers"] == [] and len(mix["selection"]) == 2
    assert len(mix["sensitivity"]) == 4  # measured and recorded all the same
    variants = {v["variant"]: v for v in mix["variants"]}
    assert variants["chosen"]["same_as"] == "all-int8"  # the same graph, timed once ...
    assert variants["chosen"]["latency"] == variants["all-int8"]["latency"]
    assert variants["chosen"]["top1"] == pytest.approx(mix["selection"][-1]["top1"])  # ... but the model QAT kept
    exported = _export(tmp_path / "export", result.artifact, data)
    graph = onnx.load(str(exported.path("onnx"))).graph
    assert all(q == (True, True) for q in _qdq_around(graph).values()) and float_layers(graph) == []


def test_without_a_budget_nothing_is_measured_per_layer(tmp_path: Path, plain_student: Artifact,
                                                        data: DataBundle) -> None:
    result, _ = _run_qat(tmp_path / "qat", plain_student, data)
    assert result.records["mixed_precision"] is None and result.records["float_layers"] == []


def test_a_budget_even_all_float_layers_miss_keeps_the_float_model(tmp_path: Path, data: DataBundle) -> None:
    """A residual add of two outlier tensors: its INT8 inputs cost more than the budget whatever the layers are."""
    result, _ = _run_qat(tmp_path / "qat", _outlier_add_student(tmp_path, data), data, max_drop=0.0)
    assert result.skipped and "qat.max_drop 0.0" in result.skipped and "float model passes through" in result.skipped
    assert result.records["mixed_precision"]["outcome"] == "float"
    assert not result.artifact.quantized


class _AddNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.b(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(y), 1), 1))


def add_net(num_classes: int = 10) -> nn.Module:
    return _AddNet(num_classes)


def _outlier_add_student(root: Path, data: DataBundle) -> Artifact:
    torch.manual_seed(0)
    model = _AddNet()
    fit(model, data, OptimConfig(epochs=8, lr=0.1, autocast="off"), cross_entropy_step, batch_size=32,
        checkpoint_dir=root / "checkpoints")
    with torch.no_grad():  # +1000 on one channel of a, -1000 on the same channel of b: the sum is unchanged
        model.a.bias[0] += OUTLIER
        model.b.bias[0] -= OUTLIER
    return save_torch_artifact(model, {"factory": "tests.test_mixed:add_net", "kwargs": {}}, root / "add",
                               data.input_shape, data.num_classes)


# --- the fallback dtype, per target and host ------------------------------------------------------------------
def test_the_fallback_follows_what_openvino_reports_for_this_cpu() -> None:
    amx = get_profile("intel-xeon-amx")  # lists bf16 before fp32
    assert resolve_fallback(amx, caps=["FP32", "BF16", "INT8"])["dtype"] == "bf16"
    no_bf16 = resolve_fallback(amx, caps=["FP32", "INT8"])
    assert no_bf16["dtype"] == "fp32" and "reports no BF16" in no_bf16["reason"]
    assert resolve_fallback(get_profile("jetson-orin-nano"))["dtype"] == "fp16"
    assert resolve_fallback(get_profile("generic-cpu"))["dtype"] == "fp32"
    assert resolve_fallback(amx, "fp32") == {"dtype": "fp32", "source": "config", "reason": "qat.fallback_dtype"}
    with pytest.raises(EdgepipeError, match=r"qat.fallback_dtype: fp16 is not a float dtype of hardware_profiles/"
                                            r"intel-xeon-amx.yaml \(it lists bf16, fp32\)"):
        resolve_fallback(amx, "fp16")
    # this host: what its OpenVINO says decides, whichever CPU the tests run on
    import openvino as ov

    host_has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert resolve_fallback(amx)["dtype"] == ("bf16" if host_has_bf16 else "fp32")


def test_tensorrt_sets_fp16_for_the_float_layers_only_when_they_fall_back_to_fp16() -> None:
    from edgepipe.backends import tensorrt_plan as plan

    nano = get_profile("jetson-orin-nano")
    assert plan.build_settings(nano, DType.INT8, (3, 32, 32))["flags"] == ["INT8", "FP16"]
    assert plan.build_settings(nano, DType.INT8, (3, 32, 32), float_dtype=DType.FP32)["flags"] == ["INT8"]


def test_budget_split_must_be_held_out(tmp_path: Path, plain_student: Artifact, data: DataBundle) -> None:
    with pytest.raises(EdgepipeError, match=r"qat.budget_split: 'x' needs data.kind: imagefolder"):
        _run_qat(tmp_path / "qat", plain_student, data, max_drop=1.0, budget_split="x")


def test_budget_images_limit_the_measurement(tmp_path: Path, plain_student: Artifact, data: DataBundle) -> None:
    result, _ = _run_qat(tmp_path / "qat", plain_student, data, max_drop=50.0, budget_images=40)
    mix = result.records["mixed_precision"]
    assert mix["images"] == 40 and mix["measured_on"] == "validation"
    assert np.isfinite([r["kl_divergence"] for r in mix["sensitivity"]]).all()


def test_the_budget_is_measured_on_a_held_out_split_the_config_names(tmp_path: Path, plain_student: Artifact,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 5), ("calib", 7)):
        for label, cls in enumerate(("dark", "light")):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 60, (8, 8), dtype=np.uint8) + 150 * label, "L").save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    data = {"kind": "imagefolder", "path": str(tmp_path / "data"), "channels": 1, "batch_size": 4,
            "eval_batch_size": 4}

    def run(**qat_fields) -> dict:
        cfg = tiny_config(data=data, qat={"calibration_batches": 1, "optim": {"epochs": 1, "lr": 0.001,
                                                                               "autocast": "off"}, **qat_fields})
        ctx = StageContext("qat", cfg, get_profile("intel-xeon-amx"), tmp_path / "qat", plain_student,
                           teacher=plain_student)
        return qat.run(ctx).records["mixed_precision"]

    mix = run(max_drop=100.0, budget_split="calib")
    assert mix["measured_on"] == "held-out split calib" and mix["images"] == 14
    assert run(max_drop=100.0)["images"] == 10  # the validation split (test)
    with pytest.raises(EdgepipeError, match=r"qat.budget_split: 'train' is the training split"):
        run(max_drop=1.0, budget_split="train")


def test_a_jetson_target_keeps_fp16_float_layers_and_labels_its_latencies_as_estimates(
        tmp_path: Path, outlier_student: Artifact, data: DataBundle) -> None:
    """No GPU here: the variants' latencies are the profile's roofline estimates, labelled so, and the bundle's
    build settings carry the FP16 flag for the float layers (qat.fallback_dtype auto: fp16 on a Jetson)."""
    jetson = get_profile("jetson-orin-nano")
    cfg = tiny_config(qat={"calibration_batches": 2, "calibration": "max", "max_drop": 1.0,
                           "optim": {"epochs": 1, "lr": 0.002, "autocast": "off"}})
    ctx = StageContext("qat", cfg, jetson, tmp_path / "qat", outlier_student, teacher=outlier_student)
    ctx.__dict__["data"] = data
    result = qat.run(ctx)
    mix = result.records["mixed_precision"]
    assert result.records["form"]["activations"] == "int8" and mix["fallback_dtype"] == "fp16"
    assert mix["outcome"] == "mixed" and mix["float_layers"][0] == "pw"
    for v in mix["variants"]:
        assert v["latency"]["kind"] == "estimate" and "estimate" in v["latency"]["label"]
    chosen = next(v for v in mix["variants"] if v["variant"] == "chosen")
    assert "does not see the" in chosen["latency"]["note"]
    ctx = StageContext("export", tiny_config(), jetson, tmp_path / "export", result.artifact)
    ctx.__dict__["data"] = data
    exported = export_stage.run(ctx).artifact
    settings = plan_settings(exported)
    assert settings["flags"] == ["INT8", "FP16"]


def plan_settings(exported: Artifact) -> dict:
    from edgepipe.backends import tensorrt_plan as plan
    from edgepipe.backends.tensorrt_plan import onnx_input_shape

    return plan.build_settings(get_profile("jetson-orin-nano"), DType.INT8, onnx_input_shape(exported.path("onnx")),
                               float_dtype=DType(exported.meta["fallback_dtype"]))
