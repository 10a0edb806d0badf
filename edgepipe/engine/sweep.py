"""`edgepipe sweep`: a study over config fields, each trial a run the engine derives from the base run.

``--set distill.temperature=1,2,4,8 --set distill.alpha=0.5,0.9 --seeds 3`` is a grid of 4 x 2 settings x 3 seeds; a
field given one value (``--set distill.loss=dkd``) is set in every trial, not a dimension. Optuna (https://optuna.org) holds the study: its samplers (``grid``: every point once; ``tpe``: ``--trials`` draws
from the same values), its pruners (``--prune-trials``: Optuna's MedianPruner stops a trial whose validation metric
after an epoch is below the median of earlier trials at that epoch) and its storage, so several processes, or
machines that share the run folder, can work on one study: each runs the same command with the same ``--storage``
database URL and takes grid points the others have not (Optuna's GridSampler; a point two workers draw at once runs
once, the second waits on the trial's run lock and reuses it).

Each trial is a run derived from the base run (``Run.derive``) in ``<run>/sweeps/trials/<setting>``: it shares the
stages no swept field decides (the teacher always, so it trains once, and its cached logits serve every trial) and
executes the rest, cached and resumable like any run; a second invocation reuses every finished trial. Choices are
made on the split data.val_from_train holds out (required: a sweep must not choose on the split it reports), the
test figure is the same stage's metric on the validation split, reported beside it. The report (table, convergence
plots, heatmap, the chosen setting against the config's own) is edgepipe.reporting.sweep_report.
"""
from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import yaml

from edgepipe.config import PipelineConfig
from edgepipe.engine.baselines import Baseline, baseline_run, derived_config, own_seconds
from edgepipe.engine.pipeline import Progress, run_pipeline
from edgepipe.engine.run import Run
from edgepipe.engine.stage import load_stage
from edgepipe.errors import EdgepipeError
from edgepipe.io import run_lock
from edgepipe.tasks import task_of

log = logging.getLogger(__name__)
TRIALS = "sweeps/trials"


@dataclass(frozen=True)
class Space:
    """The swept fields (dotted config keys) and their values, in the order given; ``seeds`` run seeds."""

    fields: dict[str, list[Any]]
    seeds: list[int]

    @property
    def swept(self) -> dict[str, list[Any]]:
        """The fields given two or more values (the study's dimensions, with the seed)."""
        return {k: v for k, v in self.fields.items() if len(v) > 1}

    @property
    def fixed(self) -> dict[str, Any]:
        """The fields given one value: set in every trial (part of its folder name), not a dimension."""
        return {k: v[0] for k, v in self.fields.items() if len(v) == 1}

    @property
    def grid(self) -> list[dict[str, Any]]:
        """Every setting (without the seed), in the order the values were given."""
        names = list(self.fields)
        return [dict(zip(names, combo)) for combo in itertools.product(*self.fields.values())]

    def size(self) -> int:
        return len(self.grid) * len(self.seeds)


def parse_sets(items: list[str]) -> dict[str, list[Any]]:
    """``["distill.temperature=1,2,4"]`` -> ``{"distill.temperature": [1, 2, 4]}`` (each value read as YAML, so
    numbers, booleans and names keep their types)."""
    fields: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not name or not values.strip():
            raise EdgepipeError(f"--set {item!r}: expected FIELD=V1,V2,... (e.g. distill.temperature=1,2,4,8)")
        if name in fields:
            raise EdgepipeError(f"--set {name}: given twice; list all its values in one --set")
        if name == "seed":
            raise EdgepipeError("--set seed: the run seed is swept with --seeds N (seeds seed .. seed+N-1)")
        parsed = []
        for v in top_level_split(values):
            try:
                parsed.append(yaml.safe_load(v.strip()))
            except yaml.YAMLError:
                raise EdgepipeError(f"--set {name}: value {v.strip()!r} is not a YAML value") from None
        if len(set(map(repr, parsed))) != len(parsed):
            raise EdgepipeError(f"--set {name}: a value is listed twice ({values})")
        fields[name] = parsed
    if not fields:
        raise EdgepipeError("sweep needs at least one --set FIELD=V1,V2,...")
    return fields


