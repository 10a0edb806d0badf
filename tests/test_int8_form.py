"""Issue 7's rules on tiny models: where the quantizers sit (residual adds, concats, shared tensors),
which form each target gets on which CPU, and the compile stage's fidelity check.

Host properties the expectations follow are named where they are used: ``exact_8bit_weights_on_cpu()``
(VNNI or AMX in the CPU flags) decides 7 or 8-bit weights on a CPU target.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgepipe.backends.onnxruntime import OrtRunner, dequantize_after_reshapes
from edgepipe.errors import EdgepipeError
from edgepipe.models.zoo import CifarResNet
from edgepipe.profiles import get_profile
from edgepipe.quantization.calibration import calibrate
from edgepipe.quantization.fakequant import insert_fake_quant, quant_settings
from edgepipe.quantization.layers import activation_quantizers
from edgepipe.quantization.placement import placement_of
from edgepipe.quantization.cpu_form import exact_8bit_weights_on_cpu
from edgepipe.quantization.form import resolve_form
from edgepipe.export.onnx_export import export_onnx, fold_weight_quantizers

SHAPE = (3, 16, 16)


class ConcatNet(nn.Module):
    """Two branches merged by a concat that feeds a convolution (an Inception/DenseNet-style merge)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.b(x) * 3.0], dim=1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.head(y)), 1), 1))


def _exported(model: nn.Module, shape: tuple[int, ...] = SHAPE) -> onnx.ModelProto:
    proto = export_onnx(model.eval(), shape, 17)
    fold_weight_quantizers(proto)
    return proto


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


# --- form ---------------------------------------------------------------------------------------------
def test_tensorrt_form_is_int8_zero_point_0_with_8_bit_weights_on_any_host() -> None:
    jetson = get_profile("jetson")
    for isa in [(), ("avx2",), ("avx2", "avx512f", "avx512_vnni"), ("amx_int8", "amx_bf16")]:
        form = resolve_form(jetson, isa=isa)
        assert (form["activations"], form["weight_bits"]) == ("int8", 8)
    with pytest.raises(EdgepipeError, match="TensorRT takes int8 with zero-point 0 only"):
        resolve_form(jetson, activations="uint8_after_relu")


@pytest.mark.parametrize("target", ["intel-xeon-amx", "generic-cpu"])
def test_cpu_form_follows_the_cpus_int8_dot_product(target: str) -> None:
    profile = get_profile(target)
    assert resolve_form(profile, isa=("avx2",))["weight_bits"] == 7  # vpmaddubsw: int16 pair sums saturate
    for isa in [("avx2", "avx512_vnni"), ("avx2", "avx_vnni"), ("amx_int8",)]:
        assert resolve_form(profile, isa=isa)["weight_bits"] == 8  # int32 accumulation
    assert all(resolve_form(profile, isa=i)["activations"] == "uint8_after_relu" for i in [(), ("amx_int8",)])
    # A recipe may pin either choice; the record says so.
    pinned = resolve_form(profile, "int8", 7, isa=("amx_int8",))
    assert (pinned["activations"], pinned["weight_bits"]) == ("int8", 7)
    assert pinned["source"] == {"activations": "config", "weight_bits": "config"}


def test_this_hosts_form_follows_its_cpu_flags() -> None:
    """Host property: VNNI/AMX in /proc/cpuinfo (exact_8bit_weights_on_cpu) -> 8-bit weights, else 7."""
    form = resolve_form(get_profile("intel-xeon-amx"))
    assert form["weight_bits"] == (8 if exact_8bit_weights_on_cpu() else 7)
    assert form["host"]["isa"] and form["host"]["cpu"] and form["reason"]
    assert "INT8" in form["host"]["openvino_cpu_capabilities"]


