"""The report of a sweep (edgepipe.engine.sweep): what a person tuning distillation looks at.

- ``sweep.md`` / ``sweep.json``: one row per trial (setting, seed, held-out and test metric, compute) and one per
  setting (mean and sample standard deviation over its seeds), the setting chosen on the held-out split, and that
  setting against the config's own (the default) on the test split, seed by seed (paired: same seed, same data order).
- ``convergence.png``: per epoch, the held-out metric and every loss component the stage logged (soft, hard,
  feature, TCKD/NCKD), one line per setting (mean over its seeds).
- ``heatmap.png``: the mean held-out metric over the first two swept fields (the best over any further fields).

It reads the trials' records only; nothing here trains or measures.
"""
from __future__ import annotations

import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepipe.host import host_cpu, host_isa
from edgepipe.reporting import formatting as fmt
from edgepipe.tasks.metric import Metric

COMPONENTS = ("loss", "soft", "hard", "feature", "tckd", "nckd", "unlabeled", "pseudo_labeled")
SIGNIFICANCE = 0.05
"""A difference between two settings is established when its mean exceeds its seed spread and the paired t-test's
p-value is below this, at 3 or more seeds."""


def shown(value: Any) -> str:
    """A swept value as the tables show it: a list or mapping as compact JSON (``[]``, ``[{"arch": ...}]``)."""
    import json

    return str(value) if value is None or isinstance(value, (bool, int, float, str)) else \
        json.dumps(value, separators=(", ", ": "))


def label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={shown(v)}" for k, v in setting.items())


def _key(setting: dict[str, Any]) -> str:
    return repr(sorted(setting.items()))


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per setting: its completed seeds' mean and spread; the chosen setting (best mean held-out metric); the chosen
    setting against the default on the test split, paired by seed."""
    metric = Metric.from_record(result["metric"])
    done = [r for r in result["rows"] if r["state"] == "complete" and r["val"] is not None]
    settings: dict[str, dict[str, Any]] = {}
    for r in done:
        s = settings.setdefault(_key(r["setting"]), {"setting": r["setting"], "seeds": {}, "seconds": 0.0})
        s["seeds"][r["seed"]] = r
        s["seconds"] += r["seconds"] or 0.0
    table = []
    for s in settings.values():
        vals = [r["val"] for r in s["seeds"].values()]
        tests = [r["test"] for r in s["seeds"].values() if r["test"] is not None]
        table.append({"setting": s["setting"], "n": len(vals), "val_mean": statistics.mean(vals),
                      "val_sd": _spread(vals), "test_mean": statistics.mean(tests) if tests else None,
                      "test_sd": _spread(tests), "seconds": s["seconds"], "seeds": sorted(s["seeds"])})
    sign = 1 if metric.higher_is_better else -1
    # best first; on a tie the config's own setting first (no change without evidence), then the order given
    table.sort(key=lambda t: (-sign * t["val_mean"], t["setting"] != result["default"]))
    full = [t for t in table if t["n"] == max((t["n"] for t in table), default=0)]  # chosen among fully run settings
    chosen = full[0] if full else None
    default = next((t for t in table if t["setting"] == result["default"]), None)
    for t in table:  # every setting against the config's own on the test split, seed by seed
        t["vs_default"] = paired_gain(metric, settings[_key(t["setting"])]["seeds"],
                                      settings[_key(default["setting"])]["seeds"]) if default is not None else None
    versus = None
    if chosen is not None and default is not None:
        a, b = settings[_key(chosen["setting"])]["seeds"], settings[_key(default["setting"])]["seeds"]
        pairs = [(seed, a[seed]["test"], b[seed]["test"]) for seed in sorted(set(a) & set(b))
                 if a[seed]["test"] is not None and b[seed]["test"] is not None]
        gains = [metric.gain_points(d, c) for _, c, d in pairs]
        mean, sd = (statistics.mean(gains), _spread(gains)) if gains else (None, None)
        p_value = _t_test(gains)
        if chosen is default:
            reading = "the config's own setting is the best on the held-out split: nothing to change"
        elif mean is None:
            reading = "no seed of both settings has a test figure"
        elif len(gains) < 3:
            reading = (f"{mean:+.2f} pts on the test split at {len(gains)} seed(s): run --seeds 3 or more to state it "
                       "against its spread")
        elif abs(mean) > sd and p_value < SIGNIFICANCE:
            reading = (f"{mean:+.2f} pts on the test split (mean of {len(gains)} paired seeds), beyond its seed spread "
                       f"({sd:.2f} pts) with paired t-test p = {p_value:.2g}: "
                       f"{'confirmed' if mean > 0 else 'the held-out choice does not carry to test'}")
        else:
            reading = (f"{mean:+.2f} pts on the test split (mean of {len(gains)} paired seeds, sample standard deviation "
                       f"{sd:.2f} pts, paired t-test p = {p_value:.2g}): not established either way")
        versus = {"pairs": [{"seed": s, "chosen": c, "default": d} for s, c, d in pairs], "gain_mean_points": mean,
                  "gain_sd_points": sd, "paired_t_p": p_value, "reading": reading, "chosen_is_default": chosen is default}
    return {"settings": table, "chosen": chosen, "default": default, "versus_default": versus,
            "pruned": sum(r["state"] == "pruned" for r in result["rows"]), "completed": len(done)}


def paired_gain(metric: Metric, a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """``a`` against ``b`` on the test split at the seeds both ran: the mean per-seed gain (points), its sample
    standard deviation, and whether it exceeds that spread at 3 or more seeds (the only case called a difference)."""
    gains = [metric.gain_points(b[s]["test"], a[s]["test"]) for s in sorted(set(a) & set(b))
             if a[s]["test"] is not None and b[s]["test"] is not None]
    if not gains:
        return None
    mean, sd = statistics.mean(gains), _spread(gains)
    p = _t_test(gains)
    return {"n": len(gains), "mean_points": mean, "sd_points": sd, "paired_t_p": p,
            "established": bool(len(gains) >= 3 and sd is not None and abs(mean) > sd and p is not None
                                and p < SIGNIFICANCE)}


def _t_test(gains: list[float]) -> float | None:
    """The paired t-test's two-sided p-value (per-seed differences against 0; scipy), at 3 or more seeds."""
    if len(gains) < 3:
        return None
    if not any(gains) or statistics.stdev(gains) == 0:
        return 0.0 if any(gains) else 1.0
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(gains, 0.0).pvalue)


