"""Model registry, safe loading, and reloading a pruned model from a plain state dict."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch_pruning as tp

from edgepipe.config import ModelSpec
from edgepipe.errors import EdgepipeError
from edgepipe.models.loading import build_from_spec, load_torch_artifact, restore_shapes, save_torch_artifact
from edgepipe.models.zoo import build_arch
from tests.support import TEACHERS, PickleMarker, TinyCNN, needs_teacher, program_with_pickled_weights


def test_cifar_resnet_sizes() -> None:
    m = build_arch("cifar_resnet", {"depth": 56})
    params = sum(p.numel() for p in m.parameters())
    assert 0.84e6 < params < 0.88e6  # ~0.86M, as the shipped teacher's README says
    macs, _ = tp.utils.count_ops_and_params(m, torch.zeros(1, 3, 32, 32))
    assert 120e6 < macs < 130e6
    with pytest.raises(EdgepipeError, match="6n\\+2"):
        build_arch("cifar_resnet", {"depth": 21})


def test_cifar_resnet_stage_widths() -> None:
    """``widths`` builds the shape a pruned student has (the pruned layer3 of the benchmark recipe), with the
    teacher's parameter names; a wrong list is one clear error."""
    m = build_arch("cifar_resnet", {"depth": 14, "widths": [16, 32, 48]}).eval()
    assert [m.conv1.out_channels, m.layer2[0].conv1.out_channels, m.layer3[-1].conv2.out_channels] == [16, 32, 48]
    assert m.fc.in_features == 48 and len(m.layer1) == 2
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert set(m.state_dict()) == set(build_arch("cifar_resnet", {"depth": 14}).state_dict())
    with pytest.raises(EdgepipeError, match="widths must be three"):
        build_arch("cifar_resnet", {"depth": 14, "widths": [16, 32]})


def test_unknown_arch_lists_known() -> None:
    with pytest.raises(EdgepipeError, match="cifar_resnet"):
        build_arch("resnet9000", {})


def test_torchvision_arch_builds_without_download() -> None:
    m = build_arch("tv_mobilenet_v3_small", {"num_classes": 10}).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_factory_and_bad_factory() -> None:
    m = build_from_spec(ModelSpec(factory="tests.support:tiny_cnn", kwargs={"width": 4}))
    assert isinstance(m, TinyCNN) and m.conv1.out_channels == 4
    with pytest.raises(EdgepipeError, match="cannot import"):
        build_from_spec(ModelSpec(factory="tests.nowhere:fn"))


def test_weights_loaded_safely_and_mismatch_is_clear(tmp_path: Path) -> None:
    m = TinyCNN()
    torch.save(m.state_dict(), tmp_path / "w.pt")
    spec = ModelSpec(factory="tests.support:tiny_cnn", weights=str(tmp_path / "w.pt"))
    assert torch.equal(build_from_spec(spec).conv1.weight, m.conv1.weight)
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a pickled module: refused
    with pytest.raises(EdgepipeError, match="not a loadable state dict"):
        build_from_spec(ModelSpec(factory="tests.support:tiny_cnn", weights=str(tmp_path / "pickled.pt")))
    torch.save(TinyCNN(width=4).state_dict(), tmp_path / "small.pt")
    with pytest.raises(EdgepipeError, match="does not fit"):
        build_from_spec(ModelSpec(factory="tests.support:tiny_cnn", weights=str(tmp_path / "small.pt")))


def test_pruned_model_reloads_from_plain_state_dict(tmp_path: Path) -> None:
    m = build_arch("cifar_resnet", {"depth": 8, "width": 8, "in_channels": 1}).eval()
    x = torch.randn(2, 1, 8, 8)
    tp.pruner.MetaPruner(m, x[:1], importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                         ignored_layers=[m.fc]).step()
    art = save_torch_artifact(m, {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "in_channels": 1}},
                              tmp_path, (1, 8, 8), 10)
    state = torch.load(art.path("model"), weights_only=True)  # plain tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = load_torch_artifact(art)
    assert again.conv1.out_channels == m.conv1.out_channels < 8
    assert torch.allclose(again(x), m(x))


def test_restore_shapes_depthwise() -> None:
    src = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(6, 6, 3, groups=6))
    dst = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, groups=8))
    restore_shapes(dst, src.state_dict())
    dst.load_state_dict(src.state_dict())
    assert dst[1].groups == 6 and dst[1].in_channels == 6


