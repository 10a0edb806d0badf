"""The fake's stand-in for the compiled ``tensorrt.tensorrt`` extension (see ``tests/fake_tensorrt/tensorrt/__init__.py``).

Every class, enum and module function of the real TensorRT 10.3 bindings is created here from
``tests/fake_tensorrt/tensorrt_10_3_names.json`` and has exactly the real names:

- a name TensorRT 10.3 does not have raises ``AttributeError`` (on the module, on a class, on an
  instance), like real TensorRT; setting one raises ``AttributeError``, and so does setting a read-only
  property or a method name; a writable property can be set;
- a real name the fake simulates behaves as described in the package docstring;
- a real name it does not simulate raises ``NotImplementedError`` when called (methods) or read
  (properties; a writable one returns what was set on it);
- the hand-written behaviour below is checked at import: each class may only define names its real
  counterpart has (else ``ImportError``), which keeps the fake honest.
"""
# ruff: noqa: F821 - the TensorRT classes (Dims, DataType, ILogger...) are created from the names JSON at import
from __future__ import annotations

import datetime
import hashlib
import json
import operator
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

_NAMES_FILE = Path(__file__).resolve().parent.parent / "tensorrt_10_3_names.json"
_N: dict[str, Any] = json.loads(_NAMES_FILE.read_text())
_REAL_VERSION: str = _N["version"]
_MODULE = __name__  # "tensorrt.tensorrt", as the real extension's
_HINT = f" (fake tensorrt: not a name of the real TensorRT {_REAL_VERSION} bindings)"
_PLUMBING = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__slots__", "__annotations__"}
ENGINE_MAGIC = "fake_tensorrt_engine"
_PY_LEVEL = {"__version__", "_itemsize", "attr", "value", "common_enter", "common_exit", "ctypes", "os", "sys",
             "warnings", "tensorrt", "nptype", "volume"}  # what the real package __init__.py adds


def _fake_version() -> str:
    return os.environ.get("FAKE_TRT_VERSION") or _REAL_VERSION


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


# ---------------------------------------------------------------------------------------------- strictness
class _Meta(type):
    """Class-level guard: ``trt.BuilderFlag.NOT_A_FLAG`` raises AttributeError like the real type."""

    def __getattribute__(cls, name: str) -> Any:
        if name[:2] == "__" or name[:5] == "_fake" or name in _TYPE_ATTRS:
            return type.__getattribute__(cls, name)
        if type.__getattribute__(cls, "_fake_builtin") and name not in type.__getattribute__(cls, "_fake_allowed"):
            raise AttributeError(f"type object '{_MODULE}.{type.__getattribute__(cls, '_fake_path')}' "
                                 f"has no attribute '{name}'{_HINT}")
        return type.__getattribute__(cls, name)

    def __setattr__(cls, name: str, value: Any) -> None:
        if (name[:2] != "__" and name[:5] != "_fake" and type.__getattribute__(cls, "_fake_builtin")
                and name not in type.__getattribute__(cls, "_fake_allowed")):
            raise AttributeError(f"fake tensorrt: cannot add '{name}' to {cls._fake_path}{_HINT}")
        type.__setattr__(cls, name, value)

    def __dir__(cls) -> list[str]:
        return sorted({n for n in type.__dir__(cls) if n[:2] == "__"} | set(cls._fake_allowed))


_TYPE_ATTRS = {"mro"}  # attributes every Python type has (real pybind11 types too)


def _guard_getattribute(self: Any, name: str) -> Any:
    if name[:2] != "__" and name[:5] != "_fake":
        cls = type(self)
        if "_fake_builtin" in cls.__dict__ and name not in cls._fake_allowed:
            raise AttributeError(f"'{_MODULE}.{cls._fake_path}' object has no attribute '{name}'{_HINT}")
    return object.__getattribute__(self, name)


def _guard_setattr(self: Any, name: str, value: Any) -> None:
    cls = type(self)
    if name[:5] == "_fake" or "_fake_builtin" not in cls.__dict__ and not _defined_by_fake(cls, name):
        object.__setattr__(self, name, value)  # fake state, or a user subclass's own attribute
    elif name in cls._fake_writable:
        object.__setattr__(self, name, value)  # through the property's setter
    elif name in cls._fake_allowed:
        raise AttributeError(f"can't set attribute '{name}' of '{_MODULE}.{cls._fake_path}' (read-only in TensorRT)")
    else:
        raise AttributeError(f"'{_MODULE}.{cls._fake_path}' object has no attribute '{name}'{_HINT}")


def _defined_by_fake(cls: type, name: str) -> bool:
    return any("_fake_builtin" in k.__dict__ and name in k.__dict__ for k in cls.__mro__)


def _guard_dir(self: Any) -> list[str]:
    return sorted({n for n in object.__dir__(self) if n[:2] == "__"} | set(type(self)._fake_allowed))


class _Object(metaclass=_Meta):
    """Root of every fake class (not a TensorRT class itself)."""

    _fake_builtin = False
    _fake_path = "_Object"
    _fake_allowed: frozenset[str] = frozenset()
    _fake_writable: frozenset[str] = frozenset()

    @classmethod
    def _fake_new(cls, *args: Any, **state: Any) -> Any:
        """An instance without calling ``__init__`` (TensorRT creates these; Python code cannot)."""
        obj = cls.__new__(cls, *args)
        for key, value in state.items():
            object.__setattr__(obj, f"_fake_{key}", value)
        return obj


def _no_constructor(self: Any, *args: Any, **kwargs: Any) -> None:
    raise TypeError(f"{_MODULE}.{type(self)._fake_path}: No constructor defined!")


def _unsimulated(path: str, name: str) -> Callable[..., Any]:
    def method(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"fake tensorrt: {path}.{name} exists in TensorRT {_REAL_VERSION} but is not simulated")
    method.__name__ = method.__qualname__ = name
    return method


def _unsimulated_property(path: str, name: str, writable: bool) -> property:
    def fget(self: Any) -> Any:
        props = self.__dict__.get("_fake_props", {})
        if name in props:
            return props[name]
        raise NotImplementedError(f"fake tensorrt: {path}.{name} exists in TensorRT {_REAL_VERSION} but is not "
                                  f"simulated{' (set it first to read it back)' if writable else ''}")

    def fset(self: Any, value: Any) -> None:
        self.__dict__.setdefault("_fake_props", {})[name] = value

    return property(fget, fset if writable else None)


