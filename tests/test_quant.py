"""edgepipe.quantization.fakequant: fake-quant layers, calibration and BatchNorm folding on tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.quantization.calibration import HISTOGRAM_BINS, calibrate
from edgepipe.quantization.fakequant import find_conv_bn_pairs, fold_batchnorm, insert_fake_quant, quant_settings
from edgepipe.quantization.layers import (QuantConv2d, QuantLinear, activation_quantizers, dequantized_copy, quant_layers,
                                          quantization_disabled, weight_scale)
from tests.support import TinyCNN


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 8, 8, generator=g) * (i + 1) for i in range(n)]


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if x.sum() > 0:
            x = torch.relu(x)
        return self.fc(x.mean((2, 3)))


class ConvUsedTwice(nn.Module):
    """The conv output also feeds a skip path: folding BN into it would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


SHAPE = (1, 8, 8)


def test_weights_take_at_most_255_levels_per_channel() -> None:
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(64, 4, 3))  # 576 weights per channel > 255
    linear = QuantLinear.from_float(nn.Linear(512, 3))
    for layer in (conv, linear):
        wq = layer.quant_weight().detach()
        scale = weight_scale(layer.weight).view(-1, *[1] * (wq.ndim - 1))
        levels = wq / scale
        assert torch.allclose(levels, levels.round(), atol=1e-3)  # integer multiples of the channel scale
        assert levels.abs().max() <= 127 + 1e-3  # symmetric: -128 is never used
        for channel in wq.flatten(1):
            assert 2 < len(channel.unique()) <= 255
        # per channel: each channel's own max|w| maps to 127
        assert torch.allclose(levels.flatten(1).abs().amax(1), torch.full((wq.shape[0],), 127.0))


def test_fake_quant_passes_gradients_straight_through_and_ranges_are_not_trained() -> None:
    torch.manual_seed(0)
    model = insert_fake_quant(TinyCNN(), quant_settings(), SHAPE)
    calibrate(model, _batches(), method="max")
    model.train()
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    for layer in quant_layers(model).values():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    names = [n for n, _ in model.named_parameters()]
    assert not any("amax" in n for n in names)
    # one quantizer per tensor: the input, the two ReLU outputs (the second above the pooling) and the pooled features
    assert {"act_quant.x.amax", "act_quant.relu.amax", "act_quant.relu_1.amax",
            "act_quant.adaptive_avg_pool2d.amax"} == {k for k in model.state_dict() if k.endswith("amax")}


def test_calibrate_max_matches_the_data() -> None:
    torch.manual_seed(0)
    model = insert_fake_quant(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)),
                              quant_settings("max"), SHAPE)
    batches = _batches()
    amax = calibrate(model, batches, method="max")
    x = torch.cat(batches)
    with torch.no_grad(), quantization_disabled(model):
        hidden = torch.relu(model.get_submodule("0")(x)).flatten(1)
    # the Linear's quantizer sits above the Flatten (on the ReLU output), where OpenVINO fuses it
    assert amax["act_quant.input_1"] == pytest.approx(float(x.abs().max()))
    assert amax["act_quant._1"] == pytest.approx(float(hidden.abs().max()), rel=1e-6)
    assert float(activation_quantizers(model)["act_quant.input_1"].amax) == pytest.approx(amax["act_quant.input_1"])


def test_calibrate_percentile_matches_the_data() -> None:
    model = insert_fake_quant(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)),
                              quant_settings(), SHAPE)
    batches = _batches()
    amax = calibrate(model, batches, method="percentile", percentile=99.0)
    absx = torch.cat(batches).abs().flatten()
    expected = float(torch.quantile(absx, 0.99))
    assert amax["act_quant.input_1"] == pytest.approx(expected, abs=2 * float(absx.max()) / HISTOGRAM_BINS)
    assert amax["act_quant.input_1"] < float(absx.max())  # it really clips the outliers
    full = calibrate(model, batches, method="percentile", percentile=100)["act_quant.input_1"]
    assert full == pytest.approx(float(absx.max()))


