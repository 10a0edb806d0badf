"""This host and the software on it: CPU model, the ISA flags that decide INT8/BF16 speed, library versions
and the git revision, written next to every figure so a measurement says where it was taken.
"""
from __future__ import annotations

import os
import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "openvino", "tensorrt", "nncf")
"""The libraries whose versions decide a result; recorded in every manifest, bench and benchmark."""


@cache
def host_cpu() -> str:
    """CPU model name and core count of this host, for labelling measurements."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


@cache
def host_isa() -> tuple[str, ...]:
    """The CPU features that decide INT8/BF16 speed here (AVX2, AVX-512 VNNI/BF16/FP16, AMX)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return tuple(f for f in wanted if f in flags)


def host_has_native_bf16() -> bool:
    return any(f in host_isa() for f in ("avx512_bf16", "amx_bf16"))



def library_versions(installed_only: bool = False) -> dict[str, str]:
    """Versions of ``LIBRARIES``; a missing one reads "not installed" (or is left out with ``installed_only``)."""
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            if not installed_only:
                out[lib] = "not installed"
    return out


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
