# Strict fake of the TensorRT 10.3 Python package for tests (no GPU, no TensorRT needed).
"""Strict fake ``tensorrt`` (TensorRT 10.3 Python API) for device-simulation tests.

Use: put ``tests/fake_tensorrt`` first on ``sys.path`` (or ``PYTHONPATH``) in a *subprocess*, then
``import tensorrt``. Never import it in the main test process: it would shadow a real TensorRT.

Names: exactly those of the real TensorRT 10.3 bindings, read from ``../tensorrt_10_3_names.json``
(written by ``../extract_names.py`` from the ``tensorrt-cu12-bindings==10.3.0`` cp311 wheel). A name
real TensorRT 10.3 lacks raises ``AttributeError`` (``trt.BuilderFlag.NOT_A_FLAG``,
``builder.build_engine``); a real name the fake does not simulate raises ``NotImplementedError``.
Classes without a constructor in TensorRT (``IBuilderConfig``, ``ICudaEngine``...) raise
``TypeError: No constructor defined!`` when called, as the real ones do; enum arguments are type-checked
(``config.set_flag(1)`` is a ``TypeError``, as in pybind11).

Simulated (the rest of the API exists but raises NotImplementedError):

- ``Logger(min_severity)``/``ILogger`` subclasses; ``Builder(logger)``: ``create_network(flags)``,
  ``create_builder_config()``, ``create_optimization_profile()``, ``num_DLA_cores``,
  ``build_serialized_network(network, config)``;
- ``OnnxParser(network, logger).parse_from_file(path)`` / ``parse(bytes)``: the file must exist and be
  loadable with ``onnx`` when ``onnx`` is importable; inputs, outputs and nodes are always read from the
  protobuf with a small built-in reader (works without ``onnx``); failures go to ``num_errors`` /
  ``get_error(i)`` (``ParserError``);
- ``IOptimizationProfile.set_shape(name, min, opt, max)`` (``ValueError`` unless same rank and
  0 <= min <= opt <= max elementwise), ``get_shape``;
- ``IBuilderConfig``: ``set_flag``/``get_flag``/``clear_flag``/``flags``, ``set_memory_pool_limit``/
  ``get_memory_pool_limit``, ``add_optimization_profile``, ``default_device_type``, ``DLA_core``,
  ``builder_optimization_level``, ``profiling_verbosity``;
- the build fails (returns ``None``, logs an error) with ``FAKE_TRT_BUILD=fail``, without outputs, with
  a dynamic input and no profile or a profile not matching the network's inputs, or on DLA
  (``default_device_type = DeviceType.DLA``) with a DLA core outside ``0..num_DLA_cores-1`` or, without
  ``BuilderFlag.GPU_FALLBACK``, with neither FP16 nor INT8 set or a dynamic (min != max) profile;
- ``Runtime(logger).deserialize_cuda_engine(buffer)`` -> ``ICudaEngine`` (``None`` for a non-fake
  engine or one built with another ``__version__``): ``num_io_tensors``, ``get_tensor_name``,
  ``get_tensor_mode``, ``get_tensor_dtype``, ``get_tensor_shape``, ``get_tensor_profile_shape(name, 0)``,
  ``num_layers``, ``serialize()``, ``create_execution_context()``, ``create_engine_inspector()``;
- ``EngineInspector.get_engine_information(LayerInformationFormat.JSON)``: ``{"Layers": [...],
  "Bindings": [...]}``; with DETAILED verbosity each layer is a dict like TensorRT's (``Name``,
  ``LayerType`` e.g. ``CaskConvolution``, ``Inputs``/``Outputs`` with TensorRT's ``Format/Datatype``
  descriptions, e.g. "Thirty-two wide channel vectorized row major Int8 format" for a conv fed by
  DequantizeLinear when INT8 is set, "Channel major FP16 format where channel % 8 == 0" with FP16, "Row
  major linear FP32" otherwise); with LAYER_NAMES_ONLY (the default) layer names only; no tensor
  dimensions;
- ``IExecutionContext``: ``set_input_shape`` (``False`` outside the profile), ``get_tensor_shape``
  (outputs resolved from the inputs' shapes), ``set_tensor_address``/``get_tensor_address``,
  ``execute_async_v3(stream)`` -> ``True`` once every input shape and I/O address is set; it computes
  nothing and leaves output memory untouched (fake CUDA is someone else's job);
- ``nptype``, ``volume``, ``DataType.itemsize``, ``float32``... as in the real package.

The serialized engine (``IHostMemory``, a buffer: ``bytes(m)``, ``memoryview(m)``, ``path.write_bytes(m)``)
is one JSON line then a marker line, so a test can read what was built::

    header = json.loads(engine_bytes.split(b"\\n", 1)[0])
    # keys: fake_tensorrt_engine, version, flags (names), workspace (bytes or null), memory_pool_limits,
    # default_device_type ("GPU"/"DLA"), DLA_core, builder_optimization_level, profiling_verbosity,
    # network_flags, profile_shapes ([min, opt, max] of the first input in profile 0), profiles,
    # tensors ([{name, mode, dtype, shape, dim_params}]), layers, onnx ({path, sha256})

Environment (read when used, so a test sets them per subprocess):

- ``FAKE_TRT_BUILD=ok|fail`` (ok): ``build_serialized_network`` returns an engine or ``None``;
- ``FAKE_TRT_PARSE=ok|fail`` (ok): ``parse_from_file`` succeeds or reports one UNSUPPORTED_NODE error;
- ``FAKE_TRT_EXECUTE=ok|fail`` (ok): ``execute_async_v3`` returns True or False;
- ``FAKE_TRT_DLA_CORES`` (2): ``Builder.num_DLA_cores`` / ``Runtime.num_DLA_cores``;
- ``FAKE_TRT_VERSION`` (the real ``10.3.0``): ``tensorrt.__version__`` (read at import), to test version
  checks; the names stay those of 10.3;
- ``FAKE_TRT_OUTPUT_SHAPE`` (unset): e.g. ``-1,10``, the output shape when the ONNX does not give one;
- ``FAKE_TRT_LOG=0|1`` (0): ``Logger`` prints like the real one (``[TRT] [E] ...`` on stderr) when 1;
  quiet by default (the real Logger always prints messages at or above ``min_severity``).
"""