def _vs_cell(v: dict[str, Any] | None, is_default: bool) -> str:
    if is_default:
        return "(the config's own)"
    if v is None:
        return "—"
    spread = f" ± {v['sd_points']:.2f}" if v["sd_points"] is not None else ""
    verdict = (f"{v['n']} seed(s): no verdict" if v["n"] < 3 else
               f"{'established' if v['established'] else 'not established'}, p = {v['paired_t_p']:.2g}")
    return f"{v['mean_points']:+.2f}{spread} pts ({verdict})"


def markdown(result: dict[str, Any], summary: dict[str, Any], level: int = 1, images: str = "") -> str:
    """The report; ``level`` of its title (2 inside BENCHMARKS.md), ``images`` prefixed to the plots' file names."""
    metric = Metric.from_record(result["metric"])
    h1, h2 = "#" * level, "#" * (level + 1)
    fields = list(result["fields"])
    held = result.get("held_out") or {}
    lines = [f"{h1} Sweep `{result['study']}`" + (f": {result['title']}" if result.get("title") else ""), "",
             f"Command: `{result['command']}`  ", f"Date: {result['date']}  ",
             f"Host: {result['host']['cpu']} ({', '.join(result['host']['isa']) or 'no AVX-512/AMX'}); every figure "
             f"is the {metric.label} of the stage `{result['stages'][-1]}` in its own runtime ("
             f"{', '.join(sorted({r['runtime'] for r in result['rows'] if r.get('runtime')})) or '?'}).  ",
             f"Choices: on {held.get('images', '?')} images held out from training (data.val_from_train, stratified, "
             f"draw seed {held.get('seed', '?')}); test: the validation split, reported only.  ",
             f"Trials: {summary['completed']} completed, {summary['pruned']} pruned; sampler {result['sampler']}; "
             f"stages run per trial: {', '.join(result['stages'])} (shared: {', '.join(result['shared']) or 'none'}); "
             f"Optuna storage `{result['storage']}`. Compute: each trial's own stage and measurement time (the first "
             "trial at a seed computes the teacher's logits the later ones reuse from the cache)."
             + (f"  \nSet in every trial: {', '.join(f'{k}={shown(v)}' for k, v in result['fixed'].items())}."
                if result.get("fixed") else ""), ""]
    chosen, versus = summary["chosen"], summary["versus_default"]
    if chosen:
        lines += [f"**Chosen on the held-out split: {label(chosen['setting'])}** — held-out "
                  f"{_pm(metric, chosen['val_mean'], chosen['val_sd'])}, test {_pm(metric, chosen['test_mean'], chosen['test_sd'])} "
                  f"over {chosen['n']} seed(s).", ""]
    if versus:
        lines += [f"Against the config's own setting ({label(result['default'])}): {versus['reading']}.", ""]
    elif chosen:
        lines += [f"The config's own setting ({label(result['default'])}) is not on the grid: add its values to "
                  "compare the choice with it.", ""]
    lines += [f"{h2} Settings (mean ± sample standard deviation over seeds)", "",
              fmt.md_table([*[f.split(".")[-1] for f in fields], "seeds", f"held-out {metric.label}",
                            f"test {metric.label}", "test vs the config's own (paired by seed)", "compute"],
                           [[*[shown(t["setting"].get(f)) for f in fields], t["n"],
                             _pm(metric, t["val_mean"], t["val_sd"]),
                             _pm(metric, t["test_mean"], t["test_sd"]),
                             _vs_cell(t.get("vs_default"), t["setting"] == result["default"]), fmt.seconds(t["seconds"])]
                            for t in summary["settings"]], align=["r"] * (len(fields) + 5)),
              "", f"{h2} Trials", "",
              fmt.md_table(["#", *[f.split(".")[-1] for f in fields], "seed", "state", f"held-out {metric.label}",
                            f"test {metric.label}", "compute"],
                           [[r["number"], *[shown(r["setting"].get(f)) for f in fields], r["seed"], r["state"],
                             metric.shown(r["val"]), metric.shown(r["test"]), fmt.seconds(r["seconds"])]
                            for r in sorted(result["rows"], key=lambda r: r["number"])],
                           align=["r"] * (len(fields) + 6)),
              "", f"![convergence]({images}convergence.png)", ""]
    if len(fields) >= 2:
        lines += [f"![heatmap]({images}heatmap.png)", ""]
    return "\n".join(lines)


