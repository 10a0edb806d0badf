"""teacher, distill and prune stages on tiny models: they train, record, and really shrink the model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgepipe.errors import EdgepipeError
from edgepipe.models.loading import load_torch_artifact
from edgepipe.profiles import HardwareProfile
from edgepipe.engine.stage import StageContext
from tests.support import tiny_config

PROFILE = HardwareProfile(name="t", backend="openvino", device="cpu", dtypes=["int8", "fp32"],
                          peak_tops={"int8": 1.0, "fp32": 0.5}, memory_bandwidth_gbps=10, memory_gb=1)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import stages.distill as distill
    import stages.prune as prune
    import stages.teacher as teacher

    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(distill__feature_pairs=[{"teacher": "layer3", "student": "layer3"}], distill__beta=0.5)
    t = StageContext("teacher", cfg, PROFILE, root / "teacher", None)
    tr = teacher.run(t)
    d = StageContext("distill", cfg, PROFILE, root / "distill", tr.artifact, teacher=tr.artifact)
    d.__dict__["data"] = t.data
    dr = distill.run(d)
    p = StageContext("prune", cfg, PROFILE, root / "prune", dr.artifact, teacher=tr.artifact)
    p.__dict__["data"] = t.data
    pr = prune.run(p)
    return {"cfg": cfg, "teacher": tr, "distill": dr, "prune": pr, "data": t.data}


def test_teacher_trains_and_records(chain: dict) -> None:
    hist = chain["teacher"].records["history"]
    assert len(hist) == 2 and hist[-1]["loss"] < hist[0]["loss"]
    # kept by the stage; the engine removes it after recording the stage done (tests/test_engine.py)
    assert (chain["teacher"].artifact.root / "checkpoints" / "last.pt").exists()


def test_distill_records_every_component(chain: dict) -> None:
    rec = chain["distill"].records
    assert len(rec["history"]) == 2
    for row in rec["history"]:
        assert {"soft", "hard", "feature", "loss", "val_top1"} <= set(row)
        assert row["loss"] == pytest.approx(0.9 * row["soft"] + 0.1 * row["hard"] + 0.5 * row["feature"], rel=0.05)
    assert rec["params_ratio"] < 1 / 3


def test_prune_really_shrinks_and_reloads(chain: dict) -> None:
    rec = chain["prune"].records
    assert rec["macs_after"] <= 0.6 * rec["macs_before"]
    assert rec["params_after"] < rec["params_before"]
    assert any(after < before for before, after in rec["channels"].values())
    model = load_torch_artifact(chain["prune"].artifact)
    assert sum(p.numel() for p in model.parameters()) == rec["params_after"]
    assert chain["prune"].artifact.size_bytes() < chain["distill"].artifact.size_bytes()
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_prune_taylor_importance(tmp_path: Path, chain: dict) -> None:
    import stages.prune as prune

    cfg = tiny_config(prune__importance="taylor", prune__optim={"epochs": 0})
    ctx = StageContext("prune", cfg, PROFILE, tmp_path, chain["distill"].artifact, teacher=chain["teacher"].artifact)
    ctx.__dict__["data"] = chain["data"]
    rec = prune.run(ctx).records
    assert rec["importance"] == "taylor" and rec["macs_ratio"] <= 0.6


def test_bad_teacher_shape_is_clear(tmp_path: Path) -> None:
    import stages.teacher as teacher

    # data.channels: 1 fixes the images to one channel; a teacher taking three cannot read them.
    # (Without it the data follows the teacher: digits would be repeated to 3 channels.)
    rgb_teacher = {"model": {"arch": "cifar_resnet", "kwargs": {"depth": 8, "in_channels": 3}}}
    cfg = tiny_config(data__channels=1, teacher=rgb_teacher)
    with pytest.raises(EdgepipeError, match="in_channels"):
        teacher.run(StageContext("teacher", cfg, PROFILE, tmp_path, None))
    follows = tiny_config(teacher=rgb_teacher)
    ctx = StageContext("teacher", follows, PROFILE, tmp_path / "follows", None)
    assert ctx.data.input_shape[0] == 3 and ctx.data.notes["channels"] == 3


def test_teacher_from_torch_export_program(tmp_path: Path) -> None:
    """A teacher that arrives as a .pt2: usable by later stages, copied into the run, never trained."""
    import stages.distill as distill
    import stages.teacher as teacher
    from tests.support import TinyCNN

    net = TinyCNN().eval()
    program = tmp_path / "user" / "teacher.pt2"
    program.parent.mkdir()
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), program)
    with pytest.raises(EdgepipeError, match="teacher: train.epochs: a torch.export program .*inference-only"):  # refused by the config itself
        tiny_config(teacher={"model": {"program": str(program)}, "train": {"epochs": 1}})
    cfg = tiny_config(teacher={"model": {"program": str(program)}}, distill__optim={"epochs": 1})
    ctx = StageContext("teacher", cfg, PROFILE, tmp_path / "teacher", None)
    art = teacher.run(ctx).artifact
    program.unlink()  # the run must not depend on the user's file any more
    again = load_torch_artifact(art)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(again(x), net(x), atol=1e-6)
    d = StageContext("distill", cfg, PROFILE, tmp_path / "distill", art, teacher=art)
    d.__dict__["data"] = ctx.data
    assert len(distill.run(d).records["history"]) == 1
