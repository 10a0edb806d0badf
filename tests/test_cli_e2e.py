"""End to end through the CLI on digits: every stage, both a TensorRT and an OpenVINO target, caching,
--force, single stages equal to `edgepipe run`, and bad input that leaves the run untouched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgepipe.cli import main
from edgepipe.engine.stage import STAGE_ORDER
from tests.support import run_device_script, tiny_config, without_tensorrt

pytestmark = pytest.mark.e2e


def _config(tmp: Path) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    return path


def _metrics(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "metrics.json").read_text())


@pytest.fixture(scope="module")
def jetson_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("jetson")
    cfg = _config(tmp)
    assert main(["run", "--config", str(cfg), "--target", "jetson", "--run", str(tmp / "run")]) == 0
    return tmp / "run", cfg


def test_every_stage_recorded(jetson_run: tuple[Path, Path]) -> None:
    run, _ = jetson_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == list(STAGE_ORDER)
    assert all(s["status"] == "done" for s in manifest["stages"])
    assert manifest["target"] == "jetson-orin-nano" and manifest["versions"]["torch"]
    for stage in STAGE_ORDER:
        m = _metrics(run, stage)
        assert 0 <= m["accuracy"]["top1"] <= 1 and m["params"] > 0 and m["macs"] > 0 and m["size_bytes"] > 0
        for key in ("latency", "throughput"):
            lat = m[key]
            assert lat["p50_ms"] > 0 and {"backend", "device", "dtype", "batch", "threads", "warmup", "iterations"} <= set(lat)
        assert "estimate" in m["estimate"]["label"]
    assert (run / "report.md").exists() and (run / "report.html").exists()
    assert (run / "config.yaml").exists()


@without_tensorrt
def test_jetson_bundle_is_int8_qdq_zero_point_0(jetson_run: tuple[Path, Path]) -> None:
    from edgepipe.export.onnx_export import qdq_report

    run, _ = jetson_run
    m = _metrics(run, "compile")
    assert m["artifact"]["kind"] == "tensorrt_bundle"
    assert m["records"]["engine_built"] is False and "no CUDA device" in m["records"]["reason"]
    assert not list((run / "compile").glob("*.engine"))
    report = qdq_report(run / "compile" / "model.onnx")
    nodes = report["nodes"]
    assert nodes and all(n["zero_point_dtype"] == "int8" and n["zero_points_all_zero"] for n in nodes)
    weights = [n for n in nodes if n["is_weight"]]
    assert weights and all(n["per_channel"] and n["axis"] == 0 for n in weights)


def test_rerun_reuses_and_force_reruns(jetson_run: tuple[Path, Path]) -> None:
    run, cfg = jetson_run
    before = json.loads((run / "manifest.json").read_text())
    assert main(["run", "--run", str(run), "--no-report"]) == 0
    after = json.loads((run / "manifest.json").read_text())
    assert [s["started"] for s in after["stages"]] == [s["started"] for s in before["stages"]]
    assert main(["run", "--run", str(run), "--force", "export", "--no-report"]) == 0
    forced = {s["name"]: s for s in json.loads((run / "manifest.json").read_text())["stages"]}
    old = {s["name"]: s for s in before["stages"]}
    assert forced["prune"]["started"] == old["prune"]["started"]
    assert forced["export"]["started"] >= old["export"]["started"]
    assert forced["export"]["output_hash"] == old["export"]["output_hash"]  # same input, same ONNX


def test_single_stages_match_run(jetson_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, cfg = jetson_run
    alone = tmp_path / "alone"
    assert main(["teacher", "--run", str(alone), "--config", str(cfg), "--target", "jetson"]) == 0
    for stage in STAGE_ORDER[1:]:
        assert main([stage, "--run", str(alone)]) == 0
    a = {s["name"]: s for s in json.loads((run / "manifest.json").read_text())["stages"]}
    b = {s["name"]: s for s in json.loads((alone / "manifest.json").read_text())["stages"]}
    for stage in STAGE_ORDER:
        assert _metrics(alone, stage)["accuracy"]["top1"] == pytest.approx(_metrics(run, stage)["accuracy"]["top1"])
        assert _metrics(alone, stage)["macs"] == _metrics(run, stage)["macs"]
    for stage in ("teacher", "distill", "prune", "qat"):
        assert a[stage]["output_hash"] == b[stage]["output_hash"], stage


def test_bad_input_is_one_line_and_leaves_run_intact(jetson_run: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run, _ = jetson_run
    manifest = (run / "manifest.json").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {model: {arch: cifar_resnet}}\ndistill: {student: {arch: cifar_resnet}, alpha: 3}\n")
    capsys.readouterr()
    assert main(["run", "--config", str(bad), "--target", "jetson", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "distill.alpha" in err
    assert main(["run", "--config", str(_config(tmp_path)), "--target", "no-such-board", "--run", str(run)]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert (run / "manifest.json").read_text() == manifest
    assert main(["export", "--run", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_openvino_target_runs_int8(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["run", "--config", str(_config(tmp_path)), "--target", "intel-xeon-amx", "--run", str(run),
                 "--no-report"]) == 0
    m = _metrics(run, "compile")
    assert m["artifact"]["kind"] == "openvino_ir" and m["artifact"]["dtype"] == "int8"
    assert m["records"]["int8_convolutions"] is True
    assert m["accuracy"]["backend"] == "openvino" and m["latency"]["backend"] == "openvino"


def test_profiles_and_models_commands(capsys: pytest.CaptureFixture) -> None:
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "jetson-orin-nano" in out and "intel-xeon-amx" in out and "alias: jetson" in out
    assert main(["profiles", "show", "jetson"]) == 0
    assert "backend: tensorrt" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "cifar_resnet" in capsys.readouterr().out


@without_tensorrt
def test_standalone_compile_and_bench_from_artifacts(jetson_run: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run, _ = jetson_run
    bundle = run / "compile"
    # what the bundle's build_engine.sh runs on a device; here (no CUDA) it fails with one line: no bundle in a bundle
    assert main(["compile", "--onnx", str(bundle / "model.onnx"), "--target", str(bundle / "profile.yaml"),
                 "--out", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no TensorRT engine can be built on this machine" in err
    assert not (tmp_path / "engine").exists()
    # the same exported ONNX compiled for OpenVINO and benchmarked alone
    assert main(["compile", "--onnx", str(run / "export" / "model.onnx"), "--target", "intel-xeon-amx",
                 "--out", str(tmp_path / "ov")]) == 0
    assert (tmp_path / "ov" / "model.xml").exists()
    assert main(["bench", "--artifact", str(tmp_path / "ov"), "--target", "intel-xeon-amx"]) == 0
    rows = json.loads((tmp_path / "ov" / "bench" / "bench.json").read_text())["rows"]
    assert rows and all(r["backend"] == "openvino" and r["dtype"] == "int8" for r in rows if r["status"] == "measured")


def test_new_target_reuses_training_and_compiles_for_onnxruntime(jetson_run: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(jetson_run[0], run)
    manifest = (run / "manifest.json").read_text()
    before = {s["name"]: s for s in json.loads(manifest)["stages"]}
    assert main(["run", "--run", str(run), "--target", "generic-cpu", "--no-report"]) == 0
    assert (run / "manifest.json").read_text() == manifest  # the second target lives in targets/<name>/ (README)
    child = run / "targets" / "generic-cpu"
    after = {s["name"]: s for s in json.loads((child / "manifest.json").read_text())["stages"]}
    # target-independent: reused, not retrained
    for stage in ("teacher", "distill", "prune"):
        assert after[stage]["started"] == before[stage]["started"] and after[stage]["shared_from"] == "../.."
    # QAT depends on the INT8 form, which differs between TensorRT and a CPU: its own model
    assert after["qat"]["key"] != before["qat"]["key"]
    assert _metrics(child, "qat")["records"]["form"]["activations"] == "uint8_after_relu"
    m = _metrics(child, "compile")
    assert m["artifact"]["kind"] == "ort_optimized"
    speedup = m["records"]["speedup"]
    assert speedup["baseline_p50_ms"] > 0 and speedup["optimized_p50_ms"] > 0 and speedup["ratio_p50"] > 0


@without_tensorrt
def test_device_command_imports_no_torch_or_openvino(jetson_run: tuple[Path, Path]) -> None:
    """The bundle's device command, run here as on a Jetson without TensorRT: exit 2, one line naming what is
    missing, and nothing but numpy imported (a Jetson has TensorRT and numpy, not torch, openvino or matplotlib)."""
    run, _ = jetson_run
    bundle = run / "compile"
    readme = (bundle / "README.md").read_text()
    assert "python3 edgepipe_trt.py run" in readme and "trtexec --onnx=model.onnx" in readme
    assert "sudo apt install python3-libnvinfer" in readme
    rc, out, err, forbidden = run_device_script(bundle, ["run"], fakes=False)
    assert rc == 2 and forbidden == [], (err, forbidden)
    assert len(err.strip().splitlines()) == 1 and "no TensorRT engine can be built" in err
    assert "tensorrt is not installed" in err and not (bundle / "engine").exists()


@without_tensorrt
def test_device_results_import_into_the_run_and_show_in_the_report(jetson_run: tuple[Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """The bundle run on a (simulated) Jetson, its results.json imported: report.md shows them beside the estimate."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(jetson_run[0], run)
    bundle = tmp_path / "bundle"
    shutil.copytree(run / "compile", bundle)  # what the owner copies to the device
    val = json.loads((run / "compile" / "metrics.json").read_text())["records"]["device_validation"]
    assert (bundle / "val.npz").is_file() and val["images"] > 0 and 0 <= val["reference_top1"] <= 1
    rc, _, err, forbidden = run_device_script(bundle, ["run", "--warmup", "2", "--iterations", "5"], fakes=True)
    assert rc == 0 and forbidden == [], err
    assert main(["import-results", "--run", str(run), str(bundle / "results.json")]) == 0
    stored = json.loads((run / "device" / "jetson-orin-nano.json").read_text())
    assert stored["latency"]["p50_ms"] > 0
    assert main(["report", "--run", str(run)]) == 0
    report = (run / "report.md").read_text()
    section = report[report.index("## Measured on the device"):]
    assert "Fake Orin (simulated)" in section and "10.3" in section and "estimate (not measured)" in section
    assert f"reference (exported ONNX, ONNX Runtime): {100 * val['reference_top1']:.2f}%" in section
    # results from another model are refused with one line, and the run keeps what it had
    other = json.loads((bundle / "results.json").read_text())
    other["engine"]["onnx_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert main(["import-results", "--run", str(run), str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bundle is stale" in err
    assert json.loads((run / "device" / "jetson-orin-nano.json").read_text()) == stored
