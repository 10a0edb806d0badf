"""The benchmark document of ``edgepipe compare``: the recipe, the claims checked against the rows, and
BENCHMARKS.md / BENCHMARKS.json / BENCHMARKS.png.

Everything here reads a finished result (the rows the engine measured, see edgepipe.reporting.compare); no
figure is computed or typed here except the claims' ratios, each from two measured rows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from edgepipe.config import PipelineConfig
from edgepipe.reporting import formatting as fmt

LATENCY_BATCH, THROUGHPUT_BATCH = 1, 64
ROW_KEYS = ("row", "method", "top1", "params", "macs", "size_bytes", "backend", "device", "requested_dtype",
            "runtime_dtype", "threads", "warmup", "iterations", "latency_b1_p50_ms", "latency_b1_p90_ms",
            "throughput_b64_images_per_s", "estimate", "note", "seconds")


def recipe(config: PipelineConfig, notes: str = "") -> dict[str, Any]:
    """The settings that decide the result, for the benchmark document."""
    d, p, q = config.distill, config.prune, config.qat
    return {
        "notes": notes,
        "teacher": config.teacher.model.model_dump(exclude_none=True, exclude_defaults=True),
        "student": d.student.model_dump(exclude_none=True, exclude_defaults=True),
        "distill": f"init {d.init}, T={d.temperature}, alpha={d.alpha}, {d.optim.epochs} epochs, peak lr {d.optim.lr}, "
                   f"batch {config.data.batch_size}, channels_last {d.optim.channels_last}, autocast {d.optim.autocast}",
        "prune": f"Torch-Pruning {p.importance.value} importance to <= {p.ratio:.0%} of the {p.target}, "
                 f"{p.steps} step(s), round_to {p.round_to}, {p.optim.epochs} fine-tuning epochs from the teacher",
        "qat": f"activations {q.activations}, weight bits {q.weight_bits} (auto: from target and host, see the "
               f"qat stage's form record), {q.calibration} calibration on {q.calibration_batches} batches, "
               f"{q.optim.epochs} epochs at lr {q.optim.lr}",
        "soft_targets": f"teacher logits from {config.soft_targets.runtime}, cache {config.soft_targets.cache}",
    }


def leading_comment(path: Path) -> str:
    """The comment block at the top of a YAML file, without the ``#`` marks."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines).strip()


# --- acceptance -------------------------------------------------------------------------------------
def _by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["row"]: r for r in result["rows"]}


