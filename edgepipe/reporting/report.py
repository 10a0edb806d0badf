"""The run report: one table of every stage's measured figures, the conditions they were measured under,
and its plots (edgepipe.reporting.plots), as Markdown (plots linked from ``report_assets/``) and as a self-contained HTML page
(plots embedded as PNG data URIs).

Everything shown is read from the run folder (``manifest.json`` and each stage's ``metrics.json``); no
figure or measurement condition is typed here. A figure a stage did not record is shown as "—", and a
plot whose data is missing is replaced by a note saying why. Roofline figures for the target device are
always labelled "estimate": they are computed from datasheet peaks, never measured.
"""
from __future__ import annotations

import base64
import html
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.reporting import formatting as fmt
from edgepipe.errors import EdgepipeError
from edgepipe.reporting.plots import make_plots, number, value_at
from edgepipe.reporting.formatting import DASH
from edgepipe.tasks.metric import Metric

log = logging.getLogger(__name__)

ASSETS_DIR = "report_assets"
Block = tuple  # ("h1"|"h2"|"h3", text) | ("kv", [(key, value)]) | ("list", [text]) | ("table", head, rows)
#                | ("plot", file name, caption, png bytes | None, skip note | None); rendered to Markdown and HTML


# --- reading the run folder -------------------------------------------------------------------------
def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise EdgepipeError(f"{path}: not found; is this a run folder? (run `edgepipe run` first)") from None
        return {}
    except json.JSONDecodeError as e:
        if required:
            raise EdgepipeError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); rerun the pipeline") from None
        log.warning("%s: not valid JSON (%s); its figures are shown as missing", path, e.msg)
        return {}
    return data if isinstance(data, dict) else {}


def _load_run(run_dir: Path) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """The manifest and, per stage in manifest order, (manifest entry, metrics.json or {})."""
    run_dir = Path(run_dir)
    manifest = _read_json(run_dir / "manifest.json", required=True)
    stages = []
    for entry in manifest.get("stages") or []:
        folder = run_dir / str(entry.get("dir") or entry.get("name", ""))
        stages.append((entry, _read_json(folder / "metrics.json")))
    return manifest, stages


def _int(x: Any) -> int | None:
    return None if number(x) is None else int(x)


# --- the stage table --------------------------------------------------------------------------------
def run_metric(stages: list[tuple[dict[str, Any], dict[str, Any]]]) -> Metric:
    """The headline metric of the run's task, as its measured stages recorded it (top-1 for older runs)."""
    return Metric.from_record(next((m["metric"] for _, m in stages if isinstance(m.get("metric"), dict)), None))


