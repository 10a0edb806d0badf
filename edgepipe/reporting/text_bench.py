"""`edgepipe compare` for a text config (issue 29, `make bench-text`): the pipeline's BERT student against the
fine-tuned teacher and the one-line alternatives, every row measured in the same run, written as the "text" section
of BENCHMARKS.md (other sections are kept) with BENCHMARKS-text.json and BENCHMARKS-text.png.

Rows (each a run the engine derives, caches and resumes, edgepipe.engine.baselines): ``teacher-fp32`` (the fine-tuned
teacher, OpenVINO fp32), ``teacher-int8`` (NNCF post-training INT8 of the teacher with its transformer scheme, the
one call an OpenVINO user makes: edgepipe.backends.openvino.post_training_quantize), ``scratch-same-init`` (the
distilled student's shape and initialisation, labels only, same epochs), ``distilled``, ``pruned`` (OpenVINO fp32) and
``final`` (the pipeline's compiled INT8 model). Every row is scored by its compiled model on every sentence of the
reported split; each row's accuracy is compared with the teacher's sentence by sentence (exact two-sided McNemar).

Latency is measured where text needs it, each figure with its shapes: batch 1 at 32 and at 128 tokens, and throughput
at batch 32 of 128-token sentences (random in-vocabulary ids, every token attended), OpenVINO on this host. The speed-up
claims come from the final model and each teacher row timed back to back in alternating rounds
(edgepipe.measure.figures.paired_speedup) at those shapes.

The KD gain (``distilled`` - ``scratch-same-init``) is a claim about training: stated over ``--seeds`` (the distill
stage with and without the teacher at each seed, scored on the choice split in PyTorch) and, for the config's seed,
sentence by sentence on the reported split (exact McNemar), so "beyond chance" has a test behind it.
"""
from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.config import PipelineConfig
from edgepipe.engine.baselines import Baseline, own_seconds, prune_wording
from edgepipe.engine.pipeline import Progress
from edgepipe.engine.run import Run
from edgepipe.errors import EdgepipeError
from edgepipe.host import host_cpu, host_has_native_bf16, host_isa, library_versions
from edgepipe.reporting import formatting as fmt
from edgepipe.reporting.compare import (earlier_invocation_seconds, pipeline_and_rows, preconditions, row_of,
                                        where_rows_are)
from edgepipe.reporting.seeds import seed_rows
from edgepipe.reporting.seeds import section as seeds_section
from edgepipe.tasks.text import ACCURACY

SECTION = "text"
ROWS = ("teacher-fp32", "teacher-int8", "scratch-same-init", "distilled", "pruned")
SHAPES = ((1, 32), (1, 128), (32, 128))
"""(batch, sequence length) of every timing: batch-1 latency at 32 and 128 tokens, throughput at batch 32 (lengths
past data.max_length are cut to it: a model's position embeddings may end there)."""


def shapes(max_length: int) -> tuple[tuple[int, int], ...]:
    return tuple(dict.fromkeys((b, min(s, max_length)) for b, s in SHAPES))


def key(batch: int, length: int) -> str:
    return f"b{batch}-s{length}"
FINAL_METHOD = "pipeline: distill -> {prune_arrow}QAT INT8 (every Linear) -> ONNX QDQ -> OpenVINO (compile stage IR)"
PAIRED_AGAINST = ("teacher-fp32", "teacher-int8")

# Issue 29's bars: final params <= 50% of the teacher's (embeddings included), accuracy >= 95% of the teacher's,
# OpenVINO INT8 batch-1 latency at 128 tokens >= 3x lower than teacher-fp32's (paired), INT8 within 1 point of float.
PARAMS_MAX, KEEP_MIN, SPEEDUP_MIN, INT8_DROP_MAX = 0.50, 0.95, 3.0, 0.010


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, Any]:
    """Exact two-sided McNemar test of two classifiers on the same sentences: b's wins and losses against a."""
    from scipy.stats import binomtest

    a_correct, b_correct = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    losses = int((a_correct & ~b_correct).sum())
    wins = int((~a_correct & b_correct).sum())
    p = binomtest(losses, losses + wins, 0.5).pvalue if losses + wins else 1.0
    return {"wins": wins, "losses": losses, "p_value": float(p),
            "test": "exact McNemar, two-sided (binomial on the sentences exactly one of the two gets right)"}


