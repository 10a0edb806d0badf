"""`edgepipe compare` for a detection config (issue 27, `make bench-detection`): the pipeline's detector against the
teacher and the one-line alternatives, every row measured in the same run, written as the "detection" section of
BENCHMARKS.md (other sections are kept) with BENCHMARKS-detection.json and BENCHMARKS-detection.png.

Rows (each a run the engine derives, caches and resumes, edgepipe.engine.baselines): ``teacher-fp32`` (and
``teacher-bf16`` where the target lists bf16), ``teacher-int8`` (NNCF post-training INT8 of the teacher; a two-stage
teacher's one-image graph, run once per image: edgepipe.backends.openvino.post_training_quantize),
``scratch-same-init`` (the distilled student's initialisation, labels only, same epochs), ``distilled``, ``pruned``,
``ptq`` (the pruned student fine-tuned as long as QAT, then NNCF INT8) and ``final`` (the pipeline's compiled INT8
model). Every row: mAP@.5 and mAP@[.5:.95] on the whole validation split by the compiled model (pycocotools),
latency at batch 1 and throughput end to end (decoding and NMS in the graph) in OpenVINO on this host.

The KD gain is a claim about training, so it is stated over seeds: the distill stage with and without the teacher
(alpha = beta = 0, same initialisation) at ``seeds`` seeds, scored in PyTorch on the same split; the speed-up is the
final model against the teacher timed back to back in alternating rounds (edgepipe.measure.figures.paired_speedup).
The teacher's training time is reported apart from the benchmark's compute (a user usually arrives with a teacher).
"""
from __future__ import annotations

import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepipe.config import PipelineConfig
from edgepipe.engine.baselines import Baseline, own_seconds, prune_wording
from edgepipe.engine.pipeline import Progress
from edgepipe.errors import EdgepipeError
from edgepipe.host import host_cpu, host_has_native_bf16, host_isa, library_versions
from edgepipe.reporting import formatting as fmt
from edgepipe.reporting.compare import (earlier_invocation_seconds, paired, pipeline_and_rows, preconditions,
                                        row_of, where_rows_are)
from edgepipe.reporting.seeds import seed_rows
from edgepipe.reporting.seeds import section as seeds_section
from edgepipe.tasks.detection import MAP50

SECTION = "detection"
ROWS = ("teacher-fp32", "teacher-bf16", "teacher-int8", "scratch-same-init", "distilled", "pruned", "ptq")
FINAL_METHOD = "pipeline: distill -> {prune_arrow}QAT INT8 (core) -> ONNX with NMS -> OpenVINO (compile stage IR)"

# The acceptance bars of issue 27, each from measured rows: (claim, required minimum).
KD_GAIN_MIN, FINAL_VS_DISTILLED_MIN, SPEEDUP_MIN = 0.020, -0.015, 5.0


def compare_detection(config: PipelineConfig, run_dir: Path, target: str, device_target: str | None, out_dir: Path,
                      command: str, progress: Progress | None = None, seeds: int = 2) -> dict[str, Any]:
    """Run the pipeline, the rows and the seeds; write the detection section of BENCHMARKS.md into ``out_dir``."""
    started = time.perf_counter()
    progress = progress or (lambda *a: None)
    preconditions(config, target, device_target)
    if device_target:
        raise EdgepipeError(f"--device {device_target}: compare measures a detector's rows on this host only; build the "
                            f"device's bundle with `edgepipe run --target {device_target}`")
    if seeds < 2:
        raise EdgepipeError(f"--seeds {seeds}: the KD gain of a detector is stated over at least 2 seeds")
    run, runs, built, extra = pipeline_and_rows(config, run_dir, target, ROWS, seeds, progress)
    rows = [row_of(runs[b.row], b.row, _method(b, config)) for b in built]
    rows.append(row_of(run, "final", FINAL_METHOD.format(**prune_wording(config)), stage="compile",
                       seconds=run.entry("compile").get("measure_time_s")))
    run_of, stage_of = where_rows_are(run, runs, built)
    all_runs = [run, *(runs[b.row] for b in [*built, *extra])]
    teacher = run.entry("teacher")
    earlier = earlier_invocation_seconds(all_runs)
    m, first = config.measure, rows[-1]
    result: dict[str, Any] = {
        "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": config.name,
        "run": str(run.root), "target": run.profile.name, "versions": library_versions(),
        "host": {"cpu": host_cpu(), "isa_flags": [f for f in host_isa() if f.startswith(("avx", "amx"))],
                 "native_bf16": host_has_native_bf16(), "os": platform.platform(), "python": platform.python_version()},
        "conditions": {"threads": first["threads"], "warmup": m.warmup, "iterations": m.iterations,
                       "throughput_batch": first["throughput_batch"],
                       "images": first["scores"].get("images"), "boxes": first["scores"].get("boxes"),
                       "evaluator": (run.metrics_of("compile").get("accuracy") or {}).get("evaluator")},
        "recipe": _recipe(config), "rows": rows, "seeds": seed_rows(config, runs, seeds, "map50"),
        "teacher_training": {"epochs": config.teacher.train.epochs, "seconds": teacher.get("wall_time_s"),
                             "map50": (run.metrics_of("teacher").get("accuracy") or {}).get("map50")},
        "compute_seconds": sum(own_seconds(r) for r in all_runs) + earlier - (teacher.get("wall_time_s") or 0.0),
        "this_invocation_seconds": time.perf_counter() - started,
    }
    result["paired"] = paired(run_of, stage_of, run, m, progress, batches=(1, first["throughput_batch"]))
    result["checks"] = checks(result)
    write(out_dir, result)
    return result


