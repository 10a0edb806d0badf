"""What the ``edgepipe`` command shows while and after it works: the rich progress bars fed by the library's
progress callbacks, a stage's one-line summary and the run's stage table."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgepipe.engine import signals


def summary(m: dict) -> str:
    """A stage's metrics as the one log line after it."""
    if m.get("status") == "skipped":
        return f"skipped ({m.get('skipped_reason')})"
    from edgepipe.tasks.metric import Metric

    acc, metric = m.get("accuracy", {}), Metric.from_record(m.get("metric"))
    lat = m.get("latency", {})
    return (f"{metric.label} {metric.shown(acc.get(metric.name, 0))} [{acc.get('backend')}], "
            f"params {m.get('params', 0):,}, "
            f"MACs {m.get('macs', 0):,}, {m.get('size_bytes', 0) / 1024:.1f} KiB, "
            f"p50 {lat.get('p50_ms', 0):.3f} ms ({lat.get('backend')} {lat.get('dtype')}, batch 1)")


def print_table(run_dir: Path) -> None:
    """The run's stage table on stdout (edgepipe.reporting.report.stage_table_rows)."""
    from rich.console import Console
    from rich.table import Table

    from edgepipe.reporting.report import stage_table_rows

    table = Table(title=f"edgepipe run {run_dir}  (latency measured on this host; estimate = target roofline)")
    rows = stage_table_rows(run_dir)
    metric = rows[0]["metric"] if rows else None
    cols = {"stage": "stage", "status": "status", "precision": "dtype",
            "score": metric.label if metric else "top-1", "delta": "Δ teacher",
            "params": "params", "macs": "MACs", "size_bytes": "size", "p50_ms": "p50 b1 (host)",
            "throughput": "throughput (host)", "estimate_ms": "target estimate"}
    for heading in cols.values():
        table.add_column(heading)
    for row in rows:
        table.add_row(*[_fmt(c, row.get(c), row["metric"], row.get("latency")) for c in cols])
    # Logs and CI are not terminals: rich would wrap the table to 80 columns.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _fmt(col: str, v, metric, latency=None) -> str:
    if v is None:
        return "—"
    if col == "score":
        return metric.shown(v)
    if col == "delta":
        return f"{metric.scale * v:+.2f} pt"
    if col in ("params", "macs"):
        return f"{v:,}"
    if col == "size_bytes":
        return f"{v / 1024:.1f} KiB"
    if col in ("p50_ms", "estimate_ms"):  # significant digits: a tiny model's estimate is microseconds
        return f"{v:.3g} ms" + (" (est.)" if col == "estimate_ms" else "")
    if col == "throughput":
        from edgepipe.reporting.formatting import rate_unit

        return f"{v:,.0f} {rate_unit(latency)}"
    return str(v)


@contextmanager
def progress_bars() -> Iterator:
    """A rich progress bar fed by the library's progress(task, done, total, values) callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[values]}"), TimeElapsedColumn(), transient=True,
                    disable=not sys.stderr.isatty())
    tasks: dict[str, int] = {}

    def update(task: str, done: int, total: int, values: dict[str, float]) -> None:
        signals.check()  # an interruption a library swallowed stops the work at its next step
        vals = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total, values=vals)
        bars.update(tasks[task], completed=done, total=total, values=vals)
        if done >= total:
            bars.remove_task(tasks.pop(task))

    with bars:
        yield update
