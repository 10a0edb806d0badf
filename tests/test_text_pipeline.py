"""The embedded text default end to end, offline (issue 29, acceptance 3): the shipped configs/text.yaml, shrunk to
seconds (fewer sentences and epochs), run by `edgepipe run` for an OpenVINO target (intel-xeon-amx), for a Jetson
(a TensorRT deploy bundle with sequence-length optimization profiles and the shipped validation token ids) and for
ONNX Runtime (generic-cpu: its compile times the task's token ids, the graph having a dynamic sequence axis), with the
student distilled on hidden states and attention and pruned (vocabulary, heads, FFN width, hidden size)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml

from edgepipe.cli import main

pytest.importorskip("transformers", reason="the text task needs transformers (pip install -e '.[text]')")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "text.yaml"


def shrunk(tmp_path: Path, **changes: object) -> Path:
    """configs/text.yaml shrunk to seconds (``changes``: further top-level sections, replacing the shrunk ones)."""
    path = tmp_path / "text-small.yaml"
    path.write_text(yaml.safe_dump({
        "extends": str(CONFIG), "name": "text-small",
        "data": {"synthetic_sentences": 320, "val_from_train": 64, "batch_size": 32},
        "teacher": {"train": {"optimizer": "adamw", "epochs": 2, "lr": 2.0e-3, "weight_decay": 0.01}},
        "distill": {"optim": {"optimizer": "adamw", "epochs": 1, "lr": 2.0e-3, "weight_decay": 0.01}},
        "prune": {"steps": 1, "optim": {"optimizer": "adamw", "epochs": 1, "lr": 1.0e-3, "weight_decay": 0.01}},
        "qat": {"calibration_batches": 2, "optim": {"optimizer": "adamw", "epochs": 1, "lr": 1.0e-4,
                                                     "weight_decay": 0.0, "autocast": "off"}},
        "measure": {"warmup": 2, "iterations": 5, "throughput_batch": 8}, **changes}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    config = shrunk(tmp)
    out = {}
    for target in ("intel-xeon-amx", "jetson", "generic-cpu"):
        assert main(["run", "--config", str(config), "--target", target, "--run", str(tmp / target)]) == 0
        out[target] = tmp / target
    return out


def test_openvino_target_runs_every_stage_with_named_integer_inputs(runs):
    run = runs["intel-xeon-amx"]
    graph = onnx.load(str(run / "export" / "model.onnx")).graph
    assert [(i.name, i.type.tensor_type.elem_type, [d.dim_param for d in i.type.tensor_type.shape.dim])
            for i in graph.input] == [(n, onnx.TensorProto.INT64, ["batch", "sequence"])
                                      for n in ("input_ids", "attention_mask", "token_type_ids")]
    compiled = json.loads((run / "compile" / "metrics.json").read_text())
    assert compiled["accuracy"]["backend"] == "openvino" and compiled["records"]["fidelity"]["fails"] is False
    # INT8 after QAT: every Linear (FullyConnected) runs int8 (i8 or u8, as the host's int8 form has it: edgepipe
    # .quantization.form); attention's activation matmuls stay float (bf16 where the CPU has it, else f32)
    precisions = compiled["records"]["conv_precisions"]
    assert set(precisions["FullyConnected"]) <= {"i8", "u8"} and compiled["accuracy"]["dtype"] == "int8"
    assert not {"i8", "u8"} & set(precisions.get("MatMul", {}))
    latency = compiled["latency"]
    assert latency["inputs"] == {n: "int64[1,32]" for n in ("input_ids", "attention_mask", "token_type_ids")}
    distilled = json.loads((run / "distill" / "metrics.json").read_text())
    teacher = json.loads((run / "teacher" / "metrics.json").read_text())
    assert distilled["params"] < teacher["params"]  # one layer of two, narrower FFN
    # every loss component logged per epoch: logits (soft, hard), hidden states and last-layer attention
    assert {"soft", "hard", "hidden", "attention"} <= set(distilled["records"]["history"][-1])
    pruned = json.loads((run / "prune" / "metrics.json").read_text())["records"]
    structure = pruned["structure"]
    assert structure["after"]["heads"] == [2] and structure["before"]["heads"] == [4]  # prune.heads 0.5
    assert structure["after"]["hidden_size"] < 64 and structure["after"]["ffn"][0] < 128  # Torch-Pruning's widths
    assert structure["vocabulary"]["from_data"] <= structure["vocabulary"]["vocabulary_after"]
    assert pruned["params_after"] <= 0.5 * pruned["params_before"]  # embeddings included
    data = json.loads((run / "manifest.json").read_text())["data"]["text"]
    assert data["tokenizer"] == "embedded:tiny-bert" and data["splits"]["train"]["sentences"] == 320
    assert (run / "report.md").is_file()


def test_jetson_target_writes_a_bundle_with_sequence_profiles_and_token_ids(runs):
    bundle = runs["jetson"] / "compile"
    settings = json.loads((bundle / "build_settings.json").read_text())
    assert settings["dynamic_dims"] == {"sequence": [1, 32, 32]} and settings["dtype"] == "int8"
    assert settings["input_shapes"]["input_ids"]["max"][1] == 32
    import numpy as np

    with np.load(bundle / "val.npz") as val:
        assert set(val.files) >= {"input_ids", "attention_mask", "labels"} and val["input_ids"].shape[1] == 32
    records = json.loads((bundle / "metrics.json").read_text())["records"]
    assert 0 <= records["device_validation"]["reference_top1"] <= 1



def test_onnx_runtime_target_compiles_and_times_token_ids(runs):
    compiled = json.loads((runs["generic-cpu"] / "compile" / "metrics.json").read_text())
    assert compiled["accuracy"]["backend"] == "onnxruntime" and compiled["records"]["fidelity"]["fails"] is False
    assert compiled["latency"]["inputs"]["input_ids"] == "int64[1,32]"
