"""The embedded default recipe (digits), run for real once, then compiled for the other kinds of target.

Student params <= 1/3 of the teacher's, pruned MACs <= 60% of the unpruned student's, final accuracy
within 2 points of the teacher's, and every stage folder has its metrics. Then the INT8 graph form
(issue 7) on each target kind: the Jetson bundle's QDQ ONNX, OpenVINO's execution graph on this CPU,
and ONNX Runtime's integer kernels. About 2 minutes on 2 cores.

Host properties the expectations follow, named where used: ``exact_8bit_weights_on_cpu()`` (VNNI or
AMX in the CPU flags: int32 dot products) decides the CPU form's weight bits and the speed-up bar.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgepipe.cli import main
from edgepipe.quantization.cpu_form import exact_8bit_weights_on_cpu
from tests.support import JETSON_COMPILED_KIND, without_tensorrt
from edgepipe.engine.stage import STAGE_ORDER

pytestmark = pytest.mark.e2e


def _metrics(run: Path) -> dict[str, dict]:
    return {s: json.loads((run / s / "metrics.json").read_text()) for s in STAGE_ORDER}


def _residual_add_inputs(onnx_path: Path) -> list[str]:
    graph = onnx.load(str(onnx_path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert adds, "the ResNet student has residual adds"
    return [producers.get(i, "graph input") for n in adds for i in n.input]


# default_run (tests/conftest.py): the digits recipe for the Jetson, run once per session in this process.
def _switch(default_run: Path, tmp_path: Path, target: str) -> Path:
    run = tmp_path / f"digits-{target}"
    shutil.copytree(default_run, run)
    assert main(["run", "--run", str(run), "--target", target, "--no-report"]) == 0
    from edgepipe.profiles import get_profile

    return run / "targets" / get_profile(target).name  # another target lives in targets/<name>/ (README)


def test_default_digits_pipeline_meets_targets(default_run: Path) -> None:
    m = _metrics(default_run)
    assert m["distill"]["params"] <= m["teacher"]["params"] / 3
    assert m["prune"]["macs"] <= 0.60 * m["distill"]["macs"]
    teacher_top1 = m["teacher"]["accuracy"]["top1"]
    for final in ("qat", "export", "compile"):
        assert m[final]["accuracy"]["top1"] >= teacher_top1 - 0.02, final
    assert m["export"]["artifact"]["dtype"] == "int8"
    assert m["compile"]["artifact"]["kind"] == JETSON_COMPILED_KIND


@without_tensorrt
def test_jetson_bundle_has_the_tensorrt_form(default_run: Path) -> None:
    """8-bit weights, int8 zero-point 0, per-channel weights on axis 0, Q/DQ on every residual Add input."""
    from edgepipe.export.onnx_export import qdq_report

    bundle = default_run / "compile" / "model.onnx"
    form = _metrics(default_run)["qat"]["records"]["form"]
    assert (form["activations"], form["weight_bits"]) == ("int8", 8)
    report = qdq_report(bundle)
    assert report["zero_point_dtypes"] == ["int8"] and report["zero_points_all_zero"]
    assert report["weights_per_channel_axis0"]
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(bundle)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert max(int(np.abs(w).max()) for w in weights) > 63  # full 8-bit weights somewhere
    assert set(_residual_add_inputs(bundle)) == {"DequantizeLinear"}


def test_openvino_runs_whole_blocks_in_int8(default_run: Path, tmp_path: Path) -> None:
    """intel-xeon-amx on this CPU: every Convolution and residual Add in i8/u8, one standalone
    FakeQuantize at most (the input's), compiled top-1 within 0.3 points of the exported graph's."""
    run = _switch(default_run, tmp_path, "intel-xeon-amx")
    m = _metrics(run)
    form = m["qat"]["records"]["form"]
    assert form["activations"] == "uint8_after_relu"
    assert form["weight_bits"] == (8 if exact_8bit_weights_on_cpu() else 7)  # host property: VNNI/AMX
    assert set(_residual_add_inputs(run / "export" / "model.onnx")) == {"DequantizeLinear"}
    rec = m["compile"]["records"]
    convs = [o for o in rec["op_precisions"] if o["op"] == "Convolution"]
    assert convs and all(o["precision"] in ("i8", "u8") for o in convs)
    assert rec["residual_adds"] and set(rec["residual_adds"].values()) <= {"i8", "u8"}
    assert rec["float_compute_ops"] == []
    assert len(rec["standalone_fake_quantize"]) <= 1
    assert all(name.startswith("/x/") for name in rec["standalone_fake_quantize"])  # the model input's
    fid = rec["fidelity"]
    assert fid["checked"] and fid["top1_drop_points"] <= 0.3
    assert m["compile"]["accuracy"]["top1"] >= m["export"]["accuracy"]["top1"] - 0.003
    # float parts run in the precision asked for, and the record says which
    assert rec["settings"]["config"]["INFERENCE_PRECISION_HINT"] == "bf16"  # the profile's best float dtype
    assert rec["float_parts_precision"] in ("bf16", "f32")


def test_onnxruntime_runs_integer_convolutions_faster_than_float(default_run: Path, tmp_path: Path) -> None:
    """generic-cpu: every convolution a QLinearConv, residual adds QLinearAdd, top-1 within 0.3 points of
    the QAT model, batch-64 throughput a clear multiple of the same model's float ONNX on this host."""
    from edgepipe.engine.artifacts import Artifact
    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.models.loading import load_torch_artifact
    from edgepipe.runtime.runner import time_runner
    from edgepipe.export.onnx_export import export_onnx
    from edgepipe.tasks import get_task

    run = _switch(default_run, tmp_path, "generic-cpu")
    m = _metrics(run)
    rec = m["compile"]["records"]
    assert rec["runtime_dtype"] == "int8"
    assert set(rec["executed_compute_ops"]["int8"]) == {"QLinearConv"} and "Conv" not in rec["executed_compute_ops"]["float"]
    assert rec["executed_compute_ops"]["int8"]["QLinearConv"] == sum(
        1 for n in onnx.load(str(run / "export" / "model.onnx")).graph.node if n.op_type == "Conv")
    assert rec["residual_adds"] and set(rec["residual_adds"].values()) == {"int8"}
    assert m["compile"]["accuracy"]["top1"] >= m["qat"]["accuracy"]["top1"] - 0.003
    assert rec["fidelity"]["top1_drop_points"] <= 0.3

    prune = Artifact.load(run.parent.parent / "prune")  # target-independent: shared with the run switched from
    shape = tuple(prune.meta["input_shape"])
    float_onnx = tmp_path / "float.onnx"
    onnx.save(export_onnx(load_torch_artifact(prune), shape, 17), str(float_onnx))
    rates = {}
    for name, path in (("float", float_onnx), ("int8", run / "compile" / "model.ort.onnx")):
        feeds = get_task("classification").timing_inputs({"input_shape": list(shape)}, 64)
        rates[name] = time_runner(OrtRunner(path, threads=2), feeds, 10, 60).images_per_s
    # Host property: with VNNI/AMX (int32 dot products) 1.5x, the bar; measured 2.05x on a Zen 4
    # (AVX-512 VNNI). An AVX2-only CPU's int8 kernels (vpmaddubsw) gain less and were not measured with
    # this graph yet; there the bar is "not slower" until a run on such a host sets a measured one.
    bar = 1.5 if exact_8bit_weights_on_cpu() else 1.0
    assert rates["int8"] >= bar * rates["float"], rates


def test_students_section_reads_the_run_folders(default_run: Path, tmp_path: Path) -> None:
    """`python -m edgepipe.reporting.benchmarks students` writes its BENCHMARKS.md section from a run's own figures."""
    from edgepipe.reporting.benchmarks import main as benchmarks_main

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    assert benchmarks_main(["students", "--run", str(default_run), "--out", str(out)]) == 0
    text = out.read_text()
    compiled = _metrics(default_run)["compile"]
    row = next(line for line in text.splitlines() if line.startswith("| digits-jetson |"))
    assert f"{100 * compiled['accuracy']['top1']:.2f}%" in row and "kept text" in text
    gain = _metrics(default_run)["qat"]["gain"]  # float vs INT8, timed back to back by the QAT stage
    assert gain["before_dtype"] != "int8" and gain["after_dtype"] in ("int8", gain["before_dtype"])
    assert f"{gain['speedup']:.2f}x" in row and f"({gain['before_dtype']})" in row
    assert text.count("<!-- begin: students -->") == 1
