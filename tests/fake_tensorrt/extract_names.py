"""Extract the public Python names of the real TensorRT 10.3 bindings into ``tensorrt_10_3_names.json``.

The strict fake ``tests/fake_tensorrt/tensorrt`` exposes exactly the names this file records, so code
that calls something real TensorRT 10.3 does not have fails with ``AttributeError`` in tests.

Source: NVIDIA's PyPI wheel ``tensorrt-cu12-bindings==10.3.0`` for CPython 3.11, manylinux x86_64
(``tensorrt_cu12_bindings-10.3.0-cp311-none-manylinux_2_17_x86_64.whl``). It holds the pybind11
extension ``tensorrt_bindings/tensorrt.so`` and the package ``__init__.py`` (which adds ``nptype``,
``volume``, ``Logger.Severity``, ``Logger.WARNING``...). Caveat: JetPack 6.1/6.2 install TensorRT 10.3 for
aarch64 as ``tensorrt`` (``python3-libnvinfer``); it is assumed to have the same Python names as this
x86_64 wheel of the same release (same binding sources and ``__init__`` template), which was not checked
against an aarch64 package here.

How: the extension links ``libnvinfer.so.10``, ``libnvonnxparser.so.10`` and ``libnvinfer_plugin.so.10``
(no GPU or CUDA here). Its only undefined symbols from those are nine plain C entry points
(``createInferBuilder_INTERNAL``, ``getPluginRegistry``, ...), which module initialisation does not
call: it only registers the pybind11 classes. So this script builds stub libraries with those SONAMEs
that define those symbols (each stub aborts loudly if ever called), imports the real extension in a
child process with the stubs on ``LD_LIBRARY_PATH`` (``RTLD_LAZY | RTLD_GLOBAL``), and introspects it:
the names are the real ones, read from the live module, not parsed out of the binary.

Run (Linux x86_64 with gcc, binutils ``nm``/``readelf`` and CPython 3.11; a few seconds)::

    .venv/bin/python tests/fake_tensorrt/extract_names.py            # downloads the wheel with pip
    .venv/bin/python tests/fake_tensorrt/extract_names.py --wheel /tmp/trtwheel/tensorrt_cu12_bindings-10.3.0-cp311-none-manylinux_2_17_x86_64.whl

Writes ``tests/fake_tensorrt/tensorrt_10_3_names.json`` (``--out`` to change), sorted names only:

- ``version``: the package's ``__version__``; ``wheel``: file name and sha256 of the wheel read;
- ``module``: top-level names (dunders left out except ``__version__``);
- ``classes``: {dotted class name: attribute, property and method names defined by the class or its
  TensorRT bases}; pybind11's own ``object`` machinery and the C slots it fills for every class are
  left out, but dunders the bindings define are kept (``__init__`` only when the class has a constructor:
  without one, calling the class raises ``TypeError: No constructor defined!``; ``__getitem__``,
  ``__len__``, ``__enter__``...);
- ``enums``: {dotted enum name: member names}; ``enum_values``: the members' integer values, same order
  (aliases share a value: ``BuilderFlag.WEIGHTLESS`` is ``STRIP_PLAN``); ``enum_common``: the attributes
  every pybind11 enum has (``name``, ``value``, ``__int__``...); an enum also appears in ``classes`` only
  when it has more (``DataType.itemsize``, the ordering operators of pybind11 arithmetic enums);
- ``properties``: {class: property names}; ``writable``: {class: property names that can be set};
- ``bases``: {class: TensorRT base classes}; ``module_values``: top-level names bound to enum members or
  strings (``float32`` -> ``DataType.FLOAT``).

Nested classes (``ILogger.Severity``) are keyed by their dotted path; an alias path (``Logger.Severity``
is ``ILogger.Severity``) gets its own key too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENT = "tensorrt-cu12-bindings==10.3.0"
PACKAGE = "tensorrt_bindings"  # the wheel's import name (JetPack installs the same files as ``tensorrt``)
SKIP_DUNDERS = {"__doc__", "__module__", "__dict__", "__weakref__", "__entries", "__qualname__"}


def _download(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", REQUIREMENT, "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "-d", str(dest)], check=True)
    return next(dest.glob("tensorrt_cu12_bindings-10.3*-cp311-*manylinux*x86_64.whl"))


def _tool(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _build_stubs(extension: Path, stub_dir: Path) -> list[str]:
    """Empty libraries with the TensorRT SONAMEs the extension needs, defining its undefined TensorRT symbols."""
    needed = [line.split("[", 1)[1].rstrip("]") for line in _tool("readelf", "-d", str(extension)).splitlines()
              if "(NEEDED)" in line]
    trt_libs = [lib for lib in needed if lib.startswith("libnv")]
    symbols = []
    for line in _tool("nm", "-D", "--undefined-only", str(extension)).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "U" and "@" not in parts[1] and not parts[1].startswith(("Py", "_Py")):
            symbols.append(parts[1])  # unversioned and not CPython's: the TensorRT libraries' entry points
    source = stub_dir / "stub.c"
    source.write_text("#include <stdio.h>\n#include <stdlib.h>\n" + "".join(
        f'void *{s}(void) {{ fprintf(stderr, "stub TensorRT library: {s} called\\n"); abort(); }}\n' for s in symbols))
    for lib in trt_libs:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(stub_dir / lib), f"-Wl,-soname,{lib}", str(source)],
                       check=True)
    return symbols


def _class_names(cls: type, base_types: tuple[type, ...]) -> list[str]:
    names = set()
    for klass in cls.__mro__:
        if klass in base_types:
            continue
        for name, value in vars(klass).items():
            if name in SKIP_DUNDERS or name.startswith("__pybind11_module_local"):
                continue
            if type(value).__name__ == "wrapper_descriptor":
                continue  # a C slot pybind11 fills for every class (``__init__`` raising "No constructor defined!")
            names.add(name)
    return sorted(names)


def introspect() -> dict:
    """Run in the child process: import the real bindings and describe them (names only)."""
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
    trt = __import__(PACKAGE)
    pybind_object = trt.Builder.__mro__[-2]  # pybind11_builtins.pybind11_object
    base_types = (object, pybind_object)

    def is_enum(obj: object) -> bool:
        return isinstance(obj, type) and isinstance(getattr(obj, "__members__", None), dict)

    out: dict = {"version": trt.__version__, "module": [], "classes": {}, "enums": {}, "enum_values": {},
                 "enum_common": [], "properties": {}, "writable": {}, "bases": {}, "module_values": {}}
    paths: dict[int, str] = {}

    def enum_member_path(value: object) -> str | None:
        for path, members in out["enums"].items():
            if paths.get(id(type(value))) == path and getattr(value, "name", None) in members:
                return f"{path}.{value.name}"
        return None

    def walk(prefix: str, cls: type) -> None:
        paths.setdefault(id(cls), prefix)
        members = dict(cls.__members__) if is_enum(cls) else {}
        names = [n for n in _class_names(cls, base_types) if n not in members]
        out["classes"][prefix] = names
        if members:
            order = sorted(members)
            out["enums"][prefix] = order
            out["enum_values"][prefix] = [int(members[m]) for m in order]
        props = sorted(n for n in names if isinstance(getattr(cls, n, None), property))
        if props:
            out["properties"][prefix] = props
            writable = [n for n in props if getattr(cls, n).fset is not None]
            if writable:
                out["writable"][prefix] = writable
        bases = [paths.get(id(b), b.__name__) for b in cls.__mro__[1:] if b not in base_types]
        if bases:
            out["bases"][prefix] = bases
        for name in names:
            value = getattr(cls, name, None)
            if isinstance(value, type) and name != "__class__":
                walk(f"{prefix}.{name}", value)

    module_names = sorted(n for n in dir(trt) if not n.startswith("__") or n == "__version__")
    out["module"] = module_names
    # classes first in dependency order (bases before subclasses), then nested ones during the walk
    classes = sorted((n for n in module_names if isinstance(getattr(trt, n), type)),
                     key=lambda n: (len(getattr(trt, n).__mro__), n))
    for name in classes:
        walk(name, getattr(trt, name))
    for name in module_names:
        value = getattr(trt, name)
        if isinstance(value, str) and name != "__version__":
            out["module_values"][name] = value
        elif not isinstance(value, type) and type(value).__module__.startswith(PACKAGE):
            path = enum_member_path(value)
            if path:
                out["module_values"][name] = path
    # the pybind11 enum machinery (``name``, ``value``, ``__int__``, ``__eq__``...) once, not per enum
    common = sorted(set.intersection(*(set(out["classes"][e]) for e in out["enums"])))
    out["enum_common"] = common
    for enum_name in out["enums"]:
        extra = [n for n in out["classes"].pop(enum_name) if n not in common]
        if extra:
            out["classes"][enum_name] = extra
        for key in ("properties", "writable"):
            if enum_name in out[key]:
                out[key][enum_name] = [n for n in out[key][enum_name] if n not in common]
                if not out[key][enum_name]:
                    del out[key][enum_name]
    out["classes"] = dict(sorted(out["classes"].items()))
    for key in ("enums", "enum_values", "properties", "writable", "bases"):
        out[key] = {k: out[key][k] for k in sorted(out[key])}
    return out


def dump(data: dict) -> str:
    """Small, diff-friendly JSON: one line per class or enum."""
    lines = ["{"]
    items = list(data.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{json.dumps(key)}: {{\n{inner}\n}}{comma}")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}{comma}")
    return "\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="the tensorrt-cu12-bindings 10.3 cp311 x86_64 wheel (else pip download)")
    parser.add_argument("--out", type=Path, default=HERE / "tensorrt_10_3_names.json")
    parser.add_argument("--introspect", action="store_true", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args(argv)
    if args.introspect:
        json.dump(introspect(), sys.stdout)
        return 0
    if sys.version_info[:2] != (3, 11):
        parser.error("the wheel's extension is for CPython 3.11: run this with a 3.11 interpreter")
    with tempfile.TemporaryDirectory(prefix="trt-names-") as tmp:
        tmp_dir = Path(tmp)
        wheel = args.wheel or _download(tmp_dir)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        unpacked, stubs = tmp_dir / "wheel", tmp_dir / "stubs"
        stubs.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
        extension = unpacked / PACKAGE / "tensorrt.so"
        symbols = _build_stubs(extension, stubs)
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(stubs), os.environ.get("LD_LIBRARY_PATH")])),
                   PYTHONPATH=str(unpacked), PYTHONDONTWRITEBYTECODE="1")
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--introspect"], env=env, cwd=tmp,
                               check=True, capture_output=True, text=True)
        data = json.loads(child.stdout)
    if not data["version"].startswith("10.3"):
        raise SystemExit(f"{wheel.name} is TensorRT {data['version']}, not 10.3")
    data = {"version": data.pop("version"),
            "wheel": {"file": wheel.name, "sha256": digest, "requirement": REQUIREMENT,
                      "method": "real extension imported against stub libnvinfer/libnvonnxparser/libnvinfer_plugin "
                                f"(stubbed symbols: {', '.join(symbols)}); names read by introspection"},
            **data}
    args.out.write_text(dump(data))
    counts = {k: len(v) for k, v in data.items() if isinstance(v, (list, dict)) and k != "wheel"}
    print(f"{args.out}: TensorRT {data['version']} from {wheel.name} (sha256 {digest}); {counts}; "
          f"{sum(map(len, data['classes'].values()))} class attributes, {sum(map(len, data['enums'].values()))} enum members")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
