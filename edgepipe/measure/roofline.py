"""Latency *estimates* for a device that is not this host: the ideal roofline and a calibrated roofline.

When the target is elsewhere (a Jetson, a Xeon server) nothing can be timed here, so edgepipe estimates.

* :func:`roofline_estimate` is the ideal lower bound the profile's datasheet figures allow: a model runs no
  faster than its arithmetic at peak throughput, nor faster than its memory traffic at peak bandwidth.
* :func:`calibrated_estimate` adds what the ideal leaves out, per layer (see :data:`CALIBRATED_FORM`):
  achievable fractions of peak compute and bandwidth, a launch overhead per kernel and a fixed enqueue/sync
  overhead per inference. Their values are fitted (edgepipe.measure.calibrate) to published results kept, with
  their sources, in ``hardware_profiles/published/jetson.yaml`` (read here: ``published_table``,
  ``calibration_for``); a device with no published results gets the ideal lower bound only.

The layers come from edgepipe.measure.layers. Every result is labelled an estimate with its assumptions, never
mixed up with a measurement.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

from edgepipe.errors import EdgepipeError
from edgepipe.measure.layers import Layer, layer_totals
from edgepipe.profiles import HardwareProfile, profiles_dir
from edgepipe.types import DType

log = logging.getLogger(__name__)


ASSUMPTIONS = (
    "ideal lower bound: full utilisation of the profile's dense peak throughput for this dtype and of its "
    "peak memory bandwidth, compute and memory traffic fully overlapped (latency = max of the two), "
    "weights read once per batch, every activation written once and read once, no kernel-launch, "
    "scheduling, host-transfer or pre/post-processing overhead; 1 MAC = 2 ops"
)


def roofline_estimate(profile: HardwareProfile, dtype: DType, macs: int, weight_bytes: int,
                      activation_bytes: int, batch: int = 1) -> dict:
    """Ideal roofline latency of one batch on ``profile`` in ``dtype``.

    Args:
        profile: Target device; its ``peak_tops[dtype]`` and ``memory_bandwidth_gbps`` are used.
        dtype: Precision the model runs in on the device.
        macs: Multiply-accumulates of ONE image (batch 1).
        weight_bytes: Bytes of all weights in ``dtype``; read once per batch.
        activation_bytes: Activation traffic of ONE image in ``dtype`` (see :func:`activation_bytes`).
        batch: Images per inference.

    Returns:
        A JSON-able dict: ``kind`` ("estimate"), ``label``, ``device``, ``dtype``, ``batch``,
        ``latency_ms``, ``compute_bound_ms``, ``memory_bound_ms``, ``bound`` ("compute" or "memory"),
        ``images_per_s`` and ``assumptions``.

    Raises:
        EdgepipeError: The profile has no peak figure for ``dtype``, or an input is out of range.
    """
    dtype = DType(dtype)
    peak = profile.peak_tops.get(dtype)
    if peak is None:
        known = ", ".join(d.value for d in profile.peak_tops)
        raise EdgepipeError(f"profile '{profile.name}': no peak_tops figure for dtype '{dtype.value}' "
                            f"(has: {known}); add one to hardware_profiles/{profile.name}.yaml or pick "
                            "another dtype")
    if batch < 1:
        raise EdgepipeError(f"roofline estimate: batch must be >= 1, got {batch}")
    for field, value in (("macs", macs), ("weight_bytes", weight_bytes), ("activation_bytes", activation_bytes)):
        if value < 0:
            raise EdgepipeError(f"roofline estimate: {field} must be >= 0, got {value}")

    compute_s = 2 * macs * batch / (peak * 1e12)
    memory_s = (weight_bytes + activation_bytes * batch) / (profile.memory_bandwidth_gbps * 1e9)
    latency_s = max(compute_s, memory_s)
    bound = "compute" if compute_s >= memory_s else "memory"
    log.debug("roofline %s %s batch %d: compute %.4g s, memory %.4g s (%s-bound)",
              profile.name, dtype.value, batch, compute_s, memory_s, bound)
    return {
        "kind": "estimate",
        "label": f"estimate: roofline from {profile.name} peak figures (not measured)",
        "device": profile.name,
        "dtype": dtype.value,
        "batch": batch,
        "latency_ms": latency_s * 1e3,
        "compute_bound_ms": compute_s * 1e3,
        "memory_bound_ms": memory_s * 1e3,
        "bound": bound,
        "images_per_s": batch / latency_s if latency_s > 0 else None,
        "assumptions": ASSUMPTIONS,
    }


CALIBRATED_FORM = """\
Per kernel i of the deployed network (one per convolution, matmul/linear and pooling layer; batch-norm,
activations and residual adds are fused into the convolution before them, as TensorRT does):

    t_i = max(2 x MACs_i x batch / (peak x compute_efficiency),
              (weights_i + batch x (inputs_i + outputs_i)) x dtype bytes / (bandwidth x bandwidth_efficiency))
          + kernel_launch_us
    latency(batch) = sum_i t_i + enqueue_us

