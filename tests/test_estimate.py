"""Roofline estimate arithmetic, activation-traffic counting, layer counting, and the calibrated estimate against
the published table it is fitted to (hardware_profiles/published/jetson.yaml)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from edgepipe.cli import main
from edgepipe.errors import EdgepipeError
from edgepipe.measure.calibrate import calibrate, row_estimate
from edgepipe.measure.layers import Layer, activation_bytes, model_layers, onnx_layers
from edgepipe.measure.roofline import (calibration_for, layer_estimate, published_results, published_table,
                                       roofline_estimate, target_estimate)
from edgepipe.models.zoo import build_arch
from edgepipe.profiles import HardwareProfile, get_profile
from edgepipe.types import DType


@pytest.fixture
def fake() -> HardwareProfile:
    """10 TOPS int8, 5 TFLOPS fp16, 100 GB/s: round numbers so expected values are easy by hand."""
    return HardwareProfile(name="fake", backend="tensorrt", device="gpu", dtypes=["int8", "fp16"],
                           peak_tops={"int8": 10.0, "fp16": 5.0}, memory_bandwidth_gbps=100.0, memory_gb=8)


def test_compute_bound(fake: HardwareProfile):
    # 1e9 MACs = 2e9 ops / 10e12 ops/s = 0.2 ms; (1e6 + 1e6) B / 100e9 B/s = 0.02 ms.
    r = roofline_estimate(fake, DType.INT8, macs=10**9, weight_bytes=10**6, activation_bytes=10**6)
    assert r["compute_bound_ms"] == pytest.approx(0.2)
    assert r["memory_bound_ms"] == pytest.approx(0.02)
    assert r["latency_ms"] == pytest.approx(0.2)
    assert r["bound"] == "compute"
    assert r["images_per_s"] == pytest.approx(5000.0)
    assert (r["kind"], r["device"], r["dtype"], r["batch"]) == ("estimate", "fake", "int8", 1)


def test_memory_bound(fake: HardwareProfile):
    # 1e6 MACs -> 2e6 / 10e12 = 0.0002 ms; (50e6 + 50e6) B / 100e9 = 1 ms.
    r = roofline_estimate(fake, DType.INT8, macs=10**6, weight_bytes=50 * 10**6, activation_bytes=50 * 10**6)
    assert r["compute_bound_ms"] == pytest.approx(0.0002)
    assert r["memory_bound_ms"] == pytest.approx(1.0)
    assert r["latency_ms"] == pytest.approx(1.0)
    assert r["bound"] == "memory"
    assert r["images_per_s"] == pytest.approx(1000.0)


def test_batch_scales_compute_and_activations_not_weights(fake: HardwareProfile):
    # batch 4: compute 4 x 2e9 / 5e12 = 1.6 ms; memory (10e6 + 4 x 5e6) / 100e9 = 0.3 ms.
    r = roofline_estimate(fake, DType.FP16, macs=10**9, weight_bytes=10 * 10**6, activation_bytes=5 * 10**6,
                          batch=4)
    assert r["compute_bound_ms"] == pytest.approx(1.6)
    assert r["memory_bound_ms"] == pytest.approx(0.3)
    assert r["latency_ms"] == pytest.approx(1.6)
    assert r["images_per_s"] == pytest.approx(4 / 1.6e-3)
    assert (r["dtype"], r["batch"]) == ("fp16", 4)


def test_bound_flips_where_the_two_roofs_cross(fake: HardwareProfile):
    # memory 1 ms fixed (100e6 B); compute crosses 1 ms at 5e9 MACs on int8 (1e10 ops / 1e13).
    below = roofline_estimate(fake, "int8", macs=4 * 10**9, weight_bytes=10**8, activation_bytes=0)
    above = roofline_estimate(fake, "int8", macs=6 * 10**9, weight_bytes=10**8, activation_bytes=0)
    assert below["bound"] == "memory" and below["latency_ms"] == pytest.approx(1.0)
    assert above["bound"] == "compute" and above["latency_ms"] == pytest.approx(1.2)


def test_labelled_as_estimate_and_json_able(fake: HardwareProfile):
    r = roofline_estimate(fake, DType.INT8, macs=10**9, weight_bytes=10**6, activation_bytes=10**6)
    assert "estimate" in r["label"] and "not measured" in r["label"] and "fake" in r["label"]
    assert "lower bound" in r["assumptions"] and "launch" in r["assumptions"]
    assert json.loads(json.dumps(r)) == r


def test_dtype_without_peak_figure_raises(fake: HardwareProfile):
    with pytest.raises(EdgepipeError, match="no peak_tops figure for dtype 'bf16'.*int8, fp16"):
        roofline_estimate(fake, DType.BF16, macs=1, weight_bytes=1, activation_bytes=1)


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"macs": -1}, {"weight_bytes": -1}])
def test_out_of_range_inputs_raise(fake: HardwareProfile, kwargs: dict):
    args = {"macs": 1, "weight_bytes": 1, "activation_bytes": 1, **kwargs}
    with pytest.raises(EdgepipeError):
        roofline_estimate(fake, DType.INT8, **args)


def test_shipped_profile_estimate():
    # Orin Nano, 20 dense INT8 TOPS, 68 GB/s: 1.8e9 MACs -> 3.6e9 / 20e12 = 0.18 ms; 13.6e6 B / 68e9 = 0.2 ms.
    r = roofline_estimate(get_profile("jetson"), DType.INT8, macs=18 * 10**8, weight_bytes=68 * 10**5,
                          activation_bytes=68 * 10**5)
    assert r["device"] == "jetson-orin-nano"
    assert r["bound"] == "memory" and r["latency_ms"] == pytest.approx(0.2)


def test_activation_bytes_known_sizes():
    # Input 1x3x8x8. conv -> 1x4x8x8 = 256, relu -> 256, pool -> 1x4x4x4 = 64, flatten -> 64, linear -> 10.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64, 10))
    elements = 256 + 256 + 64 + 64 + 10
    x = torch.randn(5, 3, 8, 8)  # batch 5 given, batch 1 counted
    assert activation_bytes(model, x, dtype_bytes=1) == elements * 1 * 2
    assert activation_bytes(model, x, dtype_bytes=DType.FP32.bytes) == elements * 4 * 2


def test_activation_bytes_counts_leaves_once_and_restores_mode():
    inner = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    model = nn.Sequential(inner, nn.Linear(6, 2))  # nested container counted through its leaves only
    model.train()
    assert activation_bytes(model, torch.randn(1, 4), dtype_bytes=2) == (6 + 6 + 2) * 2 * 2
    assert model.training and inner.training
    assert not model[0][0]._forward_hooks  # hooks removed


def test_activation_bytes_runs_in_eval_without_grad():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["training"], seen["grad"] = self.training, torch.is_grad_enabled()
            return x * 2

    assert activation_bytes(nn.Sequential(nn.BatchNorm1d(3), Probe()), torch.randn(1, 3), 1) == (3 + 3) * 2
    assert seen == {"training": False, "grad": False}


# --- layer counting ------------------------------------------------------------------------------------
def _small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10))


def test_model_layers_known_counts():
    # conv: 4x8x8 outputs x 3x3x3 = 6912 MACs, 108 weights, 3x8x8 in + 4x8x8 out; BN/ReLU fused (not counted);
    # pool: 256 in + 64 out; linear: 64 x 10 = 640 MACs, 640 weights, 64 in + 10 out.
    layers = model_layers(_small(), (3, 8, 8))
    assert layers == [Layer("conv", 6912, 108, 192 + 256), Layer("pool", 0, 0, 256 + 64), Layer("gemm", 640, 640, 74)]


def test_model_layers_restores_mode_and_rejects_a_wrong_shape():
    model = _small().train()
    with pytest.raises(EdgepipeError, match=r"forward pass on one \[1, 8, 8\] input failed") as e:
        model_layers(model, (1, 8, 8))
    assert "\n" not in str(e.value)
    assert model.training


def test_onnx_layers_match_the_torch_count(tmp_path):
    import onnx

    from edgepipe.export.onnx_export import export_onnx

    model = build_arch("resnet8_cifar", {"num_classes": 10})
    path = tmp_path / "m.onnx"
    onnx.save(export_onnx(model, (3, 32, 32), 17), str(path))
    assert onnx_layers(path) == model_layers(model, (3, 32, 32))


@pytest.mark.parametrize("content", [None, b"not an onnx file"])
def test_onnx_layers_bad_file_is_one_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EdgepipeError, match="bad.onnx: (ONNX file not found|not a readable ONNX model)"):
        onnx_layers(path)


# --- the published table and the calibration ----------------------------------------------------------
def _row(device: str, scenario: str) -> dict:
    return next(r for r in published_results(device=device) if r["scenario"] == scenario)


def test_published_rows_are_cited_and_match_their_quote():
    rows = published_results()
    assert {r["device"] for r in rows} == {"jetson-agx-orin", "jetson-orin-nx"}
    for r in rows:
        assert r["url"].startswith("https://github.com/mlcommons/inference_results_v3.1/blob/main/closed/NVIDIA/")
        assert r["round"] == "MLPerf Inference v3.1" and r["use"] in ("fit", "check")
        number = float(re.search(r"[:] *([0-9.]+)$", r["quote"]).group(1))
        # latencies are quoted in ns (the log's unit) and stored in ms; throughput as logged
        assert r["value"] == pytest.approx(number / 1e6 if "(ns)" in r["quote"] else number, rel=1e-9)


@pytest.fixture(scope="module")
def resnet50_layers() -> list[Layer]:
    return model_layers(build_arch("tv_resnet50", {"num_classes": 1000}), (3, 224, 224))


def test_acceptance_resnet50_int8_agx_orin_batch1_within_2x_of_singlestream(resnet50_layers):
    row = _row("jetson-agx-orin", "SingleStream")
    assert (row["arch"], row["input_shape"], row["dtype"], row["batch"]) == ("tv_resnet50", [3, 224, 224], "int8", 1)
    est = layer_estimate(get_profile("jetson-agx-orin"), DType.INT8, resnet50_layers, batch=1)
    assert est["calibration"] is not None and est["kind"] == "estimate"
    assert 0.5 <= est["latency_ms"] / row["value"] <= 2.0
    assert est["lower_bound"]["latency_ms"] < est["latency_ms"]  # the ideal stays available as the lower bound


def test_acceptance_resnet50_int8_agx_orin_large_batch_within_2x_of_offline(resnet50_layers):
    row = _row("jetson-agx-orin", "Offline")
    est = layer_estimate(get_profile("jetson-agx-orin"), DType.INT8, resnet50_layers, batch=row["batch"])
    assert row["batch"] >= 64
    assert 0.5 <= est["images_per_s"] / row["value"] <= 2.0


def test_every_published_row_reproduced_within_2x(resnet50_layers):
    for row in published_results():
        got = row_estimate(row, calibration_for(get_profile(row["device"])), layers=resnet50_layers)
        assert 0.5 <= got["ratio"] <= 2.0, got
        if row["use"] == "fit":
            assert 0.9 <= got["ratio"] <= 1.1, got  # the fit itself is close; Offline rows include the DLAs


def test_stored_calibration_is_the_fit():
    stored = published_table()["calibration"]
    for family, fitted in calibrate().items():
        for key in ("compute_efficiency", "bandwidth_efficiency", "kernel_launch_us", "enqueue_us",
                    "enqueue_share", "max_fit_error"):
            assert stored[family][key] == pytest.approx(fitted[key], rel=1e-3), key
        for key in ("profiles", "fitted_on", "fitted_devices", "fitted_dtypes"):
            assert stored[family][key] == fitted[key], key
        assert 0 < fitted["compute_efficiency"] <= 1 and 0 < fitted["bandwidth_efficiency"] <= 1


def test_overhead_sets_a_floor_for_a_tiny_model():
    profile = get_profile("jetson")  # the Orin Nano: no rows of its own, the family's factors apply
    cal = calibration_for(profile)
    layers = model_layers(_small(), (3, 8, 8))
    est = layer_estimate(profile, DType.INT8, layers)
    floor_us = cal.enqueue_us + len(layers) * cal.kernel_launch_us
    assert floor_us >= 100  # fitted overhead: ~0.26 ms per ResNet-50 inference, half of it per inference
    assert est["latency_ms"] * 1e3 >= floor_us
    assert est["latency_ms"] >= 100 * est["lower_bound"]["latency_ms"] and est["bound"] == "overhead"
    assert "jetson-orin-nano has no published rows" in est["assumptions"]


def test_calibrated_estimate_is_labelled_and_json_able(resnet50_layers):
    est = layer_estimate(get_profile("jetson-orin-nx"), DType.FP16, resnet50_layers, batch=2)
    assert "estimate" in est["label"] and "not measured" in est["label"]
    assert est["assumptions"].startswith("ESTIMATE") and "applied unchanged to fp16" in est["assumptions"]
    assert est["images_per_s"] == pytest.approx(2 / est["latency_ms"] * 1e3)
    assert json.loads(json.dumps(est)) == est


def test_uncalibrated_profile_gives_the_ideal_lower_bound():
    profile = get_profile("intel-xeon-amx")
    assert calibration_for(profile) is None
    est = layer_estimate(profile, DType.INT8, model_layers(_small(), (3, 8, 8)))
    assert est["calibration"] is None and "UNCALIBRATED" in est["assumptions"]
    assert est["latency_ms"] == est["lower_bound"]["latency_ms"]


def test_target_estimate_falls_back_to_the_counts_roofline():
    counts = {"macs": 10**9, "params": 10**6, "activation_elements": 10**6}
    jetson = get_profile("jetson-agx-orin")
    ideal = roofline_estimate(jetson, DType.INT8, 10**9, 10**6, 2 * 10**6)
    assert target_estimate(jetson, DType.INT8, counts) == ideal  # no layers: ideal, as before calibration
    assert target_estimate(jetson, DType.INT8, counts, layers=lambda: None) == ideal
    calibrated = target_estimate(jetson, DType.INT8, counts, layers=lambda: model_layers(_small(), (3, 8, 8)))
    assert calibrated["calibration"]["family"] == "jetson-orin-tensorrt"
    xeon = get_profile("intel-xeon-amx")
    assert target_estimate(xeon, DType.INT8, counts, layers=[Layer("conv", 1, 1, 1)]) == roofline_estimate(
        xeon, DType.INT8, 10**9, 10**6, 2 * 10**6)


# --- edgepipe estimate ---------------------------------------------------------------------------------
def test_cli_estimate_json(capsys):
    rc = main(["estimate", "--arch", "resnet8_cifar", "--kwargs", '{"num_classes": 10}', "--input-shape", "3,32,32",
               "--target", "jetson-agx-orin", "--dtype", "int8", "--batch", "4", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    assert result["latency_ms"] > 0 and result["images_per_s"] == pytest.approx(4e3 / result["latency_ms"])
    assert (result["kind"], result["batch"], result["dtype"], result["target"]) == ("estimate", 4, "int8",
                                                                                    "jetson-agx-orin")
    assert result["lower_bound"]["latency_ms"] < result["latency_ms"]


def test_cli_estimate_onnx_text(tmp_path, capsys):
    import onnx

    from edgepipe.export.onnx_export import export_onnx

    path = tmp_path / "m.onnx"
    onnx.save(export_onnx(_small(), (3, 8, 8), 17), str(path))
    assert main(["estimate", "--onnx", str(path), "--target", "jetson-orin-nx"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ESTIMATE (not measured)") and "ideal lower bound" in out and "assumptions" in out
    assert "MLPerf Inference v3.1" in out and "3 kernels" in out


@pytest.mark.parametrize("argv, message", [
    (["--arch", "no_such_arch", "--input-shape", "3,32,32"], "unknown architecture 'no_such_arch'"),
    (["--arch", "resnet8_cifar"], "--arch needs --input-shape"),
    (["--arch", "resnet8_cifar", "--input-shape", "3,x"], "--input-shape 3,x"),
    (["--arch", "resnet8_cifar", "--input-shape", "1,32,32"], "cannot count layers"),
    (["--onnx", "missing.onnx"], "missing.onnx: ONNX file not found"),
])
def test_cli_estimate_bad_input_is_exit_2_with_one_line(argv, message, capsys):
    assert main(["estimate", *argv, "--target", "jetson"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("edgepipe: error:") and message in err


def test_qat_model_counts_like_its_float_model():
    from edgepipe.models.zoo import CifarResNet
    from edgepipe.quantization.fakequant import insert_fake_quant, quant_settings

    float_layers = model_layers(CifarResNet(8, width=4).eval(), (3, 16, 16))
    qat = insert_fake_quant(CifarResNet(8, width=4).eval(), quant_settings(), (3, 16, 16))
    for name, buf in qat.named_buffers():
        if name.endswith("amax"):
            buf.fill_(4.0)  # a calibrated range (any), so the fake-quant ops run
    qat_layers = model_layers(qat, (3, 16, 16))
    assert [(x.op, x.macs, x.weight_elements) for x in qat_layers] == \
        [(x.op, x.macs, x.weight_elements) for x in float_layers]
    # the QDQ ONNX of the deploy bundle (int8 weight initializers behind DequantizeLinear) counts the same
    from edgepipe.export.onnx_export import export_onnx, fold_weight_quantizers

    proto = export_onnx(qat, (3, 16, 16), 17)
    fold_weight_quantizers(proto)
    assert onnx_layers(proto) == qat_layers


def test_artifact_layers_from_torch_onnx_or_none(tmp_path):
    import onnx

    from edgepipe.engine.artifacts import Artifact
    from edgepipe.measure.layers import artifact_layers
    from edgepipe.models.loading import save_torch_artifact
    from edgepipe.export.onnx_export import export_onnx
    from edgepipe.types import ArtifactKind

    model = build_arch("resnet8_cifar", {"num_classes": 10})
    expected = model_layers(model, (3, 32, 32))
    torch_art = save_torch_artifact(model, {"arch": "resnet8_cifar", "kwargs": {"num_classes": 10}}, tmp_path / "t",
                                    (3, 32, 32), 10)
    assert artifact_layers(torch_art, (3, 32, 32)) == expected
    (tmp_path / "o").mkdir()
    onnx.save(export_onnx(model, (3, 32, 32), 17), str(tmp_path / "o" / "model.onnx"))
    onnx_art = Artifact(kind=ArtifactKind.TENSORRT_BUNDLE, root=tmp_path / "o", files={"onnx": "model.onnx"})
    assert artifact_layers(onnx_art) == expected
    ir = Artifact(kind=ArtifactKind.OPENVINO_IR, root=tmp_path, files={"xml": "model.xml", "bin": "model.bin"})
    assert artifact_layers(ir) is None