def test_quantized_model_stays_close_to_float() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(TinyCNN())
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    model = insert_fake_quant(model, quant_settings("max", bn_folded=find_conv_bn_pairs(model)[0]), SHAPE)
    calibrate(model, [x], method="max")
    with torch.no_grad():
        out = model(x)
    assert not torch.equal(out, ref)  # it does quantize
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_bn_folding_keeps_eval_outputs() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(TinyCNN())
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    pairs, note = find_conv_bn_pairs(model)
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2")] and note is None
    assert fold_batchnorm(model, pairs) == 2
    assert isinstance(model.bn1, nn.Identity) and model.conv1.bias is not None
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_folding_bn_after_quantization_keeps_the_integer_weights() -> None:
    torch.manual_seed(0)
    model = insert_fake_quant(_randomize_bn(TinyCNN()), quant_settings(), SHAPE)
    x = torch.randn(64, 1, 8, 8)
    calibrate(model, [x], method="max")

    def integers(layer: nn.Module) -> torch.Tensor:
        return (layer.quant_weight() / weight_scale(layer.weight).view(-1, 1, 1, 1)).round().detach()

    before = {n: integers(getattr(model, n)) for n in ("conv1", "conv2")}
    gamma_sign = {"conv1": model.bn1.weight.sign(), "conv2": model.bn2.weight.sign()}
    with torch.no_grad():
        ref = model(x)
    assert (gamma_sign["conv1"] < 0).any()  # the sign flip is exercised
    assert fold_batchnorm(model, [("conv1", "bn1"), ("conv2", "bn2")]) == 2
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.bn1, nn.Identity)
    for name, ints in before.items():
        after = integers(getattr(model, name)) * gamma_sign[name].view(-1, 1, 1, 1)
        assert (after == ints).float().mean() >= 0.99 and (after - ints).abs().max() <= 1
    with torch.no_grad():
        out = model(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_bn_not_folded_when_fx_cannot_trace_or_conv_output_is_shared() -> None:
    pairs, note = find_conv_bn_pairs(Untraceable())
    assert pairs == [] and "torch.fx" in note
    assert find_conv_bn_pairs(ConvUsedTwice()) == ([], None)
    model = insert_fake_quant(Untraceable(), quant_settings(), SHAPE)
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.conv, QuantConv2d)
    # fallback: each layer quantizes its own input, signed
    assert set(activation_quantizers(model)) == {"conv.input_quant", "fc.input_quant"}
    assert all(q.signed for q in activation_quantizers(model).values())


def test_insert_fake_quant_keeps_names() -> None:
    model = insert_fake_quant(TinyCNN(), quant_settings(bn_folded=[("conv1", "bn1"), ("conv2", "bn2")]), SHAPE)
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    keys = set(model.state_dict())
    assert {"conv1.weight", "conv1.bias", "act_quant.x.amax", "fc.weight", "fc.bias"} <= keys
    assert not any(k.startswith("bn") for k in keys)


def test_dequantized_copy_is_countable_and_keeps_the_quantized_weights() -> None:
    import torch_pruning as tp

    torch.manual_seed(0)
    example = torch.randn(4, 1, 8, 8)
    reference = TinyCNN().eval()
    fold_batchnorm(reference, [("conv1", "bn1"), ("conv2", "bn2")])
    model = insert_fake_quant(TinyCNN().eval(), quant_settings(bn_folded=[("conv1", "bn1"), ("conv2", "bn2")]), SHAPE)
    model.load_state_dict(reference.state_dict(), strict=False)
    calibrate(model, [example], method="max")
    plain = dequantized_copy(model)
    assert type(plain.conv1) is nn.Conv2d and type(plain.fc) is nn.Linear and not quant_layers(plain)
    for name in ("conv1", "conv2", "fc"):
        q, p = getattr(model, name), getattr(plain, name)
        assert torch.equal(p.weight, q.quant_weight()) and not torch.equal(p.weight, q.weight)
        assert torch.equal(p.bias, q.bias)
    assert tp.utils.count_ops_and_params(plain, example[:1]) == tp.utils.count_ops_and_params(reference, example[:1])
    assert tp.utils.count_ops_and_params(model, example[:1])[0] < tp.utils.count_ops_and_params(plain, example[:1])[0]


def test_bad_inputs_are_clear() -> None:
    with pytest.raises(EdgepipeError, match="num_bits"):
        insert_fake_quant(TinyCNN(), {**quant_settings(), "num_bits": 4}, SHAPE)
    with pytest.raises(EdgepipeError, match="no nn.Conv2d or nn.Linear"):
        insert_fake_quant(nn.Sequential(nn.ReLU()), quant_settings(), SHAPE)
    with pytest.raises(EdgepipeError, match="does not have"):
        insert_fake_quant(TinyCNN(), quant_settings(bn_folded=[("conv9", "bn9")]), SHAPE)
    model = insert_fake_quant(TinyCNN(), quant_settings(), SHAPE)
    with pytest.raises(EdgepipeError, match="already"):
        insert_fake_quant(model, quant_settings(), SHAPE)
    with pytest.raises(EdgepipeError, match="not calibrated"):
        model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(EdgepipeError, match="unknown method 'entropy'"):
        calibrate(model, _batches(), method="entropy")
    with pytest.raises(EdgepipeError, match="no calibration batches"):
        calibrate(model, [], method="max")
    with pytest.raises(EdgepipeError, match="insert_fake_quant first"):
        calibrate(TinyCNN(), _batches(), method="max")