def _pm(metric: Metric, mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "—"
    return metric.shown(mean) + (f" ± {sd * metric.scale:.2f}" if sd is not None else "")


def convergence(result: dict[str, Any], summary: dict[str, Any]) -> bytes | str:
    """Per epoch: the held-out metric and each logged loss component, one line per setting (mean over its seeds)."""
    from matplotlib.ticker import MaxNLocator

    metric = Metric.from_record(result["metric"])
    val_key = f"val_{metric.name}"
    by_setting: dict[str, list[list[dict[str, Any]]]] = {}
    for r in result["rows"]:
        if r["state"] == "complete" and r["history"]:
            by_setting.setdefault(label(r["setting"]), []).append(r["history"])
    if not by_setting:
        return "no completed trial recorded a per-epoch history"
    present = [c for c in COMPONENTS if any(c in row for hs in by_setting.values() for h in hs for row in h)]
    style = _line_styles(result)
    panels = [val_key, *present]
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = fmt.new_figure(4.2 * cols, 3.2 * rows)
    for i, key in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, histories in sorted(by_setting.items()):
            epochs = min(len(h) for h in histories)
            ys = [statistics.mean(h[e][key] for h in histories if key in h[e]) if all(key in h[e] for h in histories)
                  else float("nan") for e in range(epochs)]
            scale = metric.scale if key == val_key else 1.0
            ax.plot(range(1, epochs + 1), [y * scale for y in ys], marker=".", label=name, **style(name))
        ax.set_title(f"held-out {metric.label} ({metric.unit})" if key == val_key else
                     "total loss" if key == "loss" else f"{key} loss", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if labels:  # none when no setting's history reached an epoch of the plotted metric
        fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=min(4, len(labels)), frameon=False)
    fig.suptitle(f"Sweep {result['study']}: convergence per setting (mean over seeds)", fontsize=10)
    return fmt.png_bytes(fig)


def _line_styles(result: dict[str, Any]) -> Any:
    """A setting's line: its colour from the first swept field's value, its dash from the second's (so a 4 x 3 grid
    is 4 colours x 3 dashes, each line told apart), or one colour of 20 per setting for a single field."""
    from matplotlib import colormaps

    fields = list(result["fields"])
    dashes = ["-", "--", ":", "-."]
    settings = {label(r["setting"]): r["setting"] for r in result["rows"]}
    if len(fields) >= 2:
        firsts, seconds = result["fields"][fields[0]], result["fields"][fields[1]]
        colors = colormaps["tab10" if len(firsts) <= 10 else "tab20"]
        return lambda name: {"color": colors(firsts.index(settings[name][fields[0]]) % colors.N),
                             "linestyle": dashes[seconds.index(settings[name][fields[1]]) % len(dashes)]}
    order = sorted(settings)
    colors = colormaps["tab20"]
    return lambda name: {"color": colors(order.index(name) % colors.N)}


def heatmap(result: dict[str, Any], summary: dict[str, Any]) -> bytes | str:
    """The mean held-out metric over the first two swept fields (best over any others)."""
    fields = list(result["fields"])
    if len(fields) < 2:
        return "one field swept: the settings table is the whole picture"
    metric = Metric.from_record(result["metric"])
    fx, fy = fields[0], fields[1]
    xs, ys = result["fields"][fx], result["fields"][fy]
    better = max if metric.higher_is_better else min
    grid = [[None] * len(xs) for _ in ys]
    for t in summary["settings"]:
        i, j = ys.index(t["setting"][fy]), xs.index(t["setting"][fx])
        grid[i][j] = t["val_mean"] if grid[i][j] is None else better(grid[i][j], t["val_mean"])
    import numpy as np

    values = np.array([[np.nan if v is None else v * metric.scale for v in row] for row in grid])
    fig = fmt.new_figure(1.3 * len(xs) + 2.5, 0.8 * len(ys) + 1.8)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="viridis" if metric.higher_is_better else "viridis_r", aspect="auto")
    ax.set_xticks(range(len(xs)), [shown(x) for x in xs])
    ax.set_yticks(range(len(ys)), [shown(y) for y in ys])
    ax.set_xlabel(fx)
    ax.set_ylabel(fy)
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] < mid else "black")
    fig.colorbar(im, ax=ax, label=f"held-out {metric.label} ({metric.unit}), mean over seeds")
    ax.set_title(f"Sweep {result['study']}" + (" (best over the other fields)" if len(fields) > 2 else ""),
                 fontsize=10)
    return fmt.png_bytes(fig)