def acceptance(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's claims, each computed from the measured rows: (claim, measured, required, pass)."""
    r = _by_name(result)
    final, t32, t8 = r["final"], r["teacher-fp32"], r["teacher-int8"]
    tbf = r.get("teacher-bf16")  # only where the target profile lists bf16
    thr = "throughput_b64_images_per_s"
    train = result["training_throughput"]
    paired = result.get("paired") or {}
    seeds = result.get("seeds") or []

    def speedup(row: str, batch: int, field: str = "ratio") -> float:
        """Final vs ``row``: the paired back-to-back rounds' median where measured, else the two rows' figures."""
        if row in paired:
            return paired[row]["by_batch"][str(batch)][field]
        if field == "p50_ratio":
            return r[row]["latency_b1_p50_ms"] / final["latency_b1_p50_ms"]
        return final[thr] / r[row][thr]

    checks = [
        ("final INT8 top-1 >= teacher-fp32 - 2.0 points", final["top1"] - t32["top1"], ">= -0.020"),
        ("final INT8 throughput (b64) >= 8x teacher-fp32", speedup("teacher-fp32", 64), ">= 8"),
        ("final INT8 latency (b1 p50) >= 3x lower than teacher-fp32", speedup("teacher-fp32", 1, "p50_ratio"), ">= 3"),
        ("final INT8 top-1 >= teacher-int8 - 1.5 points", final["top1"] - t8["top1"], ">= -0.015"),
        ("final INT8 throughput (b64) >= 2.5x teacher-int8", speedup("teacher-int8", 64), ">= 2.5"),
        *([("final INT8 throughput (b64) >= 2x teacher-bf16", speedup("teacher-bf16", 64), ">= 2")] if tbf else []),
        ("KD gain: distilled top-1 >= scratch-same-init + 0.3 points",
         r["distilled"]["top1"] - r["scratch-same-init"]["top1"], ">= 0.003"),
        *([(f"KD gain over {len(seeds)} seeds: mean (distill stage, PyTorch) >= +0.3 points and beyond its spread",
            _established(seeds), ">= 0.003")] if len(seeds) > 1 else []),
        ("QAT gain: final top-1 >= PTQ top-1 at equal fine-tuning epochs", final["top1"] - r["ptq"]["top1"], ">= 0"),
        ("distill training throughput >= 0.9x plain PyTorch loop", train.get("ratio") or 0.0, ">= 0.9"),
        ("stretch: final top-1 within 1.0 point of teacher-fp32", final["top1"] - t32["top1"], ">= -0.010"),
        ("stretch: final throughput (b64) >= 12x teacher-fp32", speedup("teacher-fp32", 64), ">= 12"),
    ]
    return [{"claim": c, "measured": m, "required": req, "pass": bool(m >= float(req.split()[-1]) - 1e-12)}
            for c, m, req in checks]


def _established(seeds: list[dict[str, Any]]) -> float:
    """The seeds' mean KD gain where it exceeds its sample standard deviation, else 0 (no gain established)."""
    import statistics

    gains = [s["gain"] for s in seeds]
    mean = statistics.mean(gains)
    return mean if abs(mean) > statistics.stdev(gains) else 0.0


# --- writing ----------------------------------------------------------------------------------------
def _measured_of(check: dict[str, Any], value: float | None = None) -> str:
    m = check["measured"] if value is None else value
    return f"{100 * m:+.2f} pts" if "top-1" in check["claim"] else f"{m:.2f}x"


def _required_of(check: dict[str, Any]) -> str:
    op, value = check["required"].split()
    return f"{op} {_measured_of(check, float(value))}"


def markdown(result: dict[str, Any]) -> str:
    c, h = result["conditions"], result["host"]
    lines = [
        "# Benchmarks", "",
        f"CIFAR-10 benchmark of the `{result['config']}` recipe against the one-line alternatives, all measured "
        "in one run on this machine. Produced by:", "",
        "```", result["command"], "```", "",
        f"- Date: {result['date']}",
        f"- Machine: {h['cpu']}, {c['threads']} threads, ISA: {', '.join(h['isa_flags']) or 'none listed'}; "
        f"native bf16: {'yes' if h['native_bf16'] else 'no'}; {h['os']}, Python {h['python']}",
        f"- Libraries: {', '.join(f'{k} {v}' for k, v in sorted(result['versions'].items()))}",
        f"- Every row below: OpenVINO CPU plugin, {c['threads']} inference threads, latency = p50 of "
        f"{c['iterations']} timed runs at batch {c['latency_batch']} after {c['warmup']} warm-up runs, throughput = "
        f"batch {c['throughput_batch']} over {c['iterations']} timed runs after {c['warmup']} warm-up runs; "
        f"top-1 on all {c['accuracy_samples']:,} test images, computed by the same compiled model.",
        f"- Run folder: `{result['run']}`; target profile `{result['target']}`. Compute time of the whole benchmark "
        f"(pipeline stages + baselines + timing): {result['compute_seconds'] / 60:.1f} min"
        f" (this invocation: {result['this_invocation_seconds'] / 60:.1f} min; training epochs of earlier, "
        f"interrupted invocations: {result.get('earlier_invocation_epoch_seconds', 0.0) / 60:.1f} min; stages and "
        "rows finished earlier are reused, not redone).", "",
        *_recipe_lines(result.get("recipe") or {}),
        "## Results", "",
        fmt.md_table(["row", "top-1", "params", "MACs", "size on disk", "runtime dtype", "latency b1 p50",
                      "throughput b64", "how"],
                     [[r["row"], fmt.pct(r["top1"]), fmt.count(r["params"]), fmt.count(r["macs"]),
                       fmt.size(r["size_bytes"]), _dtype(r), f"{fmt.ms(r['latency_b1_p50_ms'])} ms",
                       f"{fmt.ips(r['throughput_b64_images_per_s'])} img/s", r["method"]] for r in result["rows"]],
                     align=list("lrrrrlrrl"), markup=True),
    ]
    notes = [f"- {r['row']}: {r['note']}" for r in result["rows"] if r.get("note")]
    if notes:
        lines += ["", *notes]
    d = result.get("device_row")
    if d:
        e1, e64 = d["estimate"][f"batch_{LATENCY_BATCH}"], d["estimate"][f"batch_{THROUGHPUT_BATCH}"]
        lines += ["", f"## {result['device_target']} (estimate only)", "",
                  f"{d['method']}: `{d['artifact_kind']}` in `{d['artifact_dir']}` "
                  f"({fmt.size(d['size_bytes'])}). {d['compile_records'].get('reason', '')}".rstrip(), "",
                  fmt.md_table(["batch", "ESTIMATED latency", "ESTIMATED throughput", "bound"],
                               [[b, f"{est['latency_ms']:.3f} ms (estimate)", f"{fmt.ips(est['images_per_s'])} img/s "
                                 "(estimate)", est.get("bound")] for b, est in ((LATENCY_BATCH, e1),
                                                                               (THROUGHPUT_BATCH, e64))],
                               align=list("rrrl"), markup=True)]
        top1 = f"{d['top1']:.2%}" if d.get("top1") is not None else "n/a"
        lines += ["", f"{d['note']}: {top1}. Measure it on the device: `python3 edgepipe_trt.py run` in the bundle "
                  "(builds, times and evaluates the engine), then `edgepipe import-results`."]
    lines += _per_class_lines(result.get("per_class") or {})
    t = result["training_throughput"]
    stage_rates = ", ".join(f"{r:,.0f}" for r in t.get("distill_stage_epochs_images_per_s") or [])
    lines += ["", "## Training throughput (distillation, teacher forward included)", "",
              "Both loops timed back to back in this run on the same batches (same student, teacher, loss, "
              "batch size).", "",
              fmt.md_table(["loop", "images/s", "teacher runs in", "setup"],
                           [["edgepipe training loop", fmt.ips(t["pipeline_images_per_s"]),
                             t.get("pipeline_teacher_runtime"), t["pipeline_setup"]],
                            ["plain PyTorch loop", fmt.ips(t["plain_images_per_s"]), t.get("plain_teacher_runtime"),
                             t["plain_setup"]]],
                           align=list("lrll"), markup=True),
              "", f"Ratio edgepipe / plain: **{t['ratio']:.2f}x**. The distill stage itself ran at {stage_rates} "
              "images/s per epoch (whole epochs, while the machine may have been doing other work)."]
    if result.get("seeds"):
        from edgepipe.reporting.seeds import section
        from edgepipe.tasks.metric import TOP1

        split = "the held-out training images" if result.get("held_out") else "the validation split"
        lines += section(result["seeds"], TOP1, f"{split} (the stage's last epoch)", heading="##")
    lines += ["", "## Claims, checked against the rows above", "",
              fmt.md_table(["claim", "measured", "required", "result"],
                           [[ch["claim"], _measured_of(ch), _required_of(ch), "pass" if ch["pass"] else "**MISS**"]
                            for ch in result["checks"]], align=list("lrrl"), markup=True)]
    paired = result.get("paired") or {}
    if paired:
        any_row = next(iter(paired.values()))
        lines += ["", f"The speed-up claims are paired measurements: the final model and each teacher row timed back "
                  f"to back in {any_row['rounds']} alternating rounds ({any_row['warmup']} warm-up + "
                  f"{any_row['iterations']} timed runs each, {any_row['threads']} threads, OpenVINO), the claim being "
                  "the median of the per-round ratios. The rows above were each timed once, minutes apart; on this "
                  "shared VM a figure moved by up to ±30% between minutes, so their quotient is the weaker estimate.",
                  "", fmt.md_table(["final vs", "batch", "median ratio", "per-round ratios"],
                                   [[row, b, f"{v['ratio']:.2f}x", ", ".join(f"{x['ratio']:.2f}" for x in v["per_round"])]
                                    for row, p in paired.items() for b, v in p["by_batch"].items()],
                                   align=list("lrrl"), markup=True)]
    lines += ["", "## Accuracy vs latency", "", "![accuracy vs batch-1 latency](BENCHMARKS.png)", "",
              "Every row at its measured batch-1 p50 latency; the line joins the Pareto-optimal rows "
              "(no other row is both faster and more accurate).", "",
              "## Stage wall times", "",
              fmt.md_table(["stage", "seconds"],
                           [*[[name, None if secs is None else f"{secs:.0f}"]
                              for name, secs in result["stage_seconds"].items()],
                            *[[f"baseline/measure: {r['row']}", f"{r.get('seconds') or 0:.0f}"]
                              for r in result["rows"]]], align=list("lr"), markup=True)]
    return "\n".join(lines) + "\n"


def _per_class_lines(per_class: dict[str, dict[str, float | None]]) -> list[str]:
    """Per-class top-1 of the teacher, the distilled student and the final model, most lost first."""
    if not per_class.get("final") or not per_class.get("teacher-fp32"):
        return []
    cols = [r for r in ("teacher-fp32", "distilled", "final") if per_class.get(r)]
    teacher, final = per_class["teacher-fp32"], per_class["final"]
    loss = {c: (final[c] - teacher[c]) if final.get(c) is not None and teacher.get(c) is not None else None
            for c in teacher}
    order = sorted(teacher, key=lambda c: (loss[c] is None, loss[c] if loss[c] is not None else 0.0))
    worst = [c for c in order if loss[c] is not None and loss[c] < 0][:3]
    rows = [[c, *(fmt.pct(per_class[r].get(c), 1) for r in cols),
             None if loss[c] is None else f"{100 * loss[c]:+.1f} pts"] for c in order]
    return ["", "## Where accuracy is lost (top-1 per class)", "",
            fmt.md_table(["class", *cols, "final - teacher"], rows, align=["l", *"r" * len(cols), "r"]), "",
            "Classes that lose most from teacher to final: "
            + (", ".join(f"{c} ({100 * loss[c]:+.1f} pts)" for c in worst) if worst else "none") + "."]


def _dtype(r: dict[str, Any]) -> str:
    asked = r["requested_dtype"]
    return r["runtime_dtype"] + ("" if r["runtime_dtype"] == asked else f" (asked {asked})")


def _recipe_lines(r: dict[str, Any]) -> list[str]:
    if not r:
        return []
    lines = ["## Recipe", ""]
    if r.get("notes"):
        lines += ["> " + line if line else ">" for line in r["notes"].splitlines()] + [""]
    lines += [f"- Teacher: `{json.dumps(r['teacher'])}`", f"- Student: `{json.dumps(r['student'])}`",
              f"- Distill: {r['distill']}", f"- Prune: {r['prune']}", f"- QAT: {r['qat']}",
              f"- Soft targets: {r['soft_targets']}", ""]
    return lines


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (latency, accuracy) not dominated by a faster-and-at-least-as-accurate one."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best, keep = -1.0, []
    for i in order:
        if points[i][1] > best:
            keep.append(i)
            best = points[i][1]
    return keep


def plot(result: dict[str, Any]) -> bytes:
    rows = [r for r in result["rows"] if r.get("top1") is not None]
    pts = [(r["latency_b1_p50_ms"], 100 * r["top1"]) for r in rows]
    fig = fmt.new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    for r, (x, y) in zip(rows, pts):
        int8 = r["runtime_dtype"] == "int8"
        ax.scatter([x], [y], s=60, marker="s" if int8 else "o", color="tab:red" if r["row"] == "final" else
                   ("tab:blue" if int8 else "tab:gray"), zorder=3)
        ax.annotate(r["row"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = sorted(pareto(pts), key=lambda i: pts[i][0])
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:red", lw=1, zorder=2,
            label="Pareto front")
    c = result["conditions"]
    ax.set_xlabel(f"OpenVINO latency, batch 1, p50 (ms) — {c['threads']} threads, {result['host']['cpu']}")
    ax.set_ylabel(f"top-1 on {c['accuracy_samples']:,} test images (%)")
    ax.set_title("Accuracy vs latency (squares: INT8, circles: float)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fmt.png_bytes(fig, dpi=120)


def write_benchmarks(out_dir: Path, result: dict[str, Any]) -> None:
    rows = [{k: r.get(k) for k in ROW_KEYS} for r in result["rows"]]
    if result.get("device_row"):
        rows.append({k: result["device_row"].get(k) for k in ROW_KEYS})
    doc = {k: v for k, v in result.items() if k != "rows" and k != "device_row"}
    old = Path(out_dir) / "BENCHMARKS.md"
    kept = fmt.kept_sections(old.read_text()) if old.exists() else ""  # sections other benchmark commands own
    fmt.write_document(out_dir, {"BENCHMARKS.json": {**doc, "rows": rows}, "BENCHMARKS.png": plot(result),
                                 "BENCHMARKS.md": markdown(result).rstrip("\n") + ("\n\n" + kept if kept else "\n")})


STUDENTS_SECTION = "students"


def _student_row(run: Path, label: str | None = None) -> dict[str, Any]:
    """One finished run's row: float top-1 (distill or prune), INT8 top-1 and OpenVINO figures (compile)."""
    manifest = json.loads((run / "manifest.json").read_text())
    done = {e["name"]: e for e in manifest["stages"] if e.get("status") in ("done", "skipped")}
    missing = [s for s in ("distill", "qat", "compile") if s not in done]
    if missing:
        raise SystemExit(f"{run}: stage(s) {', '.join(missing)} have not finished; run `make bench-students` first")

    def metrics(stage: str) -> dict[str, Any]:
        return json.loads((run / stage / "metrics.json").read_text())

    float_stage = "prune" if done.get("prune", {}).get("status") == "done" else "distill"
    compiled, qat, fl = metrics("compile"), metrics("qat"), metrics(float_stage)
    config = yaml.safe_load((run / "config.yaml").read_text())
    student = config["distill"]["student"]
    gain = qat.get("gain") or {}
    # Runs recorded before the gain check wrote its dtypes timed the float input in the profile's best float dtype.
    profile = yaml.safe_load((run / "profile.yaml").read_text()) if (run / "profile.yaml").exists() else {}
    best_float = next((d for d in profile.get("dtypes", []) if d != "int8"), "fp32")
    return {"row": label or manifest.get("run", run.name), "run": str(run),
            "student": f"{student.get('arch')} {json.dumps(student.get('kwargs', {}), sort_keys=True)}",
            "float_stage": float_stage, "float_top1": fl["accuracy"]["top1"],
            "kept": (qat.get("records") or {}).get("kept"), "int8_top1": compiled["accuracy"]["top1"],
            "params": compiled.get("params"), "macs": compiled.get("macs"), "latency": compiled.get("latency") or {},
            "throughput": compiled.get("throughput") or {}, "host": manifest.get("host", {}),
            "ended": done["compile"].get("ended"), "distill_epochs": config["distill"]["optim"]["epochs"],
            "compute_min": sum((e.get("wall_time_s") or 0) for e in done.values()) / 60,
            "gain": {"against": gain.get("against"), "float_ms": gain.get("before_ms"), "int8_ms": gain.get("after_ms"),
                     "speedup": gain.get("speedup"), "kind": gain.get("kind"), "timing": gain.get("timing"),
                     "float_dtype": gain.get("before_dtype") or best_float}}


def _float_cell(gain: dict[str, Any]) -> str:
    if gain.get("float_ms") is None:
        return fmt.DASH
    est = " (estimate)" if gain.get("kind") == "estimate" else ""
    return f"{fmt.ms(gain['float_ms'])} ({gain['float_dtype']}){est}"


def _speedup_cell(gain: dict[str, Any]) -> str:
    if gain.get("speedup") is None:
        return fmt.DASH
    return f"{gain['speedup']:.2f}x" + (" (estimate)" if gain.get("kind") == "estimate" else "")


def students_section(runs: list[Path], reference: Path | None = None) -> str:
    """The small-input students (issue 12) beside the benchmark recipe, from their finished run folders."""
    rows = [_student_row(r) for r in runs]
    notes = []
    if reference is not None and (reference / "manifest.json").exists():
        name = yaml.safe_load((reference / "config.yaml").read_text()).get("name") or reference.name
        ref = _student_row(reference, f"{name} (make bench)")
        if ref["host"] == rows[0]["host"]:
            rows.append(ref)
        else:
            notes.append(f"The benchmark recipe's row ({reference}) was measured on another CPU ({ref['host']}), so it "
                         "is left out; see the Results table above for its figures on its own machine.")
    for r in rows:
        g = r["gain"]
        if g.get("speedup") is not None and g["speedup"] < 1 and g.get("kind") == "measured":
            notes.append(f"{r['row']}: its INT8 model ran {g['speedup']:.2f}x the speed of its {g['float_dtype']} float "
                         f"model on this CPU (batch 1, {fmt.ms(g['int8_ms'])} vs {fmt.ms(g['float_ms'])} ms): here "
                         "the float model is the faster deployment, and the INT8 one is only smaller.")
    alternating = [r["gain"].get("timing") == "alternating rounds" for r in rows]
    timing = ("in alternating rounds" if all(alternating) else
              "one model's rounds after the other's" if not any(alternating) else
              "in alternating rounds for " + ", ".join(r["row"] for r, a in zip(rows, alternating) if a)
              + "; one model's rounds after the other's for the rest")
    lat = rows[0]["latency"]
    table = fmt.md_table(
        ["recipe", "student", "float top-1", "QAT kept", "INT8 top-1 (OpenVINO)", "Δ INT8 - float", "params", "MACs",
         "latency b1 p50 (ms)", "throughput b64 (img/s)", "float b1 p50 (ms, dtype)", "INT8 speed-up b1",
         "distill epochs", "compute", "finished"],
        [[r["row"], f"`{r['student']}`", f"{fmt.pct(r['float_top1'])} ({r['float_stage']})", r["kept"] or fmt.DASH,
          fmt.pct(r["int8_top1"]), f"{100 * (r['int8_top1'] - r['float_top1']):+.2f} pt", fmt.count(r["params"]),
          fmt.count(r["macs"]), fmt.ms(r["latency"].get("p50_ms")), fmt.ips(r["throughput"].get("images_per_s")),
          _float_cell(r["gain"]), _speedup_cell(r["gain"]), r["distill_epochs"], f"{r['compute_min']:.1f} min", (r["ended"] or "")[:16].replace("T", " ")]
         for r in rows],
        ["l", "l", "r", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "l"])
    host = rows[0]["host"]
    lines = ["## The small-input students (`make bench-students`)", "",
             "The mobile students adapted to 32x32 inputs (`edgepipe/models/zoo.py`), distilled from the same ResNet-56 "
             f"teacher by {', '.join(f'`configs/{r.name}.yaml`' for r in runs)}, INT8 QAT, then compiled by "
             "OpenVINO; one run folder each, written by the pipeline and read here.", "",
             f"- Command: `make bench-students` (then `python -m edgepipe.reporting.benchmarks students`, which writes this "
             f"section from the run folders: {', '.join(f'`{r}`' for r in runs)})",
             f"- Machine: {host.get('cpu')}, ISA: {', '.join(host.get('isa', []))}",
             f"- Latency and throughput: {lat.get('backend')} {lat.get('dtype')} on {lat.get('device')}, "
             f"{lat.get('threads')} threads, p50 of {lat.get('iterations')} timed runs at batch {lat.get('batch')} after "
             f"{lat.get('warmup')} warm-up runs; throughput at batch {rows[0]['throughput'].get('batch')} over "
             f"{rows[0]['throughput'].get('iterations')} runs. Top-1 on all 10,000 test images, by the compiled model (INT8) and by PyTorch (float).",
             "- Float b1 and INT8 speed-up: the QAT stage's gain check (edgepipe/measure/figures.py `stage_gain`): its float "
             "input and its INT8 output, each compiled by OpenVINO (the float one in the profile's best float dtype, as "
             f"this CPU runs it) and timed at batch 1, 3 rounds of the same warm-up and iterations ({timing}), the "
             "lowest p50 each; speed-up = float p50 / INT8 p50, below 1.00x when INT8 is slower here.",
             "- Compute: the sum of the run's stage wall times (training, measuring and compiling).", "",
             table, *([""] + notes if notes else [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m edgepipe.reporting.benchmarks",
                                description="Write a BENCHMARKS.md section from finished run folders.")
    sub = p.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("students", help="the small-input students' rows (make bench-students)")
    sp.add_argument("--run", type=Path, action="append", required=True, help="a finished student run folder")
    sp.add_argument("--reference", type=Path, help="the benchmark recipe's run folder (make bench), for its row")
    sp.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = p.parse_args(argv)
    body = students_section(args.run, args.reference)
    fmt.replace_section(args.out, STUDENTS_SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