def _rows(stages: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    metric = run_metric(stages)
    teacher_top1 = next((number(value_at(m, "accuracy", metric.name)) for e, m in stages
                         if e.get("name") == "teacher"), None)
    rows = []
    for entry, m in stages:
        top1 = number(value_at(m, "accuracy", metric.name))
        estimate = m.get("estimate") if isinstance(m.get("estimate"), dict) else None
        rows.append({
            "stage": str(entry.get("name") or m.get("stage") or "?"),
            "status": str(entry.get("status") or m.get("status") or "pending"),
            "skipped_reason": entry.get("skipped_reason") or m.get("skipped_reason"),
            "precision": value_at(m, "artifact", "dtype"),
            "metric": metric,
            "score": top1,
            "top1": top1 if metric.name == "top1" else None,
            "delta": None if top1 is None or teacher_top1 is None else top1 - teacher_top1,
            "pytorch_p50_ms": number(value_at(m, "pytorch_latency", "p50_ms")),
            "params": _int(m.get("params")),
            "macs": _int(m.get("macs")),
            "size_bytes": _int(m.get("size_bytes")),
            "p50_ms": number(value_at(m, "latency", "p50_ms")),
            "p99_ms": number(value_at(m, "latency", "p99_ms")),
            "latency": m.get("latency") if isinstance(m.get("latency"), dict) else None,
            "throughput": number(value_at(m, "throughput", "images_per_s")),
            "throughput_batch": value_at(m, "throughput", "batch"),
            "throughput_record": m.get("throughput") if isinstance(m.get("throughput"), dict) else None,
            "estimate_ms": number(value_at(estimate, "latency_ms")),
            "estimate": estimate,
            "accuracy": m.get("accuracy") if isinstance(m.get("accuracy"), dict) else None,
            "wall_time_s": next((v for v in (number(entry.get("wall_time_s")), number(m.get("wall_time_s")))
                                 if v is not None), None),
            "measure_note": m.get("measure_note") if isinstance(m.get("measure_note"), str) else None,
            "gain": m.get("gain") if isinstance(m.get("gain"), dict) else None,
            "qat_choice": _qat_choice(m.get("records")),
        })
    return rows


def _qat_choice(records: Any) -> str | None:
    """Which QAT model the stage kept, with both measured top-1s (stages/qat.py's records), as one sentence."""
    if not isinstance(records, dict) or records.get("kept") not in ("calibrated", "fine-tuned"):
        return None
    ptq, qat = number(records.get("ptq_top1")), number(records.get("qat_top1"))
    figures = ", ".join(f"{what} {DASH if v is None else f'{100 * v:.2f}%'}"
                        for what, v in (("calibrated", ptq), ("fine-tuned", qat)))
    return (f"kept the {records['kept']} INT8 model, the better on the validation set ({figures} top-1, PyTorch "
            "fake-quant with BatchNorm folded)")


def stage_table_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One dict per stage of the run, in order, with the raw figures (None where not recorded).

    Keys: ``stage``, ``status``, ``precision`` (artifact dtype), ``top1`` (fraction, 0..1), ``delta``
    (top-1 minus the teacher's, as a fraction; x100 for points), ``params``, ``macs``, ``size_bytes``,
    ``p50_ms`` (batch 1), ``throughput`` (images/s at ``throughput_batch``), ``estimate_ms`` (roofline
    estimate, not measured); also ``skipped_reason``, ``p99_ms``, ``latency`` and ``throughput_record``
    (the recorded dicts), ``throughput_batch``, ``estimate``, ``accuracy``, ``wall_time_s`` and
    ``measure_note`` (e.g. why a latency is a host reference).

    Raises:
        EdgepipeError: ``run_dir`` has no readable manifest.json.
    """
    return _rows(_load_run(run_dir)[1])


def _runtime(lat: dict[str, Any] | None) -> str:
    if not lat:
        return DASH
    threads = fmt.threads(lat.get("threads"))
    return f"{lat.get('backend', '?')} {lat.get('dtype', '')} · {lat.get('device', '?')} · {threads}"


def _table_cells(r: dict[str, Any]) -> list[str]:
    est = r["estimate"]
    estimate = DASH if r["estimate_ms"] is None else (
        f"estimate: {fmt.ms(r['estimate_ms'])} ms ({est.get('dtype', '?')}, batch {est.get('batch', '?')}, "
        f"{est.get('bound', '?')}-bound)")
    latency = DASH if r["p50_ms"] is None else f"{fmt.ms(r['p50_ms'])} / {fmt.ms(r['p99_ms'])}"
    throughput = (DASH if r["throughput"] is None
                  else f"{fmt.ips(r['throughput'])} {fmt.rate_unit(r['latency'])} @ batch {r['throughput_batch']}")
    metric = r["metric"]
    delta = DASH if r["delta"] is None else "ref" if r["stage"] == "teacher" else f"{metric.scale * r['delta']:+.2f}"
    pytorch = DASH if r["pytorch_p50_ms"] is None else fmt.ms(r["pytorch_p50_ms"])
    runtime = _runtime(r["latency"])
    if r["latency"] and (r["measure_note"] or "").startswith("host reference"):
        runtime += " (host reference, see notes)"
    return [r["stage"], r["status"], r["precision"] or DASH,
            DASH if r["score"] is None else f"{metric.scale * r['score']:.2f}",
            delta, fmt.count(r["params"]), fmt.count(r["macs"]), fmt.size(r["size_bytes"]), latency, runtime,
            throughput, estimate, fmt.seconds(r["wall_time_s"]), pytorch]


def table_head(metric: Metric) -> list[str]:
    """The stage table's columns, the task's headline metric named in its own unit."""
    unit = f" ({metric.unit})" if metric.unit else ""
    return ["stage", "status", "precision", f"{metric.label}{unit}", f"Δ {metric.label} vs teacher (pts)", "params",
            "MACs", "size", "latency p50 / p99 (ms, batch 1)", "measured with", "throughput",
            "target estimate (not measured)", "wall time", "PyTorch eager p50 (ms, batch 1)"]


TABLE_HEAD = table_head(Metric("top1", "top-1"))


def _conditions(rows: list[dict[str, Any]]) -> list[str]:
    """Footnotes: the measurement conditions recorded in the metrics, grouped across stages."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        for what, rec in (("latency", r["latency"]), ("throughput", r["throughput_record"])):
            if isinstance(rec, dict):
                key = (f"{what} at batch {rec.get('batch', '?')}: {rec.get('warmup', '?')} untimed warm-up + "
                       f"{rec.get('iterations', '?')} timed iterations, {fmt.threads(rec.get('threads'))}, "
                       f"{rec.get('backend', '?')} {rec.get('dtype', '')} on {rec.get('device', '?')}")
                groups.setdefault(key, []).append(r["stage"])
        acc = r["accuracy"]
        if acc and r["score"] is not None:
            key = (f"{r['metric'].label} on {acc.get('samples', '?')} validation images, run with {acc.get('backend', '?')} "
                   f"{acc.get('dtype', '')}")
            groups.setdefault(key, []).append(r["stage"])
    notes = [f"{k} ({', '.join(v)})" for k, v in groups.items()]
    if groups:
        notes.append("p50/p90/p99 are percentiles of the per-iteration wall-clock latency on one fixed random "
                     "batch; images/s = batch × 1000 / mean latency.")
    estimates = {(r["estimate"].get("label") or "estimate (not measured)", r["estimate"].get("assumptions"))
                 for r in rows if r["estimate"]}
    for label, assumptions in sorted(estimates, key=str):
        notes.append(f"Target {label}: an ideal lower bound computed from datasheet figures, never timed"
                     + (f" ({assumptions})." if assumptions else "."))
    notes += [f"{r['stage']}: {r['measure_note']}" for r in rows if r["measure_note"]]
    notes += [f"{r['stage']} {r['qat_choice']}" for r in rows if r["qat_choice"]]
    notes += [f"{r['stage']} skipped: {r['skipped_reason']}" for r in rows if r["skipped_reason"]]
    return notes


# --- document ---------------------------------------------------------------------------------------
def _gain_blocks(rows: list[dict[str, Any]]) -> list[Block]:
    """Which model-transforming stages earned their place on the target, and why (the engine's gain check)."""
    verdicts = [f"{r['stage']} {r['gain'].get('verdict', '')}" for r in rows if r["gain"]]
    return [("h3", "Does each stage earn its place?"), ("list", verdicts)] if verdicts else []


def _torch_devices(manifest: dict[str, Any]) -> str:
    """Where each stage trained and evaluated in PyTorch (the manifest's ``torch_device``), grouped by device."""
    where: dict[str, list[str]] = {}
    for e in manifest.get("stages") or []:
        d = e.get("torch_device")
        if d and e.get("status") in ("done", "skipped"):
            where.setdefault(f"{d.get('device')} ({d.get('name')})", []).append(e["name"])
    return "; ".join(f"{', '.join(names)}: {label}" for label, names in where.items()) or DASH


def _document(manifest: dict[str, Any], stages: list[tuple[dict[str, Any], dict[str, Any]]],
              run_dir: Path | None = None) -> list[Block]:
    from edgepipe.engine.device_results import device_blocks

    rows = _rows(stages)
    host = manifest.get("host") or {}
    versions = manifest.get("versions") or {}
    blocks: list[Block] = [
        ("h1", f"edgepipe report: {manifest.get('run', '?')}"),
        ("kv", [("Run", manifest.get("run") or DASH), ("Target", manifest.get("target") or DASH),
                ("Host CPU", host.get("cpu") or DASH), ("ISA", ", ".join(host.get("isa") or []) or DASH),
                ("PyTorch ran on", _torch_devices(manifest)),
                ("Versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or DASH),
                ("Git revision", manifest.get("git_revision") or DASH), ("Created", manifest.get("created") or DASH),
                ("Report written", datetime.now(timezone.utc).isoformat(timespec="seconds"))]),
        *_data_blocks(manifest.get("data") or {}),
        ("h2", "Stages"),
        ("table", table_head(run_metric(stages)), [_table_cells(r) for r in rows]),
        ("h3", "Measurement conditions"),
        ("list", _conditions(rows)),
        *_gain_blocks(rows),
        *_mixed_blocks(stages),
        *(device_blocks(run_dir, rows) if run_dir is not None else []),
        ("h2", "Plots"),
    ]
    for name, caption, png, note in make_plots(rows, stages, _examples_loader(run_dir)):
        blocks.append(("plot", name, caption, png, None if note is None else f"Plot skipped: {note}."))
    return blocks


def _mixed_blocks(stages: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[Block]:
    """The QAT stage's accuracy budget (qat.max_drop): the outcome, the chosen mix against all-INT8 and all-float
    (top-1 and latency, each measured), and the selection steps."""
    metrics = next((m for e, m in stages if e.get("name") == "qat"), None)
    mix = value_at(metrics, "records", "mixed_precision")
    if not isinstance(mix, dict):
        return []
    floats = mix.get("float_layers") or []
    outcome = {"int8": "every Conv/Linear INT8 holds the budget", "mixed": f"{len(floats)} layer(s) kept in float",
               "float": "missed even with every Conv/Linear in float: the float model was kept"}.get(mix.get("outcome"), "?")
    blocks: list[Block] = [
        ("h3", "Mixed precision under the accuracy budget (qat.max_drop)"),
        ("kv", [("Budget", f"{mix['max_drop_points']:g} points of top-1 against the float input, on "
                           f"{mix.get('images', '?')} {mix.get('measured_on', '?')} images"),
                ("Outcome", outcome),
                ("Float layers", ", ".join(floats) or "none"),
                ("Fallback dtype", f"{mix.get('fallback_dtype', '?')} ({mix.get('fallback_reason', '')})")])]
    variants = mix.get("variants") or []
    if variants:
        head = ["variant", "float layers", "top-1", "drop (points)", "batch-1 p50", "measured as"]
        cells = []
        for v in variants:
            lat = v.get("latency") or {}
            kind = "ESTIMATE (roofline)" if lat.get("kind") == "estimate" else "measured"
            if lat.get("kind") == "estimate":
                how = f"{kind}: {lat.get('label', '')}" + (f"; {lat['note']}" if lat.get("note") else "")
            else:
                how = (f"{kind}: {lat.get('backend', '?')} {lat.get('dtype', '?')}, float parts "
                       f"{lat.get('float_dtype', '?')}, {lat.get('device', '?')}, {lat.get('threads', '?')} threads, "
                       f"{lat.get('warmup', '?')} warm-up + {lat.get('iterations', '?')} runs, best p50 of "
                       f"{lat.get('rounds', 1)} rounds"
                       + (", rounds alternating with the other variants" if lat.get("interleaved_with") else ""))
            if v.get("same_as"):
                how = f"the {v['same_as']} graph's latency (the same layers INT8; timed once): {how}"
            cells.append([v["variant"], str(v.get("float_layers", DASH)), fmt.pct(number(v.get("top1"))),
                          f"{v['drop_points']:.2f}" if number(v.get("drop_points")) is not None else DASH,
                          f"{fmt.ms(lat['p50_ms'])} ms" if number(lat.get("p50_ms")) is not None else DASH, how])
        blocks.append(("table", head, cells))
    steps = [f"{s['phase']}: {s['float_layers']} layer(s) in float, top-1 {fmt.pct(number(s['top1']))}, "
             f"{abs(s['drop_points']):.2f} points {'below' if s['drop_points'] >= 0 else 'above'} float "
             f"({'within' if s['within_budget'] else 'over'} budget)"
             for s in mix.get("selection") or []]
    if steps:
        blocks.append(("list", steps))
    return blocks


def _data_blocks(notes: dict[str, Any]) -> list[Block]:
    """How the images became tensors (edgepipe.data: channels, source modes, files skipped as unreadable)."""
    if not notes:
        return []
    items = [f"{notes.get('channels', '?')} channel(s) per image"]
    held = notes.get("val_from_train")
    if isinstance(held, dict):
        items.append(f"held out from training for every choice (data.val_from_train): {held.get('images', 0):,} of "
                     f"{held.get('of', 0):,} training images, stratified by class, draw seed {held.get('seed')}; the "
                     "validation split is only reported")
    unlabeled = notes.get("unlabeled")
    if isinstance(unlabeled, dict) and unlabeled.get("source", "").startswith("rest"):
        items.append(f"unlabeled (data.unlabeled): {unlabeled.get('images', 0):,} images, {unlabeled['source']}; the "
                     "distill stage trains on them with the teacher's soft targets (its records say how)")
    elif isinstance(unlabeled, dict):
        items.append(f"unlabeled (data.unlabeled): {unlabeled.get('images', 0):,} images from {unlabeled.get('source')} "
                     f"({unlabeled.get('skipped_as_training_images', 0)} skipped as training images); the distill "
                     "stage trains on them with the teacher's soft targets (its records say how)")
    skipped_total = repeated_total = 0
    for split, info in notes.items():
        if not isinstance(info, dict) or split in ("val_from_train",) or (split == "unlabeled" and "modes" not in info):
            continue
        modes = ", ".join(f"{m} {n:,}" for m, n in sorted((info.get("modes") or {}).items()))
        skipped = info.get("skipped") or []
        skipped_total += len(skipped)
        items.append(f"{split}: {info.get('images', 0):,} images read (source modes: {modes or DASH}); "
                     f"{len(skipped)} unreadable file(s) skipped")
        items += [f"skipped {split}/{path}: {reason}" for path, reason in skipped[:20]]
        if len(skipped) > 20:
            items.append(f"... and {len(skipped) - 20} more in {split} (manifest.json, data)")
        repeated = info.get("repeated") or []
        repeated_total += len(repeated)
        items += [f"not read again {split}/{path}: {why}" for path, why in repeated[:20]]
        if len(repeated) > 20:
            items.append(f"... and {len(repeated) - 20} more reached twice in {split} (manifest.json, data)")
    blocks: list[Block] = [("h2", "Data"), ("list", items)]
    if skipped_total:
        blocks.insert(1, ("kv", [("Unreadable images skipped", f"{skipped_total} (data.strict: true stops instead)")]))
    if repeated_total:
        blocks.insert(1, ("kv", [("Folders or files reached twice, read once",
                                  f"{repeated_total} (symlink loops, files linked twice)")]))
    return blocks


def _render_md(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {fmt.md_cell(args[0])}\n")
        elif kind == "kv":
            out.append("\n".join(f"- **{k}:** {fmt.md_cell(v)}" for k, v in args[0]) + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {fmt.md_cell(t)}" for t in args[0]) + "\n")
        elif kind == "table":
            out.append(fmt.md_table(*args) + "\n")
        elif kind == "plot":
            name, caption, png, note = args
            out.append(f"![{fmt.md_cell(caption)}]({ASSETS_DIR}/{name})\n" if png
                       else f"> {fmt.md_cell(caption)}: {fmt.md_cell(note)}\n")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:4px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
        ".note{color:#8a5a00;font-style:italic}img{max-width:100%}")


def _render_html(blocks: list[Block]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(str(blocks[0][1]))}</title><style>{_CSS}</style></head><body>"]
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(str(args[0]))}</{kind}>")
        elif kind == "kv":
            out.append("<ul>" + "".join(f"<li><b>{e(k)}:</b> {e(str(v))}</li>" for k, v in args[0]) + "</ul>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(str(t))}</li>" for t in args[0]) + "</ul>")
        elif kind == "table":
            head, rows = args
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</tbody></table>")
        elif kind == "plot":
            name, caption, png, note = args
            if png:
                data = base64.b64encode(png).decode("ascii")
                out.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{e(caption)}</figcaption></figure>")
            else:
                out.append(f'<p class="note">{e(caption)}: {e(note)}</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _examples_loader(run_dir: Path | None) -> Any:
    """For a detection run, what the detection pictures draw on: its first validation images (as the task reads its
    data, from the run's config), their ground truth and the class names; or why they cannot be read here."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return None

    def load() -> Any:
        from edgepipe.config import load_config
        from edgepipe.tasks import task_of
        from edgepipe.tasks.detection import EXAMPLES

        try:
            config = load_config(Path(run_dir) / "config.yaml")
            data = task_of(config).load_data(config)
            images, truth = data.val_head(EXAMPLES)
        except (EdgepipeError, OSError) as e:
            return f"the validation images cannot be read here ({str(e).splitlines()[0]})"
        truth = [{"boxes": np.asarray(t["boxes"]).tolist(), "labels": np.asarray(t["labels"]).tolist()}
                 for t in truth]
        return images, truth, list(data.class_names)
    return load


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``run_dir/report.md`` (plots in ``report_assets/``) and a self-contained ``run_dir/report.html``.

    Returns:
        The paths of report.md and report.html.

    Raises:
        EdgepipeError: ``run_dir`` has no readable manifest.json.
    """
    run_dir = Path(run_dir)
    manifest, stages = _load_run(run_dir)
    blocks = _document(manifest, stages, run_dir)
    plots = [args for kind, *args in blocks if kind == "plot"]
    for name, _, png, note in plots:
        if not png:
            log.info("report: %s skipped: %s", name, note)
    # None removes a stale plot from an earlier report, which would contradict the note.
    fmt.write_document(run_dir / ASSETS_DIR, {name: png or None for name, _, png, _ in plots})
    paths = fmt.write_document(run_dir, {"report.md": _render_md(blocks), "report.html": _render_html(blocks)})
    return paths["report.md"], paths["report.html"]
