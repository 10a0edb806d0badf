"""Bad config files, profile files and command-line values (issue 24: "Tracebacks instead of one line", "Messages that
mislead"): each is exit 2 with one ``edgepipe: error:`` line naming the file or field, and no run folder changes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from edgepipe.cli import main
from tests.reliability import TARGET, Finished, assert_refused, profile_file, tree, write_config

RECURSIVE = """\
name: recursive
teacher:
  model: {arch: cifar_resnet, kwargs: &k {depth: 8, me: *k}}
distill:
  student: {arch: cifar_resnet, kwargs: {depth: 8}}
"""


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": each level names the previous one nine times (9**levels strings from ~600 bytes)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *l{levels - 1}\n"


@pytest.fixture
def cache(finished: Finished, monkeypatch: pytest.MonkeyPatch) -> Finished:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    return finished


def run_argv(f: Finished, config: Path | str, target: str = TARGET, run: Path | None = None) -> list[str]:
    return ["run", "--config", str(config), "--target", target, "--run", str(run or f.run)]


def refused_alone(argv: list[str], expect: str, capsys: pytest.CaptureFixture) -> str:
    """A command that touches no run (validate, estimate): exit 2 and one short line holding ``expect``."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("edgepipe: error: "), err[:2000]
    assert expect in lines[0], lines[0]
    assert len(lines[0]) < 500, lines[0][:600]
    return lines[0]


# --- config files -------------------------------------------------------------------------------------------------