def compare_text(config: PipelineConfig, run_dir: Path, target: str, device_target: str | None, out_dir: Path,
                 command: str, progress: Progress | None = None, seeds: int = 1) -> dict[str, Any]:
    """Run the pipeline, the rows and the seeds; write the text section of BENCHMARKS.md into ``out_dir``."""
    from edgepipe.backends import runner_for
    from edgepipe.runtime.runner import run_batches, time_runner
    from edgepipe.tasks import task_of

    started = time.perf_counter()
    progress = progress or (lambda *a: None)
    preconditions(config, target, device_target)
    if device_target:
        raise EdgepipeError(f"--device {device_target}: compare measures a text model's rows on this host only; build "
                            f"the device's bundle with `edgepipe run --target {device_target}`")
    run, runs, built, extra = pipeline_and_rows(config, run_dir, target, ROWS, seeds, progress)
    rows = [row_of(runs[b.row], b.row, _method(b, runs, config)) for b in built]
    rows.append(row_of(run, "final", FINAL_METHOD.format(**prune_wording(config)), stage="compile",
                       seconds=run.entry("compile").get("measure_time_s")))
    run_of, stage_of = where_rows_are(run, runs, built)

    task = task_of(config)
    data = task.load_data(config)
    m = config.measure
    threads = m.threads or __import__("torch").get_num_threads()
    correct: dict[str, np.ndarray] = {}
    for i, r in enumerate(rows):
        artifact = run_of[r["row"]].artifact_of(stage_of[r["row"]])
        runner, _ = runner_for(artifact, threads)
        outputs, targets = run_batches(runner, task.val_feeds(data, config.data.eval_batch_size))
        labels = np.concatenate([np.asarray(t) for t in targets])
        correct[r["row"]] = outputs["logits"].argmax(1) == labels
        r["accuracy"] = float(correct[r["row"]].mean())
        r["sentences"] = int(len(labels))
        r["timings"] = []
        meta = dict(artifact.meta)
        for batch, length in shapes(config.data.max_length):
            feeds = task.timing_inputs({**meta, "timing_sequence": length}, batch)
            lat = time_runner(runner, feeds, m.warmup, m.iterations)
            r["timings"].append({"batch": batch, "sequence": length, "p50_ms": lat.p50_ms, "p90_ms": lat.p90_ms,
                                 "sentences_per_s": lat.images_per_s,
                                 "inputs": {k: list(v.shape) for k, v in feeds.items()}})
        progress("text rows: accuracy and latency", i + 1, len(rows), {})
    for r in rows:
        r["vs_teacher"] = mcnemar(correct["teacher-fp32"], correct[r["row"]])
    final = run.artifact_of("compile")
    paired = {}
    from edgepipe.measure.figures import paired_speedup

    for row in PAIRED_AGAINST:
        reference = run_of[row].artifact_of(stage_of[row])
        paired[row] = {key(batch, length): paired_speedup(reference, final, tuple(final.meta["input_shape"]), m,
                                                              (batch,), progress=progress,
                                                              timing={"timing_sequence": length})
                       for batch, length in shapes(config.data.max_length)}
    all_runs = [run, *(runs[b.row] for b in [*built, *extra])]
    teacher = run.entry("teacher")
    structure = (run.metrics_of("prune").get("records") or {}).get("structure")
    result: dict[str, Any] = {
        "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": config.name,
        "run": str(run.root), "target": run.profile.name, "versions": library_versions(),
        "host": {"cpu": host_cpu(), "isa_flags": [f for f in host_isa() if f.startswith(("avx", "amx"))],
                 "native_bf16": host_has_native_bf16(), "os": platform.platform(), "python": platform.python_version()},
        "conditions": {"threads": threads, "warmup": m.warmup, "iterations": m.iterations,
                       "shapes": shapes(config.data.max_length),
                       "headline_shape": key(1, min(128, config.data.max_length)),
                       "sentences": rows[-1]["sentences"], "split": config.data.val_split,
                       "choice_split": config.data.choice_split or "held-out training sentences"},
        "recipe": _recipe(config), "rows": rows, "paired": paired, "structure": structure,
        "kd_test": mcnemar(correct["scratch-same-init"], correct["distilled"]),
        "seeds": seed_rows(config, runs, seeds, "top1"),
        "teacher_training": {"epochs": config.teacher.train.epochs, "seconds": teacher.get("wall_time_s"),
                             "top1": (run.metrics_of("teacher").get("accuracy") or {}).get("top1")},
        "compute_seconds": sum(own_seconds(r) for r in all_runs) + earlier_invocation_seconds(all_runs),
        "this_invocation_seconds": time.perf_counter() - started,
    }
    result["checks"] = checks(result)
    write(out_dir, result)
    return result