def top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and braces, so a value may be a YAML list or mapping:
    ``[],[{arch: cifar_resnet, kwargs: {depth: 20}}]`` is two values."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def encoded(value: Any) -> Any:
    """A value as Optuna stores a categorical choice (None, bool, int, float or str): a list or mapping as its JSON."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


def decoded(value: Any, choices: list[Any]) -> Any:
    return next(c for c in choices if encoded(c) == value)


def stages_of(config: PipelineConfig, space: Space, order: tuple[str, ...], until: str | None = None,
              ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(shared, own): the stages every trial takes from the base run and those it executes. A trial runs from the
    first stage a swept field (or, with several seeds, the seed) decides through the first stage that reads each
    field (distill.* and data.* stop at distill, prune.* at prune), or through ``until``; every figure is that last
    stage's. The teacher is always shared (trained once); a field only the teacher reads is refused."""
    def reading(section: str) -> list[int]:
        return [i for i, s in enumerate(order) if s != "teacher" and section in load_stage(s).SECTIONS]
    firsts = {}
    for name in space.fields:
        found = reading(name.split(".")[0])
        if not found:
            raise EdgepipeError(f"--set {name}: no stage after the teacher reads {name.split('.')[0]}; a sweep shares "
                                "the teacher across trials (sweep its settings with one `edgepipe run` per setting)")
        firsts[name] = found[0]
    first = min([*firsts.values(), *(reading("seed")[:1] if len(space.seeds) > 1 else [])])
    last = max(firsts.values())
    if until is not None:
        if until not in order:
            raise EdgepipeError(f"--until {until}: not a stage of this run ({', '.join(order)})")
        if order.index(until) < last:
            late = max(firsts, key=firsts.get)
            raise EdgepipeError(f"--until {until}: {late} is first read by the {order[last]} stage, after {until}; "
                                f"give --until {order[last]} or a later stage")
        last = order.index(until)
    return order[:first], order[first:last + 1]


def check_space(config: PipelineConfig, space: Space) -> None:
    """Every setting is a valid config (one line naming the field otherwise), and choices can be held out."""
    dumped = config.model_dump(mode="json")
    teacher = [name for name in space.fields if name.split(".")[0] == "teacher"]
    if teacher:
        raise EdgepipeError(f"--set {teacher[0]}: every trial shares the base run's teacher, so a teacher field cannot "
                            "vary or be set per sweep; give the teacher in the config (a base run of its own, --run)")
    for name in space.fields:
        node: Any = dumped
        for key in name.split("."):
            if not isinstance(node, dict) or key not in node:
                raise EdgepipeError(f"--set {name}: no such config field ('{key}' not found); name a field of the "
                                    "config, e.g. distill.temperature")
            node = node[key]
    for setting in space.grid:
        derived_config(config, setting)
    if config.data.val_from_train is None:
        raise EdgepipeError("data.val_from_train is not set: a sweep would choose on the split it reports; set "
                            "data.val_from_train (e.g. 0.1) in the config so choices are made on held-out training "
                            "images")


def trial_name(setting: dict[str, Any], seed: int) -> str:
    """A folder name for one setting at one seed (readable, filesystem-safe, stable across invocations; a long one is
    cut and given a digest of the whole)."""
    import hashlib

    parts = [f"{k}={encoded(v)}" for k, v in setting.items()] + [f"seed={seed}"]
    name = re.sub(r"[^A-Za-z0-9_.=+-]", "_", ",".join(parts))
    if len(name) > 120:
        name = name[:100] + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def run_trial(base: Run, setting: dict[str, Any], seed: int, shared: tuple[str, ...], own: tuple[str, ...],
              progress: Progress) -> Run:
    """One setting at one seed: a derived run, executed (or reused) by the engine under its own lock."""
    name = trial_name(setting, seed)
    root = base.root / TRIALS / name
    root.mkdir(parents=True, exist_ok=True)
    b = Baseline(name, "pipeline", shared, own, "sweep trial", {**setting, "seed": seed})
    with run_lock(root, wait=True):  # another worker of the study may be running this very trial: reuse it after
        return baseline_run({"pipeline": base}, b, progress, folder=TRIALS)


def trial_record(run: Run, last: str, metric: str) -> dict[str, Any]:
    """What the report reads from a finished trial: the choice and test metric of its last stage, the per-epoch
    history of its first training stage (every loss component, the held-out metric) and its compute (with its
    teacher assistants' training, distill.assistants)."""
    m = run.metrics_of(last)
    acc = m.get("accuracy") or {}
    history = next((h for h in ((run.metrics_of(s).get("records") or {}).get("history")
                                for s in run.own_stages()) if h), None)
    # a teacher-assistant chain's steps are runs of their own inside the trial's folder: their compute is the trial's
    steps = [Run.open(d) for d in sorted((run.root / "assistants").glob("*")) if (d / "manifest.json").exists()]
    return {"folder": str(run.root), "val": (acc.get("choice") or {}).get(metric), "test": acc.get(metric),
            "seconds": own_seconds(run) + sum(own_seconds(step) for step in steps), "history": history or [],
            "runtime": f"{acc.get('backend', '?')} {acc.get('dtype', '?')}"}