def _method(b: Baseline, config: PipelineConfig) -> str:
    epochs = f"{config.distill.optim.epochs} epochs"
    return {"scratch-same-init": f"same student and initialisation as distilled, labels only (torchvision's SSD loss), "
                                 f"{epochs}, same optimizer, OpenVINO fp32",
            "teacher-int8": "teacher, NNCF nncf.quantize (OpenVINO INT8)",
            "ptq": f"{prune_wording(config)['pruned_student']} fine-tuned {config.qat.optim.epochs} epochs as QAT is "
                   "(float, with KD), then NNCF "
                   "INT8 (instead of QAT), OpenVINO"}.get(b.row, b.method.format(student=config.distill.student.arch,
                                                                              epochs=epochs, init=config.distill.init,
                                                                              ptq="NNCF", qat_epochs="",
                                                                              **prune_wording(config)))


def _recipe(config: PipelineConfig) -> dict[str, Any]:
    d, p, q = config.distill, config.prune, config.qat
    return {"teacher": config.teacher.model.model_dump(exclude_none=True, exclude_defaults=True),
            "teacher_train": f"{config.teacher.train.epochs} epochs, peak lr {config.teacher.train.lr}",
            "student": d.student.model_dump(exclude_none=True, exclude_defaults=True),
            "distill": f"T={d.temperature}, alpha={d.alpha} (prediction distillation), beta={d.beta} (PKD), "
                       f"{d.optim.epochs} epochs, peak lr {d.optim.lr}, batch {config.data.batch_size}",
            "prune": f"Torch-Pruning {p.importance.value} importance to <= {p.ratio:.0%} of the core's {p.target}, "
                     f"{p.optim.epochs} KD fine-tuning epochs",
            "qat": f"{q.calibration} calibration on {q.calibration_batches} batches, {q.optim.epochs} epochs at lr "
                   f"{q.optim.lr}; decoding and NMS float",
            "data": f"{config.data.kind} {config.data.path}: train on {config.data.train_split}, report on "
                    f"{config.data.val_split}, {config.data.image_size} px"}


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 27's bars, each from measured figures: (claim, measured, required, pass)."""
    r = {row["row"]: row for row in result["rows"]}
    gains = [s["gain"] for s in result["seeds"]]
    speedup = result["paired"]["teacher-fp32"]["by_batch"]["1"]["p50_ratio"]
    found = [
        (f"KD gain: distilled - scratch-same-init mAP@.5, mean of {len(gains)} seeds", statistics.mean(gains),
         KD_GAIN_MIN, "pts"),
        ("final INT8 mAP@.5 - distilled (OpenVINO fp32)", r["final"]["scores"]["map50"] - r["distilled"]["scores"]["map50"],
         FINAL_VS_DISTILLED_MIN, "pts"),
        ("final vs teacher-fp32: batch-1 latency ratio, end to end with NMS, paired rounds", speedup, SPEEDUP_MIN, "x"),
    ]
    return [{"claim": c, "measured": v, "required": req, "unit": unit, "pass": bool(v >= req - 1e-12)}
            for c, v, req, unit in found]


