"""Distillation, pruning and QAT of detectors (issue 27, items 4-6), on tiny models in seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_pruning as tp

from edgepipe.data.canvas import digit_canvases
from edgepipe.data.detection_batches import detection_bundle
from edgepipe.errors import EdgepipeError
from edgepipe.models.loading import load_torch_artifact, save_torch_artifact
from edgepipe.models.zoo import build_arch
from edgepipe.quantization.calibration import calibrate
from edgepipe.quantization.fakequant import find_conv_bn_pairs, fold_batchnorm, insert_fake_quant, quant_settings
from edgepipe.quantization.layers import quant_layers
from edgepipe.tasks import get_task
from edgepipe.training.detection_kd import SCORE_FLOOR, pkd_loss

TASK = get_task("detection")
CLASSES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list]:
    data = detection_bundle(digit_canvases(8, size=48, classes=CLASSES), digit_canvases(4, "val", size=48,
                                                                                      classes=CLASSES), 48, False,
                            False, 0)
    return next(data.train_batches(4, 0, augment=False))


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return (build_arch("faster_rcnn_small", {"num_classes": 4, "size": 48}),
            build_arch("ssd_small", {"num_classes": 4, "size": 48}))


def test_pkd_is_one_minus_pearson_and_ignores_each_channels_scale_and_offset() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 5, 5, generator=g)
    s = t + 0.5 * torch.randn(2, 3, 5, 5, generator=g)
    assert float(pkd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    scale, shift = torch.tensor([2.0, 0.1, 7.0]).view(1, 3, 1, 1), torch.tensor([1.0, -3.0, 0.0]).view(1, 3, 1, 1)
    assert float(pkd_loss(s * scale + shift, t)) == pytest.approx(float(pkd_loss(s, t)), rel=1e-4)
    r = np.mean([np.corrcoef(s[i, c].flatten(), t[i, c].flatten())[0, 1] for i in range(2) for c in range(3)])
    assert float(pkd_loss(s, t)) == pytest.approx(1 - r, rel=1e-3)


def test_labels_only_distillation_does_not_run_the_teacher_and_is_the_students_own_loss(batch) -> None:
    """alpha = beta = 0 (the scratch-same-init baseline): the teacher's forward, most of a KD step's compute with a
    Faster R-CNN teacher, is not paid, and the loss is the student's torchvision loss on the labels."""
    x, y = batch
    teacher, student = _models()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    distiller = TASK.distiller(teacher, student, 2.0, 0.0, 0.0, x)
    student.train()
    calls.clear()
    terms = distiller.step(student, x, y)
    torch.manual_seed(1)
    own = sum(student(x, y).values())
    assert calls == [] and float(terms["soft"]) == 0 == float(terms["feature"])
    assert float(terms["loss"]) == pytest.approx(float(terms["hard"])) and float(terms["hard"]) == pytest.approx(
        float(own), rel=1e-5)
    distiller.step(student, x, y)
    assert calls == []
    TASK.distiller(teacher, student, 2.0, 0.5, 0.0, x).step(student, x, y)
    assert calls == [1]


def test_the_distiller_logs_each_term_and_trains_the_students_and_adapters(batch) -> None:
    x, y = batch
    teacher, student = _models()
    distiller = TASK.distiller(teacher, student, 2.0, 0.5, 1.0, x)
    assert len(distiller.adapters) == 3 and distiller.pairs == [0, 1, 2]  # each SSD map, the FPN level of its size
    student.train()
    terms = distiller.step(student, x, y)
    assert {"loss", "hard", "soft", "soft_box", "feature", "classification", "bbox_regression"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values()) and 0 < float(terms["feature"]) <= 2
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.adapters.parameters())
    assert student.core.head.classification_head.module_list[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never trains
    distiller.remove()


def test_the_distillation_step_runs_under_bf16_autocast(batch) -> None:
    """Training autocasts to bf16 where the CPU has it (optim.autocast: auto): the teacher's detections come out in
    bf16 and must still fill the float targets (PyTorch emulates bf16 autocast on any CPU, so this runs anywhere)."""
    x, y = batch
    teacher, student = _models()
    distiller = TASK.distiller(teacher, student, 2.0, 0.5, 1.0, x)
    student.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = distiller.step(student, x, y)
    terms["loss"].backward()
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["soft"]) > 0
    distiller.remove()