CONFIG_FILES = {
    "not-utf8": (lambda f, p: p.write_bytes(yaml.safe_dump(f.config).encode() + b"# caf\xe9\n"), "not UTF-8 text"),
    "recursive-alias": (lambda f, p: p.write_text(RECURSIVE), "recursive value"),
    "alias-bomb": (lambda f, p: p.write_text(alias_bomb()), "billion laughs"),
    "duplicate-key": (lambda f, p: p.write_text(yaml.safe_dump(f.config) + "name: again\n"),
                      "key 'name' is given twice"),
    "empty": (lambda f, p: p.write_bytes(b""), "is empty"),
    "only-comments": (lambda f, p: p.write_text("# nothing here\n"), "holds no YAML value"),
    "a-folder": (lambda f, p: p.mkdir(), "is a folder, not a config file"),
    "deep-nesting": (lambda f, p: p.write_text("name: " + "[" * 2000 + "]" * 2000 + "\n"), "nested"),
    "huge-value": (lambda f, p: p.write_text(yaml.safe_dump({**f.config, "data": {**f.config["data"],
                                                                                   "kind": "x" * 500_000}})),
                   "data.kind"),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_bad_config_file(case: str, cache: Finished, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make, expect = CONFIG_FILES[case]
    path = tmp_path / "bad.yaml"
    make(cache, path)
    line = assert_refused(run_argv(cache, path), cache.run, expect, capsys)
    assert str(path) in line and len(line) < 500, line[:600]
    assert refused_alone(["validate", str(path)], expect, capsys).endswith(line.split(": error: ", 1)[1])


def test_validate_and_run_agree_on_a_recursive_alias(cache: Finished, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """`validate` called this file valid and `run` then crashed writing config.yaml; both now give the same line, and
    a new run folder is not even created."""
    path = tmp_path / "recursive.yaml"
    path.write_text(RECURSIVE)
    said = refused_alone(["validate", str(path)], "line 3: an alias refers to a collection that contains it", capsys)
    new = tmp_path / "new-run"
    capsys.readouterr()
    assert main(run_argv(cache, path, run=new)) == 2
    assert capsys.readouterr().err.strip() == said
    assert not new.exists()


def test_alias_bomb_line_is_short(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(12))  # 9**12 strings once expanded
    line = refused_alone(["validate", str(path)], "expand to more than 100,000 values", capsys)
    assert len(line) < 500


def test_shared_aliases_and_merge_keys_still_load(cache: Finished, tmp_path: Path) -> None:
    """Aliases are not refused as such: one optim block shared by two stages, a merge key overriding one value."""
    import json

    from edgepipe.config import load_config

    rest = {k: v for k, v in cache.config.items() if k not in ("distill", "prune")}
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(rest) + f"""distill:
  student: {json.dumps(cache.config["distill"]["student"])}
  optim: &o {{epochs: 1, lr: 0.05}}
prune:
  ratio: 0.7
  steps: 1
  optim: {{<<: *o, lr: 0.02}}
""")
    cfg = load_config(path)
    assert (cfg.distill.optim.epochs, cfg.distill.optim.lr) == (1, 0.05)
    assert (cfg.prune.optim.epochs, cfg.prune.optim.lr) == (1, 0.02)


# --- profile files ------------------------------------------------------------------------------------------------

PROFILES = {
    "peak-nan": ({"peak_tops": {"fp32": math.nan, "int8": 1.0}}, "peak_tops.fp32: Input should be a finite number"),
    "peak-inf": ({"peak_tops": {"fp32": 1.0, "int8": math.inf}}, "peak_tops.int8: Input should be a finite number"),
    "bandwidth-inf": ({"memory_bandwidth_gbps": math.inf}, "memory_bandwidth_gbps: Input should be a finite"),
    "memory-nan": ({"memory_gb": math.nan}, "memory_gb: Input should be a finite number"),
    "power-nan": ({"power_w": math.nan}, "power_w: Input should be a finite number"),
    "speedup-inf": ({"min_speedup": math.inf}, "min_speedup: Input should be a finite number"),
    "peak-zero": ({"peak_tops": {"fp32": 0.0, "int8": 1.0}}, "peak_tops.fp32: must be > 0"),
}


@pytest.mark.parametrize("case", PROFILES)
def test_bad_profile_figure(case: str, cache: Finished, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    changes, expect = PROFILES[case]
    path = profile_file(cache, tmp_path / "bad-cpu.yaml", "generic-cpu", **changes)
    assert_refused(run_argv(cache, cache.config_file, target=str(path)), cache.run, expect, capsys)
    refused_alone(["estimate", "--arch", "cifar_resnet", "--input-shape", "3,32,32", "--target", str(path)], expect,
                  capsys)


@pytest.mark.parametrize("content, expect", [(b"", "the profile file is empty"),
                                             (b"name: caf\xe9\n", "not UTF-8 text (byte 0xe9"),
                                             (b"name: a\nname: b\n", "key 'name' is given twice"),
                                             (b"a: &a [*a]\n", "recursive value")])
def test_bad_profile_file(content: bytes, expect: str, cache: Finished, tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad-cpu.yaml"
    path.write_bytes(content)
    assert_refused(run_argv(cache, cache.config_file, target=str(path)), cache.run, expect, capsys)


def test_profile_path_that_is_a_folder(cache: Finished, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "folder.yaml").mkdir()
    assert_refused(run_argv(cache, cache.config_file, target=str(tmp_path / "folder.yaml")), cache.run,
                   "is a folder, not a profile file", capsys)


# --- estimate -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expect", [
    (["--kwargs", '{"width": -4}'], "width"),
    (["--kwargs", '{"num_classes": -3}'], "num_classes"),
    (["--kwargs", '{"width": 4.5}'], "cifar_resnet"),
    (["--kwargs", '{"width": 200000}'], "--kwargs.width: cifar_resnet with kwargs {'width': 200000} has"),  # not built
    (["--batch", str(10 ** 12)], "--batch 1000000000000: must be between 1 and 65,536"),
    (["--input-shape", "3,100000,100000"], "--input-shape 3,100000,100000: 30,000,000,000 values per image"),
    (["--target", ""], "--target is empty"),
])
def test_estimate_bad_values(extra: list[str], expect: str, capsys: pytest.CaptureFixture) -> None:
    options = {"--arch": "cifar_resnet", "--input-shape": "3,32,32", "--target": "generic-cpu"}
    options.update(zip(extra[::2], extra[1::2]))
    refused_alone(["estimate", *(x for kv in options.items() for x in kv)], expect, capsys)


# --- --config NAME --------------------------------------------------------------------------------------------------

def test_a_local_folder_does_not_shadow_a_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    assert main(["validate", "digits"]) == 0
    assert "digits: valid (digits-default)" in capsys.readouterr().out
    assert "./digits is a folder, not a config file; using the shipped recipe" in caplog.text


def test_a_local_file_named_like_a_recipe_is_used_and_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture, capsys) -> None:
    from edgepipe.config import configs_dir

    monkeypatch.chdir(tmp_path)
    recipe = (configs_dir() / "digits.yaml").read_text()
    (tmp_path / "digits").write_text(recipe.replace("name: digits-default", "name: mine"))
    assert main(["validate", "digits"]) == 0
    assert "valid (mine)" in capsys.readouterr().out
    assert "using the file ./digits, not the shipped recipe" in caplog.text


def test_a_folder_is_never_a_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    refused_alone(["validate", "mine"], "mine: is a folder, not a config file; give the path of a YAML file", capsys)
    refused_alone(["validate", ""], "CONFIG is empty", capsys)


# --- --run and the other command-line values ------------------------------------------------------------------------

def test_empty_run_is_refused_and_the_current_folder_untouched(cache: Finished, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    for argv in (run_argv(cache, cache.config_file, run=Path("x"))[:-1] + [""], ["bench", "--run", ""],
                 ["report", "--run", ""], ["import-results", "--run", "", "results.json"]):
        assert_refused(argv, here, "--run is empty; give a run folder", capsys)


def test_a_folder_of_other_files_does_not_become_a_run(cache: Finished, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(b"not really")
    assert_refused(run_argv(cache, cache.config_file, run=folder), folder,
                   "not a run folder (no manifest.json); give --run a new or empty folder", capsys)
    assert_refused(["compare", "--config", str(cache.config_file), "--target", TARGET, "--run", str(folder)], folder,
                   "not a run folder", capsys)


@pytest.mark.parametrize("argv, expect", [
    (["bench"], "`edgepipe bench --run RUN` measures a run made by `edgepipe run`; to measure one artifact folder, "
                "`edgepipe bench --artifact DIR --target T`"),
    (["report"], "`edgepipe report --run RUN` reports a run made by `edgepipe run`"),
    (["run"], "start it with `edgepipe run --config CONFIG --target TARGET --run"),
    (["distill"], "start it with `edgepipe run --config CONFIG --target TARGET --run"),
    (["run", "--config", "digits"], "start it with `edgepipe run --config CONFIG --target TARGET --run"),
])
@pytest.mark.parametrize("state", ["empty", "other files", "missing"])
def test_a_command_on_a_folder_that_is_not_a_run_leaves_it_as_it_was(argv: list[str], expect: str, state: str,
                                                                     cache: Finished, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "folder"
    if state != "missing":
        folder.mkdir()
    if state == "other files":
        (folder / "notes.txt").write_text("mine")
    what = "is not a run folder (" + ("it does not exist)" if state == "missing" else "no manifest.json)")
    assert_refused([*argv, "--run", str(folder)], tmp_path, f"{folder}: {what}; {expect}", capsys)
    assert not (folder / ".edgepipe.lock").exists()


def test_import_results_on_an_empty_folder(cache: Finished, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (tmp_path / "results.json").write_text("{}")
    assert_refused(["import-results", "--run", str(folder), str(tmp_path / "results.json")], folder,
                   "is not a run folder (no manifest.json); give --run the run whose compile stage wrote", capsys)


@pytest.mark.parametrize("flag", ["--target", "--config"])
def test_empty_config_or_target_does_not_mean_keep_the_runs_own(flag: str, cache: Finished,
                                                                capsys: pytest.CaptureFixture) -> None:
    """`--target ""` was falsy: the run silently kept its target (and `--config ""` its config)."""
    argv = ["run", "--run", str(cache.run), flag, ""]
    assert_refused(argv, cache.run, f"{flag} is empty; give", capsys)


def test_refused_run_on_an_existing_empty_folder_leaves_no_lock(cache: Finished, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """A new run whose checks fail in a folder the user made: the folder stays empty (no .edgepipe.lock)."""
    folder = tmp_path / "new"
    folder.mkdir()
    bad = write_config(tmp_path / "bad.yaml", cache.config, **{"data.path": str(tmp_path / "nowhere")})
    before = tree(folder)
    capsys.readouterr()
    assert main(run_argv(cache, bad, run=folder)) == 2
    assert tree(folder) == before == {} and list(folder.iterdir()) == []