def _keeps_default(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a dunder that only undoes what a Python base class (``bytes``) adds and TensorRT does not have."""
    fn._fake_keeps_default = True  # type: ignore[attr-defined]
    return fn


def _check_type(value: Any, cls: type, what: str) -> Any:
    if not isinstance(value, cls):
        raise TypeError(f"{what}(): incompatible function arguments: expected {_MODULE}.{cls._fake_path}, "
                        f"got {type(value).__name__} {value!r}")
    return value


def _check_int(value: Any, what: str) -> int:
    """What pybind11's int conversion accepts: anything with ``__index__`` (ints, numpy ints, enums), no floats."""
    try:
        if isinstance(value, float):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: incompatible function arguments: expected int, got {type(value).__name__}") from None


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, Dims):
        return tuple(value)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what}: incompatible function arguments: expected a Dims, list or tuple, got {type(value).__name__}")
    return tuple(_check_int(d, what) for d in value)


# ----------------------------------------------------------------------------------------- hand-written
_IMPL: dict[str, type] = {}


def _implements(path: str) -> Callable[[type], type]:
    def register(mixin: type) -> type:
        _IMPL[path] = mixin
        return mixin
    return register


class _Enum(_Object):
    """The pybind11 enum machinery every TensorRT enum has (``_N["enum_common"]``)."""

    def __init__(self, value: int) -> None:
        value = _check_int(value, f"{type(self)._fake_path}()")
        object.__setattr__(self, "_fake_value", value)
        object.__setattr__(self, "_fake_name", type(self)._fake_by_value.get(value, "???"))

    @property
    def name(self) -> str:
        return self._fake_name

    @property
    def value(self) -> int:
        return self._fake_value

    def __int__(self) -> int:
        return self._fake_value

    def __index__(self) -> int:
        return self._fake_value

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._fake_value == self._fake_value  # type: ignore[attr-defined]

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self._fake_value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self._fake_name}: {self._fake_value}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self._fake_name}"

    def __getstate__(self) -> int:
        return self._fake_value

    def __setstate__(self, state: int) -> None:
        _Enum.__init__(self, state)

    __members__: ClassVar[dict[str, Any]] = {}


class _OrderedEnum:
    """Comparison operators, for the enums pybind11 declares arithmetic."""

    def __lt__(self, other: Any) -> bool:
        return int(self) < int(other)

    def __le__(self, other: Any) -> bool:
        return int(self) <= int(other)

    def __gt__(self, other: Any) -> bool:
        return int(self) > int(other)

    def __ge__(self, other: Any) -> bool:
        return int(self) >= int(other)


@_implements("Dims")
class _Dims:
    MAX_DIMS = 8

    def __init__(self, shape: Any = ()) -> None:
        values = [_check_int(d, "Dims()") for d in shape]
        if len(values) > 8:
            raise ValueError(f"Dims supports at most 8 dimensions, got {len(values)}")
        object.__setattr__(self, "_fake_dims", values)

    def __len__(self) -> int:
        return len(self._fake_dims)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self._fake_dims[index])
        index = _check_int(index, "Dims.__getitem__")
        if not -len(self._fake_dims) <= index < len(self._fake_dims):
            raise IndexError("Out of bounds")
        return self._fake_dims[index]

    def __setitem__(self, index: int, value: int) -> None:
        if not -len(self._fake_dims) <= index < len(self._fake_dims):
            raise IndexError("Out of bounds")
        self._fake_dims[index] = _check_int(value, "Dims.__setitem__")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            return list(other) == self._fake_dims
        return isinstance(other, Dims) and other._fake_dims == self._fake_dims

    def __hash__(self) -> int:
        return hash(tuple(self._fake_dims))

    def __repr__(self) -> str:
        return repr(tuple(self._fake_dims))

    def __str__(self) -> str:
        return str(tuple(self._fake_dims))


def _dims(values: Any) -> Any:
    return Dims(list(values))


@_implements("ILogger")
class _ILogger:
    def __init__(self) -> None:  # the trampoline: Python subclasses implement log()
        pass


@_implements("Logger")
class _Logger:
    def __init__(self, min_severity: Any = None) -> None:
        self.min_severity = ILogger.Severity.WARNING if min_severity is None else min_severity

    @property
    def min_severity(self) -> Any:
        return self._fake_min_severity

    @min_severity.setter
    def min_severity(self, value: Any) -> None:
        object.__setattr__(self, "_fake_min_severity", _check_type(value, ILogger.Severity, "Logger.min_severity"))

    def log(self, severity: Any, msg: str) -> None:
        """Prints like the real Logger (to stderr) when FAKE_TRT_LOG=1; quiet by default."""
        _check_type(severity, ILogger.Severity, "Logger.log")
        if _env("FAKE_TRT_LOG", "0") in ("1", "true", "yes") and int(severity) <= int(self._fake_min_severity):
            letter = {"INTERNAL_ERROR": "F", "ERROR": "E", "WARNING": "W", "INFO": "I", "VERBOSE": "V"}[severity.name]
            stamp = datetime.datetime.now().strftime("%m/%d/%Y-%H:%M:%S")
            print(f"[{stamp}] [TRT] [{letter}] {msg}", file=sys.stderr)


def _log(logger: Any, severity: str, msg: str) -> None:
    if logger is not None:
        logger.log(getattr(ILogger.Severity, severity), msg)


@_implements("IHostMemory")
class _IHostMemory(bytes):
    """A serialized engine: a buffer (``bytes(mem)``, ``memoryview(mem)``, ``path.write_bytes(mem)``)."""

    @property
    def dtype(self) -> Any:
        return DataType.UINT8

    @property
    def nbytes(self) -> int:
        return bytes.__len__(self)

    # bytes' sequence API is not IHostMemory's: like the real object it is only a buffer
    @_keeps_default
    def __len__(self) -> int:
        raise TypeError("object of type 'IHostMemory' has no len()")

    @_keeps_default
    def __getitem__(self, index: Any) -> Any:
        raise TypeError("'IHostMemory' object is not subscriptable")

    @_keeps_default
    def __iter__(self) -> Any:
        raise TypeError("'IHostMemory' object is not iterable")

    @_keeps_default
    def __contains__(self, item: Any) -> bool:
        raise TypeError("argument of type 'IHostMemory' is not iterable")

    @_keeps_default
    def __add__(self, other: Any) -> Any:
        return NotImplemented

    @_keeps_default
    def __mul__(self, other: Any) -> Any:
        return NotImplemented

    @_keeps_default
    def __rmul__(self, other: Any) -> Any:
        return NotImplemented

    @_keeps_default
    def __mod__(self, other: Any) -> Any:
        return NotImplemented

    @_keeps_default
    def __eq__(self, other: object) -> bool:
        return self is other

    @_keeps_default
    def __ne__(self, other: object) -> bool:
        return self is not other

    @_keeps_default
    def __hash__(self) -> int:
        return id(self) >> 4

    @_keeps_default
    def __repr__(self) -> str:
        return f"<{_MODULE}.IHostMemory object at {id(self):#x}>"

    @_keeps_default
    def __str__(self) -> str:
        return repr(self)


