"""Config validation: every shipped recipe validates; bad input is one line naming file and field."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgepipe.config import configs_dir, load_config
from edgepipe.errors import EdgepipeError

SHIPPED = sorted(configs_dir().glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.distill.student is not None
    assert 0 < cfg.prune.ratio < 1


def test_recipe_by_name() -> None:
    assert load_config("digits").data.kind == "digits"


@pytest.mark.parametrize("text, needle", [
    ("teacher: {model: {arch: x}}\ndistill: {student: {arch: y}}\nbogus: 1\n", "bogus: unknown key"),
    ("teacher: {model: {arch: x}}\ndistill: {student: {arch: y}, temperature: -1}\n", "distill.temperature"),
    ("teacher: {model: {arch: x, program: p.pt2}}\ndistill: {student: {arch: y}}\n", "exactly one of arch"),
    ("teacher: {model: {factory: nocolon}}\ndistill: {student: {arch: y}}\n", "module:function"),
    ("teacher: {model: {arch: x}}\ndistill: {student: {arch: y}}\nprune: {importance: l7}\n", "prune.importance"),
    ("teacher: {model: {arch: x}}\ndistill: {student: {arch: y}}\ndata: {kind: imagefolder}\n", "needs a path"),
    ("teacher: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(EdgepipeError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(EdgepipeError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_extends_another(tmp_path):
    """extends: a recipe or file; mappings merge key by key, lists and values replace, null resets; loops refused."""
    from edgepipe.config import load_config
    from edgepipe.errors import EdgepipeError

    (tmp_path / "child.yaml").write_text("extends: digits\nname: child\ndistill:\n  alpha: 0.5\n"
                                         "  student: {kwargs: {depth: 14}}\nbench: {batch_sizes: [2]}\n"
                                         "data: {val_fraction: null}\n")
    child, parent = load_config(tmp_path / "child.yaml"), load_config("digits")
    assert child.name == "child" and child.distill.alpha == 0.5 and child.distill.temperature == parent.distill.temperature
    assert child.distill.student.kwargs == {**parent.distill.student.kwargs, "depth": 14}
    assert child.bench.batch_sizes == [2] and child.data.val_fraction == 0.2  # the field's default
    (tmp_path / "grand.yaml").write_text("extends: child.yaml\nseed: 3\n")
    assert load_config(tmp_path / "grand.yaml").distill.alpha == 0.5
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(EdgepipeError, match="leads back to itself"):
        load_config(tmp_path / "a.yaml")
