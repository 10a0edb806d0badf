"""More ways to distill, each a config choice: decoupled KD (distill.loss: dkd), teacher assistants
(distill.assistants) and unlabeled images (data.unlabeled, distill.pseudo_label_threshold)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from edgepipe.cli import main
from edgepipe.config import DataConfig
from edgepipe.data.loading import load_data
from edgepipe.tasks.classification import dkd_terms, kd_terms
from tests.support import tiny_config


def _write(tmp_path, cfg) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def _distill(tmp_path, cfg) -> dict:
    assert main(["teacher", "--config", _write(tmp_path, cfg), "--target", "intel-xeon-amx",
                 "--run", str(tmp_path / "run")]) == 0
    assert main(["distill", "--run", str(tmp_path / "run")]) == 0
    return json.loads((tmp_path / "run" / "distill" / "metrics.json").read_text())


# --- decoupled KD ------------------------------------------------------------------------------------------------
def test_dkd_decomposes_kd():
    """Zhao et al. 2022, eq. 5: per sample, KD = TCKD + (1 - p_t of the target) x NCKD (teacher's probability at T)."""
    torch.manual_seed(0)
    for _ in range(5):
        s, t, y = torch.randn(1, 10), torch.randn(1, 10) * 3, torch.randint(0, 10, (1,))
        d, k = dkd_terms(s, t, y, 4.0, 1.0, 1.0, 1.0), kd_terms(s, t, y, 4.0, 1.0)
        p_target = torch.softmax(t / 4.0, dim=1)[0, y[0]]
        assert float(k["soft"]) == pytest.approx(float(d["tckd"] + (1 - p_target) * d["nckd"]), rel=1e-4)
    same = dkd_terms(t, t, y, 4.0, 0.5, 1.0, 8.0)
    assert float(same["soft"]) == pytest.approx(0.0, abs=1e-5)
    weighted = dkd_terms(s, t, y, 2.0, 0.7, 2.0, 8.0)
    assert float(weighted["soft"]) == pytest.approx(float(2 * weighted["tckd"] + 8 * weighted["nckd"]), rel=1e-5)
    assert float(weighted["loss"]) == pytest.approx(float(0.7 * weighted["soft"] + 0.3 * weighted["hard"]), rel=1e-5)


def test_dkd_distill_stage_logs_its_components(tmp_path):
    base = tiny_config().distill.model_dump()
    cfg = tiny_config(distill={**base, "loss": "dkd", "dkd_beta": 4.0})
    records = _distill(tmp_path, cfg)["records"]
    assert records["loss"] == "DKD" and records["dkd_beta"] == 4.0
    assert all({"tckd", "nckd", "soft", "hard"} <= set(row) for row in records["history"])


def test_dkd_for_a_detector_is_one_line(tmp_path, capsys):
    cfg = yaml.safe_load(open("configs/digit-detection.yaml"))
    cfg["distill"]["loss"] = "dkd"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path), "--target", "jetson", "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "distill.loss: dkd is not offered by task detection" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()



# --- teacher assistants ------------------------------------------------------------------------------------------
def _assistant_config():
    base = tiny_config().distill.model_dump()
    return tiny_config(
        teacher={"model": {"arch": "cifar_resnet", "kwargs": {"depth": 14, "width": 8, "in_channels": 1}},
                 "train": {"epochs": 1, "lr": 0.1}},
        distill={**base, "init": "teacher", "assistants": [
            {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "in_channels": 1}}],
                 "student": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "width": 8, "in_channels": 1}}})


def test_teacher_assistant_chain_is_a_cached_run_and_teaches_the_student(tmp_path, monkeypatch):
    """teacher -> assistant -> student: the assistant is distilled in RUN/assistants/0 from the teacher; the student
    from the assistant (its init and its soft targets); a second run reuses both."""
    metrics = _distill(tmp_path, _assistant_config())
    run = tmp_path / "run"
    step = json.loads((run / "assistants" / "0" / "manifest.json").read_text())
    assert [e["name"] for e in step["stages"]] == ["teacher", "distill"]
    assert step["stages"][0]["shared_from"] and step["stages"][1]["status"] == "done"
    assistant = torch.load(run / "assistants" / "0" / "distill" / "model.pt", weights_only=True)
    teacher_params = sum(v.numel() for k, v in assistant.items() if "num_batches" not in k and "running" not in k)
    assert metrics["records"]["teacher_params"] == teacher_params  # the student learned from the assistant
    assert json.loads((run / "assistants" / "0" / "distill" / "metrics.json").read_text())["accuracy"]["top1"] >= 0
    import stages.distill as distill_stage

    monkeypatch.setattr(distill_stage, "run", lambda ctx: (_ for _ in ()).throw(AssertionError("trained again")))
    assert main(["distill", "--run", str(run)]) == 0


