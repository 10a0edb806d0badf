"""Soft targets from OpenVINO with a cache, and a shallower student initialised from the teacher's blocks."""
from __future__ import annotations

import pytest
import torch

from edgepipe.config import FeaturePair
from edgepipe.training.distillation import FeatureHints, SoftTargets, init_from_teacher, kd_step
from edgepipe.errors import EdgepipeError
from edgepipe.models.loading import ExportedProgramModel
from edgepipe.models.zoo import cifar_resnet


def _teacher(depth: int = 20, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return cifar_resnet(depth=depth, width=width, in_channels=1).eval()


def test_student_takes_evenly_spaced_teacher_blocks() -> None:
    teacher, student = _teacher(20), cifar_resnet(depth=14, width=8, in_channels=1)
    report = init_from_teacher(student, teacher)
    assert report["blocks"] == {"layer1": [0, 2], "layer2": [0, 2], "layer3": [0, 2]}
    assert torch.equal(student.layer2[1].conv1.weight, teacher.layer2[2].conv1.weight)
    assert torch.equal(student.layer3[0].shortcut[0].weight, teacher.layer3[0].shortcut[0].weight)
    assert torch.equal(student.fc.weight, teacher.fc.weight)


def test_init_from_an_exported_program_teacher() -> None:
    teacher = _teacher(14)
    program = ExportedProgramModel(torch.export.export(teacher, (torch.randn(2, 1, 8, 8),)).module())
    student = cifar_resnet(depth=8, width=8, in_channels=1)
    init_from_teacher(student, program)
    assert torch.equal(student.layer1[0].conv2.weight, teacher.layer1[0].conv2.weight)


def test_init_names_the_tensor_that_does_not_fit() -> None:
    with pytest.raises(EdgepipeError, match=r"conv1\.weight.*init: random"):
        init_from_teacher(cifar_resnet(depth=8, width=4, in_channels=1), _teacher(14))
    with pytest.raises(EdgepipeError, match="has 3 blocks, the teacher 1"):
        init_from_teacher(cifar_resnet(depth=20, width=8, in_channels=1), _teacher(8))


def test_openvino_soft_targets_match_pytorch_and_cache() -> None:
    teacher = _teacher(14)
    targets = SoftTargets(teacher, "openvino", cache=True, key="test-ov", example=torch.randn(2, 1, 8, 8))
    assert targets.max_abs_diff is not None and targets.max_abs_diff < 1e-3
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(targets(x), teacher(x), atol=1e-4, rtol=1e-4)
    again = targets(x.clone().contiguous(memory_format=torch.channels_last))  # same values, other layout
    assert torch.equal(again, targets(x))
    rec = targets.record()
    assert rec["teacher_forwards"] == 1 and rec["cache_hits"] == 2
    other = SoftTargets(teacher, "openvino", cache=True, key="test-ov", example=torch.randn(2, 1, 8, 8))
    other(x)
    assert other.record()["cache_hits"] == 1  # a later stage of the same process


def test_feature_hints_need_the_torch_teacher() -> None:
    teacher, student = _teacher(14), cifar_resnet(depth=8, width=8, in_channels=1)
    hints = FeatureHints(teacher, student, [FeaturePair(teacher="layer3", student="layer3")], torch.randn(2, 1, 8, 8))
    targets = SoftTargets(teacher, "openvino", example=torch.randn(2, 1, 8, 8))
    with pytest.raises(EdgepipeError, match="soft_targets.runtime: torch"):
        kd_step(targets, 4.0, 0.9, 0.5, hints)


def test_cached_logits_outlive_the_process_on_disk(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """A resumed run or a later stage command reads the teacher's logits back instead of recomputing them, and a
    damaged cache file is recomputed, never trusted."""
    import edgepipe.training.distillation as distillation

    teacher = cifar_resnet(8, width=4).eval()
    batches = [torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i, n in enumerate((5, 5, 3))]
    first = SoftTargets(teacher, cache=True, key="t-disk", cache_dir=tmp_path)
    want = [first(x) for x in batches]
    assert first.record()["teacher_forwards"] == 3
    shards = list((tmp_path / "soft_targets").rglob("*.npz"))
    assert len(shards) == 1
    distillation._LOGITS_CACHE.clear()  # a new process
    second = SoftTargets(teacher, cache=True, key="t-disk", cache_dir=tmp_path)
    got = [second(x) for x in batches]
    rec = second.record()
    assert rec["loaded_from_disk"] == 3 and rec["cache_hits"] == 3 and rec["teacher_forwards"] == 0
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    distillation._LOGITS_CACHE.clear()
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    with caplog.at_level("WARNING"):
        third = SoftTargets(teacher, cache=True, key="t-disk", cache_dir=tmp_path)
    assert "damaged cache file" in caplog.text and third.loaded == 0
    assert torch.equal(third(batches[0]), want[0]) and third.misses == 1
    distillation._LOGITS_CACHE.clear()
    other = SoftTargets(cifar_resnet(8, width=4), cache=True, key="another-teacher", cache_dir=tmp_path)
    assert other.loaded == 0  # another teacher's logits live under another key