def test_seven_bit_weights_stay_within_63_levels_and_survive_export() -> None:
    """weight_bits 7 (for OpenVINO INT8 on CPUs without VNNI): every weight in [-63, 63] times its scale,
    kept through the saved settings and into the ONNX int8 initializers."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgepipe.export.onnx_export import export_onnx, fold_weight_quantizers

    torch.manual_seed(0)
    model = insert_fake_quant(TinyCNN(), quant_settings(weight_bits=7), SHAPE)
    calibrate(model, [torch.randn(8, 1, 8, 8)], "max", 100.0)
    for layer in quant_layers(model).values():
        levels = layer.quant_weight().detach() / weight_scale(layer.weight, 63).view(-1, *[1] * (layer.weight.ndim - 1))
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert levels.abs().max() <= 63 + 1e-3 and levels.abs().max() > 62
    proto = export_onnx(model.eval(), (1, 8, 8), 17)
    assert fold_weight_quantizers(proto) == 3
    graph = proto.graph
    ints = [numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert ints and max(int(np.abs(w).max()) for w in ints) == 63
    with pytest.raises(EdgepipeError, match="older edgepipe"):
        insert_fake_quant(TinyCNN(), {k: v for k, v in quant_settings().items() if k != "placement"}, SHAPE)
    with pytest.raises(EdgepipeError, match="weight_bits must be 7 or 8"):
        insert_fake_quant(TinyCNN(), {**quant_settings(), "weight_bits": 6}, SHAPE)


class _QuantizedIdentity(nn.Module):
    """A 1x1 convolution with weight 1: its output is the dequantized input, so any rounding shows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_fake_quant_rounds_like_onnx_quantizelinear_at_ties() -> None:
    """round_like_onnx: PyTorch's fake-quant kernels round x * (1 / scale), ONNX's QuantizeLinear rounds x / scale.
    For an x whose x / scale is within an ulp of a .5 tie they give integers one apart. On a CIFAR MobileNetV2
    (width 0.5, calibrated) that happened to 106 of 481M activations per 500 images at identical inputs, and each
    flip spreads through the following layers. edgepipe's quantizers round x / scale: the exported graph in ONNX
    Runtime must then give the PyTorch model's outputs exactly on such inputs."""
    import numpy as np
    import onnxruntime as ort

    from edgepipe.export.onnx_export import export_onnx, fold_weight_quantizers

    amax = 3.1984
    scale = torch.tensor(amax / 127, dtype=torch.float32)
    k = torch.arange(-120, 120, dtype=torch.float32)
    candidates = torch.cat([((k + 0.5) * scale).nextafter(torch.tensor(d)) for d in (-1e9, 0.0, 1e9)]
                           + [(k + 0.5) * scale])
    ties = candidates[torch.round(candidates * (1 / scale)) != torch.round(candidates / scale)]
    assert len(ties) >= 8, "the scale was chosen to give x * (1/s) != x / s roundings; pick another if torch changes"
    model = insert_fake_quant(_QuantizedIdentity(), quant_settings(activations="int8"), (1, 4, 4))
    activation_quantizers(model)["act_quant.x"].amax.fill_(amax)
    x = torch.zeros(1, 1, 4, 4 * ((len(ties) + 3) // 4)).flatten()
    x[: len(ties)] = ties
    x = x.view(1, 1, 4, -1)
    model.eval()
    proto = export_onnx(model, (1, 4, x.shape[-1]), 17)
    fold_weight_quantizers(proto)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort_out = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        torch_out = model(x).numpy()
    assert np.array_equal(torch_out, ort_out), f"{int((torch_out != ort_out).sum())} of {len(ties)} ties rounded apart"
    # and the integers are those of QuantizeLinear: round half to even of x / scale
    assert np.array_equal(np.rint(torch_out.ravel()[: len(ties)] / scale.numpy()), np.rint(ties.numpy() / scale.numpy()))


def test_classifier_quantizer_sits_above_dropout() -> None:
    """torchvision's classifiers are Dropout -> Linear. Dropout is the identity at inference but scales by
    1 / (1 - p) while QAT trains; a quantizer below it, calibrated in eval mode, would clip those values."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1)
            return self.classifier(x)

    torch.manual_seed(0)
    model = insert_fake_quant(Head(), quant_settings(activations="uint8_after_relu"), (1, 8, 8))
    assert "act_quant.classifier_0" not in activation_quantizers(model)
    head_quant = activation_quantizers(model)["act_quant.adaptive_avg_pool2d"]
    calibrate(model, _batches())
    seen = []
    head_quant.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x = _batches()[2]
    with torch.no_grad():
        model.eval()(x)
        model.train()(x)
    assert torch.equal(seen[0], seen[1])  # training's dropout (x2 here) happens after the quantizer, not before
