"""qat stage on TinyCNN: calibrates, fine-tunes, saves a quantized artifact that reloads exactly; skips without int8."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import stages.qat as qat
from edgepipe.engine.artifacts import Artifact
from edgepipe.config import OptimConfig
from edgepipe.data.batches import DataBundle
from edgepipe.errors import EdgepipeError
from edgepipe.models.loading import load_torch_artifact, save_torch_artifact
from edgepipe.profiles import HardwareProfile
from edgepipe.quantization.layers import QuantConv2d, QuantLinear
from edgepipe.engine.stage import StageContext
from edgepipe.training.loop import fit
from edgepipe.tasks.classification import cross_entropy_step
from edgepipe.types import ArtifactKind, DType
from tests.support import TinyCNN, tiny_config, tiny_data

BUILD = {"factory": "tests.support:tiny_cnn", "kwargs": {}}
JETSON = HardwareProfile(name="tiny-jetson", backend="tensorrt", device="gpu", dtypes=["int8", "fp16", "fp32"],
                         peak_tops={"int8": 40.0, "fp16": 20.0, "fp32": 5.0}, memory_bandwidth_gbps=68, memory_gb=8)
FLOAT_ONLY = HardwareProfile(name="tiny-gpu", backend="tensorrt", device="gpu", dtypes=["fp16", "fp32"],
                             peak_tops={"fp16": 20.0, "fp32": 5.0}, memory_bandwidth_gbps=68, memory_gb=8)


def trained_student(root: Path, data: DataBundle, width: int = 8) -> Artifact:
    """A TinyCNN trained for a few epochs on tiny_data (width != 8 stands in for a pruned model)."""
    torch.manual_seed(0)
    model = TinyCNN(width=width)
    fit(model, data, OptimConfig(epochs=6, lr=0.1, autocast="off"), cross_entropy_step, batch_size=32,
        checkpoint_dir=root / "checkpoints")
    return save_torch_artifact(model, BUILD, root / f"student{width}", data.input_shape, data.num_classes)


def context(out: Path, student: Artifact | None, data: DataBundle, profile: HardwareProfile = JETSON,
            teacher: Artifact | None = None, **overrides) -> StageContext:
    ctx = StageContext("qat", tiny_config(**overrides), profile, out, student, teacher=teacher)
    ctx.__dict__["data"] = data
    return ctx


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return tiny_data()


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory, data: DataBundle) -> Artifact:
    return trained_student(tmp_path_factory.mktemp("student"), data)


def run_keeping_model(ctx: StageContext, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Run the stage and keep the in-memory model it saved, to compare with the reloaded one."""
    kept = {}

    def save(model, *args, **kwargs):
        kept["model"] = model
        return save_torch_artifact(model, *args, **kwargs)

    monkeypatch.setattr(qat, "save_torch_artifact", save)
    return qat.run(ctx), kept["model"]


def test_qat_saves_a_quantized_artifact_that_reloads_exactly(tmp_path: Path, student: Artifact, data: DataBundle,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    result, trained = run_keeping_model(context(tmp_path / "qat", student, data, teacher=student), monkeypatch)
    art = result.artifact
    assert result.skipped is None
    assert art.kind is ArtifactKind.TORCH and art.quantized and art.dtype is DType.INT8
    settings = json.loads(art.path("build").read_text())["quantization"]
    assert settings["bn_folded"] == [["conv1", "bn1"], ["conv2", "bn2"]]
    reloaded = load_torch_artifact(art)
    assert isinstance(reloaded.conv1, QuantConv2d) and isinstance(reloaded.fc, QuantLinear)
    x = torch.cat([x for x, _ in data.val_batches(64)])
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained.eval()(x))
    # the stage keeps its last checkpoint: the engine removes it once the manifest records the stage done
    assert (tmp_path / "qat" / "checkpoints" / "last.pt").exists()


