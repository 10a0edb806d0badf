"""Fake ``cuda.bindings.runtime`` (see the package docstring). Names follow cuda-python 12.x."""
from __future__ import annotations

import ctypes
import enum
import os
import time


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorNoDevice = 100


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStream_t(int):  # noqa: N801 - an int handle, as int(stream) gives in cuda-python
    pass


class _Props:
    name = b"Fake Orin (simulated)\0\0\0"


_memory: dict[int, bytearray] = {}
_events: dict[int, float] = {}
_next = [0x10000]


def _handle() -> int:
    _next[0] += 0x1000
    return _next[0]


def _devices() -> int:
    return int(os.environ.get("FAKE_CUDA_DEVICES", "1"))


def cudaGetDeviceCount():  # noqa: N802
    n = _devices()
    return (cudaError_t.cudaSuccess, n) if n else (cudaError_t.cudaErrorNoDevice, 0)


def cudaGetDeviceProperties(device: int):  # noqa: N802
    return (cudaError_t.cudaSuccess, _Props()) if device < _devices() else (cudaError_t.cudaErrorInvalidValue, None)


def cudaDriverGetVersion():  # noqa: N802
    return cudaError_t.cudaSuccess, 12060


def cudaRuntimeGetVersion():  # noqa: N802
    return cudaError_t.cudaSuccess, 12060


def cudaStreamCreate():  # noqa: N802
    return cudaError_t.cudaSuccess, cudaStream_t(_handle())


def cudaStreamSynchronize(stream):  # noqa: N802
    return (cudaError_t.cudaSuccess,)


def cudaMalloc(nbytes: int):  # noqa: N802
    ptr = _handle()
    _memory[ptr] = bytearray(nbytes)
    _next[0] += nbytes
    return cudaError_t.cudaSuccess, ptr


def cudaFree(ptr: int):  # noqa: N802
    return (cudaError_t.cudaSuccess,) if _memory.pop(int(ptr), None) is not None else (cudaError_t.cudaErrorInvalidValue,)


def cudaMemcpyAsync(dst, src, nbytes: int, kind, stream):  # noqa: N802
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        buf = _memory.get(int(dst))
        if buf is None or nbytes > len(buf):
            return (cudaError_t.cudaErrorInvalidValue,)
        buf[:nbytes] = ctypes.string_at(int(src), nbytes)
    elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
        buf = _memory.get(int(src))
        if buf is None or nbytes > len(buf):
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(int(dst), bytes(buf[:nbytes]), nbytes)
    else:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (cudaError_t.cudaSuccess,)


def cudaEventCreate():  # noqa: N802
    return cudaError_t.cudaSuccess, _handle()


def cudaEventRecord(event, stream):  # noqa: N802
    _events[int(event)] = time.perf_counter()
    return (cudaError_t.cudaSuccess,)


def cudaEventSynchronize(event):  # noqa: N802
    return (cudaError_t.cudaSuccess,) if int(event) in _events else (cudaError_t.cudaErrorInvalidValue,)


def cudaEventElapsedTime(start, end):  # noqa: N802
    return cudaError_t.cudaSuccess, (_events[int(end)] - _events[int(start)]) * 1e3