# ---- ONNX: a minimal protobuf reader (the device environment may have no ``onnx`` package) ----------
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 70:
            raise ValueError("bad varint")


def _fields(buf: memoryview) -> Any:
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n or field == 0:
            raise ValueError("truncated protobuf")
        yield field, wire, value


def _str(value: memoryview) -> str:
    return bytes(value).decode("utf-8")


def _value_info(buf: memoryview) -> dict[str, Any]:
    info: dict[str, Any] = {"name": "", "elem_type": 0, "shape": None, "dim_params": None}
    for f, _, v in _fields(buf):
        if f == 1:
            info["name"] = _str(v)
        elif f == 2:  # TypeProto
            for tf, _, tv in _fields(v):
                if tf != 1:  # tensor_type
                    continue
                for ttf, _, ttv in _fields(tv):
                    if ttf == 1:
                        info["elem_type"] = ttv
                    elif ttf == 2:  # TensorShapeProto
                        shape, params = [], []
                        for sf, _, sv in _fields(ttv):
                            if sf != 1:
                                continue
                            dim, param = -1, None
                            for df, _, dv in _fields(sv):
                                if df == 1:
                                    dim = dv if dv < 1 << 63 else dv - (1 << 64)
                                elif df == 2:
                                    param = _str(dv)
                            shape.append(dim if dim >= 0 else -1)
                            params.append(param)
                        info["shape"], info["dim_params"] = shape, params
    return info


def _read_onnx(data: bytes) -> dict[str, Any]:
    """Inputs, outputs and nodes of an ONNX ModelProto (ValueError if it is not one)."""
    buf = memoryview(data)
    graph = None
    ir_version = None
    for f, wire, v in _fields(buf):
        if f == 1 and wire == 0:
            ir_version = v
        elif f == 7 and wire == 2:
            graph = v
    if graph is None or ir_version is None:
        raise ValueError("not an ONNX model (no ir_version or graph)")
    nodes, inputs, outputs, initializers = [], [], [], set()
    for f, wire, v in _fields(graph):
        if f == 1:
            node: dict[str, Any] = {"inputs": [], "outputs": [], "name": "", "op": ""}
            for nf, _, nv in _fields(v):
                if nf == 1:
                    node["inputs"].append(_str(nv))
                elif nf == 2:
                    node["outputs"].append(_str(nv))
                elif nf == 3:
                    node["name"] = _str(nv)
                elif nf == 4:
                    node["op"] = _str(nv)
            nodes.append(node)
        elif f == 5:
            for tf, _, tv in _fields(v):
                if tf == 8:
                    initializers.add(_str(tv))
        elif f == 11:
            inputs.append(_value_info(v))
        elif f == 12:
            outputs.append(_value_info(v))
    inputs = [i for i in inputs if i["name"] not in initializers]
    if not outputs:
        raise ValueError("the ONNX graph has no outputs")
    return {"ir_version": ir_version, "inputs": inputs, "outputs": outputs, "nodes": nodes}


# ONNX TensorProto.DataType -> TensorRT DataType member
_ONNX_DTYPES = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 16: "BF16"}


@_implements("ParserError")
class _ParserError:
    def code(self) -> Any:
        return self._fake_code

    def desc(self) -> str:
        return self._fake_desc

    def file(self) -> str:
        return "ModelImporter.cpp"

    def func(self) -> str:
        return self._fake_func

    def line(self) -> int:
        return 0

    def node(self) -> int:
        return self._fake_node

    def node_name(self) -> str:
        return self._fake_node_name

    def node_operator(self) -> str:
        return self._fake_node_operator

    def local_function_stack(self) -> list[str]:
        return []

    def local_function_stack_size(self) -> int:
        return 0

    def __str__(self) -> str:
        return (f"In node {self._fake_node} with name: {self._fake_node_name} and operator: {self._fake_node_operator} "
                f"({self._fake_func}): {self._fake_code.name}: {self._fake_desc}")

    def __repr__(self) -> str:
        return str(self)


def _parser_error(code: str, desc: str, func: str, node: int = -1, name: str = "", op: str = "") -> Any:
    return ParserError._fake_new(code=getattr(ErrorCode, code), desc=desc, func=func, node=node, node_name=name,
                                 node_operator=op)


@_implements("ITensor")
class _ITensor:
    @property
    def name(self) -> str:
        return self._fake_info["name"]

    @property
    def shape(self) -> Any:
        return _dims(self._fake_info["shape"])

    @property
    def dtype(self) -> Any:
        return getattr(DataType, self._fake_info["dtype"])

    @property
    def is_network_input(self) -> bool:
        return self._fake_io == "INPUT"

    @property
    def is_network_output(self) -> bool:
        return self._fake_io == "OUTPUT"


def _tensor_info(info: dict[str, Any]) -> dict[str, Any]:
    dtype = _ONNX_DTYPES.get(info["elem_type"])
    if dtype is None:
        raise ValueError(f"tensor {info['name']!r} has ONNX element type {info['elem_type']}, which the fake does not map")
    return {"name": info["name"], "dtype": dtype, "shape": info["shape"], "dim_params": info["dim_params"]}


@_implements("INetworkDefinition")
class _INetworkDefinition:
    @property
    def num_inputs(self) -> int:
        return len(self._fake_inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._fake_outputs)

    @property
    def num_layers(self) -> int:
        return len(self._fake_nodes)

    def get_input(self, index: int) -> Any:
        return ITensor._fake_new(info=self._fake_inputs[index], io="INPUT") if 0 <= index < len(self._fake_inputs) else None

    def get_output(self, index: int) -> Any:
        return ITensor._fake_new(info=self._fake_outputs[index], io="OUTPUT") if 0 <= index < len(self._fake_outputs) else None

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    @property
    def flags(self) -> int:
        return self._fake_flags

    @property
    def builder(self) -> Any:
        return self._fake_builder


