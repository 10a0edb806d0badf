"""The one error type the CLI turns into a single clear line and a non-zero exit."""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError


class EdgepipeError(Exception):
    """User-facing error: the message names the file or field, what is wrong and what to do."""


def format_validation_error(source: Path | str, error: ValidationError) -> str:
    """Turn pydantic's report into one line: ``file: field.path: message (got VALUE)``."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(x) for x in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check the spelling"
        got = item.get("input")
        shown = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return f"{source}: " + "; ".join(parts)
