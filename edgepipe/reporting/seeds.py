"""A KD gain stated over seeds, as both benchmarks (``edgepipe compare``, classification and detection) state it.

The distill stage with the teacher (``distilled``) and without it (alpha = beta = 0: ``scratch-same-init``, the same
initialisation, data order, epochs and optimizer) at each seed: the config's seed is the pipeline's own distill stage
and the scratch-same-init row, each further seed two runs derived from the pipeline's (``seed_baselines``), cached
and resumed like every row. Each figure is the stage's last-epoch validation metric in PyTorch (``val_<metric>`` of
its history: the held-out split where data.val_from_train carves one), what the stage hands on; a baseline measures
only its last stage, so a row that goes on to export has no measured figures of its distill stage.
"""
from __future__ import annotations

import statistics
from typing import Any

from edgepipe.config import PipelineConfig
from edgepipe.engine.baselines import Baseline
from edgepipe.engine.run import Run
from edgepipe.errors import EdgepipeError
from edgepipe.reporting import formatting as fmt
from edgepipe.tasks.metric import Metric

LABELS_ONLY = {"distill.alpha": 0.0, "distill.beta": 0.0}


def seed_baselines(config: PipelineConfig, seeds: int) -> list[Baseline]:
    """The distill stage with and without the teacher at each further seed."""
    out = []
    for seed in range(config.seed + 1, config.seed + seeds):
        out += [Baseline(f"distilled-seed{seed}", "pipeline", ("teacher",), ("distill",),
                         f"distill stage at seed {seed}", {"seed": seed}),
                Baseline(f"scratch-same-init-seed{seed}", "pipeline", ("teacher",), ("distill",),
                         f"distill stage at seed {seed}, labels only", {"seed": seed, **LABELS_ONLY})]
    return out


def seed_rows(config: PipelineConfig, runs: dict[str, Run], seeds: int, metric: str) -> list[dict[str, Any]]:
    """Per seed: the distill stage's ``metric`` with the teacher and without, and the gain."""
    def score(run: Run) -> float:
        history = (run.metrics_of("distill").get("records") or {}).get("history") or []
        if not history or history[-1].get(f"val_{metric}") is None:
            raise EdgepipeError(f"{run.root / 'distill'}: no validation {metric} in its history; rerun `edgepipe "
                                "compare`")
        return float(history[-1][f"val_{metric}"])

    out = []
    for seed in range(config.seed, config.seed + seeds):
        kd = runs["pipeline"] if seed == config.seed else runs[f"distilled-seed{seed}"]
        plain = runs["scratch-same-init"] if seed == config.seed else runs[f"scratch-same-init-seed{seed}"]
        out.append({"seed": seed, "distilled": score(kd), "scratch_same_init": score(plain),
                    "gain": score(kd) - score(plain)})
    return out


def reading(seeds: list[dict[str, Any]]) -> str:
    """What the seeds allow one to say, from their figures: a gain smaller than its spread is not established, and
    the spread of each row says where the variation comes from."""
    if len(seeds) < 2:
        return ""
    gains = [s["gain"] for s in seeds]
    mean, sd = statistics.mean(gains), statistics.stdev(gains)
    spread = {row: statistics.stdev([s[row] for s in seeds]) for row in ("distilled", "scratch_same_init")}
    verdict = (f"The mean gain is smaller than its seed spread ({100 * abs(mean):.2f} < {100 * sd:.2f} pts): "
               "these seeds do not establish a KD gain either way" if abs(mean) < sd else
               f"The mean gain exceeds its seed spread ({100 * abs(mean):.2f} > {100 * sd:.2f} pts)")
    return (f"{verdict}. Across seeds, `distilled` varies by {100 * spread['distilled']:.2f} pts (sample standard "
            f"deviation) and `scratch-same-init` by {100 * spread['scratch_same_init']:.2f} pts.")


def section(seeds: list[dict[str, Any]], metric: Metric, split: str, heading: str = "###") -> list[str]:
    """The KD gain over seeds as Markdown lines: one row per seed, the mean, range and spread, and the reading."""
    gains = [s["gain"] for s in seeds]
    return ["", f"{heading} KD gain over seeds", "",
            "The distill stage with the teacher (`distilled`) and without it (alpha = beta = 0: `scratch-same-init`, "
            "the same initialisation, data order, epochs and optimizer), at each seed, "
            f"{metric.label} of the PyTorch model on {split}:", "",
            fmt.md_table(["seed", "distilled", "scratch-same-init", "KD gain"],
                         [[s["seed"], fmt.pct(s["distilled"]), fmt.pct(s["scratch_same_init"]),
                           f"{100 * s['gain']:+.2f} pts"] for s in seeds], align=list("rrrr"), markup=True),
            "", f"Mean gain {100 * statistics.mean(gains):+.2f} pts, range {100 * min(gains):+.2f} .. "
                f"{100 * max(gains):+.2f} pts" + (f", sample standard deviation {100 * statistics.stdev(gains):.2f} pts"
                                                  if len(gains) > 1 else "") + ". " + reading(seeds)]
