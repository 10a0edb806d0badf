"""Reading a YAML file a person wrote (a config or a hardware profile): one clear error for every way it can be wrong.

``yaml.safe_load`` runs no code, but a few files still turn into trouble after it: bytes that are not UTF-8 (a
traceback); an alias inside the collection it names (a recursive Python object: validation accepts it wherever any
value is allowed, e.g. a model's ``kwargs``, and writing the run's ``config.yaml`` then crashes); a chain of aliases
(the "billion laughs": a few hundred bytes that expand to billions of values, and an error message that echoes them
all); nesting deep enough to exhaust Python's recursion limit; a key given twice (YAML keeps the last value without a
word). Each is refused here, before validation, with the file, the line and what to do.

Aliases themselves stay allowed (sharing one ``optim`` block between stages is a fair use); what is limited is what
they do: no recursion, and at most ``MAX_VALUES`` values once every alias is expanded. The largest shipped config
expands to about 200 values, so the limit leaves room for any real file while a ten-level alias chain (nine to a
level: 9^10 values) is refused at once, before a single value of it is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgepipe.errors import EdgepipeError, short_repr

MAX_BYTES = 1 << 20  # a config or profile is a few KB; this also stops at /dev/zero instead of reading forever
MAX_VALUES = 100_000  # values after expanding every alias (see the module docstring)
MAX_DEPTH = 64  # nesting levels; no field of a config or profile nests more than 5 deep

_MERGE = "tag:yaml.org,2002:merge"

class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (merge keys ``<<`` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                    continue
                ident = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if ident in seen:
                    raise _DuplicateKey(f"line {line}: key {short_repr(key_node.value)} is given twice in one mapping "
                                        f"(first on line {seen[ident]}); YAML would silently keep the last value: "
                                        "keep one of them")
                seen[ident] = line
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_graph(root: yaml.Node) -> str | None:
    """What is wrong with the composed document (recursion, expansion, depth), or None. Aliases make the node graph
    a DAG (shared nodes) or a cycle; the walk visits each node once and adds up its expanded size and height."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    open_: set[int] = set()  # nodes whose subtree is being walked: reaching one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 1 + max((height[id(k)] for k in kids), default=0)
            line = node.start_mark.line + 1
            if size[key] > MAX_VALUES:
                return (f"line {line}: its aliases expand to more than {MAX_VALUES:,} values (an alias chain, a "
                        "'billion laughs'); write the values out, or alias fewer levels deep")
            if height[key] > MAX_DEPTH:
                return f"line {line}: nested more than {MAX_DEPTH} levels deep; no config or profile field nests so far"
            continue
        if key in size:
            continue
        if key in open_:
            return (f"line {node.start_mark.line + 1}: an alias refers to a collection that contains it (a recursive "
                    "value, which has no end); write the value out instead of the alias")
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)
    return None


def read_yaml(path: Path, what: str) -> Any:
    """The document in ``path`` (``what``: "config file", "profile file"), or one EdgepipeError naming the file,
    the line where it helps, what is wrong and what to do."""
    path = Path(path)
    if path.is_dir():
        raise EdgepipeError(f"{path}: is a folder, not a {what}; give the path of a YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise EdgepipeError(f"{path}: {what} not found; check the path") from None
    except OSError as e:
        raise EdgepipeError(f"{path}: cannot read the {what} ({e.strerror}); check the path and its permissions"
                            ) from None
    if len(raw) > MAX_BYTES:
        raise EdgepipeError(f"{path}: larger than {MAX_BYTES >> 20} MiB, which no {what} is; check the path")
    if not raw.strip():
        example = {"config file": " (e.g. configs/digits.yaml)", "profile file": " (e.g. hardware_profiles/)"}
        raise EdgepipeError(f"{path}: the {what} is empty (expected a mapping of fields); write its YAML fields"
                            f"{example.get(what, '')}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgepipeError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the "
                            f"{what} as UTF-8") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise EdgepipeError(f"{path}: the {what} holds no YAML value; write its fields")
        problem = _check_graph(node)
        if problem:
            raise EdgepipeError(f"{path}: {problem}")
        return loader.construct_document(node)
    except _DuplicateKey as e:
        raise EdgepipeError(f"{path}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what_wrong = ": ".join(filter(None, (e.context, e.problem)))[:200] or type(e).__name__
        raise EdgepipeError(f"{path}: not valid YAML ({where}{what_wrong}); fix the syntax") from None
    except yaml.YAMLError as e:
        raise EdgepipeError(f"{path}: not valid YAML ({type(e).__name__}: {str(e)[:200]}); fix the syntax") from None
    except RecursionError:
        raise EdgepipeError(f"{path}: nested too deeply for a {what} (more than {MAX_DEPTH} levels); check the file"
                            ) from None
    finally:
        loader.dispose()