def test_qat_records_calibration_ptq_and_history(tmp_path: Path, student: Artifact, data: DataBundle) -> None:
    rec = qat.run(context(tmp_path, student, data, teacher=student)).records
    assert len(rec["history"]) == 1 and {"soft", "hard", "val_top1"} <= set(rec["history"][0])
    assert rec["calibration"]["batches"] == 2 and rec["calibration"]["samples"] == 128
    amax = rec["calibration"]["amax"]
    assert set(amax) == {"act_quant.x", "act_quant.relu", "act_quant.relu_1", "act_quant.adaptive_avg_pool2d"}
    # the input quantizer sees the normalized input: (0.3 + 0.7 - 0.5) / 0.3 bounds it
    assert 0 < amax["act_quant.x"] <= (1.0 - 0.5) / 0.3 + 1e-5
    assert rec["form"]["activations"] == "int8" and rec["form"]["weight_bits"] == 8  # a TensorRT target
    assert rec["placement"]["traced"] and rec["placement"]["quantizers"] == 4
    assert rec["bn_folded"] == 2 and rec["bn_unfolded"] == [] and rec["quantized_layers"] == 3
    assert rec["float_top1"] >= 0.9 and rec["ptq_top1"] >= 0.9 and rec["history"][-1]["val_top1"] >= 0.9
    assert abs(rec["qat_top1"] - rec["history"][-1]["val_top1"]) <= 2 / 64  # folding BN after QAT ~ exact
    assert rec["teacher"] == "teacher stage"


def test_qat_of_a_pruned_model_without_teacher_reloads(tmp_path: Path, data: DataBundle,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pruned = trained_student(tmp_path, data, width=6)  # saved under the width-8 build spec
    result, trained = run_keeping_model(context(tmp_path / "qat", pruned, data), monkeypatch)
    assert result.records["teacher"].startswith("float input")
    reloaded = load_torch_artifact(result.artifact)
    assert reloaded.conv1.out_channels == 6
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained.eval()(x))


def test_qat_skipped_without_int8_or_when_disabled(tmp_path: Path, student: Artifact, data: DataBundle) -> None:
    result = qat.run(context(tmp_path / "a", student, data, profile=FLOAT_ONLY))
    assert result.artifact is student
    assert result.skipped == "target tiny-gpu lists no int8 (dtypes: fp16, fp32)"
    result = qat.run(context(tmp_path / "b", student, data, qat__enabled=False))
    assert result.artifact is student and "disabled in config" in result.skipped
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_qat_refuses_bad_inputs(tmp_path: Path, student: Artifact, data: DataBundle) -> None:
    with pytest.raises(EdgepipeError, match="needs a torch model"):
        qat.run(context(tmp_path, None, data))
    onnx_art = Artifact(kind=ArtifactKind.ONNX, root=tmp_path, files={"onnx": "model.onnx"})
    with pytest.raises(EdgepipeError, match="got an artifact of kind onnx"):
        qat.run(context(tmp_path, onnx_art, data))
    quantized = qat.run(context(tmp_path / "q", student, data, teacher=student)).artifact
    with pytest.raises(EdgepipeError, match="already quantized"):
        qat.run(context(tmp_path / "qq", quantized, data))


def test_qat_keeps_the_calibrated_model_when_fine_tuning_lowers_top1(tmp_path: Path, student: Artifact,
                                                                      data: DataBundle) -> None:
    """An lr far too high wrecks the fine-tuning: the stage saves the calibrated snapshot, says so, and the
    saved model scores exactly the calibrated top-1 it recorded (BatchNorm folded the same way)."""
    from edgepipe.tasks.classification import evaluate

    bad = {"epochs": 1, "lr": 20.0, "autocast": "off"}
    rec = qat.run(context(tmp_path, student, data, teacher=student, qat__optim=bad)).records
    assert rec["qat_top1"] < rec["ptq_top1"] - 0.1
    assert rec["kept"] == "calibrated" and rec["kept_top1"] == rec["ptq_top1"]
    saved = load_torch_artifact(Artifact.load(tmp_path))
    assert evaluate(saved, data, 64) == rec["ptq_top1"]


def test_qat_keeps_the_fine_tuned_model_when_it_is_at_least_as_good(tmp_path: Path, student: Artifact,
                                                                      data: DataBundle) -> None:
    from edgepipe.tasks.classification import evaluate

    rec = qat.run(context(tmp_path, student, data, teacher=student)).records
    assert rec["kept"] == "fine-tuned" and rec["qat_top1"] >= rec["ptq_top1"] and rec["kept_top1"] == rec["qat_top1"]
    assert evaluate(load_torch_artifact(Artifact.load(tmp_path)), data, 64) == rec["qat_top1"]