# --- placement ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("activations", ["int8", "uint8_after_relu"])
def test_residual_adds_take_both_inputs_quantized_and_shared_tensors_one_quantizer(activations: str) -> None:
    torch.manual_seed(0)
    model = insert_fake_quant(CifarResNet(8, width=4).eval(), quant_settings(activations=activations), SHAPE)
    plan = placement_of(model)
    adds = {c for p in plan for c, op in p["consumers"] if op == "Add"}
    assert len(adds) == 3 and all(sum(c == a for p in plan for c, _ in p["consumers"]) == 2 for a in adds)
    shared = [p for p in plan if {op for _, op in p["consumers"]} == {"Conv2d", "Add"}]
    assert shared, "a block input read by a convolution and an add has one quantizer"
    unsigned = [p["name"] for p in plan if not p["signed"]]
    if activations == "int8":
        assert not unsigned
    else:  # ReLU outputs (and their pooling) are unsigned; pre-add conv outputs and the normalized input signed
        assert unsigned and all(n.startswith(("relu", "adaptive_avg_pool2d")) for n in unsigned)
        assert {p["name"] for p in plan if p["signed"]} == {"x"} | {n for n in (p["name"] for p in plan) if "bn2" in n or "shortcut" in n}
    calibrate(model, [torch.randn(8, *SHAPE)], "max")
    graph = _exported(model).graph
    producers = _producers(graph)
    onnx_adds = [n for n in graph.node if n.op_type == "Add"]
    assert len(onnx_adds) == 3
    assert all(producers[i].op_type == "DequantizeLinear" for n in onnx_adds for i in n.input)
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == len(plan)  # one Q/DQ pair per quantized tensor, not one per consumer


def test_concat_inputs_share_one_scale() -> None:
    torch.manual_seed(0)
    model = insert_fake_quant(ConcatNet().eval(), quant_settings(activations="uint8_after_relu"), SHAPE)
    grouped = [q for q in activation_quantizers(model).values() if q.group]
    assert len(grouped) == 2 and len({q.group for q in grouped}) == 1
    assert all(q.signed for q in grouped)  # one branch can be negative, so the shared form is signed
    calibrate(model, [torch.randn(8, *SHAPE)], "max")
    assert float(grouped[0].amax) == float(grouped[1].amax) > 0
    graph = _exported(model).graph
    producers = _producers(graph)
    concat = next(n for n in graph.node if n.op_type == "Concat")
    dqs = [producers[i] for i in concat.input]
    assert all(d.op_type == "DequantizeLinear" for d in dqs)
    from edgepipe.export.onnx_graph import constant_values

    values = constant_values(graph)
    assert len({float(values[d.input[1]]) for d in dqs}) == 1


def test_reloading_checks_the_trained_placement() -> None:
    settings = quant_settings(activations="uint8_after_relu")
    trained = placement_of(insert_fake_quant(CifarResNet(8, width=4), settings, SHAPE))
    rebuilt = insert_fake_quant(CifarResNet(8, width=4), {**settings, "activation_quantizers": trained}, SHAPE)
    assert placement_of(rebuilt) == trained
    wrong = [{**trained[0], "signed": not trained[0]["signed"]}, *trained[1:]]
    with pytest.raises(EdgepipeError, match="no longer gives the quantizer placement"):
        insert_fake_quant(CifarResNet(8, width=4), {**settings, "activation_quantizers": wrong}, SHAPE)


def test_moving_dequantize_below_flatten_is_exact(tmp_path) -> None:
    torch.manual_seed(0)
    model = insert_fake_quant(CifarResNet(8, width=4).eval(), quant_settings(activations="uint8_after_relu"), SHAPE)
    calibrate(model, [torch.randn(8, *SHAPE)], "max")
    proto = _exported(model)
    moved, n = dequantize_after_reshapes(proto)
    assert n == 1
    producers = _producers(moved.graph)
    gemm = next(x for x in moved.graph.node if x.op_type == "Gemm")
    assert producers[gemm.input[0]].op_type == "DequantizeLinear"
    onnx.save(proto, str(tmp_path / "a.onnx"))
    onnx.save(moved, str(tmp_path / "b.onnx"))
    x = np.random.default_rng(0).standard_normal((16, *SHAPE)).astype(np.float32)
    assert np.array_equal(OrtRunner(tmp_path / "a.onnx").infer(x), OrtRunner(tmp_path / "b.onnx").infer(x))


