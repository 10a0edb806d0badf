"""How figures look in what edgepipe writes for people: the one place for report, bench and compare.

Owns the number formatters (percentages, parameter/MAC counts, byte sizes, milliseconds, images/s,
seconds, thread counts, all showing a missing figure as ``DASH``), Markdown cells and tables (escaping
included), matplotlib figures (Agg canvas, never pyplot's global backend) and their PNG bytes, and the
atomic writing of a document's files (JSON, Markdown/HTML text, PNG) through :mod:`edgepipe.io`.
What a document says (its columns, notes and plots) stays with the module that writes it.
"""
from __future__ import annotations

import html
import io
import re
from pathlib import Path
from typing import Any

from edgepipe.io import atomic_write, atomic_write_json, atomic_write_text

DASH = "—"
"""Shown wherever a figure was not recorded; never a zero."""


# --- numbers ----------------------------------------------------------------------------------------
def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage: 0.1234 -> "12.34%"."""
    return DASH if x is None else f"{100 * x:.{digits}f}%"


def count(x: float | None) -> str:
    """Parameters or MACs: "1.23 G", "40.50 M", "270.00 K", "512"."""
    if x is None:
        return DASH
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def size(b: float | None) -> str:
    """Bytes: "1.23 MiB", "12.3 KiB", "512 B"."""
    if b is None:
        return DASH
    if b >= 2 ** 20:
        return f"{b / 2 ** 20:.2f} MiB"
    return f"{b / 1024:.1f} KiB" if b >= 1024 else f"{b:.0f} B"


def ms(x: float | None) -> str:
    """Milliseconds, without the unit; three decimals below 10 ms, fewer above."""
    if x is None:
        return DASH
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def ips(x: float | None) -> str:
    """Images per second, without the unit: "1,234" from 100 up, "12.3" below."""
    return DASH if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def seconds(x: float | None) -> str:
    """A duration: "12.5 s" below two minutes, else "3.2 min"."""
    return DASH if x is None else f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def threads(n: Any) -> str:
    """"1 thread", "4 threads", or "default threads" when none was set."""
    return "default threads" if n is None else f"{n} thread{'' if n == 1 else 's'}"


# --- Markdown ---------------------------------------------------------------------------------------
def md_cell(x: Any, fmt: str = "{}", markup: bool = False) -> str:
    """``x`` formatted with ``fmt`` for one Markdown line or table cell: None or "" -> DASH; "|" escaped and
    newlines folded so it cannot break the table; HTML escaped so user text cannot inject markup, unless
    ``markup`` (text edgepipe wrote itself, e.g. "**MISS**" or "a -> b", kept readable in the raw file)."""
    if x is None or (isinstance(x, str) and x == ""):
        return DASH
    text = fmt.format(x) if markup else html.escape(fmt.format(x), quote=False)
    return text.replace("|", "\\|").replace("\n", " ")


def rate_unit(latency: dict | None) -> str:
    """What a throughput counts, from the inputs its latency record names: sentences for token ids, else images."""
    inputs = (latency or {}).get("inputs") or {}
    return "sent/s" if "input_ids" in inputs else "img/s"


def md_table(head: list[str], rows: list[list[Any]], align: list[str] | None = None, markup: bool = False) -> str:
    """A Markdown table (no trailing newline); every cell goes through :func:`md_cell` (with ``markup``).

    ``align`` has one entry per column, "l" (``|---|``) or "r" (``|---:|``); default all left.
    """
    rule = "".join("---:|" if a == "r" else "---|" for a in (align or ["l"] * len(head)))
    lines = ["| " + " | ".join(md_cell(h, markup=markup) for h in head) + " |", "|" + rule]
    lines += ["| " + " | ".join(md_cell(c, markup=markup) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------------
def new_figure(width: float = 7.0, height: float = 4.2) -> Any:
    """A matplotlib Figure (constrained layout) on its own Agg canvas, without touching pyplot's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def rectangle(corner: tuple[float, float], width: float, height: float, color: str) -> Any:
    """An unfilled box outline to add to an axes (a detection or a ground-truth box)."""
    from matplotlib.patches import Rectangle

    return Rectangle(corner, width, height, fill=False, edgecolor=color, linewidth=1.0)


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """``fig`` rendered as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# --- writing ----------------------------------------------------------------------------------------
def write_document(out_dir: Path, files: dict[str, str | bytes | dict[str, Any] | list[Any] | None]) -> dict[str, Path]:
    """Write each ``{file name: content}`` into ``out_dir`` atomically, in order: a dict or list as JSON,
    str as text, bytes as is; None removes the file (so a stale one cannot contradict the document).

    Returns:
        File name -> path, for every file written or removed.
    """
    out_dir = Path(out_dir)
    paths = {}
    for name, content in files.items():
        path = out_dir / name
        if content is None:
            path.unlink(missing_ok=True)
        elif isinstance(content, bytes):
            atomic_write(path, lambda p, data=content: p.write_bytes(data))
        elif isinstance(content, str):
            atomic_write_text(path, content)
        else:
            atomic_write_json(path, content)
        paths[name] = path
    return paths


_SECTION = re.compile(r"<!-- begin: (?P<name>[\w.-]+) -->\n.*?<!-- end: (?P=name) -->\n", re.S)


def kept_sections(text: str) -> str:
    """The ``<!-- begin: NAME -->`` ... ``<!-- end: NAME -->`` blocks of a document, which other commands own:
    a rewrite of the document by its main command keeps them (appended at its end)."""
    return "".join(m.group(0) for m in _SECTION.finditer(text))


def replace_section(path: Path, name: str, body: str) -> Path:
    """Put ``body`` into ``path`` as the section ``name`` (replacing that section, or appending it), atomically."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = f"<!-- begin: {name} -->\n{body.rstrip()}\n<!-- end: {name} -->\n"
    pattern = re.compile(rf"<!-- begin: {re.escape(name)} -->\n.*?<!-- end: {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _m: block, text, count=1) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    return atomic_write_text(path, text)