def sweep(base: Run, space: Space, study_name: str, storage: str | None, sampler: str, trials: int | None,
          prune: bool, progress: Progress | None = None, until: str | None = None) -> dict[str, Any]:
    """Run the study (resuming an earlier one in the same storage) and return every finished trial's record."""
    import optuna

    progress = progress or (lambda *a: None)
    config = base.config
    check_space(config, space)
    shared, own = stages_of(config, space, base.order, until)
    task = task_of(config)
    metric = task.headline
    with run_lock(base.root, wait=True):  # the shared stages, once (other workers of the study wait, then reuse them)
        run_pipeline(base, stages=list(shared), progress=progress)
    folder = base.root / "sweeps" / study_name
    folder.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    space_with_seed = {**{k: [encoded(v) for v in vs] for k, vs in space.swept.items()}, "seed": space.seeds}
    if sampler == "grid":
        chosen = optuna.samplers.GridSampler(space_with_seed, seed=0)
        n_trials = space.size()
    else:
        chosen = optuna.samplers.TPESampler(seed=0)
        n_trials = trials or space.size()
    pruner = optuna.pruners.MedianPruner(n_startup_trials=len(space.seeds), n_warmup_steps=1) if prune \
        else optuna.pruners.NopPruner()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=chosen, pruner=pruner,
                                direction="maximize" if metric.higher_is_better else "minimize", load_if_exists=True)

    for t in study.trials[:1]:  # Optuna fixes a study's values at its first trial
        if {k: list(d.choices) for k, d in t.distributions.items()} != space_with_seed:
            raise EdgepipeError(f"--study {study_name}: that study (in {storage}) sweeps other values "
                                f"({', '.join(f'{k}={list(d.choices)}' for k, d in t.distributions.items())}); give "
                                "another --study name (finished trials of the same setting are reused)")

    def objective(trial: optuna.Trial) -> float:
        setting = {**space.fixed, **{k: decoded(trial.suggest_categorical(k, space_with_seed[k]), v)
                                     for k, v in space.swept.items()}}
        seed = trial.suggest_categorical("seed", space.seeds)
        trial.set_user_attr("trial_folder", trial_name(setting, seed))
        epoch_label = f"{own[-1]} validation" if own else ""

        def report(label: str, i: int, n: int, values: dict[str, float]) -> None:
            if prune and label.endswith(" validation") and label == epoch_label and values:
                trial.report(next(iter(values.values())), i)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {i}: below the median of earlier trials")
            progress(f"trial {trial.number + 1}/{n_trials} {label}", i, n, values)
        run = run_trial(base, setting, seed, shared, own, report)
        rec = trial_record(run, own[-1], metric.name)
        for key in ("val", "test", "seconds"):
            trial.set_user_attr(key, rec[key])
        if rec["val"] is None:
            raise EdgepipeError(f"{run.root}: stage {own[-1]} has no held-out figure (accuracy.choice)")
        return rec["val"]

    if sampler == "grid":
        # Every grid point without a finished trial is queued explicitly: Optuna's GridSampler counts a failed or
        # interrupted trial (Ctrl-C, a killed worker) as visited, and the sweep must resume it (from its checkpoint).
        finished = {_point(t.params) for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")}
        waiting = {_point(t.params) for t in study.trials if t.state.name == "WAITING"}
        points = [{**dict(zip(space.swept, combo)), "seed": seed}
                  for combo in itertools.product(*(space_with_seed[k] for k in space.swept)) for seed in space.seeds]
        missing = [p for p in points if _point(p) not in finished]
        for p in missing:
            if _point(p) not in waiting:
                study.enqueue_trial(p)
        remaining = len(missing)
    else:
        remaining = max(0, n_trials - len(study.trials))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    rows = []
    for t in study.trials:
        if t.state.name not in ("COMPLETE", "PRUNED"):
            continue
        setting = {k: decoded(t.params[k], v) for k, v in space.swept.items() if k in t.params}
        seed = t.params.get("seed")
        row = {"number": t.number, "state": t.state.name.lower(), "setting": setting, "seed": seed,
               "val": t.user_attrs.get("val"), "test": t.user_attrs.get("test"),
               "seconds": t.user_attrs.get("seconds"), "history": []}
        trial_dir = base.root / TRIALS / trial_name({**space.fixed, **setting}, seed)
        if t.state.name == "COMPLETE" and (trial_dir / "manifest.json").exists():
            row.update({k: v for k, v in trial_record(Run.open(trial_dir), own[-1], metric.name).items()
                        if k in ("val", "test", "history", "seconds", "runtime")})  # the trial's folder is the truth
        rows.append(row)
    default = {k: _value_at(config, k) for k in space.swept}
    return {"study": study_name, "storage": storage, "sampler": sampler, "pruning": prune, "fields": space.swept,
            "fixed": space.fixed,
            "seeds": space.seeds, "shared": list(shared), "stages": list(own), "metric": metric.as_dict(),
            "default": default, "held_out": _held_out_note(base), "rows": rows, "folder": str(folder),
            "base_config_seed": config.seed}


def _point(params: dict[str, Any]) -> tuple:
    """A grid point as a hashable key (its encoded values, the seed included)."""
    return tuple(sorted(params.items()))


def _value_at(config: PipelineConfig, dotted: str) -> Any:
    node: Any = config.model_dump(mode="json")
    for key in dotted.split("."):
        node = node[key]
    return node


def _held_out_note(base: Run) -> dict[str, Any] | None:
    notes = base.manifest.get("data") or {}
    return notes.get("val_from_train") if isinstance(notes, dict) else None