@_implements("OnnxParser")
class _OnnxParser:
    def __init__(self, network: Any, logger: Any) -> None:
        _check_type(network, INetworkDefinition, "OnnxParser.__init__")
        _check_type(logger, ILogger, "OnnxParser.__init__")
        object.__setattr__(self, "_fake_network", network)
        object.__setattr__(self, "_fake_logger", logger)
        object.__setattr__(self, "_fake_errors", [])

    @property
    def num_errors(self) -> int:
        return len(self._fake_errors)

    def get_error(self, index: int) -> Any:
        return self._fake_errors[index] if 0 <= index < len(self._fake_errors) else None

    def clear_errors(self) -> None:
        self._fake_errors.clear()

    def _fake_fail(self, error: Any) -> bool:
        self._fake_errors.append(error)
        _log(self._fake_logger, "ERROR", str(error))
        return False

    def parse_from_file(self, model: str) -> bool:
        """True for an existing ONNX model (loaded with ``onnx`` when importable, else read as protobuf)."""
        path = Path(model)
        if not path.is_file():
            return self._fake_fail(_parser_error("INVALID_VALUE", f"Failed to open file: {model}", "parseFromFile"))
        try:
            import onnx  # optional: the device environment usually has no onnx
        except ImportError:
            pass
        else:
            try:
                onnx.load(str(path))
            except Exception as e:  # noqa: BLE001 - any load failure is a parse failure
                return self._fake_fail(_parser_error("MODEL_DESERIALIZE_FAILED",
                                                     f"Failed to parse ONNX model from file: {model} ({e})", "parseFromFile"))
        return self._fake_parse(path.read_bytes(), str(path), "parseFromFile")

    def parse(self, model: Any, path: str | None = None) -> bool:
        return self._fake_parse(bytes(memoryview(model)), path, "parse")

    def _fake_parse(self, data: bytes, path: str | None, func: str) -> bool:
        try:
            model = _read_onnx(data)
            inputs = [_tensor_info(i) for i in model["inputs"]]
            outputs = [_tensor_info(o) for o in model["outputs"]]
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            return self._fake_fail(_parser_error("MODEL_DESERIALIZE_FAILED", f"Failed to parse ONNX model: {e}", func))
        if _env("FAKE_TRT_PARSE", "ok") == "fail":
            node = model["nodes"][0] if model["nodes"] else {"name": "", "op": ""}
            return self._fake_fail(_parser_error("UNSUPPORTED_NODE", "simulated parser failure (FAKE_TRT_PARSE=fail)",
                                                 "parseGraph", 0, node["name"], node["op"]))
        override = os.environ.get("FAKE_TRT_OUTPUT_SHAPE")
        for out in outputs:
            if override:
                out["shape"] = [int(d) for d in override.split(",")]
                out["dim_params"] = [None] * len(out["shape"])
            if out["shape"] is None:
                return self._fake_fail(_parser_error("UNSUPPORTED_GRAPH", f"fake tensorrt: ONNX output {out['name']!r} "
                                                     "has no shape (set FAKE_TRT_OUTPUT_SHAPE, e.g. -1,10)", func))
        for inp in inputs:
            if inp["shape"] is None:
                return self._fake_fail(_parser_error("INVALID_GRAPH", f"input {inp['name']!r} has no shape", func))
        net = self._fake_network
        object.__setattr__(net, "_fake_inputs", inputs)
        object.__setattr__(net, "_fake_outputs", outputs)
        object.__setattr__(net, "_fake_nodes", model["nodes"])
        object.__setattr__(net, "_fake_onnx", {"path": path, "sha256": hashlib.sha256(data).hexdigest()})
        return True


@_implements("IOptimizationProfile")
class _IOptimizationProfile:
    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        lo, mid, hi = (_shape(s, "IOptimizationProfile.set_shape") for s in (min, opt, max))
        if not len(lo) == len(mid) == len(hi):
            raise ValueError(f"set_shape({input!r}): min, opt and max have different ranks: {lo}, {mid}, {hi}")
        if not all(0 <= a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise ValueError(f"set_shape({input!r}): need 0 <= min <= opt <= max elementwise, got {lo}, {mid}, {hi}")
        self._fake_shapes[str(input)] = [list(lo), list(mid), list(hi)]

    def get_shape(self, input: str) -> list[Any]:
        return [_dims(s) for s in self._fake_shapes.get(input, [])]

    def __bool__(self) -> bool:
        return True  # set_shape validates eagerly

    def __nonzero__(self) -> bool:
        return True


@_implements("IBuilderConfig")
class _IBuilderConfig:
    def set_flag(self, flag: Any) -> None:
        self._fake_flags.add(_check_type(flag, BuilderFlag, "IBuilderConfig.set_flag").name)

    def clear_flag(self, flag: Any) -> None:
        self._fake_flags.discard(_check_type(flag, BuilderFlag, "IBuilderConfig.clear_flag").name)

    def get_flag(self, flag: Any) -> bool:
        return _check_type(flag, BuilderFlag, "IBuilderConfig.get_flag").name in self._fake_flags

    @property
    def flags(self) -> int:
        return sum(1 << int(getattr(BuilderFlag, n)) for n in self._fake_flags)

    @flags.setter
    def flags(self, value: int) -> None:
        value = _check_int(value, "IBuilderConfig.flags")
        self._fake_flags.clear()
        self._fake_flags.update(n for n, m in BuilderFlag.__members__.items() if value >> int(m) & 1)

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        _check_type(pool, MemoryPoolType, "IBuilderConfig.set_memory_pool_limit")
        size = _check_int(pool_size, "IBuilderConfig.set_memory_pool_limit")
        if size < 0:
            raise OverflowError("can't convert negative int to unsigned")
        self._fake_pools[pool.name] = size

    def get_memory_pool_limit(self, pool: Any) -> int:
        _check_type(pool, MemoryPoolType, "IBuilderConfig.get_memory_pool_limit")
        return self._fake_pools.get(pool.name, 8 << 30 if pool.name == "WORKSPACE" else 0)

    def add_optimization_profile(self, profile: Any) -> int:
        _check_type(profile, IOptimizationProfile, "IBuilderConfig.add_optimization_profile")
        if not profile._fake_shapes:
            _log(self._fake_logger, "ERROR", "IBuilderConfig::addOptimizationProfile: the profile has no shapes")
            return -1
        self._fake_profiles.append({k: [list(s) for s in v] for k, v in profile._fake_shapes.items()})
        return len(self._fake_profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._fake_profiles)

    @property
    def default_device_type(self) -> Any:
        return self._fake_device

    @default_device_type.setter
    def default_device_type(self, value: Any) -> None:
        object.__setattr__(self, "_fake_device", _check_type(value, DeviceType, "IBuilderConfig.default_device_type"))

    @property
    def DLA_core(self) -> int:
        return self._fake_dla_core

    @DLA_core.setter
    def DLA_core(self, value: int) -> None:
        object.__setattr__(self, "_fake_dla_core", _check_int(value, "IBuilderConfig.DLA_core"))

    @property
    def builder_optimization_level(self) -> int:
        return self._fake_opt_level

    @builder_optimization_level.setter
    def builder_optimization_level(self, value: int) -> None:
        object.__setattr__(self, "_fake_opt_level", _check_int(value, "IBuilderConfig.builder_optimization_level"))

    @property
    def profiling_verbosity(self) -> Any:
        return self._fake_verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value: Any) -> None:
        object.__setattr__(self, "_fake_verbosity",
                           _check_type(value, ProfilingVerbosity, "IBuilderConfig.profiling_verbosity"))


