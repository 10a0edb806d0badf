"""The one error type the CLI turns into a single clear line and a non-zero exit."""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class EdgepipeError(Exception):
    """User-facing error: the message names the file or field, what is wrong and what to do."""


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4
_short.maxlevel = 2

MAX_SHOWN_ERRORS = 6  # one line: the first few problems, then how many more


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters without building the whole text (a value may be huge)."""
    return _short.repr(value)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_validation_error(source: Path | str, error: ValidationError) -> str:
    """Turn pydantic's report into one line: ``file: field.path: message (got VALUE)``. Every part is cut short
    (pydantic echoes the input value, which may be a megabyte string or a list of millions), so the line stays
    readable whatever the file holds."""
    parts = []
    items = error.errors(include_url=False)
    for item in items[:MAX_SHOWN_ERRORS]:
        loc = ".".join(_cut(str(x), 60) for x in item["loc"])
        msg = _cut(item["msg"].removeprefix("Value error, "), 300)
        if item["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check the spelling"
        got = item.get("input")
        shown = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else \
            f" (got {short_repr(got)})"
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    if len(items) > MAX_SHOWN_ERRORS:
        parts.append(f"and {len(items) - MAX_SHOWN_ERRORS} more problem(s) in this file")
    return f"{source}: " + "; ".join(parts)
