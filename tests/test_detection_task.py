"""The detection task (issue 27, in progress): detectors behind fixed outputs, box-aware batches, and the teacher and
a labels-only student trained through the engine on the embedded digit canvases, scored by COCO mAP."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgepipe.config import validate_config
from edgepipe.data.canvas import digit_canvases
from edgepipe.data.detection_batches import detection_bundle
from edgepipe.engine.pipeline import run_pipeline
from edgepipe.engine.run import Run
from edgepipe.models.zoo import build_arch
from edgepipe.tasks import get_task, task_of


def _config(**data) -> dict:
    return {
        "name": "tiny-detection", "task": "detection",
        "data": {"kind": "digit-canvases", "canvas_images": 64, "image_size": 48, "batch_size": 16,
                 "eval_batch_size": 32, **data},
        "teacher": {"model": {"arch": "faster_rcnn_small", "kwargs": {"num_classes": 10, "size": 48}},
                    "train": {"epochs": 2, "lr": 0.02, "autocast": "off"}},
        "distill": {"student": {"arch": "ssd_small", "kwargs": {"num_classes": 10, "size": 48}},
                    "alpha": 0.0, "optim": {"epochs": 2, "lr": 0.02, "autocast": "off"}},
        "measure": {"warmup": 1, "iterations": 3, "throughput_batch": 4},
    }


@pytest.mark.parametrize("arch", ["ssd_small", "faster_rcnn_small"])
def test_a_detector_trains_on_its_loss_terms_and_returns_fixed_outputs(arch: str) -> None:
    torch.manual_seed(0)
    model = build_arch(arch, {"num_classes": 4, "size": 48})
    task = get_task("detection")
    data = detection_bundle(digit_canvases(8, size=48, classes=(0, 1, 2, 3)),
                            digit_canvases(4, "val", size=48, classes=(0, 1, 2, 3)), 48, True, False, 0)
    x, y = next(data.train_batches(4, 0))
    assert x.shape == (4, 3, 48, 48) and 0 <= float(x.min()) and float(x.max()) <= 1
    model.train()
    terms = task.train_loss(model, x, y)
    assert terms["loss"].requires_grad and len(terms) >= 4  # the total, hard, and the model's own terms
    terms["loss"].backward()
    model.eval()
    with torch.no_grad():
        out = model(x)
    task.check_outputs(out, "model", {"input_shape": [3, 48, 48], "num_classes": 4}, 4)
    boxes, scores, labels, count = out
    assert boxes.shape == (4, 100, 4) and labels.dtype == torch.int64 and count.dtype == torch.int64
    for i, c in enumerate(count.tolist()):
        assert (scores[i, c:] == 0).all() and (labels[i, c:] == -1).all()
        assert (scores[i, 1:c] <= scores[i, :c - 1]).all()  # in score order


def test_augmented_batches_keep_boxes_on_their_objects_and_depend_on_seed_and_epoch() -> None:
    train = digit_canvases(6, size=48, classes=(0, 1, 2), seed=1)
    data = detection_bundle(train, digit_canvases(2, "val", size=48, classes=(0, 1, 2)), 48, True, True, 0)
    first = list(data.train_batches(3, 0))
    again = list(data.train_batches(3, 0))
    other = list(data.train_batches(3, 1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    for x, targets in first:
        for image, t in zip(x, targets):
            assert t["boxes"].dtype == torch.float32 and len(t["boxes"]) == len(t["labels"])
            for x1, y1, x2, y2 in t["boxes"].round().int().tolist():
                assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48
                assert float(image[:, y1:y2, x1:x2].max()) > 0.4  # the digit's ink is inside its box


def test_the_detection_config_resolves_its_task_and_refuses_a_missing_path() -> None:
    assert task_of(validate_config({k: v for k, v in _config().items() if k != "task"})).name == "detection"
    with pytest.raises(Exception, match="path: voc data needs a path to the dataset root"):
        validate_config(_config(kind="voc"))


KD = {"alpha": 0.5, "beta": 1.0, "temperature": 2.0}
FULL = ("teacher", "distill", "prune", "qat", "export", "compile")


@pytest.mark.parametrize("target,order,distill", [
    ("intel-xeon-amx", FULL, KD), ("jetson-orin-nano", ("teacher", "distill", "export", "compile"), {})])
def test_detectors_train_distil_prune_quantize_export_and_compile_through_the_engine(
        tmp_path: Path, target: str, order: tuple[str, ...], distill: dict) -> None:
    """Faster R-CNN teacher and SSD student on the digit canvases, through Run/run_pipeline: every epoch logs the
    detectors' own loss terms (and the distillation's) and mAP@.5; the student (distilled, pruned, QAT'd on OpenVINO's
    target; labels only for the Jetson bundle) exports with NMS in the graph, checked by mAP, and compiles: OpenVINO
    INT8 with every convolution in i8/u8 and NMS in the compiled model; a Jetson bundle whose ONNX passes the TensorRT
    checks."""
    raw = _config()
    raw["distill"].update(distill)
    raw["prune"] = {"ratio": 0.6, "steps": 1, "alpha": 0.5, "temperature": 2.0,
                    "optim": {"epochs": 1, "lr": 0.01, "autocast": "off"}}
    raw["qat"] = {"calibration_batches": 2, "alpha": 0.5, "temperature": 2.0,
                  "optim": {"epochs": 1, "lr": 0.001, "autocast": "off"}}
    run = Run.create(tmp_path / "run", validate_config(raw), target, order=order)
    run_pipeline(run)
    kd = {"soft", "soft_box", "feature"} if distill else set()
    for stage, terms in (("teacher", {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}),
                         ("distill", {"classification", "bbox_regression", *kd})):
        m = json.loads((run.root / stage / "metrics.json").read_text())
        assert m["status"] == "done"
        history = m["records"]["history"]
        assert len(history) == 2 and terms <= set(history[0]), stage
        assert all(0.0 <= r["val_map50"] <= 1.0 for r in history)
        assert history[-1]["loss"] < history[0]["loss"], stage
        assert np.isfinite([r["loss"] for r in history]).all()
        # measured: COCO mAP from pycocotools on the validation canvases, latency on the target's runtime (the
        # two-stage teacher exported one image at a time and scanned over the batch)
        assert m["metric"]["name"] == "map50" and m["accuracy"]["samples"] == 16
        assert set(m["accuracy"]["per_class"]) == {str(d) for d in range(10)}
        assert m["latency"]["backend"] != "pytorch" and m["on_target"] and m["pytorch_latency"]["backend"] == "pytorch"
        if stage == "distill":  # the student against the teacher, both on the target: metric and paired latency
            assert m["gain"]["metric"] == "map50" and m["gain"]["against"] == "teacher"
            assert m["gain"]["speedup"] > 0 and m["gain"]["timing"] == "alternating rounds"
    if "prune" in order:
        pruned = json.loads((run.root / "prune" / "metrics.json").read_text())["records"]
        assert pruned["macs_ratio"] <= 0.6 and {"soft", "soft_box"} <= set(pruned["history"][-1])
        qat = json.loads((run.root / "qat" / "metrics.json").read_text())["records"]
        assert qat["quantized_layers"] > 0 and qat["distillation"]["method"].startswith("prediction distillation")
    export = json.loads((run.root / "export" / "metrics.json").read_text())
    checks = export["records"]["checks"]
    assert checks["max_gap_points"] == (1.0 if "qat" in order else 0.5) and checks["samples"] == 16
    assert checks["gap_points"] <= checks["max_gap_points"]
    onnx_ops = {n.op_type for n in onnx.load(str(run.root / "export" / "model.onnx")).graph.node}
    assert "NonMaxSuppression" in onnx_ops
    compiled = json.loads((run.root / "compile" / "metrics.json").read_text())
    assert compiled["status"] == "done" and compiled["metric"]["name"] == "map50"
    if target == "jetson-orin-nano":
        from edgepipe.backends.tensorrt_plan import check_onnx_for_tensorrt

        assert (run.root / "compile" / "edgepipe_trt.py").exists()
        assert check_onnx_for_tensorrt(run.root / "compile" / "model.onnx") == []
        _device_detections_are_scored_on_import(run.root, compiled["records"]["device_validation"])
        # the report draws the first validation images with the ground truth and each stage's detections
        from edgepipe.reporting.report import write_report

        md, _ = write_report(run.root)
        assert len(export["accuracy"]["examples"]) == 4
        assert (run.root / "report_assets" / "detections.png").stat().st_size > 1000
        assert "report_assets/detections.png" in md.read_text()
    else:
        records = compiled["records"]
        assert compiled["latency"]["backend"] == "openvino" and compiled["latency"]["dtype"] == "int8"
        assert records["int8_convolutions"] and records["nms_layers"] == 1 and records["residual_adds"] == {}
        assert not records["fidelity"]["fails"] and records["fidelity"]["metric"] == "map50"


class _OrtEngine:
    """What the device script's evaluation reads from a TensorRT engine (named inputs and outputs, ``run``), here
    the bundle's ONNX in ONNX Runtime: the device's evaluation and the host's scoring of it, end to end."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def _device_detections_are_scored_on_import(run: Path, reference: dict) -> None:
    import hashlib

    from edgepipe.backends import tensorrt_device as device
    from edgepipe.engine.device_results import import_results

    bundle = run / "compile"
    accuracy = device.evaluate(_OrtEngine(bundle / "model.onnx"), bundle / "val.npz", 8)
    assert accuracy["images"] == reference["images"] == 16 and len(accuracy["detections"]["boxes"]) == 16
    timing = {"batch": 1, "warmup": 2, "iterations": 5, "p50_ms": 0.5, "p90_ms": 0.6, "p99_ms": 0.7,
              "images_per_s": 2000.0}
    results = {"schema": device.SCHEMA, "created": "2026-12-06T00:00:00+00:00", "target": "jetson-orin-nano",
               "tensorrt_version": "10.3.0", "gpu": "Orin",
               "engine": {"file": "model.engine",
                          "onnx_sha256": hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()},
               "latency": timing, "throughput": {**timing, "batch": 8}, "accuracy": accuracy}
    path = run / "results.json"
    path.write_text(json.dumps(results))
    stored = json.loads(import_results(run, path).read_text())["accuracy"]
    # the device's detections scored by the same pycocotools code as the host's reference on the same images
    assert stored["map50"] == pytest.approx(reference["reference_map50"], abs=0.005)
    assert stored["scored"].startswith("on the host at import")
    broken = json.loads(json.dumps(results))
    found = broken["accuracy"]["detections"]
    i = next(i for i, boxes in enumerate(found["boxes"]) if boxes)
    found["scores"][i] = ["x"] * len(found["boxes"][i])
    path.write_text(json.dumps(broken))
    with pytest.raises(Exception, match=f"accuracy.detections of image {i} are damaged"):
        import_results(run, path)