Why this form: it is the roofline (which the profiles' cited peaks already define) applied per kernel, so a
network with memory-bound layers (early high-resolution convolutions, weight-heavy late layers at batch 1)
and compute-bound ones is not averaged into one ratio, plus the two costs the roofline ignores that dominate
small models: a gap per kernel and a fixed cost per inference. Four parameters, each with a physical meaning;
peak and bandwidth stay the profile's datasheet figures, so one family's factors carry over to every device of
that family. They are fitted (:func:`calibrate`) by least squares on log(estimate / published) over the
published rows marked ``use: fit``. Published results of one network (ResNet-50) have one kernel count, so the
per-kernel and per-inference overheads cannot be told apart from them: their sum is fitted and split by
``enqueue_share`` (an assumption, written beside the fitted values)."""


def published_path() -> Path:
    """The cited table of published results and the calibration fitted to it."""
    return profiles_dir() / "published" / "jetson.yaml"


@cache
def _table(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EdgepipeError(f"{path}: cannot read the published-results table ({type(e).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise EdgepipeError(f"{path}: expected a mapping with a 'results' list")
    return data


def published_table(path: Path | None = None) -> dict[str, Any]:
    """The parsed table: ``results`` (rows), ``families`` and, once fitted, ``calibration``."""
    return _table(str(path or published_path()))


def published_results(path: Path | None = None, device: str | None = None) -> list[dict[str, Any]]:
    """Rows of the table (optionally of one device profile), each with its value, source and URL."""
    rows = published_table(path)["results"]
    return [r for r in rows if device is None or r.get("device") == device]


@dataclass(frozen=True)
class Calibration:
    """The fitted factors of one device family (see :data:`CALIBRATED_FORM`)."""

    family: str
    profiles: tuple[str, ...]
    compute_efficiency: float
    bandwidth_efficiency: float
    kernel_launch_us: float
    enqueue_us: float
    enqueue_share: float | None
    """The assumed per-inference share of the fitted overhead; None when both overheads were fitted."""
    fitted_on: tuple[str, ...]
    fitted_devices: tuple[str, ...]
    fitted_dtypes: tuple[str, ...]
    max_fit_error: float
    """Largest factor between a fitted row's estimate and its published value (1.0 = exact)."""
    source: str
    table: str


def calibration_for(profile: HardwareProfile, path: Path | None = None) -> Calibration | None:
    """The calibration of the family ``profile`` belongs to, or None (no published results for it)."""
    path = path or published_path()
    if not Path(path).is_file():
        return None
    data = published_table(path)
    for family, c in (data.get("calibration") or {}).items():
        if profile.name in (c.get("profiles") or []):
            return Calibration(family=family, profiles=tuple(c["profiles"]),
                               compute_efficiency=float(c["compute_efficiency"]),
                               bandwidth_efficiency=float(c["bandwidth_efficiency"]),
                               kernel_launch_us=float(c["kernel_launch_us"]), enqueue_us=float(c["enqueue_us"]),
                               enqueue_share=None if c.get("enqueue_share") is None else float(c["enqueue_share"]),
                               fitted_on=tuple(c["fitted_on"]), fitted_devices=tuple(c["fitted_devices"]),
                               fitted_dtypes=tuple(c["fitted_dtypes"]), max_fit_error=float(c["max_fit_error"]),
                               source=str(data.get("source_round", "")), table=display_path(Path(path)))
    return None


def display_path(path: Path) -> str:
    """``path`` from ``hardware_profiles/`` on, as the estimates cite the table (the full path elsewhere)."""
    parts = path.resolve().parts
    return "/".join(parts[parts.index("hardware_profiles"):]) if "hardware_profiles" in parts else str(path)


def peak_tops_for(profile: HardwareProfile, dtype: DType) -> float:
    """The profile's peak TOPS in ``dtype``; an error naming the profile file when it has none."""
    peak = profile.peak_tops.get(dtype)
    if peak is None:
        known = ", ".join(d.value for d in profile.peak_tops)
        raise EdgepipeError(f"profile '{profile.name}': no peak_tops figure for dtype '{dtype.value}' "
                            f"(has: {known}); add one to hardware_profiles/{profile.name}.yaml or pick another dtype")
    return peak


def calibrated_latency_s(layers: list[Layer], dtype: DType, batch: int, peak_tops: float, bandwidth_gbps: float,
                         ec: float, eb: float, kernel_s: float, enqueue_s: float) -> tuple[float, float, float, float]:
    """(latency, compute-limited part, memory-limited part, overhead) in seconds: :data:`CALIBRATED_FORM`."""
    compute = memory = 0.0
    for x in layers:
        c = 2 * x.macs * batch / (peak_tops * 1e12 * ec)
        m = (x.weight_elements + batch * x.activation_elements) * dtype.bytes / (bandwidth_gbps * 1e9 * eb)
        if c >= m:
            compute += c
        else:
            memory += m
    overhead = len(layers) * kernel_s + enqueue_s
    return compute + memory + overhead, compute, memory, overhead


def calibrated_estimate(profile: HardwareProfile, dtype: DType, layers: list[Layer], batch: int,
                        calibration: Calibration) -> dict[str, Any]:
    """The calibrated latency of one batch of ``batch`` images on ``profile`` (:data:`CALIBRATED_FORM`).

    Returns:
        A JSON-able dict: ``kind`` ("estimate"), ``label``, ``device``, ``dtype``, ``batch``, ``latency_ms``,
        ``images_per_s``, ``bound`` (the largest part: "compute", "memory" or "overhead"), ``compute_limited_ms``,
        ``memory_limited_ms``, ``overhead_ms``, ``kernels``, ``macs``, ``weight_bytes`` and ``activation_bytes``
        (one image), ``lower_bound`` (the ideal :func:`roofline_estimate` of the same layers), ``calibration``
        (the factors and where they come from) and ``assumptions``.
    """
    dtype = DType(dtype)
    peak = peak_tops_for(profile, dtype)
    if batch < 1:
        raise EdgepipeError(f"estimate: batch must be >= 1, got {batch}")
    if not layers:
        raise EdgepipeError("estimate: no layers to estimate")
    c = calibration
    total, compute, memory, overhead = calibrated_latency_s(
        layers, dtype, batch, peak, profile.memory_bandwidth_gbps, c.compute_efficiency, c.bandwidth_efficiency,
        c.kernel_launch_us * 1e-6, c.enqueue_us * 1e-6)
    totals = layer_totals(layers, dtype)
    ideal = roofline_estimate(profile, dtype, totals["macs"], totals["weight_bytes"], totals["activation_bytes"],
                              batch=batch)
    parts = {"compute": compute, "memory": memory, "overhead": overhead}
    notes = []
    if dtype.value not in c.fitted_dtypes:
        notes.append(f"the factors were fitted on {'/'.join(c.fitted_dtypes)} rows and are applied unchanged to "
                     f"{dtype.value} (no published {dtype.value} rows)")
    if profile.name not in c.fitted_devices:
        notes.append(f"{profile.name} has no published rows: the {c.family} factors fitted on "
                     f"{', '.join(c.fitted_devices)} are applied to its datasheet peak and bandwidth")
    assumptions = (
        f"ESTIMATE, roofline calibrated on published results ({c.family}: {len(c.fitted_on)} {c.source} results "
        f"in {c.table}, reproduced within {c.max_fit_error:.2f}x). Per kernel (convolution, matmul/linear, pooling; "
        "batch-norm, activations and residual adds fused into the convolution before them, as TensorRT does): "
        f"max(2 x MACs x batch / ({peak:g} TOPS x {c.compute_efficiency:.3f}), (weights + batch x activations in "
        f"and out) x {dtype.bytes} B / ({profile.memory_bandwidth_gbps:g} GB/s x {c.bandwidth_efficiency:.3f})) "
        f"+ {c.kernel_launch_us:.2f} us launch, summed, plus {c.enqueue_us:.1f} us enqueue/sync per inference "
        + (f"(the per-kernel/per-inference split of the fitted overhead is an assumption: enqueue share "
           f"{c.enqueue_share:g})" if c.enqueue_share is not None else "(both overheads fitted)")
        + ". GPU only (no DLA); input already in device memory in the deployed dtype (no "
        "pre-processing, host copies or framework overhead); steady state after warm-up; the TensorRT kernels "
        "are as efficient on this model as on the published one" + ("; " + "; ".join(notes) if notes else ""))
    return {
        "kind": "estimate",
        "label": f"estimate: roofline calibrated on published results ({c.family}), {profile.name} (not measured)",
        "device": profile.name,
        "dtype": dtype.value,
        "batch": batch,
        "latency_ms": total * 1e3,
        "images_per_s": batch / total,
        "bound": max(parts, key=parts.get),
        "compute_limited_ms": compute * 1e3,
        "memory_limited_ms": memory * 1e3,
        "overhead_ms": overhead * 1e3,
        **totals,
        "lower_bound": ideal,
        "calibration": {"family": c.family, "compute_efficiency": c.compute_efficiency,
                        "bandwidth_efficiency": c.bandwidth_efficiency, "kernel_launch_us": c.kernel_launch_us,
                        "enqueue_us": c.enqueue_us, "enqueue_share": c.enqueue_share, "fitted_on": list(c.fitted_on),
                        "max_fit_error": c.max_fit_error, "source": c.source, "table": c.table},
        "assumptions": assumptions,
    }


def layer_estimate(profile: HardwareProfile, dtype: DType, layers: list[Layer], batch: int = 1) -> dict[str, Any]:
    """The estimate for ``layers``: calibrated when ``profile`` has published results, else the ideal lower bound
    (:func:`roofline_estimate` of the layer totals, with ``calibration`` None and ``lower_bound`` itself)."""
    cal = calibration_for(profile)
    if cal is not None:
        return calibrated_estimate(profile, dtype, layers, batch, cal)
    dtype = DType(dtype)
    totals = layer_totals(layers, dtype)
    ideal = roofline_estimate(profile, dtype, totals["macs"], totals["weight_bytes"], totals["activation_bytes"],
                              batch=batch)
    ideal = {**ideal, **totals, "calibration": None,
             "assumptions": ideal["assumptions"] + f"; UNCALIBRATED: no published results for {profile.name} in "
                            f"{display_path(published_path())}, so only the ideal lower bound is given (a real device "
                            "is typically several times slower, most of all for small models)"}
    return {**ideal, "lower_bound": dict(ideal)}


def target_estimate(profile: HardwareProfile, dtype: DType, counts: dict[str, Any], batch: int = 1,
                    layers: list[Layer] | Callable[[], list[Layer] | None] | None = None) -> dict[str, Any]:
    """The estimate the pipeline records: calibrated when the profile has published results and the layers are
    known (``layers``, or a function giving them, called only then); otherwise the ideal roofline of ``counts``
    (``macs``, ``params``, ``activation_elements`` of one image), as before calibration existed."""
    dtype = DType(dtype)
    cal = calibration_for(profile)
    if cal is not None:
        try:
            found = layers() if callable(layers) else layers
        except EdgepipeError as e:
            log.warning("%s: per-layer counts unavailable (%s)", profile.name, e)
            found = None
        if found:
            return calibrated_estimate(profile, dtype, found, batch, cal)
        log.info("%s: no per-layer counts for the calibrated estimate; giving the ideal lower bound", profile.name)
    return roofline_estimate(profile, dtype, counts["macs"], counts["params"] * dtype.bytes,
                             counts["activation_elements"] * 2 * dtype.bytes, batch=batch)