def _num_dla_cores() -> int:
    return int(os.environ.get("FAKE_TRT_DLA_CORES", "2"))


@_implements("Builder")
class _Builder:
    def __init__(self, logger: Any) -> None:
        object.__setattr__(self, "_fake_logger", _check_type(logger, ILogger, "Builder.__init__"))

    @property
    def logger(self) -> Any:
        return self._fake_logger

    @property
    def num_DLA_cores(self) -> int:
        return _num_dla_cores()

    @property
    def platform_has_fast_fp16(self) -> bool:
        return True

    @property
    def platform_has_fast_int8(self) -> bool:
        return True

    @property
    def platform_has_tf32(self) -> bool:
        return False

    def create_network(self, flags: int = 0) -> Any:
        flags = _check_int(flags, "Builder.create_network")
        return INetworkDefinition._fake_new(flags=flags, builder=self, inputs=[], outputs=[], nodes=[], onnx=None)

    def create_builder_config(self) -> Any:
        return IBuilderConfig._fake_new(flags=set(), pools={}, profiles=[], device=DeviceType.GPU, dla_core=-1,
                                        opt_level=3, verbosity=ProfilingVerbosity.LAYER_NAMES_ONLY,
                                        logger=self._fake_logger)

    def create_optimization_profile(self) -> Any:
        return IOptimizationProfile._fake_new(shapes={})

    def build_serialized_network(self, network: Any, config: Any) -> Any:
        """The engine: one JSON header line (what was built and how), then a marker line; None on failure."""
        _check_type(network, INetworkDefinition, "Builder.build_serialized_network")
        _check_type(config, IBuilderConfig, "Builder.build_serialized_network")
        problem = _build_problem(network, config)
        if problem:
            _log(self._fake_logger, "ERROR", problem)
            return None
        header = _engine_header(network, config)
        data = (json.dumps(header, separators=(",", ":")) + "\n").encode() + \
            b"FAKE TENSORRT ENGINE: no weights, computes nothing (tests/fake_tensorrt)\n"
        return IHostMemory._fake_new(data)


def _build_problem(network: Any, config: Any) -> str | None:
    if _env("FAKE_TRT_BUILD", "ok") == "fail":
        return "simulated build failure (FAKE_TRT_BUILD=fail)"
    if not network._fake_outputs:
        return "Error Code 4: API Usage Error (Network must have at least one output.)"
    profiles = config._fake_profiles
    for inp in network._fake_inputs:
        dynamic = -1 in inp["shape"]
        if dynamic and not profiles:
            return ("Error Code 4: API Usage Error (Network has dynamic or shape inputs, but no optimization profile "
                    "has been defined.)")
        for index, profile in enumerate(profiles):
            if inp["name"] not in profile:
                if dynamic:
                    return f"Error Code 4: API Usage Error (optimization profile {index} is missing values for input {inp['name']!r})"
                continue
            for shape in profile[inp["name"]]:
                if len(shape) != len(inp["shape"]) or any(d != -1 and s != d for s, d in zip(shape, inp["shape"])):
                    return (f"Error Code 4: API Usage Error (optimization profile {index}: shape {shape} of input "
                            f"{inp['name']!r} does not match the network's {inp['shape']})")
    for index, profile in enumerate(profiles):
        unknown = set(profile) - {i["name"] for i in network._fake_inputs}
        if unknown:
            return f"Error Code 4: API Usage Error (optimization profile {index} names no network input: {sorted(unknown)})"
    if config._fake_device == DeviceType.DLA:
        cores = _num_dla_cores()
        if not 0 <= config._fake_dla_core < cores:
            return f"Error Code 2: Internal Error (DLA core {config._fake_dla_core} requested, device has {cores} DLA core(s))"
        if "GPU_FALLBACK" not in config._fake_flags:
            if not {"FP16", "INT8"} & config._fake_flags:
                return "Error Code 2: Internal Error (DLA supports only FP16 and INT8; set BuilderFlag.FP16/INT8 or GPU_FALLBACK)"
            for profile in profiles:
                for name, (lo, _mid, hi) in profile.items():
                    if lo != hi:
                        return (f"Error Code 2: Internal Error (DLA needs static shapes: profile of {name!r} has "
                                f"min {lo} != max {hi}; set BuilderFlag.GPU_FALLBACK or a static profile)")
    return None


def _engine_header(network: Any, config: Any) -> dict[str, Any]:
    profiles = config._fake_profiles
    first_input = network._fake_inputs[0]["name"] if network._fake_inputs else None
    tensors = []
    for io, items in (("INPUT", network._fake_inputs), ("OUTPUT", network._fake_outputs)):
        for t in items:
            tensors.append({"name": t["name"], "mode": io, "dtype": t["dtype"], "shape": t["shape"],
                            "dim_params": t["dim_params"]})
    return {
        ENGINE_MAGIC: 1,
        "version": _fake_version(),
        "flags": sorted(config._fake_flags),
        "workspace": config._fake_pools.get("WORKSPACE"),
        "memory_pool_limits": dict(sorted(config._fake_pools.items())),
        "default_device_type": config._fake_device.name,
        "DLA_core": config._fake_dla_core,
        "builder_optimization_level": config._fake_opt_level,
        "profiling_verbosity": config._fake_verbosity.name,
        "network_flags": network._fake_flags,
        "profile_shapes": profiles[0].get(first_input) if profiles and first_input else None,
        "profiles": profiles,
        "tensors": tensors,
        "layers": _engine_layers(network._fake_nodes, set(config._fake_flags)),
        "onnx": network._fake_onnx,
    }


