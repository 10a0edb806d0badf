"""Hardware profiles: validated, frozen descriptions of a target device.

A profile lives in ``hardware_profiles/<name>.yaml``. It says which backend compiles for the device,
which dtypes it runs (in order of preference), its peak throughput per dtype and memory figures
(used only for a labelled roofline *estimate*), and backend options. Unknown keys or values are one
clear error naming the file and field.
"""
from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgepipe.errors import EdgepipeError, format_validation_error
from edgepipe.types import Backend, DType


class _Strict(BaseModel):
    # inf/NaN in a profile is always a mistake: a NaN peak fails later with a TypeError, an inf one makes every
    # estimate zero
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False)


class TensorRTOptions(_Strict):
    workspace_mb: int = Field(1024, gt=0, description="Builder workspace memory pool limit (MiB).")
    dla_cores: int = Field(0, ge=0, description="Number of DLA cores on the device (0: none).")
    use_dla_core: int | None = Field(
        None, ge=0, description="Build for this DLA core (with GPU fallback); None builds for the GPU.")
    max_batch: int = Field(32, gt=0, description="Largest batch of the engine's optimization profile.")
    opt_batch: int = Field(1, gt=0, description="Batch size TensorRT tunes kernels for.")
    builder_optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization level.")


class OpenVINOOptions(_Strict):
    device: str = Field("CPU", description="OpenVINO device name: CPU, GPU, NPU.")
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        "LATENCY", description="OpenVINO PERFORMANCE_HINT used for compilation.")
    num_streams: int | None = Field(None, ge=1, description="NUM_STREAMS; None lets the hint decide.")


class ONNXRuntimeOptions(_Strict):
    execution_provider: str = Field("CPUExecutionProvider", description="ONNX Runtime execution provider.")
    activation_type: Literal["int8", "uint8"] = Field(
        "uint8",
        description="Activation type of the QDQ model handed to ONNX Runtime. x86 CPU kernels favour uint8 "
                    "(same values, zero-point 128); int8 keeps the exported form.")
    graph_optimization_level: Literal["basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level for the optimized model.")


class BackendOptions(_Strict):
    tensorrt: TensorRTOptions = TensorRTOptions()
    openvino: OpenVINOOptions = OpenVINOOptions()
    onnxruntime: ONNXRuntimeOptions = ONNXRuntimeOptions()


class HardwareProfile(_Strict):
    """One target device. Figures are vendor datasheet numbers, cited in the YAML beside them."""

    name: str = Field(description="Canonical profile name, equal to the file stem.")
    aliases: tuple[str, ...] = Field((), description="Short names accepted for this profile (jetson).")
    description: str = Field("", description="One line a person reads in `edgepipe profiles`.")
    backend: Backend = Field(description="Runtime that compiles for this device.")
    device: str = Field(description="Device class: gpu, cpu, igpu, npu, dla.")
    dtypes: tuple[DType, ...] = Field(description="Supported dtypes, most preferred first.")
    peak_tops: dict[DType, float] = Field(
        description="Peak dense throughput per dtype, in tera-ops/s (1 MAC = 2 ops).")
    memory_bandwidth_gbps: float = Field(gt=0, description="Peak memory bandwidth, GB/s.")
    memory_gb: float = Field(gt=0, description="Device memory, GB.")
    power_w: float | None = Field(None, gt=0, description="Module power budget in the quoted mode, W.")
    min_speedup: float = Field(
        1.05, ge=1, description="A stage's output counts as faster on this target only when its batch-1 latency is "
                                "at least this many times lower than its input's (the engine's gain check).")
    options: BackendOptions = BackendOptions()

    @model_validator(mode="after")
    def _check(self) -> HardwareProfile:
        if not self.dtypes:
            raise ValueError("dtypes: list at least one dtype")
        if len(set(self.dtypes)) != len(self.dtypes):
            raise ValueError("dtypes: each dtype once")
        missing = [d.value for d in self.dtypes if d not in self.peak_tops]
        if missing:
            raise ValueError(f"peak_tops: no figure for supported dtype(s) {', '.join(missing)}")
        for d, v in self.peak_tops.items():
            if v <= 0:
                raise ValueError(f"peak_tops.{d.value}: must be > 0, got {v}")
        return self

    @property
    def supports_int8(self) -> bool:
        return DType.INT8 in self.dtypes

    @property
    def best_float(self) -> DType:
        """The most preferred float dtype the device runs (fp32 if none is listed)."""
        return next((d for d in self.dtypes if d.is_float), DType.FP32)

    def compile_dtype(self, quantized: bool) -> DType:
        """INT8 when the device lists it and the model was quantized, else the best float dtype."""
        return DType.INT8 if quantized and self.supports_int8 else self.best_float


def profiles_dir() -> Path:
    """The shipped profiles: ``hardware_profiles/`` beside the package (checkout or wheel)."""
    return Path(str(resources.files("hardware_profiles")))


def load_profile_file(path: Path, require_stem: bool = True) -> HardwareProfile:
    """Load and validate one profile YAML; errors name the file and the field.

    Shipped profiles must be named after their file; a profile passed by path (a deploy bundle's
    ``profile.yaml``) need not be.
    """
    from edgepipe.yamlfile import read_yaml

    data = read_yaml(path, "profile file")
    if not isinstance(data, dict):
        raise EdgepipeError(f"{path}: expected a mapping of profile fields, got {type(data).__name__}")
    try:
        profile = HardwareProfile.model_validate(data)
    except ValidationError as e:
        raise EdgepipeError(format_validation_error(path, e)) from None
    if require_stem and profile.name != path.stem:
        raise EdgepipeError(f"{path}: name '{profile.name}' must equal the file name '{path.stem}'")
    return profile


@cache
def all_profiles(directory: Path | None = None) -> dict[str, HardwareProfile]:
    """Every profile in ``directory`` (default: the shipped ones), by canonical name."""
    directory = directory or profiles_dir()
    return {p.stem: load_profile_file(p) for p in sorted(directory.glob("*.yaml"))}


def get_profile(name_or_path: str) -> HardwareProfile:
    """Resolve a profile by name, alias or path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise EdgepipeError(f"{path}: profile file not found")
        return load_profile_file(path, require_stem=False)
    profiles = all_profiles()
    if name_or_path in profiles:
        return profiles[name_or_path]
    for profile in profiles.values():
        if name_or_path in profile.aliases:
            return profile
    known = ", ".join(sorted(list(profiles) + [a for p in profiles.values() for a in p.aliases]))
    raise EdgepipeError(f"unknown target '{name_or_path}' (known: {known}); see `edgepipe profiles`")