# --- compile fidelity -------------------------------------------------------------------------------------
class _Runner:
    backend, device, dtype, threads = "openvino", "cpu", "int8", 1

    def __init__(self, inner: OrtRunner, scramble: bool) -> None:
        self.inner, self.scramble = inner, scramble

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.run(feeds)["logits"]
        return {"logits": out[:, ::-1].copy() if self.scramble else out}


@pytest.mark.parametrize("scramble", [False, True])
def test_compile_fails_when_the_compiled_model_loses_accuracy(tmp_path, monkeypatch, scramble: bool) -> None:
    """A runtime that computes something else than the exported graph (here: reversed logits) fails the
    stage with one line; one that agrees passes and records both top-1 figures."""
    import stages.compile as compile_stage
    from edgepipe.engine.artifacts import Artifact
    from edgepipe.engine.stage import StageContext
    from edgepipe.types import ArtifactKind
    from tests.support import tiny_config, tiny_data

    from edgepipe.config import OptimConfig
    from edgepipe.training.loop import fit
    from edgepipe.tasks.classification import cross_entropy_step

    data = tiny_data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    fit(net, data, OptimConfig(epochs=6, lr=0.1, autocast="off"), cross_entropy_step, batch_size=32,
        checkpoint_dir=tmp_path / "checkpoints")
    onnx.save(export_onnx(net.eval(), data.input_shape, 17), str(tmp_path / "model.onnx"))
    exported = Artifact(kind=ArtifactKind.ONNX, root=tmp_path, files={"onnx": "model.onnx"})
    ctx = StageContext("compile", tiny_config(), get_profile("intel-xeon-amx"), tmp_path / "out", exported)
    ctx.__dict__["data"] = data
    monkeypatch.setattr(compile_stage, "runner_for",
                        lambda art, threads: (_Runner(OrtRunner(tmp_path / "model.onnx"), scramble), None))
    if scramble:
        with pytest.raises(EdgepipeError, match=r"points lower \(compile.max_top1_drop "):
            compile_stage.check_fidelity(ctx, exported)
    else:
        record = compile_stage.check_fidelity(ctx, exported)
        assert record["checked"] and record["top1_drop_points"] == 0 and record["prediction_agreement"] == 1.0
        assert record["reference_top1"] > 0.5  # a model that learned, so a scrambled runtime shows


@pytest.mark.parametrize("losses,wins,fails", [(10, 6, False), (30, 0, True), (3, 0, False), (40, 25, False)])
def test_a_drop_fails_only_beyond_chance(losses: int, wins: int, fails: bool) -> None:
    """On 1,000 images: 0.4 points from 10 losses and 6 wins is rounding noise (p ~ 0.23); 3.0 points lost
    on 30 images and won on none is a fault; 0.3 points is within the limit whatever the p-value; 1.5
    points from 40 losses and 25 wins is above the limit but not beyond chance (p ~ 0.04 > 0.01)."""
    from edgepipe.tasks.classification import fidelity_verdict

    ref = np.zeros(1000, bool)
    ref[:losses] = True  # the reference alone is right on the first images, the compiled alone on the next
    cmp = np.zeros(1000, bool)
    cmp[losses:losses + wins] = True
    ref[500:700] = cmp[500:700] = True  # both right on 200 more
    v = fidelity_verdict(ref, cmp, 0.3)
    assert (v["losses"], v["wins"]) == (losses, wins)
    assert v["top1_drop_points"] == pytest.approx((losses - wins) / 10)
    assert v["fails"] is fails
