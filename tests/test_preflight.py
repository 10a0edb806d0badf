"""Every check before the first write, and one backend per folder (issue 24, items 2 and 3).

Each refusal runs against the shared finished run (generic-cpu, ONNX Runtime) and asserts the contract of
``assert_refused``: exit 2, one ``edgepipe: error:`` line, every file of the run byte-identical. Then another
--target on a copy of the finished run: it builds in ``targets/<profile>/``, shares the stages whose key does not
depend on the target, and leaves the run's own files as they were.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepipe.cli import main
from edgepipe.io import LOCK_FILE
from tests.reliability import (TARGET, Case, Finished, assert_refused, copy_run, profile_file, run_target, run_with,
                               tree, write_config)

pytestmark = pytest.mark.e2e
JETSON = "jetson-orin-nano"  # what the alias `jetson` resolves to (hardware_profiles/jetson-orin-nano.yaml)


def _other_target(cfg_changes: dict, target: str, expect: str, stage: str = "run") -> Case:
    def case(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
        cfg = write_config(tmp / "bad.yaml", f.config, **cfg_changes)
        return [stage, "--config", str(cfg), "--target", target, "--run", str(f.run)], f.run, expect
    return case


def _provider(name: str) -> Case:
    """A profile naming CUDAExecutionProvider; ``name`` = the run's own target name (rebuilt in place) or another
    (built in targets/<name>/): refused before either."""
    def make(f: Finished, tmp: Path) -> str:
        return str(profile_file(f, tmp / f"{name}.yaml", TARGET,
                                options={"onnxruntime": {"execution_provider": "CUDAExecutionProvider"}}))
    return run_target(make, "'CUDAExecutionProvider' is not in this onnxruntime build (available: ")


def _ov_device(f: Finished, tmp: Path) -> str:
    return str(profile_file(f, tmp / "ov-board.yaml", "intel-core-cpu", options={"openvino": {"device": "FPGA"}}))


def _single_stage_provider(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
    prof = profile_file(f, tmp / "cuda-box.yaml", TARGET,
                        options={"onnxruntime": {"execution_provider": "CUDAExecutionProvider"}})
    return ["qat", "--config", str(f.config_file), "--target", str(prof), "--run", str(f.run)], f.run, \
        "CUDAExecutionProvider"


def _force_shared(f: Finished, tmp: Path) -> tuple[list[str], Path, str]:
    return ["run", "--run", str(f.run), "--target", "jetson", "--force", "distill"], f.run, \
        "--force distill: the distill stage does not depend on the target"


CASES: dict[str, Case] = {
    "opset-99": run_with({"export.opset": 99}, "export.opset: 99 is not supported here; this installation exports "
                                               "and runs opsets 17.."),
    "compile-fp16-generic-cpu": run_with({"compile.dtype": "fp16"}, "compile.dtype: target generic-cpu lists int8, "
                                                                    "fp32, not fp16"),
    "compile-fp16-xeon-amx": _other_target({"compile.dtype": "fp16"}, "intel-xeon-amx",
                                           "compile.dtype: target intel-xeon-amx lists int8, bf16, fp32, not fp16"),
    "compile-int8-without-qat": run_with({"compile.dtype": "int8", "qat.enabled": False}, "int8 needs the qat stage"),
    "compile-fp32-after-qat": run_with({"compile.dtype": "fp32"}, "compile.dtype: fp32 for a QDQ INT8 ONNX model"),
    "feature-pair-teacher": run_with({"distill.feature_pairs": [{"teacher": "layer9", "student": "layer1"}],
                                      "distill.beta": 1.0}, "distill.feature_pairs[0].teacher: the teacher model has no "
                                                            "layer 'layer9' (its layers include: "),
    "feature-pair-student": run_with({"distill.feature_pairs": [{"teacher": "layer1", "student": "stage1"}]},
                                     "distill.feature_pairs[0].student: the student model has no layer 'stage1'"),
    "feature-hints-cached-logits": run_with({"distill.feature_pairs": [{"teacher": "layer1", "student": "layer1"}],
                                             "distill.beta": 1.0, "soft_targets.cache": True},
                                            "set soft_targets.runtime: torch and soft_targets.cache: false"),
    "init-teacher-other-widths": run_with({"distill.init": "teacher", "distill.student.kwargs.width": 16},
                                          "distill.init: teacher: student tensor"),
    "prune-ignore-unknown": run_with({"prune.ignore": ["layer7"]}, "prune.ignore: the model pruning takes (student) "
                                                                   "has no module 'layer7'"),
    "qat-fallback-not-listed": run_with({"qat.fallback_dtype": "bf16"}, "qat.fallback_dtype: bf16"),
    "qat-uint8-on-tensorrt": _other_target({"qat.activations": "uint8_after_relu"}, "jetson",
                                           f"qat.activations: uint8_after_relu cannot run on {JETSON}"),
    "budget-split-missing": run_with({"qat.max_drop": 1.0, "qat.budget_split": "calib"}, "qat.budget_split: "),
    "provider-cuda-same-name": _provider(TARGET),
    "provider-cuda-other-target": _provider("cuda-box"),
    "provider-cuda-single-stage": _single_stage_provider,
    "openvino-unknown-device": run_target(_ov_device, "options.openvino.device 'FPGA' is not an OpenVINO device"),
    "other-target-config-changes-shared": _other_target({"distill.optim.lr": 0.07}, "jetson",
                                                        f": changes the distill stage, which the {JETSON} build would "
                                                        "share with"),
    "other-target-force-shared": _force_shared,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_before_the_first_write(name: str, finished: Finished, tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    assert_refused(*CASES[name](finished, tmp_path), capsys)
    assert not (finished.run / "targets").exists()


def test_an_absent_openvino_device_keeps_the_labelled_cpu_fallback() -> None:
    """intel-igpu (device GPU) on a host without that GPU is no preflight error: compile builds the IR and
    measures it on the CPU with a note (edgepipe.backends.openvino.compile), as before."""
    from edgepipe.backends import get_backend
    from edgepipe.profiles import get_profile
    from edgepipe.types import DType

    get_backend("openvino").check(get_profile("intel-igpu"), DType.INT8, DType.FP16)
    get_backend("tensorrt").check(get_profile("jetson"), DType.INT8, DType.FP16)  # no TensorRT here: a bundle


def _top_level(run: Path) -> dict[str, str]:
    return {k: v for k, v in tree(run).items() if not k.startswith("targets/") and k != LOCK_FILE}


def test_another_target_builds_in_targets_and_shares_the_rest(finished: Finished, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepipe.backends.tensorrt_plan import BUNDLE_FILES, VALIDATION_FILE

    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    run = copy_run(finished, tmp_path / "run")
    before = _top_level(run)
    assert main(["run", "--run", str(run), "--target", "jetson"]) == 0
    assert _top_level(run) == before  # config.yaml, profile.yaml, manifest.json and every stage folder as they were
    child = run / "targets" / JETSON
    manifest = json.loads((child / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["stages"]}
    assert manifest["target"] == JETSON
    parent = {e["name"]: e for e in json.loads((run / "manifest.json").read_text())["stages"]}
    for stage in ("teacher", "distill", "prune"):  # target-independent keys: referenced, not retrained or copied
        e = entries[stage]
        assert e["shared_from"] == "../.." and e["artifact_dir"] == f"../../{stage}", e
        assert e["key"] == parent[stage]["key"] and e["started"] == parent[stage]["started"]
        assert not (child / stage / "model.pt").exists()
    for stage in ("qat", "export", "compile"):
        assert entries[stage]["status"] == "done" and "shared_from" not in entries[stage]
        assert entries[stage]["artifact_dir"] == stage
    compiled = {p.name for p in (child / "compile").iterdir()}
    assert compiled == {*BUNDLE_FILES.values(), VALIDATION_FILE, "artifact.json", "metrics.json"}, compiled
    assert json.loads((child / "compile" / "artifact.json").read_text())["kind"] == "tensorrt_bundle"
    assert (child / "report.md").is_file()
    # the same command again reuses everything; the report and the parent's own commands still work
    started = {e["name"]: e["started"] for e in manifest["stages"]}
    assert main(["run", "--run", str(run), "--target", "jetson", "--no-report"]) == 0
    again = json.loads((child / "manifest.json").read_text())["stages"]
    assert {e["name"]: e["started"] for e in again} == started
    assert _top_level(run) == before
    assert main(["report", "--run", str(child)]) == 0
    assert main(["run", "--run", str(run), "--no-report"]) == 0  # its own target: every stage reused
    assert json.loads((run / "manifest.json").read_text())["target"] == TARGET


def test_a_rebuilt_compile_folder_keeps_no_other_backends_files(tmp_path: Path) -> None:
    """stages.compile.remove_previous: the previous artifact's listed files go (inside the folder only); the
    engine's metrics.json and files the artifact does not list stay."""
    from stages.compile import remove_previous

    folder = tmp_path / "compile"
    folder.mkdir()
    for name in ("model.xml", "model.bin", "metrics.json", "notes.txt"):
        (folder / name).write_text(name)
    (tmp_path / "outside.txt").write_text("x")
    (folder / "artifact.json").write_text(json.dumps({"kind": "openvino_ir", "files": {
        "xml": "model.xml", "bin": "model.bin", "evil": "../outside.txt", "m": "metrics.json"}}))
    assert sorted(remove_previous(folder)) == ["artifact.json", "model.bin", "model.xml"]
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "notes.txt"]
    assert (tmp_path / "outside.txt").exists()
    assert remove_previous(folder) == []  # nothing listed any more


def test_same_name_profile_with_another_backend_recompiles_cleanly(finished: Finished, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile YAML named like the run's target but with backend openvino: the run is rebuilt in place (same
    target name) and its compile folder holds the OpenVINO IR only, not the ONNX Runtime model it had."""
    monkeypatch.setenv("EDGEPIPE_CACHE", str(finished.tmp / "cache"))
    run = copy_run(finished, tmp_path / "run")
    assert (run / "compile" / "model.ort.onnx").is_file()
    prof = profile_file(finished, tmp_path / f"{TARGET}.yaml", "intel-core-cpu")
    assert main(["run", "--config", str(finished.config_file), "--target", str(prof), "--run", str(run),
                 "--no-report"]) == 0
    files = {p.name for p in (run / "compile").iterdir()}
    assert files == {"model.xml", "model.bin", "artifact.json", "metrics.json"}, files
    assert not (run / "targets").exists()