# The real package's __init__.py adds a few Python-level names on top of its extension module (context
# manager hooks, Logger severities, nptype, volume, DataType.itemsize). The fake defines the same names,
# written here from their documented behaviour (TensorRT Python API reference), so that its namespace is
# exactly the real one; _fake_check_module enforces that at import.
import ctypes  # noqa: F401 - the real package's namespace includes these modules
import os  # noqa: F401
import sys  # noqa: F401
import warnings

from . import tensorrt
from .tensorrt import *  # noqa: F403 - every name of the 10.3 extension module, generated from the names JSON
from .tensorrt import Builder, DataType, IBuilderConfig, ICudaEngine, IExecutionContext, IHostMemory, ILogger
from .tensorrt import INetworkDefinition, Logger, OnnxParser, Runtime

__version__ = tensorrt._fake_version()


def common_enter(this):
    """``with`` support (deprecated in TensorRT 10: objects are freed by reference counting)."""
    warnings.warn("Context managers for TensorRT types are deprecated", DeprecationWarning, stacklevel=2)
    return this


def common_exit(this, exc_type, exc_value, traceback):
    """No effect, as in TensorRT 10."""


for _cls in (ICudaEngine, IExecutionContext, Runtime, IHostMemory, Builder, INetworkDefinition, OnnxParser,
             IBuilderConfig):
    _cls.__enter__, _cls.__exit__ = common_enter, common_exit
ILogger.__enter__, ILogger.__exit__ = common_enter, (lambda this, *exc: None)
Logger.Severity = ILogger.Severity  # trt.Logger.WARNING etc., as the real package provides
for attr, value in ILogger.Severity.__members__.items():  # the real loop leaves attr and value in the namespace
    setattr(Logger, attr, value)
del _cls


def volume(iterable):
    """Product of the dimensions (1 for an empty shape)."""
    out = 1
    for d in iterable:
        out *= d
    return out


def nptype(trt_type):
    """The numpy type of a DataType; TypeError for types numpy lacks (bf16, fp8, int4)."""
    import numpy as np

    numpy_name = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                  "BOOL": "bool_", "UINT8": "uint8"}.get(getattr(trt_type, "name", None))
    if numpy_name is None:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return getattr(np, numpy_name)


def _itemsize(trt_type):
    return {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1, "UINT8": 1, "FP8": 1,
            "INT4": 0.5}.get(getattr(trt_type, "name", None))


DataType.itemsize = property(_itemsize)

tensorrt._fake_check_module(globals())  # the names here are exactly the real package's, or ImportError
