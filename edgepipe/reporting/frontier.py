"""The recipes tried for a benchmark bar, side by side: each run's accuracy at every stage it reached, against the
throughput of its student's shape relative to the teacher (``make bench-frontier``).

A recipe's accuracy comes from its own run folder (test split, each stage's own runtime as the report records it);
its speed from the shape probe (``edgepipe.measure.shapes``: the shape's INT8 graph against the teacher's FP32 and
INT8 graphs, paired in alternating rounds on the same host), matched by the shape the run ended with (depth and the
stage widths after pruning). Timings of two runs' final models taken minutes apart moved by up to ±30% on the shared
2-core host, so the paired shape ratio is the comparison; a run whose shape the probe did not time says so. Nothing
here is typed in: every cell is read from a run folder or from the probe's JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from edgepipe.reporting import formatting as fmt

SECTION = "frontier"
STAGES = ("distill", "prune", "qat", "compile")


def _metrics(run: Path, stage: str) -> dict[str, Any] | None:
    path = run / stage / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    return m if m.get("status", "done") == "done" and m.get("accuracy") else None


def run_shape(run: Path) -> tuple[int, tuple[int, ...]]:
    """(depth, stage widths) of the model a run ended with: the pruned channels where its prune stage ran."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    kw = config["distill"]["student"].get("kwargs", {})
    width = kw.get("width", 16)
    widths = list(kw.get("widths") or (width, 2 * width, 4 * width))
    pruned = _metrics(run, "prune")
    if pruned:
        channels = pruned.get("records", {}).get("channels", {})
        for i in range(3):
            if f"layer{i + 1}.0.conv1" in channels:
                widths[i] = channels[f"layer{i + 1}.0.conv1"][1]
    return int(kw.get("depth", 20)), tuple(widths)


def row(run: Path, shapes: dict[str, Any], teacher_top1: float) -> dict[str, Any]:
    config = yaml.safe_load((run / "config.yaml").read_text())
    depth, widths = run_shape(run)
    key = f"{depth}:{','.join(map(str, widths))}"
    probe = next((r for r in shapes["rows"] if r["shape"] == key), None)
    acc = {s: (m["accuracy"]["top1"] if (m := _metrics(run, s)) else None) for s in STAGES}
    ran = {s: json.loads((run / s / "metrics.json").read_text()).get("status", "done")
           if (run / s / "metrics.json").exists() else None for s in STAGES}
    last = next((s for s in reversed(STAGES) if acc[s] is not None), None)
    return {"run": str(run), "shape": key, "distill_epochs": config["distill"]["optim"]["epochs"],
            "prune_epochs": config.get("prune", {}).get("optim", {}).get("epochs") if acc["prune"] is not None else None,
            "top1": acc, "ran": ran, "last_stage": last,
            "gap_pts": None if last is None else 100 * (acc[last] - teacher_top1),
            "x_teacher_fp32": probe and probe["x_teacher_fp32"], "x_teacher_int8": probe and probe["x_teacher_int8"],
            "paired": _paired(run)}


def _paired(run: Path) -> dict[str, float] | None:
    """The run's own benchmark (``edgepipe compare --out RUN/benchmark``): its final model against the teacher rows,
    paired at batch 64, where it has one."""
    doc = run / "benchmark" / "BENCHMARKS.json"
    if not doc.exists():
        return None
    paired = json.loads(doc.read_text()).get("paired") or {}
    return {row: p["by_batch"]["64"]["ratio"] for row, p in paired.items() if "64" in p.get("by_batch", {})} or None


