"""The run report's plots: accuracy vs latency, distillation losses, channels per layer, per-class top-1
and latency-constrained pruning. Each reads the stage table rows and the stages' metrics (never measures
anything) and returns PNG bytes, or the reason it has nothing to draw, which the report shows instead.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgepipe.reporting import formatting as fmt

Stages = list[tuple[dict[str, Any], dict[str, Any]]]


def value_at(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _plot_accuracy_latency(rows: list[dict[str, Any]]) -> bytes | str:
    points = [r for r in rows if r["score"] is not None and r["p50_ms"] is not None and r["p50_ms"] > 0]
    if not points:
        return "no stage recorded both its metric and a batch-1 latency"
    metric = points[0]["metric"]
    fig = fmt.new_figure()
    ax = fig.add_subplot()
    ax.scatter([r["p50_ms"] for r in points], [metric.scale * r["score"] for r in points], zorder=3)
    ax.margins(x=0.2, y=0.3)  # room for the labels at the edges
    # Stages often share an accuracy; stagger labels above and below the points so they stay readable.
    for i, r in enumerate(sorted(points, key=lambda r: r["p50_ms"])):
        ax.annotate(f"{r['stage']} ({r['latency'].get('backend', '?')} {r['latency'].get('dtype', '')})",
                    (r["p50_ms"], metric.scale * r["score"]), textcoords="offset points", fontsize=8,
                    xytext=(4, 6 + 12 * (i % 3)) if i % 2 == 0 else (4, -12 - 12 * (i % 3)),
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"})
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lats = [r["p50_ms"] for r in points]
    wide = max(lats) / min(lats) > 300  # 1-2-5 ticks crowd the axis beyond ~2.5 decades
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.3, y=0.15)  # room for the point labels
    ax.set_xlabel("batch-1 latency p50 (ms, log scale, each stage in the target's runtime on this host)")
    ax.set_ylabel(f"{metric.label}" + (f" ({metric.unit})" if metric.unit else "")
                  + ("" if metric.higher_is_better else ", lower is better"))
    ax.set_title(f"{metric.label} vs latency per stage")
    ax.grid(True, which="both", alpha=0.3)
    return fmt.png_bytes(fig)


def _plot_distillation(stages: Stages) -> bytes | str:
    metrics = next((m for e, m in stages if e.get("name") == "distill"), None)
    if metrics is None:
        return "the run has no distill stage"
    history = [h for h in (value_at(metrics, "records", "history") or []) if isinstance(h, dict)]
    if not history:
        return f"the distill stage recorded no per-epoch history (status: {metrics.get('status', 'not run')})"
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig = fmt.new_figure()
    ax = fig.add_subplot()
    for key, label in (("soft", "soft (KL)"), ("hard", "hard (CE)"), ("feature", "feature (MSE)"), ("loss", "total")):
        values = [number(h.get(key)) for h in history]
        if any(v is not None for v in values):
            ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    from edgepipe.tasks.metric import Metric

    metric = Metric.from_record(metrics.get("metric"))
    top1 = [number(h.get(f"val_{metric.name}")) for h in history]
    handles, labels = ax.get_legend_handles_labels()
    if any(v is not None for v in top1):
        ax2 = ax.twinx()
        shown = f"val {metric.label}" + (f" ({metric.unit})" if metric.unit else "")
        ax2.plot(epochs, [float("nan") if v is None else metric.scale * v for v in top1], color="black", ls="--",
                 marker="s", label=shown)
        ax2.set_ylabel(shown)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=len(labels))
    ax.set_title("Distillation loss components per epoch")
    return fmt.png_bytes(fig)


def _plot_channels(stages: Stages) -> bytes | str:
    metrics = next((m for e, m in stages if e.get("name") == "prune"), None)
    if metrics is None:
        return "the run has no prune stage"
    channels = value_at(metrics, "records", "channels")
    pairs = {name: (number(v[0]), number(v[1])) for name, v in (channels.items() if isinstance(channels, dict) else ())
             if isinstance(v, list | tuple) and len(v) == 2}
    pairs = {name: v for name, v in pairs.items() if None not in v}
    if not pairs:
        return f"the prune stage recorded no per-layer channel counts (status: {metrics.get('status', 'not run')})"
    names = list(pairs)
    before = [pairs[n][0] for n in names]
    after = [pairs[n][1] for n in names]
    xs = range(len(names))
    fig = fmt.new_figure(width=max(6.0, 0.3 * len(names) + 2), height=4.5)
    ax = fig.add_subplot()
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before pruning")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after pruning")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("Channels per layer before and after pruning")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return fmt.png_bytes(fig)


def _plot_prune_latency(stages: Stages) -> bytes | str:
    """Latency-constrained pruning: every candidate's batch-1 latency against its MACs, with the budget."""
    metrics = next((m for e, m in stages if e.get("name") == "prune"), None)
    lat = value_at(metrics, "records", "latency")
    if not isinstance(lat, dict) or not lat.get("measurements"):
        return "the prune stage did not prune to a latency budget (prune.target is not latency)"
    points = [(100 * p["macs_ratio"], p["p50_ms"]) for p in lat["measurements"]]
    fig = fmt.new_figure()
    ax = fig.add_subplot()
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label="candidate p50, batch 1")
    ax.axhline(lat["budget_ms"], color="tab:red", ls="--", label=f"budget {fmt.ms(lat['budget_ms'])} ms")
    ax.invert_xaxis()
    estimate = " — ESTIMATE (roofline), not measured" if lat.get("kind") == "estimate" else ""
    ax.set_xlabel("MACs (% of the unpruned student)")
    ax.set_ylabel(f"latency (ms) on {lat.get('measured_on', '?')}{estimate}")
    ax.set_title("Latency-constrained pruning, step by step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fmt.png_bytes(fig)


def _plot_per_class(stages: Stages) -> bytes | str:
    """Top-1 per class of the teacher, the distilled student and the last measured stage, side by side."""
    measured = [(e.get("name"), value_at(m, "accuracy", "per_class")) for e, m in stages]
    measured = [(n, pc) for n, pc in measured if isinstance(pc, dict) and pc]
    if not measured:
        return "no stage recorded per-class top-1"
    chosen = {n: pc for n, pc in measured if n in ("teacher", "distill")}
    chosen.setdefault(*measured[-1])
    classes = list(next(iter(chosen.values())))
    fig = fmt.new_figure(width=max(6.0, 0.45 * len(classes) + 2), height=4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(chosen)
    for i, (name, pc) in enumerate(chosen.items()):
        ax.bar([x + (i - (len(chosen) - 1) / 2) * width for x in range(len(classes))],
               [100 * (pc.get(c) or 0.0) for c in classes], width=width, label=name)
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0, fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Top-1 per class")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return fmt.png_bytes(fig)


def _plot_sensitivity(stages: Stages) -> bytes | str:
    """The QAT stage's per-layer INT8 sensitivity (qat.max_drop): top-1 drop with each layer quantized alone,
    in network order, the layers kept in float marked."""
    metrics = next((m for e, m in stages if e.get("name") == "qat"), None)
    mix = value_at(metrics, "records", "mixed_precision")
    if not isinstance(mix, dict) or not mix.get("sensitivity"):
        return "the qat stage had no accuracy budget (qat.max_drop), so no per-layer sensitivity was measured"
    rows = sorted(mix["sensitivity"], key=lambda r: r.get("index", 0))
    kept = set(mix.get("float_layers") or [])
    fig = fmt.new_figure(width=max(6.0, 0.22 * len(rows) + 2), height=4.2)
    ax = fig.add_subplot()
    colors = ["tab:orange" if r["layer"] in kept else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r["top1_drop_points"] for r in rows], color=colors)
    ax.axhline(mix["max_drop_points"], color="tab:red", ls="--", lw=1,
               label=f"budget for the whole model: {mix['max_drop_points']:g} points")
    from matplotlib.patches import Patch  # legend entries even when a group is empty (an empty bar() has no patch)

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color="tab:blue", label=f"INT8 ({len(rows) - len(kept)})"),
                Patch(color="tab:orange", label=f"kept in {mix.get('fallback_dtype', 'float')} ({len(kept)})")]
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=90, fontsize=6 if len(rows) > 30 else 8)
    ax.set_ylabel("top-1 drop (points) with only this layer INT8")
    ax.set_title(f"INT8 sensitivity per layer, on {mix.get('images', '?')} {mix.get('measured_on', '')} images")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    return fmt.png_bytes(fig)