@needs_teacher
def test_shipped_teacher_loads_both_forms() -> None:
    sd_model = build_from_spec(ModelSpec(arch="cifar_resnet", kwargs={"depth": 56},
                                         weights=str(TEACHERS / "resnet56_cifar10.state_dict.pt"))).eval()
    prog_model = build_from_spec(ModelSpec(program=str(TEACHERS / "resnet56_cifar10.pt2")))
    prog_model.train()  # every stage switches modes; a raw exported module raises here
    prog_model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(sd_model(x), prog_model(x), atol=1e-4)
    from edgepipe.measure.figures import model_counts

    counts = model_counts(prog_model, (3, 32, 32))  # Torch-Pruning's hook counter sees 0 in an exported graph
    assert 120e6 < counts["macs"] < 130e6 and 0.84e6 < counts["params"] < 0.88e6
    assert "flop_counter" in counts["mac_counter"]


def test_a_crafted_pt2_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = program_with_pickled_weights(tmp_path / "evil.pt2", PickleMarker(str(marker)))
    with pytest.raises(EdgepipeError, match=r"evil.pt2: loading this program would unpickle arbitrary Python objects"
                                            r".*set trust_pickle: true"):
        build_from_spec(ModelSpec(program=str(evil)))
    assert not marker.exists()
    # the same archive layout with plain tensors pickled in it loads: weights-only unpickling allows tensors
    plain = program_with_pickled_weights(tmp_path / "plain.pt2")
    assert build_from_spec(ModelSpec(program=str(plain)))(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)
    assert build_from_spec(ModelSpec(program=str(plain), trust_pickle=True)) is not None


@pytest.mark.parametrize("arch,kwargs", [("mobilenet_v2_cifar", {"width_mult": 0.5}),
                                         ("mobilenet_v3_small_cifar", {"width_mult": 0.5}),
                                         ("shufflenet_v2_cifar", {"width_mult": 0.5})])
def test_cifar_students_trace_quantize_prune_and_export(tmp_path: Path, arch: str, kwargs: dict) -> None:
    """The small-input students: 4x4 before the pooling (ImageNet strides would leave 1x1 at 32x32), torch.fx
    placement of the quantizers, Torch-Pruning, a reload of the pruned state dict, ONNX and OpenVINO."""
    import numpy as np
    import openvino as ov

    from edgepipe.export.onnx_export import export_onnx
    from edgepipe.quantization.fakequant import insert_fake_quant, quant_settings
    from edgepipe.quantization.placement import placement_of

    torch.manual_seed(0)
    model = build_arch(arch, {"num_classes": 10, **kwargs}).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    pool = model.avgpool if arch == "mobilenet_v3_small_cifar" else None
    last = pool if pool is not None else (model.conv5 if arch.startswith("shufflenet") else model.features[-1])

    def record(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["hw"] = tuple((args[0] if pool else out).shape[-2:])

    last.register_forward_hook(record)
    assert model(x).shape == (2, 10) and seen["hw"] == (4, 4)
    assert build_arch(arch, {"in_channels": 1, **kwargs})(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
    # Running statistics that settle within a short training: PyTorch's 0.1, not torchvision's V3 ImageNet 0.01.
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}

    quantized = insert_fake_quant(build_arch(arch, kwargs), quant_settings(activations="uint8_after_relu"), (3, 32, 32))
    assert placement_of(quantized)  # traced: adds and concats are quantized too, not only conv inputs

    if arch.startswith("shufflenet"):
        # Torch-Pruning 1.6 cannot build its dependency graph through torchvision's channel_shuffle (a 5-D view
        # and transpose: ZeroDivisionError in its flatten index mapping), so the ShuffleNetV2 recipe does not prune.
        with pytest.raises(ZeroDivisionError):
            tp.DependencyGraph().build_dependency(build_arch(arch, kwargs).eval(), example_inputs=x[:1])
    else:
        macs, _ = tp.utils.count_ops_and_params(model, x[:1])
        tp.pruner.MetaPruner(model, x[:1], importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3,
                             ignored_layers=[model.classifier[-1]], round_to=4).step()
        pruned_macs, _ = tp.utils.count_ops_and_params(model, x[:1])
        assert pruned_macs < 0.8 * macs
    save_torch_artifact(model, {"arch": arch, "kwargs": kwargs}, tmp_path, (3, 32, 32), 10)
    from edgepipe.engine.artifacts import Artifact

    reloaded = load_torch_artifact(Artifact.load(tmp_path))
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(reloaded(x), expected, atol=1e-5)
    proto = export_onnx(reloaded, (3, 32, 32), 17)
    compiled = ov.Core().compile_model(ov.Core().read_model(proto.SerializeToString(), b""), "CPU")
    assert np.allclose(compiled(x.numpy())[0], expected.numpy(), atol=1e-3)
