"""A fake of NVIDIA's cuda-python for the device-simulation test (tests/backends/test_device_simulation.py).

Only the runtime calls edgepipe's device code makes (``cuda.bindings.runtime``), with cuda-python's calling
convention: every call returns a tuple whose first item is a ``cudaError_t``. Device memory is host memory
(a dict of bytearrays); events are host timestamps. ``FAKE_CUDA_DEVICES`` sets the device count (default 1).
"""