# --- unlabeled images --------------------------------------------------------------------------------------------
def test_rest_of_training_is_the_unlabeled_set():
    cfg = DataConfig(limit_train=300, unlabeled="rest")
    data, whole = load_data(cfg), load_data(DataConfig())
    assert data.train_size == 300 and data.unlabeled_size == whole.train_size - 300
    mixed = data.with_unlabeled()
    assert mixed.train_size == whole.train_size and int((mixed.train_labels == -1).sum()) == data.unlabeled_size
    labelled = {x.numpy().tobytes() for x in data.train_images}
    assert not any(x.numpy().tobytes() in labelled for x in data.unlabeled_images)
    assert data.notes["unlabeled"]["images"] == data.unlabeled_size


def test_unlabeled_images_train_on_soft_targets_and_confident_pseudo_labels(tmp_path):
    cfg = tiny_config(data={"kind": "digits", "batch_size": 64, "limit_train": 256, "limit_val": 128,
                            "unlabeled": "rest"},
                      distill={**tiny_config().distill.model_dump(), "pseudo_label_threshold": 0.2})
    records = _distill(tmp_path, cfg)["records"]
    assert records["unlabeled"]["images"] == 1437 - 256 and records["unlabeled"]["labelled_images"] == 256
    assert "pseudo-labels" in records["unlabeled"]["how"]
    for row in records["history"]:
        assert row["unlabeled"] == pytest.approx((1437 - 256) / 1437, abs=0.05)
        assert 0 <= row["pseudo_labeled"] <= row["unlabeled"]


def test_scratch_never_sees_the_unlabeled_images(tmp_path):
    cfg = tiny_config(data={"kind": "digits", "batch_size": 64, "limit_train": 256, "limit_val": 128,
                            "unlabeled": "rest"},
                      distill={**tiny_config().distill.model_dump(), "alpha": 0.0})
    records = _distill(tmp_path, cfg)["records"]
    assert records["unlabeled"] is None


def test_labelled_cross_entropy_ignores_unlabeled_images():
    from edgepipe.tasks.classification import labelled_cross_entropy

    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.tensor([3, -1, 5, -1])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert float(labelled_cross_entropy(logits, labels)) == pytest.approx(float(expected))
    none = labelled_cross_entropy(logits, torch.full((4,), -1))
    assert float(none) == 0.0
    none.backward()  # a batch of unlabeled images only keeps the graph


@pytest.mark.parametrize("data, distill, message", [
    ({"unlabeled": "/nonexistent"}, {}, "data.unlabeled: a folder of unlabeled images goes with data.kind: imagefolder"),
    ({}, {"pseudo_label_threshold": 0.9}, "distill.pseudo_label_threshold: set without data.unlabeled"),
    ({"unlabeled": "rest"}, {}, "data.unlabeled: rest means the training images data.limit_train leaves out"),
])
def test_bad_unlabeled_settings_are_one_line(tmp_path, capsys, data, distill, message):
    cfg = tiny_config(data={"kind": "digits", "batch_size": 64, **data},
                      distill={**tiny_config().distill.model_dump(), **distill})
    assert main(["run", "--config", _write(tmp_path, cfg), "--target", "jetson", "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_folder_of_unlabeled_images_skips_training_images(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "set"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    extra = tmp_path / "extra" / "deep"
    extra.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(extra / f"u{i}.png")
    (extra / "link.png").symlink_to(root / "train" / "a" / "0.png")  # a training image: skipped
    data = load_data(DataConfig(kind="imagefolder", path=str(root), unlabeled=str(tmp_path / "extra")))
    assert data.unlabeled_size == 5 and data.notes["unlabeled"]["skipped_as_training_images"] == 1
    assert data.with_unlabeled().train_size == 12 + 5


def test_a_feature_pair_on_a_module_never_called_is_one_line():
    """A torch.export program's submodules hold weights only (the graph never calls them): hooks on them never fire,
    which must be said, not raised as a KeyError deep in training."""
    from torch import nn

    from edgepipe.config import FeaturePair
    from edgepipe.errors import EdgepipeError
    from edgepipe.training.distillation import FeatureHints
    from tests.support import tiny_cnn

    class Flat(nn.Module):  # like ExportedProgramModel: a 'program' whose children are not called
        def __init__(self):
            super().__init__()
            self.program = nn.Module()
            self.program.layer3 = nn.Conv2d(1, 4, 1)
            self.net = tiny_cnn()

        def forward(self, x):
            return self.net(x)
    with pytest.raises(EdgepipeError, match="the teacher's module 'program.layer3' is never called.*torch.export"):
        FeatureHints(Flat(), tiny_cnn(), [FeaturePair(teacher="program.layer3", student="conv2")],
                     torch.randn(2, 1, 8, 8))