PLOTS: tuple[tuple[str, str], ...] = (
    ("accuracy_vs_latency.png", "Top-1 vs batch-1 latency (log scale) for every stage"),
    ("distillation_losses.png", "Distillation loss components per epoch, with validation top-1"),
    ("pruning_channels.png", "Channels per layer before and after pruning"),
    ("per_class_top1.png", "Top-1 per class: teacher, distilled student and the last stage"),
    ("prune_latency.png", "Batch-1 latency of each pruning candidate against its MACs, with the budget"),
    ("int8_sensitivity.png", "Top-1 drop per layer with only that layer INT8, and the layers kept in float"),
    ("detections.png", "Validation images: the ground truth and each stage's detections (score >= 0.3)"),
)


def _plot_detections(stages: Stages, examples: Callable[[], Any] | None) -> bytes | str:
    """A few validation images (one per column): the ground truth in the first row, then each measured stage's
    detections (its ``accuracy.examples``), labelled with class and score."""
    measured = [(e.get("name"), value_at(m, "accuracy", "examples")) for e, m in stages]
    measured = [(n, ex) for n, ex in measured if isinstance(ex, list) and ex]
    if not measured:
        return "no stage recorded detections (a detection run records them when it is measured)"
    if examples is None:
        return "the run's validation images are not readable here"
    loaded = examples()
    if isinstance(loaded, str):
        return loaded
    images, truth, names = loaded
    cols = min(len(images), len(measured[0][1]))
    rows = [("ground truth", [{"boxes": t["boxes"], "labels": t["labels"], "scores": None} for t in truth])]
    rows += measured
    fig = fmt.new_figure(width=2.4 * cols + 0.6, height=2.4 * len(rows) + 0.3)
    for r, (title, found) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            image = images[c]
            ax.imshow(image.transpose(1, 2, 0) if image.shape[0] in (1, 3) else image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=9)
            d = found[c] if c < len(found) else {"boxes": [], "labels": [], "scores": None}
            scores = d.get("scores") or [None] * len(d["boxes"])
            for (x1, y1, x2, y2), label, score in zip(d["boxes"], d["labels"], scores):
                color = "lime" if score is None else "red"
                ax.add_patch(fmt.rectangle((x1, y1), x2 - x1, y2 - y1, color))
                text = names[int(label)] if 0 <= int(label) < len(names) else str(label)
                ax.text(x1, y1, text if score is None else f"{text} {score:.2f}", color=color, fontsize=6,
                        va="bottom")
    return fmt.png_bytes(fig)


def make_plots(rows: list[dict[str, Any]], stages: Stages, examples: Callable[[], Any] | None = None,
               ) -> list[tuple[str, str, bytes | None, str | None]]:
    """(file name, caption, PNG bytes or None, why it was skipped or None) for every plot in ``PLOTS``;
    ``examples`` gives the validation images the detection pictures draw on (images, ground truth, class names)."""
    makers: list[Callable[[], bytes | str]] = [lambda: _plot_accuracy_latency(rows), lambda: _plot_distillation(stages),
                                               lambda: _plot_channels(stages), lambda: _plot_per_class(stages),
                                               lambda: _plot_prune_latency(stages), lambda: _plot_sensitivity(stages),
                                               lambda: _plot_detections(stages, examples)]
    out = []
    for (name, caption), make in zip(PLOTS, makers):
        result = make()
        out.append((name, caption, result, None) if isinstance(result, bytes) else (name, caption, None, result))
    return out