def test_what_a_detector_cannot_do_is_one_line_and_the_done_stages_stay(tmp_path: Path, capsys) -> None:
    from edgepipe.cli import main

    raw = _config()
    raw["teacher"]["train"]["epochs"] = 1
    raw["distill"]["feature_pairs"] = [{"teacher": "model.backbone", "student": "core.backbone"}]
    raw["distill"]["beta"] = 1.0
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(raw))
    run = tmp_path / "run"
    assert main(["teacher", "--config", str(cfg), "--target", "generic-cpu", "--run", str(run)]) == 0
    capsys.readouterr()
    assert main(["distill", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill.feature_pairs: a detector's feature maps are paired by resolution" in err[0]
    entries = {e["name"]: e for e in json.loads((run / "manifest.json").read_text())["stages"]}
    assert entries["teacher"]["status"] == "done"
    assert "distill" not in entries or entries["distill"]["status"] == "pending"


def test_the_ptq_baselines_stages_fine_tune_by_distillation_then_nncf_int8_the_ssd_student(tmp_path: Path) -> None:
    """The ptq baseline's stages: finetune (the qat stage's epochs and prediction distillation, no fake quantization)
    then NNCF nncf.quantize (OpenVINO INT8) of the exported SSD: every convolution int8, the NMS still in the graph,
    scored by mAP like every stage."""
    raw = _config()
    raw["teacher"]["train"]["epochs"] = 1
    raw["distill"]["optim"]["epochs"] = 1
    raw["qat"] = {"alpha": 0.5, "temperature": 2.0, "optim": {"epochs": 1, "lr": 0.001, "autocast": "off"}}
    order = ("teacher", "distill", "finetune", "export", "ptq")
    run = Run.create(tmp_path / "run", validate_config(raw), "intel-xeon-amx", order=order)
    run_pipeline(run)
    tuned = json.loads((run.root / "finetune" / "metrics.json").read_text())["records"]
    assert tuned["distillation"]["method"].startswith("prediction distillation")
    assert {"soft", "soft_box", "hard"} <= set(tuned["history"][0])
    m = json.loads((run.root / "ptq" / "metrics.json").read_text())
    assert m["status"] == "done" and m["metric"]["name"] == "map50" and m["latency"]["dtype"] == "int8"
    convs = m["records"]["conv_precisions"]["Convolution"]
    assert set(convs) <= {"i8", "u8"} and sum(convs.values()) > 0 and m["accuracy"]["samples"] == 16
