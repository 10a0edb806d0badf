"""Hardware profiles: every shipped YAML validates, names resolve, bad files give one clear line."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgepipe.errors import EdgepipeError
from edgepipe.profiles import all_profiles, get_profile, load_profile_file, profiles_dir
from edgepipe.types import Backend, DType

SHIPPED = sorted(profiles_dir().glob("*.yaml"))
EXPECTED = {"jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "intel-xeon-amx", "intel-core-cpu",
            "intel-igpu", "generic-cpu"}

VALID = """\
name: {name}
description: "test device"
backend: onnxruntime
device: cpu
dtypes: [int8, fp32]
peak_tops:
  int8: 2.0
  fp32: 0.5
memory_bandwidth_gbps: 10.0
memory_gb: 4
"""


@pytest.fixture(autouse=True)
def _fresh_profile_cache():
    all_profiles.cache_clear()
    yield
    all_profiles.cache_clear()


def write(tmp_path: Path, stem: str, text: str) -> Path:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(text)
    return path


def test_ships_exactly_the_expected_profiles():
    assert {p.stem for p in SHIPPED} == EXPECTED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profile_loads_and_is_consistent(path: Path):
    profile = load_profile_file(path)
    assert profile.name == path.stem
    assert profile.description, "description names the SKU the figures are for"
    assert set(profile.dtypes) <= set(profile.peak_tops)
    # Cheaper precisions are never slower than fp32 on the same device.
    fp32 = profile.peak_tops[DType.FP32]
    assert all(v >= fp32 for v in profile.peak_tops.values())
    # Every figure carries a cited source in a comment beside it.
    text = path.read_text()
    for key in ("memory_bandwidth_gbps", "memory_gb", *(f"  {d.value}:" for d in profile.dtypes)):
        assert key in text
    assert "DENSE" in text


def test_backend_specific_fields():
    profiles = all_profiles()
    for name in ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"):
        p = profiles[name]
        assert p.backend is Backend.TENSORRT and p.device == "gpu"
        assert p.dtypes == (DType.INT8, DType.FP16, DType.FP32)
        assert p.options.tensorrt.use_dla_core is None
    assert profiles["jetson-orin-nano"].options.tensorrt.dla_cores == 0
    assert profiles["jetson-orin-nx"].options.tensorrt.dla_cores == 2
    assert profiles["jetson-agx-orin"].options.tensorrt.dla_cores == 2
    assert profiles["intel-xeon-amx"].dtypes == (DType.INT8, DType.BF16, DType.FP32)
    assert DType.FP16 not in profiles["intel-core-cpu"].dtypes
    assert profiles["intel-igpu"].options.openvino.device == "GPU"
    for name in ("intel-xeon-amx", "intel-core-cpu"):
        assert profiles[name].backend is Backend.OPENVINO and profiles[name].options.openvino.device == "CPU"
    generic = profiles["generic-cpu"]
    assert generic.backend is Backend.ONNXRUNTIME
    assert generic.options.onnxruntime.execution_provider == "CPUExecutionProvider"
    assert generic.options.onnxruntime.activation_type == "uint8"
    assert generic.dtypes == (DType.INT8, DType.FP32)


def test_alias_and_name_resolve():
    assert get_profile("jetson").name == "jetson-orin-nano"
    assert get_profile("jetson-agx-orin").name == "jetson-agx-orin"


def test_get_profile_accepts_a_yaml_path(tmp_path: Path):
    path = write(tmp_path, "my-board", VALID.format(name="my-board"))
    assert get_profile(str(path)).name == "my-board"


def test_names_unique_across_profiles_and_aliases():
    names = [n for p in all_profiles().values() for n in (p.name, *p.aliases)]
    assert len(names) == len(set(names)), names


def test_unknown_target_lists_known_ones():
    with pytest.raises(EdgepipeError) as err:
        get_profile("jetson-tx9")
    msg = str(err.value)
    assert "unknown target 'jetson-tx9'" in msg
    for known in (*EXPECTED, "jetson"):
        assert known in msg


@pytest.mark.parametrize(("dtypes", "quantized", "expected"), [
    ("[int8, fp16, fp32]", True, DType.INT8),
    ("[int8, fp16, fp32]", False, DType.FP16),
    ("[fp16, fp32]", True, DType.FP16),
    ("[int8, bf16, fp32]", False, DType.BF16),
    ("[int8, fp32]", False, DType.FP32),
])
def test_compile_dtype(tmp_path: Path, dtypes: str, quantized: bool, expected: DType):
    text = VALID.replace("dtypes: [int8, fp32]", f"dtypes: {dtypes}").replace(
        "  fp32: 0.5", "  fp32: 0.5\n  fp16: 1.0\n  bf16: 1.0")
    profile = load_profile_file(write(tmp_path, "dev", text.format(name="dev")))
    assert profile.compile_dtype(quantized) is expected


@pytest.mark.parametrize(("case", "text", "field"), [
    ("unknown_key", VALID + "clock_ghz: 1.0\n", "clock_ghz"),
    ("unknown_nested_key", VALID + "options:\n  tensorrt:\n    workspace: 10\n", "options.tensorrt.workspace"),
    ("unknown_dtype", VALID.replace("dtypes: [int8, fp32]", "dtypes: [int4, fp32]"), "dtypes"),
    ("missing_peak", VALID.replace("dtypes: [int8, fp32]", "dtypes: [int8, fp16, fp32]"), "peak_tops"),
    ("missing_field", VALID.replace("memory_gb: 4\n", ""), "memory_gb"),
    ("bad_bandwidth", VALID.replace("memory_bandwidth_gbps: 10.0", "memory_bandwidth_gbps: -1"),
     "memory_bandwidth_gbps"),
    ("name_not_stem", VALID.format(name="other-name"), "name"),
])
def test_bad_profile_is_one_line_naming_file_and_field(tmp_path: Path, case: str, text: str, field: str):
    path = write(tmp_path, "dev", text.replace("{name}", "dev"))
    with pytest.raises(EdgepipeError) as err:
        load_profile_file(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    assert field in msg
    if case == "unknown_dtype":
        assert "int4" in msg
    if case == "name_not_stem":
        assert "'other-name'" in msg and "'dev'" in msg


@pytest.mark.parametrize(("text", "fragment"), [
    ("- int8\n- fp32\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
    ("", "expected a mapping"),
])
def test_unparseable_profile_names_file(tmp_path: Path, text: str, fragment: str):
    path = write(tmp_path, "dev", text)
    with pytest.raises(EdgepipeError) as err:
        load_profile_file(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path)) and fragment in msg


def test_all_profiles_on_a_directory_reports_the_bad_file(tmp_path: Path):
    write(tmp_path, "good", VALID.format(name="good"))
    bad = write(tmp_path, "bad", VALID.format(name="bad").replace("dtypes: [int8, fp32]", "dtypes: [int4]"))
    with pytest.raises(EdgepipeError, match=str(bad)):
        all_profiles(tmp_path)
    all_profiles.cache_clear()
    bad.unlink()
    assert list(all_profiles(tmp_path)) == ["good"]