_COMPUTE = {"Conv": "CaskConvolution", "ConvTranspose": "CaskDeconvolution", "Gemm": "CaskGemmMatrixMultiply",
            "MatMul": "CaskGemmMatrixMultiply"}
_OTHER = {"MaxPool": "CaskPooling", "AveragePool": "CaskPooling", "GlobalAveragePool": "CaskPooling",
          "GlobalMaxPool": "CaskPooling", "Softmax": "CaskSoftMaxV2", "Reshape": "NoOp", "Flatten": "NoOp",
          "Squeeze": "NoOp", "Unsqueeze": "NoOp", "Transpose": "Shuffle", "Concat": "NoOp"}
_POINTWISE = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Add", "Mul", "Sub", "Div"}
_SKIPPED = {"QuantizeLinear", "DequantizeLinear", "Constant", "Identity", "Shape", "Gather", "Cast"}
_FORMATS = {"int8": "Thirty-two wide channel vectorized row major Int8 format",
            "fp16": "Channel major FP16 format where channel % 8 == 0",
            "fp32": "Row major linear FP32"}
_FORMATS_OTHER = {"int8": "Row major linear Int8 format", "fp16": "Row major linear FP16 format",
                  "fp32": "Row major linear FP32"}


def _engine_layers(nodes: list[dict[str, Any]], flags: set[str]) -> list[dict[str, Any]]:
    """Layers like the engine inspector's: Q/DQ folded away, an activation fused into its convolution;
    compute layers fed by DequantizeLinear run in int8 when INT8 is set, else fp16 with FP16, else fp32."""
    dq_outputs = {o for n in nodes if n["op"] == "DequantizeLinear" for o in n["outputs"]}
    layers: list[dict[str, Any]] = []
    for node in nodes:
        op, name = node["op"], node["name"] or f"{node['op']}_{len(layers)}"
        if op in _SKIPPED:
            continue
        last = layers[-1] if layers else None
        if (op in _POINTWISE and last is not None and last["kind"] == "compute" and len(node["inputs"]) == 1
                and node["inputs"][0] in last["outputs"]):
            last["name"] += f" + {name}"
            last["outputs"] = node["outputs"]
            continue
        if op in _COMPUTE:
            quantized = any(i in dq_outputs for i in node["inputs"])
            precision = "int8" if quantized and "INT8" in flags else "fp16" if "FP16" in flags else "fp32"
            layers.append({"name": name, "type": _COMPUTE[op], "kind": "compute", "precision": precision,
                           "inputs": node["inputs"][:1], "outputs": node["outputs"]})
        else:
            precision = "fp16" if "FP16" in flags else "fp32"
            layers.append({"name": name, "type": _OTHER.get(op, "PointWiseV2" if op in _POINTWISE else op),
                           "kind": "other", "precision": precision, "inputs": node["inputs"][:1],
                           "outputs": node["outputs"]})
    return layers


def _parse_engine(data: bytes) -> dict[str, Any] | None:
    head = data.split(b"\n", 1)[0]
    try:
        header = json.loads(head)
    except ValueError:
        return None
    return header if isinstance(header, dict) and header.get(ENGINE_MAGIC) == 1 else None


@_implements("Runtime")
class _Runtime:
    def __init__(self, logger: Any) -> None:
        object.__setattr__(self, "_fake_logger", _check_type(logger, ILogger, "Runtime.__init__"))

    @property
    def logger(self) -> Any:
        return self._fake_logger

    @property
    def num_DLA_cores(self) -> int:
        return _num_dla_cores()

    def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
        try:
            data = bytes(memoryview(serialized_engine))
        except TypeError:
            raise TypeError("deserialize_cuda_engine(): incompatible function arguments: expected a buffer") from None
        header = _parse_engine(data)
        if header is None:
            _log(self._fake_logger, "ERROR", "1: [runtime.cpp::parsePlan::314] Error Code 1: Serialization "
                                             "(Serialization assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.)")
            return None
        if header["version"] != _fake_version():
            _log(self._fake_logger, "ERROR", "1: [stdArchiveReader.cpp::StdArchiveReaderInitCommon::46] Error Code 1: "
                 f"Serialization (Version tag does not match: engine built with TensorRT {header['version']}, "
                 f"this is {_fake_version()})")
            return None
        return ICudaEngine._fake_new(header=header, data=data, logger=self._fake_logger)


