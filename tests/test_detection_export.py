"""A one-stage detector exported whole (issue 27, item 7): decoding and NMS in the graph, fixed outputs, dynamic batch,
the same detections in ONNX Runtime as in PyTorch, and an ONNX that TensorRT's parser takes (NMS included)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgepipe.backends.tensorrt_plan import NMS_LAYER, check_onnx_for_tensorrt
from edgepipe.export.onnx_export import export_onnx
from edgepipe.models.detection_outputs import BatchedNMS
from edgepipe.models.zoo import build_arch
from edgepipe.tasks import get_task

NAMES = Path(__file__).parent / "fake_tensorrt" / "tensorrt_10_3_names.json"


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, thresh: float, cap: int) -> set[tuple[int, ...]]:
    """The ONNX NonMaxSuppression definition, one image and class at a time, written out plainly (the reference)."""
    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    kept = set()
    for n in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            chosen: list[int] = []
            for t in np.argsort(-scores[n, c], kind="stable"):
                if scores[n, c, t] <= thresh or len(chosen) == cap:
                    break
                if all(overlap(boxes[n, t], boxes[n, k]) <= iou for k in chosen):
                    chosen.append(int(t))
            kept |= {(n, c, t) for t in chosen}
    return kept


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(3, 40, 2, generator=g) * 40
    wh = 4 + torch.rand(3, 40, 2, generator=g) * 16
    scores = torch.rand(3, 4, 40, generator=g)
    scores[scores < 0.3] = 0  # some candidates of no class at all
    return torch.cat([xy, xy + wh], dim=-1), scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_keeps_what_the_onnx_definition_keeps_in_pytorch_and_in_onnx_runtime(seed: int, tmp_path) -> None:
    boxes, scores = _random_case(seed)
    want = _greedy_nms(boxes.numpy(), scores.numpy(), 0.45, 0.2, 5)
    got = {tuple(r) for r in BatchedNMS.apply(boxes, scores, 5, 0.45, 0.2).tolist()}
    assert got == want and any(r[1] == 3 for r in got)

    class Wrap(torch.nn.Module):
        def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return BatchedNMS.apply(b, s, 5, 0.45, 0.2)

    path = tmp_path / "nms.onnx"
    torch.onnx.export(Wrap(), (boxes, scores), str(path), dynamo=False, opset_version=17, input_names=["b", "s"])
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("NonMaxSuppression") == 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_kept = {tuple(r) for r in session.run(None, {"b": boxes.numpy(), "s": scores.numpy()})[0].tolist()}
    assert onnx_kept == want


@pytest.fixture(scope="module")
def ssd() -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    model = build_arch("ssd_small", {"num_classes": 3, "size": 48}).eval()
    with torch.no_grad():  # confident enough to leave detections above the score threshold
        model.core.head.classification_head.module_list[0].bias.normal_(0, 3)
    return model, export_onnx(model, (3, 48, 48), 17, get_task("detection"), 3)


def test_the_exported_ssd_returns_pytorchs_detections_at_any_batch_size(ssd) -> None:
    model, proto = ssd
    ops = {n.op_type for n in proto.graph.node}
    assert {"NonMaxSuppression", "TopK", "Conv", "Softmax"} <= ops
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels", "count"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 6):
        x = torch.rand(batch, 3, 48, 48, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = [t.numpy() for t in model(x)]
        out = session.run(None, {"images": x.numpy()})
        assert out[0].shape == (batch, 100, 4) and out[3].shape == (batch,)
        assert (ref[3] > 0).all() and np.array_equal(ref[3], out[3])
        assert np.allclose(ref[1], out[1], atol=1e-5)  # the same scores in the same order
        for i, c in enumerate(out[3]):  # the same detections; two of nearly equal score may trade places
            for box, score, label in zip(out[0][i, :c], out[1][i, :c], out[2][i, :c]):
                near = (np.abs(ref[1][i, :c] - score) < 1e-5) & (ref[2][i, :c] == label)
                assert (np.abs(ref[0][i, :c][near] - box).max(axis=1) < 1e-3).any()
            assert (out[2][i, c:] == -1).all() and (out[1][i, :c] > 0).all()
            assert (out[0][i, :c, 2:] >= out[0][i, :c, :2]).all() and out[0][i, :c].max() <= 48


def test_the_detector_onnx_passes_tensorrts_checks_with_nms_as_its_nms_layer(ssd, tmp_path) -> None:
    _, proto = ssd
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    assert check_onnx_for_tensorrt(path) == []
    names = json.loads(NAMES.read_text())  # the real TensorRT 10.3 bindings' names: the layer the parser builds
    layer, method = NMS_LAYER
    assert layer in names["classes"] and method in names["classes"]["INetworkDefinition"]
    assert "BoundingBoxFormat" in names["enums"]


def test_tensorrts_nms_rules_are_checked(tmp_path) -> None:
    from onnx import TensorProto, helper

    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 3000, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2, 3000])
    iou = helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("selected", TensorProto.INT64, ["m", 3])
    limit = helper.make_tensor("limit", TensorProto.INT64, [1], [10])
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "limit", "iou"], ["selected"], name="nms")
    graph = helper.make_graph([node], "g", [boxes, scores, iou], [out], initializer=[limit])
    path = tmp_path / "nms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    problems = check_onnx_for_tensorrt(path)
    assert any("input 3 (iou_threshold) is not a constant" in p for p in problems)
    assert any("input 4 (score_threshold) is not a constant" in p for p in problems)
    assert any("3000 boxes per image, more than the 2000" in p for p in problems)


def test_a_two_stage_detector_exports_per_image_and_runs_at_any_batch_and_detection_count(tmp_path) -> None:
    """A Faster R-CNN (the teacher) is traced for one image (Detector.pad reads no length as a Python number, so the
    trace holds for any detection count) and scanned over the batch (edgepipe.export.per_image): PyTorch's
    detections at batch 1 and 6, on images with different counts, in ONNX Runtime and OpenVINO."""
    torch.manual_seed(0)
    model = build_arch("faster_rcnn_small", {"num_classes": 3, "size": 48}).eval()
    with torch.no_grad():  # class scores spread out, and a threshold among them: counts differ between images
        model.model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.3)
    model.model.roi_heads.score_thresh = 0.2645  # about the median score of this model
    images = [torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    proto = export_onnx(model, (3, 48, 48), 17, get_task("detection"), 3)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node] == ["Scan"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(proto.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    counts = set()
    for x in [*images, torch.cat(images)]:
        with torch.no_grad():
            ref = [t.numpy() for t in model(x)]
        counts |= set(ref[3].tolist())
        result = compiled({"images": x.numpy()})
        for out in (session.run(None, {"images": x.numpy()}), [result[o] for o in compiled.outputs]):
            assert np.array_equal(ref[3], out[3]) and np.array_equal(ref[2], out[2])
            assert np.allclose(ref[1], out[1], atol=1e-5) and np.allclose(ref[0], out[0], atol=1e-3)
    assert len(counts) > 2, counts
    # OpenVINO's execution graph shows the Scan, not the layers inside it: the runner reports the precision hint
    # (not "int8" for want of float layers). NNCF does not enter the loop body either: post-training INT8 quantizes
    # the one-image graph inside the Scan, and the runner runs it once per image of a batch.
    from edgepipe.backends.openvino import OvRunner, load, post_training_quantize
    from edgepipe.export.per_image import per_image_graph
    from edgepipe.profiles import get_profile

    path = tmp_path / "teacher.onnx"
    onnx.save(proto, str(path))
    assert OvRunner(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).dtype == "fp32"
    single = per_image_graph(proto)
    assert per_image_graph(single) is None and [i.name for i in single.graph.input] == ["images"]
    assert [d.dim_value for d in single.graph.input[0].type.tensor_type.shape.dim] == [3, 48, 48]
    one = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
    scanned = session.run(None, {"images": images[0].numpy()})
    for a, b in zip(scanned, one.run(None, {"images": images[0].numpy()[0]})):
        assert np.array_equal(a[0], b)
    artifact, records = post_training_quantize(path, torch.cat(images * 3).numpy(), "performance",
                                               get_profile("intel-xeon-amx"), tmp_path / "ptq", {}, lambda *a: None)
    convs = records["conv_precisions"]["Convolution"]
    assert records["per_image"] and artifact.meta["per_image"] and set(convs) <= {"i8", "u8"} and sum(convs.values())
    artifact.save()
    runner = load(artifact)
    batch = torch.cat(images).numpy()
    out = runner.run({"images": batch})
    assert [out[o.name].shape for o in proto.graph.output] == [r.shape for r in session.run(None, {"images": batch})]
    for i in (0, 5):  # a batch's detections are its images' own
        alone = runner.run({"images": batch[i:i + 1]})
        assert all(np.array_equal(alone[k][0], out[k][i]) for k in out)
    runner.bind({"images": batch})()