def test_prediction_distillation_follows_the_teachers_detections(batch) -> None:
    x, y = batch
    teacher, student = _models()
    distiller = TASK.distiller(teacher, student, 1.0, 1.0, 0.0, x)
    assert len(distiller.adapters) == 0  # no feature term: no adapters, no feature hooks
    student.train()
    logits, regression = student.core(x)

    def detections(score: float) -> tuple[torch.Tensor, ...]:
        boxes, scores = torch.zeros(4, 100, 4), torch.zeros(4, 100)
        labels, count = torch.full((4, 100), -1), torch.zeros(4, dtype=torch.int64)
        for i, t in enumerate(y):
            n = len(t["boxes"])
            boxes[i, :n], scores[i, :n], labels[i, :n], count[i] = t["boxes"], score, t["labels"], n
        return boxes, scores, labels, count

    soft, soft_box = distiller.prediction_loss(student, logits, regression, detections(0.9))
    assert float(soft) > 0 and float(soft_box) > 0
    (soft + soft_box).backward()
    assert regression.requires_grad
    # detections under the score floor are no targets: no box term, only the background of every anchor
    none, no_box = distiller.prediction_loss(student, logits.detach(), regression.detach(),
                                             detections(SCORE_FLOOR / 2))
    assert float(no_box) == 0.0 and float(none) > 0
    distiller.remove()


def test_a_two_stage_detector_is_not_pruned_or_quantized_and_one_stage_cores_are(batch) -> None:
    teacher, student = _models()
    with pytest.raises(EdgepipeError, match="two-stage detector"):
        TASK.graph_core(teacher)
    core = TASK.graph_core(student)
    assert core is student.core


def test_pruning_the_core_keeps_the_class_and_box_layers_and_the_fixed_outputs(batch, tmp_path) -> None:
    x, _ = batch
    _, student = _models()
    heads = TASK.protected_layers(student, {})
    convs = [m for m in heads if isinstance(m, torch.nn.Conv2d)]
    widths = [m.out_channels for m in convs]
    example = torch.zeros(1, 3, 48, 48)
    pruner = tp.pruner.MetaPruner(TASK.graph_core(student), example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=heads)
    before = tp.utils.count_ops_and_params(student.core, example)[0]
    pruner.step()
    assert tp.utils.count_ops_and_params(student.core, example)[0] < 0.6 * before
    assert [m.out_channels for m in convs] == widths and len(convs) == 6  # 3 maps x (class, box)
    student.eval()
    with torch.no_grad():
        out = student(x)
    TASK.check_outputs(out, "pruned", {}, 4)
    art = save_torch_artifact(student, {"arch": "ssd_small", "kwargs": {"num_classes": 4, "size": 48}}, tmp_path,
                              (3, 48, 48), 4, meta={"task": "detection"})
    with torch.no_grad():
        again = load_torch_artifact(art)(x)
    assert all(torch.equal(a, b) for a, b in zip(out, again))


def test_qat_quantizes_the_core_alone_and_reloads_exactly(batch, tmp_path) -> None:
    x, _ = batch
    _, student = _models()
    pairs, note = find_conv_bn_pairs(student)
    assert note is None and pairs and all(c.startswith("core.") and b.startswith("core.") for c, b in pairs)
    settings = quant_settings("percentile", 99.99, 2, [], 8, "int8", {"activations": "int8", "weight_bits": 8}, [])
    model = insert_fake_quant(student, settings, (3, 48, 48))
    layers = quant_layers(model)
    assert layers and all(name.startswith("core.") for name in layers)
    assert len(layers) == sum(isinstance(m, torch.nn.Conv2d) for m in build_arch(
        "ssd_small", {"num_classes": 4, "size": 48}).core.modules())  # every conv of backbone and heads
    calibrate(model, [x], "percentile", 99.99)  # through the whole detector: its core's quantizers see the images
    fold_batchnorm(model, pairs)
    model.eval()
    with torch.no_grad():
        out = model(x)
    TASK.check_outputs(out, "qat", {}, 4)
    saved = {**settings, "bn_folded": [list(p) for p in pairs]}
    art = save_torch_artifact(model, {"arch": "ssd_small", "kwargs": {"num_classes": 4, "size": 48}}, tmp_path,
                              (3, 48, 48), 4, meta={"task": "detection"}, quantization=saved)
    with torch.no_grad():
        again = load_torch_artifact(art)(x)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