def _method(b: Baseline, runs: dict[str, Run], config: PipelineConfig) -> str:
    epochs = _epochs(config.distill.optim.epochs)
    ptq = (runs[b.row].metrics_of(runs[b.row].order[-1]).get("records") or {}).get("method", "NNCF")
    return {"teacher-fp32": "fine-tuned teacher, OpenVINO fp32 precision hint",
            "teacher-int8": f"fine-tuned teacher, {ptq} (OpenVINO INT8)",
            "scratch-same-init": f"distilled's shape and initialisation (init {config.distill.init}), labels only "
                                 f"(cross-entropy), {epochs}, same optimizer, OpenVINO fp32",
            "distilled": "pipeline distill stage (logits KD" + (" + hidden states + attention"
                                                                if config.distill.beta > 0 else "")
                         + f", {epochs}), OpenVINO fp32",
            "pruned": prune_wording(config)["prune_stage"] + " (vocabulary, heads, FFN width, hidden size; KD "
                      "fine-tune), OpenVINO fp32"}[b.row]


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _recipe(config: PipelineConfig) -> dict[str, Any]:
    d, p, q = config.distill, config.prune, config.qat
    return {"teacher": config.teacher.model.model_dump(exclude_none=True, exclude_defaults=True),
            "teacher_train": f"{_epochs(config.teacher.train.epochs)}, {config.teacher.train.optimizer}, peak lr "
                             f"{config.teacher.train.lr}, batch {config.data.batch_size}",
            "student": d.student.model_dump(exclude_none=True, exclude_defaults=True),
            "distill": f"init {d.init}, T={d.temperature}, alpha={d.alpha}, beta={d.beta} (hidden states + last-layer "
                       f"attention), {_epochs(d.optim.epochs)}, peak lr {d.optim.lr}",
            "prune": (f"vocabulary {p.vocabulary}, {p.heads:.0%} of each layer's heads, then Torch-Pruning "
                      f"{p.importance.value} importance to <= {p.ratio:.0%} of the student's {p.target} in "
                      f"{p.steps} step{'' if p.steps == 1 else 's'}, KD fine-tuning for {_epochs(p.optim.epochs)}")
            if p.enabled else "disabled",
            "qat": f"{q.calibration} calibration on {q.calibration_batches} batches, {_epochs(q.optim.epochs)} at lr "
                   f"{q.optim.lr}",
            "data": f"{config.data.kind} {config.data.path or '(generated)'}: train on {config.data.train_split}, "
                    f"choices on {config.data.choice_split or 'held-out training sentences'}, report on "
                    f"{config.data.val_split}, max_length {config.data.max_length}"}


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 29's bars, each from measured figures: (claim, measured, required, pass)."""
    r = {row["row"]: row for row in result["rows"]}
    teacher, final = r["teacher-fp32"], r["final"]
    headline = result["conditions"]["headline_shape"]
    speed = result["paired"]["teacher-fp32"][headline]["by_batch"]["1"]["p50_ratio"]
    found = [
        ("final params / teacher params (embeddings included)", final["params"] / teacher["params"], PARAMS_MAX, "x",
         "max"),
        (f"final accuracy / teacher accuracy on the {result['conditions']['sentences']} sentences (McNemar p = "
         f"{final['vs_teacher']['p_value']:.3g})", final["accuracy"] / teacher["accuracy"], KEEP_MIN, "ratio", "min"),
        (f"final vs teacher-fp32: batch-1 latency ratio at {headline.split('-s')[1]} tokens, OpenVINO, paired rounds",
         speed, SPEEDUP_MIN,
         "x", "min"),
        ("final INT8 accuracy - pruned (its float model, OpenVINO fp32)", final["accuracy"] - r["pruned"]["accuracy"],
         -INT8_DROP_MAX, "pts", "min"),
    ]
    return [{"claim": c, "measured": v, "required": req, "unit": unit, "bound": bound,
             "pass": bool(v <= req + 1e-12 if bound == "max" else v >= req - 1e-12)}
            for c, v, req, unit, bound in found]