def section(runs: list[Path], shapes: dict[str, Any], teacher_top1: float, bars: dict[str, float],
            command: str) -> tuple[str, list[dict[str, Any]]]:
    rows = [row(r, shapes, teacher_top1) for r in runs]
    head = ["run", "shape (depth: widths)", "epochs (distill + prune)", "distilled", "pruned", "QAT (PyTorch)",
            "final INT8 (OpenVINO)", "last - teacher", "x teacher-fp32", "x teacher-int8",
            "final, paired in its benchmark: x fp32 / x int8"]
    body = []
    for r in rows:
        a = r["top1"]
        body.append([f"`{r['run']}`", r["shape"], f"{r['distill_epochs']} + {r['prune_epochs'] or 0}",
                     *(fmt.pct(a[s]) if a[s] is not None else "skipped" if r["ran"][s] == "skipped"
                       else "not measured" if r["ran"][s] else "not run" for s in STAGES),
                     f"{r['gap_pts']:+.2f} pts ({r['last_stage']})" if r["gap_pts"] is not None else fmt.DASH,
                     f"{r['x_teacher_fp32']:.2f}x" if r["x_teacher_fp32"] else "shape not probed",
                     f"{r['x_teacher_int8']:.2f}x" if r["x_teacher_int8"] else "shape not probed",
                     f"{r['paired'].get('teacher-fp32', 0):.2f}x / {r['paired'].get('teacher-int8', 0):.2f}x"
                     if r["paired"] else "no benchmark run"])
    lines = ["## Recipes tried for the stretch bar (accuracy against throughput)", "",
             f"Command: `{command}`. Host of every figure: {shapes['host']}, ISA flags {', '.join(shapes['isa'])}.", "",
             (f"Bars: final INT8 top-1 within {bars['gap_pts']:.1f} point of teacher-fp32 ({fmt.pct(teacher_top1)}); "
             f"throughput at least {bars['x_fp32']:.0f}x teacher-fp32 and (an existing bar of the benchmark) "
             f"{bars['x_int8']:.1f}x teacher-int8. Accuracy: each run's stages on the 10,000 test images. Speed: the "
             f"shape the run ended with, from the student-shapes section ({shapes['date']}; NNCF INT8 graph of the "
             f"shape against the teacher's FP32 and INT8 graphs, batch {shapes['batch']}, {shapes['rounds']} "
             "alternating rounds, median of per-round ratios). A run stopped before its last stages shows how far "
             "it got."), "",
             fmt.md_table(head, body, ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r"]), "",
             ("The probe ranks shapes before any training; a bar is decided by the last column where a run has it (its "
             "QAT graph through ONNX QDQ against the teacher rows as `edgepipe compare` builds them, NNCF calibrated on "
             "training images), which ran below the probe's figures on this host."), ""]
    def speed(r: dict[str, Any], row: str, key: str) -> float:
        return (r["paired"] or {}).get(row) or r[key] or 0.0

    met = [r for r in rows if r["gap_pts"] is not None and r["last_stage"] == "compile"
           and r["gap_pts"] >= -bars["gap_pts"] and speed(r, "teacher-fp32", "x_teacher_fp32") >= bars["x_fp32"]
           and speed(r, "teacher-int8", "x_teacher_int8") >= bars["x_int8"]]
    lines.append("Every bar met by: " + (", ".join(f"`{r['run']}`" for r in met) if met else
                                         "none of the recipes tried") + ".")
    return "\n".join(lines) + "\n", rows


def plot(rows: list[dict[str, Any]], bars: dict[str, float]) -> bytes:
    fig = fmt.new_figure(7.0, 4.2)
    ax = fig.subplots()
    for r in rows:
        if r["gap_pts"] is None or not r["x_teacher_fp32"]:
            continue
        ax.scatter(r["x_teacher_fp32"], r["gap_pts"], s=40)
        ax.annotate(f"{r['shape']} {r['distill_epochs']}+{r['prune_epochs'] or 0} ep ({r['last_stage']})",
                    (r["x_teacher_fp32"], r["gap_pts"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(-bars["gap_pts"], color="grey", ls="--", lw=1)
    ax.axvline(bars["x_fp32"], color="grey", ls="--", lw=1)
    ax.set_xlabel("INT8 throughput of the shape, x teacher-fp32 (paired, batch 64)")
    ax.set_ylabel("top-1 - teacher-fp32 (points, test)")
    ax.set_title("Recipes tried: accuracy against throughput (dashed: the bars)")
    return fmt.png_bytes(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m edgepipe.reporting.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, action="append", required=True, help="a run folder of a recipe tried")
    p.add_argument("--shapes", type=Path, required=True, help="the shape probe's JSON (make bench-shapes)")
    p.add_argument("--teacher-metrics", type=Path, required=True,
                   help="the teacher stage's metrics.json (RUN/teacher/metrics.json): its test top-1")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--gap", type=float, default=1.0)
    p.add_argument("--x-fp32", type=float, default=12.0)
    p.add_argument("--x-int8", type=float, default=2.5)
    args = p.parse_args(argv)
    for path in (args.shapes, args.teacher_metrics, *(r / "config.yaml" for r in args.run)):
        if not path.exists():
            print(f"error: {path}: not found; run the recipe (or make bench-shapes) first")
            return 2
    shapes = json.loads(args.shapes.read_text())
    teacher = json.loads(args.teacher_metrics.read_text())["accuracy"]["top1"]
    bars = {"gap_pts": args.gap, "x_fp32": args.x_fp32, "x_int8": args.x_int8}
    command = "python -m edgepipe.reporting.frontier " + " ".join(f"--run {r}" for r in args.run) + \
        f" --shapes {args.shapes} --teacher-metrics {args.teacher_metrics}"
    text, rows = section(args.run, shapes, teacher, bars, command)
    png = args.out.with_name(f"{args.out.stem}-frontier.png")
    from edgepipe.io import atomic_write

    image = plot(rows, bars)
    atomic_write(png, lambda tmp: tmp.write_bytes(image))
    text += f"\n![recipes tried: accuracy against throughput]({png.name})\n"
    fmt.replace_section(args.out, SECTION, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