def _figure(v: float, unit: str) -> str:
    return f"{100 * v:+.2f} pts" if unit == "pts" else f"{v:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    c, h, t = result["conditions"], result["host"], result["teacher_training"]
    rec = result["recipe"]
    rows = result["rows"]
    lines = [
        "## Detection: BCCD (`make bench-detection`)", "",
        f"The `{result['config']}` recipe (configs/bccd.yaml) against its teacher and the one-line alternatives, every "
        "row measured in one run on this machine. Produced by:", "",
        "```", result["command"], "```", "",
        f"- Date: {result['date']}",
        f"- Machine: {h['cpu']}, {c['threads']} threads, ISA: {', '.join(h['isa_flags']) or 'none listed'}; native "
        f"bf16: {'yes' if h['native_bf16'] else 'no'}; {h['os']}, Python {h['python']}",
        f"- Libraries: {', '.join(f'{k} {v}' for k, v in sorted(result['versions'].items()))}",
        f"- Every row: OpenVINO CPU plugin, {c['threads']} inference threads, the whole detector (decoding and NMS "
        f"in the graph); latency = p50 of {c['iterations']} timed runs at batch 1 after {c['warmup']} warm-up runs, "
        f"throughput at batch {c['throughput_batch']}; mAP by the compiled model on all {c['images']} `test` images "
        f"({c['boxes']} boxes), {c['evaluator']}.",
        f"- Data: {rec['data']}.",
        f"- Teacher: `{rec['teacher']}`, trained here from scratch ({rec['teacher_train']}) in "
        f"{(t['seconds'] or 0) / 60:.1f} min (apart from the benchmark's compute): mAP@.5 {fmt.pct(t['map50'])} "
        "in PyTorch.",
        f"- Student: `{rec['student']}`; distill {rec['distill']}; prune: {rec['prune']}; QAT: {rec['qat']}.",
        f"- Compute of the benchmark (every stage, baseline and measurement but the teacher's training): "
        f"{result['compute_seconds'] / 60:.1f} min (this invocation {result['this_invocation_seconds'] / 60:.1f} min; "
        "rows finished earlier are reused).", "",
        fmt.md_table(["row", "mAP@.5", "mAP@[.5:.95]", "params", "MACs", "size", "runtime dtype", "latency b1 p50",
                      f"throughput b{c['throughput_batch']}", "how"],
                     [[r["row"], fmt.pct(r["scores"].get("map50")), fmt.pct(r["scores"].get("map")),
                       fmt.count(r["params"]), fmt.count(r["macs"]), fmt.size(r["size_bytes"]), r["runtime_dtype"],
                       f"{fmt.ms(r['latency_b1_p50_ms'])} ms", f"{fmt.ips(r['throughput_b64_images_per_s'])} img/s",
                       r["method"]] for r in rows], align=list("lrrrrrlrrl"), markup=True),
    ]
    notes = [f"- {r['row']}: {r['note']}" for r in rows if r.get("note")]
    lines += ["", *notes] if notes else []
    classes = sorted({k for r in rows for k in (r["scores"].get("per_class") or {})})
    if classes:
        lines += ["", "AP@[.5:.95] per class:", "",
                  fmt.md_table(["row", *classes], [[r["row"], *(fmt.pct((r["scores"].get("per_class") or {}).get(k))
                                                               for k in classes)] for r in rows],
                               align=["l", *"r" * len(classes)], markup=True)]
    lines += seeds_section(result["seeds"], MAP50, "the same split")
    lines += ["", "### Claims, checked against the rows above", "",
              fmt.md_table(["claim", "measured", "required", "result"],
                           [[ch["claim"], _figure(ch["measured"], ch["unit"]), ">= " + _figure(ch["required"], ch["unit"]),
                             "pass" if ch["pass"] else "**MISS**"] for ch in result["checks"]],
                           align=list("lrrl"), markup=True)]
    paired = result["paired"]
    if paired:
        one = next(iter(paired.values()))
        lines += ["", f"Paired timing: the final model and each teacher row back to back in {one['rounds']} alternating "
                  f"rounds ({one['warmup']} warm-up + {one['iterations']} timed runs each, {one['threads']} threads, "
                  "OpenVINO); the figure is the median of the per-round ratios (reference p50 / final p50 at batch 1, "
                  "images/s ratio at the larger batch).", "",
                  fmt.md_table(["final vs", "batch", "median ratio", "per-round ratios"],
                               [[row, b, f"{v['p50_ratio' if b == '1' else 'ratio']:.2f}x",
                                 ", ".join(f"{(x['reference_p50_ms'] / x['candidate_p50_ms']) if b == '1' else x['ratio']:.2f}"
                                           for x in v["per_round"])]
                                for row, p in paired.items() for b, v in p["by_batch"].items()],
                               align=list("lrrl"), markup=True)]
    lines += ["", "![mAP@.5 vs batch-1 latency](BENCHMARKS-detection.png)"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> bytes:
    rows = result["rows"]
    fig = fmt.new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    for r in rows:
        x, y, int8 = r["latency_b1_p50_ms"], 100 * (r["scores"].get("map50") or 0.0), r["runtime_dtype"] == "int8"
        ax.scatter([x], [y], s=60, marker="s" if int8 else "o", zorder=3,
                   color="tab:red" if r["row"] == "final" else ("tab:blue" if int8 else "tab:gray"))
        ax.annotate(r["row"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel(f"OpenVINO latency, batch 1, p50 (ms, log scale) — {result['conditions']['threads']} threads, "
                  f"{result['host']['cpu']}")
    ax.set_ylabel(f"mAP@.5 on {result['conditions']['images']} test images (%)")
    ax.set_title("BCCD detection: accuracy vs latency, NMS included (squares: INT8)")
    ax.grid(alpha=0.3)
    return fmt.png_bytes(fig, dpi=120)


def write(out_dir: Path, result: dict[str, Any]) -> None:
    """BENCHMARKS-detection.json/.png, then the detection section of BENCHMARKS.md (the rest of it kept)."""
    out_dir = Path(out_dir)
    fmt.write_document(out_dir, {"BENCHMARKS-detection.json": result, "BENCHMARKS-detection.png": plot(result)})
    fmt.replace_section(out_dir / "BENCHMARKS.md", SECTION, markdown(result))