def _figure(v: float, unit: str) -> str:
    return {"pts": f"{100 * v:+.2f} pts", "ratio": f"{100 * v:.1f}%"}.get(unit, f"{v:.2f}x")


def markdown(result: dict[str, Any]) -> str:
    c, h, t, rec = result["conditions"], result["host"], result["teacher_training"], result["recipe"]
    rows = result["rows"]
    shape_heads = [f"b{b} s{s} " + ("p50" if b == 1 else "sent/s") for b, s in c["shapes"]]

    def timing(r: dict[str, Any]) -> list[str]:
        return [f"{fmt.ms(x['p50_ms'])} ms" if x["batch"] == 1 else fmt.ips(x["sentences_per_s"])
                for x in r["timings"]]

    lines = [
        "## Text: a fine-tuned BERT-family classifier (`make bench-text`: SST-2, MiniLM-L6)", "",
        f"The `{result['config']}` recipe against its fine-tuned teacher and the one-line alternatives, every row "
        "measured in one run on this machine. Produced by:", "",
        "```", result["command"], "```", "",
        f"- Date: {result['date']}",
        f"- Machine: {h['cpu']}, {c['threads']} threads, ISA: {', '.join(h['isa_flags']) or 'none listed'}; native "
        f"bf16: {'yes' if h['native_bf16'] else 'no'}; {h['os']}, Python {h['python']}",
        f"- Libraries: {', '.join(f'{k} {v}' for k, v in sorted(result['versions'].items()))}",
        f"- Every row: OpenVINO CPU plugin, {c['threads']} inference threads; accuracy by the compiled model on all "
        f"{c['sentences']} sentences of `{c['split']}` (choices were made on `{c['choice_split']}`); p = exact "
        "two-sided McNemar against teacher-fp32 on those sentences. Latency: p50 of "
        f"{c['iterations']} timed runs after {c['warmup']} warm-up runs on random in-vocabulary token ids with every "
        "token attended, at the shapes in each column's name (b = batch, s = tokens per sentence); throughput = "
        "sentences/s at that batch.",
        f"- Data: {rec['data']}.",
        f"- Teacher: `{rec['teacher']}` fine-tuned here ({rec['teacher_train']}) in {(t['seconds'] or 0) / 60:.1f} min "
        f"(counted in the benchmark's compute below): accuracy {fmt.pct(t['top1'])} in PyTorch.",
        f"- Student: `{rec['student']}`; distill {rec['distill']}; prune: {rec['prune']}; QAT: {rec['qat']}.",
        f"- Compute of the benchmark (every stage, baseline and measurement, the teacher's fine-tuning included): "
        f"{result['compute_seconds'] / 60:.1f} min (this invocation {result['this_invocation_seconds'] / 60:.1f} min; "
        "rows finished earlier are reused).", "",
        fmt.md_table(["row", "accuracy", "p vs teacher", "params", "of teacher", "size", "runtime dtype", *shape_heads,
                      "how"],
                     [[r["row"], fmt.pct(r["accuracy"]), f"{r['vs_teacher']['p_value']:.3g}", fmt.count(r["params"]),
                       f"{100 * r['params'] / rows[0]['params']:.1f}%", fmt.size(r["size_bytes"]), r["runtime_dtype"],
                       *timing(r), r["method"]] for r in rows],
                     align=list("lrrrrrl") + ["r"] * len(shape_heads) + ["l"], markup=True),
    ]
    notes = [f"- {r['row']}: {r['note']}" for r in rows if r.get("note")]
    lines += ["", *notes] if notes else []
    s = result.get("structure")
    if s:
        before, after = s["before"], s["after"]
        vocab = s.get("vocabulary") or {}
        lines += ["", "What pruning removed from the distilled student (Torch-Pruning; embeddings counted in params): "
                  f"vocabulary {before['vocabulary']:,} -> {after['vocabulary']:,} rows"
                  + (f" ({vocab.get('from_data', 0):,} ids in the training sentences + special tokens; any other id "
                     "reads [UNK]'s row through a lookup table, a buffer of int64 ids counted in the size column, not "
                     "in params)" if vocab else "")
                  + f"; hidden size {before['hidden_size']} -> {after['hidden_size']}; heads per layer "
                  f"{before['heads']} -> {after['heads']}; FFN width per layer {before['ffn']} -> {after['ffn']}."]
    kd = result["kd_test"]
    lines += ["", f"KD, sentence by sentence (seed {result['seeds'][0]['seed'] if result['seeds'] else ''}, "
              f"`{c['split']}`): distilled gets {kd['wins']} sentences right that scratch-same-init gets wrong and "
              f"{kd['losses']} the other way (exact two-sided McNemar p = {kd['p_value']:.3g})."]
    if result["seeds"]:
        lines += seeds_section(result["seeds"], ACCURACY, f"`{c['choice_split']}` (the choice split)")
    lines += ["", "### Claims, checked against the rows above", "",
              fmt.md_table(["claim", "measured", "required", "result"],
                           [[ch["claim"], _figure(ch["measured"], ch["unit"]),
                             ("<= " if ch["bound"] == "max" else ">= ") + _figure(ch["required"], ch["unit"]),
                             "pass" if ch["pass"] else "**MISS**"] for ch in result["checks"]],
                           align=list("lrrl"), markup=True)]
    paired = result["paired"]
    one = next(iter(next(iter(paired.values())).values()))
    lines += ["", f"Paired timing: the final model and each teacher row back to back in {one['rounds']} alternating "
              f"rounds ({one['warmup']} warm-up + {one['iterations']} timed runs each, {one['threads']} threads, "
              "OpenVINO); the figure is the median of the per-round ratios (reference p50 / final p50 at batch 1, "
              "sentences/s ratio at batch 32).", "",
              fmt.md_table(["final vs", "batch", "tokens", "median ratio", "per-round ratios"],
                           [[row, shape.split("-")[0][1:], shape.split("-")[1][1:],
                             f"{v['p50_ratio' if b == '1' else 'ratio']:.2f}x",
                             ", ".join(f"{_round_ratio(x, b):.2f}" for x in v["per_round"])]
                            for row, p in paired.items() for shape, one_shape in p.items()
                            for b, v in one_shape["by_batch"].items()],
                           align=list("lrrrl"), markup=True)]
    lines += ["", "![accuracy vs batch-1 latency at 128 tokens](BENCHMARKS-text.png)"]
    return "\n".join(lines) + "\n"


