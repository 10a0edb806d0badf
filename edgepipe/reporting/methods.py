"""Distillation methods side by side, each against its reference over the same seeds (``make bench-sweep``'s last
step; issue 28): one table from finished sweeps, so "does DKD / feature KD / a teacher assistant help here" is read in
one place, with the compute each side spent.

A comparison names two settings, each ``STUDY:FIELD=VALUE[,FIELD=VALUE]`` (a study of ``edgepipe sweep`` under the
run's ``sweeps/``, a setting it ran; values as YAML): the candidate and its reference. They may come from different
studies of the same run (e.g. the assistant chain against direct distillation at more epochs): the trials pair by
seed, which fixes the data order, the initialisation and the held-out split, the same pairing a study uses within
itself. The gain is the test-split metric, candidate minus reference, per seed; a method is said to help (or hurt)
only where the mean gain exceeds its seed spread and the paired t-test gives p < 0.05 at 3 or more seeds (the rule
the sweep report applies); otherwise "not established". Compute is each side's mean seconds per trial (its own stages
and measurement, as the sweep recorded it), so "at equal compute" can be checked, not assumed.

It reads the sweeps' ``sweep.json`` only; nothing here trains or measures.

    python -m edgepipe.reporting.methods --run runs/cifar10-sweep \\
        --compare "DKD vs KD=dkd-vs-kd:distill.loss=dkd|dkd-vs-kd:distill.loss=kd" --out BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from edgepipe.engine.sweep import top_level_split
from edgepipe.errors import EdgepipeError
from edgepipe.reporting import formatting as fmt
from edgepipe.reporting.sweep_report import label, paired_gain
from edgepipe.tasks.metric import Metric

SECTION = "distillation-methods"


def parse_side(text: str) -> tuple[str, dict[str, Any]]:
    """``STUDY:FIELD=VALUE,FIELD=VALUE`` -> (study, {field: value}); a value is read as YAML (``[]``, ``{...}``)."""
    study, sep, rest = text.partition(":")
    if not sep or not study or not rest:
        raise EdgepipeError(f"--compare: {text!r} is not STUDY:FIELD=VALUE (e.g. dkd-vs-kd:distill.loss=dkd)")
    setting: dict[str, Any] = {}
    for part in (p for p in top_level_split(rest) if p.strip()):
        field, eq, value = part.partition("=")
        if not eq or not field.strip():
            raise EdgepipeError(f"--compare: {part!r} in {text!r} is not FIELD=VALUE")
        setting[field.strip()] = yaml.safe_load(value)
    return study.strip(), setting


def parse_comparison(text: str) -> tuple[str, tuple[str, dict[str, Any]], tuple[str, dict[str, Any]]]:
    """``NAME=CANDIDATE|REFERENCE`` (each side as ``parse_side`` reads it)."""
    name, eq, sides = text.partition("=")
    candidate, bar, reference = sides.partition("|")
    if not eq or not bar or not name.strip():
        raise EdgepipeError(f"--compare: {text!r} is not NAME=STUDY:FIELD=VALUE|STUDY:FIELD=VALUE")
    return name.strip(), parse_side(candidate), parse_side(reference)


def _study(runs: list[Path], study: str, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The study's sweep.json from the one run folder (of ``runs``) that holds it."""
    if study not in cache:
        found = [path for path in (run / "sweeps" / study / "sweep.json" for run in runs) if path.exists()]
        if not found:
            raise EdgepipeError(f"--compare: no sweep {study} under {', '.join(str(r / 'sweeps') for r in runs)}; run "
                                f"`edgepipe sweep --run RUN --study {study} ...` first")
        if len(found) > 1:
            raise EdgepipeError(f"--compare: sweep {study} is in several runs ({', '.join(map(str, found))}); give "
                                "only the --run you mean")
        cache[study] = json.loads(found[0].read_text())
    return cache[study]