def write_report(result: dict[str, Any], out_dir: Path, command: str, into: Path | None = None,
                 title: str | None = None) -> dict[str, Any]:
    """sweep.md/.json, convergence.png and heatmap.png in ``out_dir``; with ``into`` (e.g. BENCHMARKS.md) also the
    report as its section ``sweep-<study>`` (other sections kept) and the plots beside it as
    ``<stem>-sweep-<study>-*.png``. Returns the summary."""
    result = {**result, "command": command, "title": title,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "host": {"cpu": host_cpu(), "isa": list(host_isa())}}
    summary = summarize(result)
    plots = {"convergence.png": convergence(result, summary), "heatmap.png": heatmap(result, summary)}
    files: dict[str, Any] = {name: data for name, data in plots.items() if isinstance(data, bytes)}
    files["sweep.json"] = {**result, "summary": summary,
                           "plots_not_drawn": {k: v for k, v in plots.items() if isinstance(v, str)}}
    files["sweep.md"] = markdown(result, summary)
    fmt.write_document(Path(out_dir), files)
    if into is not None:
        into = Path(into)
        prefix = f"{into.stem}-sweep-{result['study']}-"
        fmt.write_document(into.parent, {prefix + name: data for name, data in plots.items() if isinstance(data, bytes)})
        fmt.replace_section(into, f"sweep-{result['study']}", markdown(result, summary, level=2, images=prefix))
    return summary