def _round_ratio(x: dict[str, Any], batch: str) -> float:
    return x["reference_p50_ms"] / x["candidate_p50_ms"] if batch == "1" else x["ratio"]


def plot(result: dict[str, Any]) -> bytes:
    rows = result["rows"]
    fig = fmt.new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    for r in rows:
        x = [t["p50_ms"] for t in r["timings"] if t["batch"] == 1][-1]
        y, int8 = 100 * r["accuracy"], r["runtime_dtype"] == "int8"
        ax.scatter([x], [y], s=60, marker="s" if int8 else "o", zorder=3,
                   color="tab:red" if r["row"] == "final" else ("tab:blue" if int8 else "tab:gray"))
        ax.annotate(f"{r['row']} ({r['params'] / 1e6:.1f}M)", (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    xs = [[t["p50_ms"] for t in r["timings"] if t["batch"] == 1][-1] for r in rows]
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if min(xs) / 1.5 <= t <= max(xs) * 1.5]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xlim(min(xs) / 1.3, max(xs) * 1.6)  # room for the labels right of the points
    tokens = result["conditions"]["headline_shape"].split("-s")[1]
    ax.set_xlabel(f"OpenVINO latency, batch 1, {tokens} tokens, p50 (ms, log scale)")
    ax.set_ylabel(f"accuracy on {result['conditions']['sentences']} sentences (%)")
    ax.set_title(f"{result['config']}: accuracy vs latency (squares: INT8; parameters in brackets)\n"
                 f"{result['host']['cpu']}, {result['conditions']['threads']} threads", fontsize=10)
    ax.grid(alpha=0.3)
    return fmt.png_bytes(fig, dpi=120)


def write(out_dir: Path, result: dict[str, Any]) -> None:
    """BENCHMARKS-text.json/.png, then the text section of BENCHMARKS.md (the rest of it kept)."""
    out_dir = Path(out_dir)
    fmt.write_document(out_dir, {"BENCHMARKS-text.json": result, "BENCHMARKS-text.png": plot(result)})
    fmt.replace_section(out_dir / "BENCHMARKS.md", SECTION, markdown(result))