def _trials(result: dict[str, Any], study: str, setting: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The completed trials of ``setting`` (the swept fields it names; fields it leaves out must be the only value the
    study swept them over) by seed."""
    rows = [r for r in result["rows"] if r["state"] == "complete" and r["test"] is not None
            and all(r["setting"].get(k) == v for k, v in setting.items())]
    if not rows:
        ran = sorted({label(r["setting"]) for r in result["rows"]})
        raise EdgepipeError(f"--compare: study {study} has no finished trial with {label(setting)}; it ran: "
                            f"{'; '.join(ran) or 'nothing'}")
    kinds = {json.dumps(r["setting"], sort_keys=True) for r in rows}
    if len(kinds) > 1:
        raise EdgepipeError(f"--compare: {label(setting)} matches {len(kinds)} settings of study {study}; name every "
                            "swept field")
    return {r["seed"]: r for r in rows}


def comparison(runs: Path | list[Path], name: str, candidate: tuple[str, dict[str, Any]],
               reference: tuple[str, dict[str, Any]], cache: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One row: both sides' test metric over the seeds both ran, the paired gain and its verdict, their compute."""
    cache = {} if cache is None else cache
    runs = [runs] if isinstance(runs, Path) else list(runs)
    a_result, b_result = _study(runs, candidate[0], cache), _study(runs, reference[0], cache)
    metric = Metric.from_record(a_result["metric"])
    if Metric.from_record(b_result["metric"]).name != metric.name:
        raise EdgepipeError(f"--compare {name}: studies {candidate[0]} and {reference[0]} measure different metrics")
    a, b = _trials(a_result, *candidate), _trials(b_result, *reference)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise EdgepipeError(f"--compare {name}: the two settings share no seed (candidate {sorted(a)}, reference "
                            f"{sorted(b)}); run both with the same --seeds")
    gain = paired_gain(metric, {s: a[s] for s in seeds}, {s: b[s] for s in seeds})

    def side(study: str, setting: dict[str, Any], trials: dict[int, dict[str, Any]]) -> dict[str, Any]:
        tests = [trials[s]["test"] for s in seeds]
        return {"study": study, "setting": setting, "label": label(setting),
                "test_mean": statistics.mean(tests), "test_sd": statistics.stdev(tests) if len(tests) > 1 else None,
                "seconds_per_trial": statistics.mean(trials[s]["seconds"] or 0.0 for s in seeds),
                "runtime": trials[seeds[0]].get("runtime"), "host": cache[study].get("host"),
                "date": cache[study].get("date")}

    if gain["n"] < 3:
        verdict = f"{gain['n']} seed(s): no verdict"
    elif gain["established"]:
        verdict = "helps" if gain["mean_points"] > 0 else "hurts"
    else:
        verdict = "not established"
    cand, ref = side(*candidate, a), side(*reference, b)
    return {"name": name, "seeds": seeds, "metric": metric.name, "candidate": cand, "reference": ref, "gain": gain,
            "compute_ratio": (cand["seconds_per_trial"] / ref["seconds_per_trial"]
                              if ref["seconds_per_trial"] else None), "verdict": verdict}


def markdown(rows: list[dict[str, Any]], runs: list[Path], command: str) -> str:
    def pct(mean: float, sd: float | None) -> str:
        return f"{fmt.pct(mean)}" + (f" ± {100 * sd:.2f}" if sd is not None else "")

    table = [[r["name"], f"`{r['candidate']['study']}`: {r['candidate']['label']}",
              f"`{r['reference']['study']}`: {r['reference']['label']}", str(len(r["seeds"])),
              pct(r["candidate"]["test_mean"], r["candidate"]["test_sd"]),
              pct(r["reference"]["test_mean"], r["reference"]["test_sd"]),
              f"{r['gain']['mean_points']:+.2f} ± {r['gain']['sd_points']:.2f}" if r["gain"]["sd_points"] is not None
              else f"{r['gain']['mean_points']:+.2f}",
              f"{r['gain']['paired_t_p']:.2g}" if r["gain"]["paired_t_p"] is not None else "—",
              f"{fmt.seconds(r['candidate']['seconds_per_trial'])} / {fmt.seconds(r['reference']['seconds_per_trial'])}"
              + (f" ({r['compute_ratio']:.2f}x)" if r["compute_ratio"] else ""),
              f"**{r['verdict']}**" if r["verdict"] in ("helps", "hurts") else r["verdict"]] for r in rows]
    runtimes = sorted({r[side]["runtime"] or "?" for r in rows for side in ("candidate", "reference")})
    hosts = sorted({f"{h['cpu']} ({', '.join(h['isa']) or 'no ISA flags listed'})" for r in rows
                    for h in (r["candidate"]["host"], r["reference"]["host"]) if h})
    dates = sorted({d for r in rows for d in (r["candidate"]["date"], r["reference"]["date"]) if d})
    return "\n".join([
        "## Distillation methods against their references (`make bench-sweep`)", "",
        f"Command: `{command}`  ",
        f"Studies run on: {'; '.join(hosts) or 'host not recorded'}"
        + (f", {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") if dates else "") + "  ",
        f"Read from the sweeps of {', '.join(f'`{r}`' for r in runs)} (each study's section above has its trials, "
        "convergence plots and host); "
        f"every figure is the test-split top-1 of the student's distill stage ({', '.join(runtimes)}), mean ± sample "
        "standard deviation over the seeds both sides ran; the gain is paired by seed (same data order, "
        "initialisation and held-out split). A method is said to help or hurt only where its mean gain exceeds its "
        "seed spread with paired t-test p < 0.05 at 3 or more seeds. Compute: each side's mean seconds per trial (its "
        "own stages and measurement; the teacher's cached logits are shared by every trial at a seed).", "",
        fmt.md_table(["comparison", "candidate", "reference", "seeds", "candidate test top-1", "reference test top-1",
                      "gain (pts, paired)", "p", "compute per trial (candidate / reference)", "verdict"],
                     table, align=list("lllrrrrrrl"), markup=True),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepipe.reporting.methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, action="append",
                        help="a run folder whose sweeps/ holds studies (repeatable)")
    parser.add_argument("--compare", action="append", required=True, metavar="NAME=STUDY:F=V|STUDY:F=V",
                        help="one comparison: candidate | reference (repeatable)")
    parser.add_argument("--out", type=Path, help="write the table as a section of this markdown file (e.g. "
                                                   "BENCHMARKS.md); also NAME.json beside it")
    args = parser.parse_args(argv)
    try:
        cache: dict[str, dict[str, Any]] = {}
        rows = [comparison(args.run, *parse_comparison(c), cache=cache) for c in args.compare]
    except EdgepipeError as e:
        print(f"edgepipe: error: {e}", file=sys.stderr)
        return 2
    import shlex

    command = "python -m edgepipe.reporting.methods " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = markdown(rows, args.run, command)
    if args.out is None:
        print(text)
    else:
        fmt.write_document(args.out.parent, {f"{args.out.stem}-{SECTION}.json": {"command": command, "rows": rows}})
        fmt.replace_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