@_implements("ICudaEngine")
class _ICudaEngine:
    def _fake_tensor(self, name: str) -> dict[str, Any] | None:
        return next((t for t in self._fake_header["tensors"] if t["name"] == name), None)

    def _fake_require(self, name: str, what: str) -> dict[str, Any]:
        tensor = self._fake_tensor(name)
        if tensor is None:
            _log(self._fake_logger, "ERROR", f"3: [engine.cpp::{what}] Error Code 3: API Usage Error (no tensor named {name!r})")
            raise ValueError(f"fake tensorrt: {what}({name!r}): the engine has no such tensor "
                             f"(real TensorRT logs an error and returns an invalid value)")
        return tensor

    @property
    def num_io_tensors(self) -> int:
        return len(self._fake_header["tensors"])

    @property
    def num_layers(self) -> int:
        return len(self._fake_header["layers"])

    @property
    def num_optimization_profiles(self) -> int:
        return max(1, len(self._fake_header["profiles"]))

    @property
    def name(self) -> str:
        return "Unnamed Network 0"

    @property
    def profiling_verbosity(self) -> Any:
        return getattr(ProfilingVerbosity, self._fake_header["profiling_verbosity"])

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    def get_tensor_name(self, index: int) -> str | None:
        tensors = self._fake_header["tensors"]
        return tensors[index]["name"] if 0 <= index < len(tensors) else None

    def get_tensor_mode(self, name: str) -> Any:
        tensor = self._fake_tensor(name)
        return getattr(TensorIOMode, tensor["mode"]) if tensor else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> Any:
        return getattr(DataType, self._fake_require(name, "get_tensor_dtype")["dtype"])

    def get_tensor_shape(self, name: str) -> Any:
        return _dims(self._fake_require(name, "get_tensor_shape")["shape"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Any]:
        tensor = self._fake_require(name, "get_tensor_profile_shape")
        profiles = self._fake_header["profiles"]
        if tensor["mode"] != "INPUT" or not 0 <= profile_index < max(1, len(profiles)):
            _log(self._fake_logger, "ERROR", f"get_tensor_profile_shape({name!r}, {profile_index}): not an input of that profile")
            return []
        shapes = profiles[profile_index].get(name) if profiles else None
        return [_dims(s) for s in shapes] if shapes else [_dims(tensor["shape"])] * 3

    def create_execution_context(self, strategy: Any = None) -> Any:
        return IExecutionContext._fake_new(engine=self, shapes={}, addresses={}, runs=0)

    def create_engine_inspector(self) -> Any:
        return EngineInspector._fake_new(engine=self, context=None)

    def serialize(self) -> Any:
        return IHostMemory._fake_new(self._fake_data)


@_implements("IExecutionContext")
class _IExecutionContext:
    @property
    def engine(self) -> Any:
        return self._fake_engine

    @property
    def active_optimization_profile(self) -> int:
        return 0

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = _shape(shape, "IExecutionContext.set_input_shape")
        engine = self._fake_engine
        tensor = engine._fake_tensor(name)
        logger = engine._fake_logger
        if tensor is None or tensor["mode"] != "INPUT":
            _log(logger, "ERROR", f"3: [executionContext.cpp::setInputShape] Error Code 3: API Usage Error "
                                  f"({name!r} is not an input tensor)")
            return False
        lo, _opt, hi = (list(d) for d in engine.get_tensor_profile_shape(name, 0))
        if len(shape) != len(tensor["shape"]) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            _log(logger, "ERROR", f"3: [executionContext.cpp::setInputShape] Error Code 3: API Usage Error (shape "
                                  f"{list(shape)} of {name!r} is outside the optimization profile [{lo}, {hi}])")
            return False
        self._fake_shapes[name] = list(shape)
        return True

    def get_tensor_shape(self, name: str) -> Any:
        engine = self._fake_engine
        tensor = engine._fake_require(name, "IExecutionContext.get_tensor_shape")
        if tensor["mode"] == "INPUT":
            return _dims(self._fake_shapes.get(name, tensor["shape"]))
        known: dict[str, int] = {}  # symbolic dims (dim_param) the inputs' shapes fix
        batch = None
        for t in engine._fake_header["tensors"]:
            if t["mode"] == "INPUT" and t["name"] in self._fake_shapes:
                actual = self._fake_shapes[t["name"]]
                batch = actual[0] if batch is None and actual else batch
                for param, dim in zip(t["dim_params"] or [], actual):
                    if param:
                        known[param] = dim
        out = []
        for i, dim in enumerate(tensor["shape"]):
            param = (tensor["dim_params"] or [None] * len(tensor["shape"]))[i]
            if dim == -1 and param in known:
                dim = known[param]
            elif dim == -1 and i == 0 and batch is not None:
                dim = batch
            out.append(dim)
        return _dims(out)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        memory = _check_int(memory, "IExecutionContext.set_tensor_address")
        if self._fake_engine._fake_tensor(name) is None:
            _log(self._fake_engine._fake_logger, "ERROR", f"3: [executionContext.cpp::setTensorAddress] Error Code 3: "
                                                          f"API Usage Error (no tensor named {name!r})")
            return False
        self._fake_addresses[name] = memory
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._fake_addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        """True when every input shape and every I/O address is set; computes nothing (outputs untouched)."""
        _check_int(stream_handle, "IExecutionContext.execute_async_v3")
        engine = self._fake_engine
        for t in engine._fake_header["tensors"]:
            shape = self._fake_shapes.get(t["name"], t["shape"]) if t["mode"] == "INPUT" else None
            if shape is not None and -1 in shape:
                _log(engine._fake_logger, "ERROR", f"3: [executionContext.cpp::enqueueV3] Error Code 3: API Usage Error "
                                                   f"(input {t['name']!r} has dynamic dimensions: call set_input_shape)")
                return False
            if not self._fake_addresses.get(t["name"]):
                _log(engine._fake_logger, "ERROR", f"3: [executionContext.cpp::enqueueV3] Error Code 3: API Usage Error "
                                                   f"(address of tensor {t['name']!r} is not set)")
                return False
        if _env("FAKE_TRT_EXECUTE", "ok") == "fail":
            _log(engine._fake_logger, "ERROR", "simulated execution failure (FAKE_TRT_EXECUTE=fail)")
            return False
        object.__setattr__(self, "_fake_runs", self._fake_runs + 1)
        return True


@_implements("EngineInspector")
class _EngineInspector:
    @property
    def execution_context(self) -> Any:
        return self._fake_context

    @execution_context.setter
    def execution_context(self, value: Any) -> None:
        object.__setattr__(self, "_fake_context", _check_type(value, IExecutionContext, "EngineInspector.execution_context"))

    def _fake_layer(self, layer: dict[str, Any]) -> Any:
        verbosity = self._fake_engine._fake_header["profiling_verbosity"]
        if verbosity != "DETAILED":
            return layer["name"]
        fmt = (_FORMATS if layer["kind"] == "compute" else _FORMATS_OTHER)[layer["precision"]]
        info = {"Name": layer["name"], "LayerType": layer["type"],
                "Inputs": [{"Name": n, "Location": "Device", "Format/Datatype": fmt} for n in layer["inputs"]],
                "Outputs": [{"Name": n, "Location": "Device", "Format/Datatype": fmt} for n in layer["outputs"]],
                "TacticValue": "0x0000000000000000", "StreamId": 0,
                "Metadata": f"[ONNX Layer: {layer['name'].split(' + ')[0]}]"}
        if layer["type"] == "CaskConvolution":
            info["ParameterType"] = "Convolution"
        return info

    def get_engine_information(self, format: Any) -> str:
        _check_type(format, LayerInformationFormat, "EngineInspector.get_engine_information")
        header = self._fake_engine._fake_header
        layers = [] if header["profiling_verbosity"] == "NONE" else [self._fake_layer(x) for x in header["layers"]]
        if format == LayerInformationFormat.ONELINE:
            return "\n".join(json.dumps(x) if isinstance(x, dict) else x for x in layers) + "\n"
        return json.dumps({"Layers": layers, "Bindings": [t["name"] for t in header["tensors"]]}, indent=1)

    def get_layer_information(self, layer_index: int, format: Any) -> str:
        _check_type(format, LayerInformationFormat, "EngineInspector.get_layer_information")
        layers = self._fake_engine._fake_header["layers"]
        if not 0 <= layer_index < len(layers):
            return ""
        return json.dumps(self._fake_layer(layers[layer_index]))


# -------------------------------------------------------------------------------------- building classes
def _honesty_check(path: str, mixin: type, allowed: frozenset[str]) -> None:
    """Every name a hand-written part defines must exist on the real class: else the fake is lying."""
    for name, value in vars(mixin).items():
        if name in _PLUMBING or name[:5] == "_fake" or getattr(value, "_fake_keeps_default", False):
            continue
        if name not in allowed:
            raise ImportError(f"fake tensorrt implements {path}.{name}, which the real TensorRT {_REAL_VERSION} "
                              f"bindings do not have (see {_NAMES_FILE.name})")


def _build_all() -> dict[str, type]:
    classes, enums = _N["classes"], _N["enums"]
    props, writable, bases_of = _N["properties"], _N["writable"], _N["bases"]
    common = frozenset(_N["enum_common"])
    _honesty_check("<every enum>", _Enum, common)
    built: dict[str, type] = {}

    def allowed_of(path: str) -> frozenset[str]:
        if path in enums:
            return frozenset(enums[path]) | common | frozenset(classes.get(path, ()))
        return frozenset(classes[path])

    def build(path: str) -> type:
        if path in built:
            return built[path]
        allowed = allowed_of(path)
        trt_bases = tuple(build(b) for b in bases_of.get(path, [])[:1])  # the direct base; the rest follow by MRO
        mixins: tuple[type, ...] = ()
        if path in _IMPL:
            _honesty_check(path, _IMPL[path], allowed)
            mixins = (_IMPL[path],)
        if path in enums:
            ordered = {"__lt__", "__le__", "__gt__", "__ge__"} <= allowed
            if ordered:
                _honesty_check(path, _OrderedEnum, allowed)
            mixins += ((_OrderedEnum,) if ordered else ()) + (_Enum,)
        name = path.rsplit(".", 1)[-1]
        ns: dict[str, Any] = {
            "__module__": _MODULE, "__qualname__": path, "_fake_builtin": True, "_fake_path": path,
            "_fake_allowed": allowed, "_fake_writable": frozenset(writable.get(path, ())),
            "__getattribute__": _guard_getattribute, "__setattr__": _guard_setattr, "__dir__": _guard_dir,
            "__doc__": f"Fake of tensorrt.{path} (TensorRT {_REAL_VERSION}); see tests/fake_tensorrt."}
        if "__init__" not in allowed:
            ns["__init__"] = _no_constructor
        cls = _Meta(name, mixins + (trt_bases or (_Object,)), ns)
        built[path] = cls

        def provided(attr: str) -> bool:  # by a hand-written part or a TensorRT base (not by the fake's root)
            return any(attr in k.__dict__ and k.__dict__[attr] is not _no_constructor
                       for k in cls.__mro__ if k not in (_Object, object))

        if path in enums:  # members, and their aliases sharing a value (BuilderFlag.WEIGHTLESS is STRIP_PLAN's)
            members = {}
            by_value: dict[int, str] = {}
            for member, value in zip(enums[path], _N["enum_values"][path]):
                by_value.setdefault(value, member)
            type.__setattr__(cls, "_fake_by_value", by_value)
            # __members__ in declaration order, which is value order (the JSON lists names sorted)
            for member, value in sorted(zip(enums[path], _N["enum_values"][path]), key=lambda mv: mv[1]):
                obj = cls._fake_new()
                object.__setattr__(obj, "_fake_value", value)
                object.__setattr__(obj, "_fake_name", member)
                members[member] = obj
                type.__setattr__(cls, member, obj)
            type.__setattr__(cls, "__members__", members)
        for attr in sorted(allowed):  # nested classes, and the members a nested enum exports (ILogger.WARNING)
            nested = f"{path}.{attr}"
            if (nested in classes or nested in enums) and not provided(attr):
                type.__setattr__(cls, attr, build(nested))
                for member in enums.get(nested, ()):
                    if member in allowed and not provided(member):
                        type.__setattr__(cls, member, getattr(built[nested], member))
        for attr in sorted(allowed):
            if provided(attr) or (path in enums and attr in common):
                continue
            if attr in props.get(path, ()):
                type.__setattr__(cls, attr, _unsimulated_property(path, attr, attr in writable.get(path, ())))
            elif attr[:2] == "__" and attr not in ("__init__", "__getitem__", "__setitem__", "__len__"):
                continue  # __repr__, __eq__, __del__, __enter__ (set by __init__.py)...: Python's defaults do
            else:
                type.__setattr__(cls, attr, _unsimulated(path, attr))
        return cls

    for path in sorted(classes.keys() | enums.keys(), key=lambda p: (p.count("."), p)):
        if "." in path:
            parent = path.rsplit(".", 1)[0]
            build(parent)  # nested classes are built by their parent (an alias path reuses the same class)
            continue
        build(path)
    return {p: c for p, c in built.items() if "." not in p}


def _module_namespace() -> dict[str, Any]:
    ns: dict[str, Any] = dict(_build_all())
    for name, value in _N["module_values"].items():
        if name in _PY_LEVEL:
            continue  # attr/value: loop variables the real __init__.py leaves behind
        enum_path, member = value.rsplit(".", 1)
        ns[name] = getattr(ns[enum_path], member)
    for name in _N["module"]:
        if name not in ns and name not in _PY_LEVEL:
            ns[name] = _unsimulated("tensorrt", name)  # get_plugin_registry, init_libnvinfer_plugins...
    return ns


globals().update(_module_namespace())
__all__ = sorted(n for n in _N["module"] if n not in _PY_LEVEL)  # noqa: PLE0605


def _fake_check_module(namespace: dict[str, Any]) -> None:
    """Called by the package ``__init__``: its public names must be exactly the real package's."""
    have = {n for n in namespace if n[:2] != "__" or n == "__version__"}
    expected = set(_N["module"])
    if have != expected:
        raise ImportError(f"fake tensorrt module names differ from TensorRT {_REAL_VERSION}'s: "
                          f"extra {sorted(have - expected)}, missing {sorted(expected - have)}")
