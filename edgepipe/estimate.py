"""Roofline *estimate* of latency on a device that is not this host.

When the target is elsewhere (a Jetson, a Xeon server) nothing can be timed here, so edgepipe reports the
ideal lower bound the profile's datasheet figures allow: a model can run no faster than its arithmetic at
peak throughput, nor faster than its memory traffic at peak bandwidth. The result is always labelled an
estimate, never mixed up with a measurement.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
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


def activation_bytes(model: nn.Module, example: torch.Tensor, dtype_bytes: int) -> int:
    """Activation traffic of one image: every leaf module's output, written once and read once.

    Runs one batch-1 forward pass under ``torch.no_grad()`` in eval mode with forward hooks on every leaf
    module (a module with no children) and sums ``output elements x dtype_bytes x 2``. The model's
    train/eval mode is restored afterwards.

    Args:
        model: The network; only leaf modules are counted, so a container is not counted twice.
        example: One input; only its first item is used (batch 1).
        dtype_bytes: Bytes per activation element in the deployed dtype (``DType.bytes``).

    Returns:
        Total activation bytes moved per image.
    """
    if dtype_bytes <= 0:
        raise EdgepipeError(f"activation_bytes: dtype_bytes must be > 0, got {dtype_bytes}")
    elements = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal elements
        elements += _numel(output)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return elements * dtype_bytes * 2


def _numel(output: object) -> int:
    """Elements in a module output: a tensor, or tensors nested in tuples, lists or dicts."""
    if isinstance(output, torch.Tensor):
        return output.numel()
    if isinstance(output, (tuple, list)):
        return sum(_numel(o) for o in output)
    if isinstance(output, dict):
        return sum(_numel(o) for o in output.values())
    return 0
