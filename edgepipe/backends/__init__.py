"""Compile backends, registered by name and chosen by the hardware profile's ``backend`` field.

Each backend is one module with the same few verbs:

- ``DTYPES``: the precisions it can compile to; anything else is refused at once.
- ``available() -> tuple[bool, str]``: can it compile *and run* here, and if not, why.
- ``compile(onnx_path, profile, dtype, out_dir, progress=None) -> tuple[Artifact, dict]``: build the
  deployable artifact in ``out_dir`` and return it with records (settings used, runtime checks).
- ``load(artifact, threads=None) -> Runner``: a runner (see ``edgepipe.runtime``) for measurement.

Heavy imports (tensorrt, pycuda, openvino) happen inside the backend modules' functions, so importing
this registry, and ``edgepipe --help``, stays fast.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from edgepipe.errors import EdgepipeError
from edgepipe.types import Backend, DType

_MODULES = {
    Backend.ONNXRUNTIME: "edgepipe.backends.onnxruntime",
    Backend.OPENVINO: "edgepipe.backends.openvino",
    Backend.TENSORRT: "edgepipe.backends.tensorrt",
}


def get_backend(backend: Backend | str) -> ModuleType:
    """The backend module for ``backend`` (an enum member or its name)."""
    try:
        key = Backend(backend)
    except ValueError:
        raise EdgepipeError(f"unknown backend '{backend}' (known: {', '.join(b.value for b in Backend)})") from None
    return importlib.import_module(_MODULES[key])


def check_dtype(backend: Backend, dtype: DType) -> None:
    allowed = get_backend(backend).DTYPES
    if dtype not in allowed:
        raise EdgepipeError(f"backend {backend.value} cannot compile {dtype.value} "
                            f"(supported: {', '.join(d.value for d in allowed)})")
