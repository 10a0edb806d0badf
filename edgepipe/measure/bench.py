"""`edgepipe bench`: every stage artifact of a run, timed on this host across runtimes, dtypes and batch sizes.

Each artifact runs in the runtime that fits it (PyTorch for torch models, ONNX Runtime for ONNX and
ORT-optimized graphs, OpenVINO for IR); a float ONNX is also compiled on the fly with OpenVINO at every
float dtype the target profile lists (in a temporary folder, never in the run's stage folders). Every
row records the precision the runtime *actually* ran, so a bf16 request that falls back to fp32 on this
CPU is measured once and says so. A TensorRT bundle cannot run here: it gets a "not run" row with the
reason, and its ONNX is measured in ONNX Runtime as a labelled host reference.

Results go to ``<run>/bench/``: bench.json (rows, host, conditions), bench.md (table) and bench.png
(throughput vs batch size).

Why one file of ~440 lines: planning which runtimes and dtypes fit each artifact kind, measuring them
and writing the result are one command's three steps over one row format (``ROW_KEYS``); loading goes
through the registry in edgepipe.backends and formatting through edgepipe.reporting.formatting.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepipe.reporting import formatting as fmt
from edgepipe.engine.artifacts import Artifact
from edgepipe.backends import backend_of, get_backend, runner_for
from edgepipe.config import BenchConfig
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.runtime.runner import Runner, time_runner
from edgepipe.tasks import DEFAULT as DEFAULT_TASK
from edgepipe.tasks import get_task, task_of_artifact
from edgepipe.host import host_cpu, host_has_native_bf16, host_isa, library_versions
from edgepipe.engine.stage import STAGE_ORDER
from edgepipe.types import ArtifactKind, DType

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, dict[str, float]], None]

ROW_KEYS = ("stage", "artifact_kind", "backend", "device", "dtype", "batch", "threads", "warmup", "iterations",
            "p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s", "status", "note")
HOST_REFERENCE = "host reference"


@dataclass
class _Plan:
    """One runner to build and time at every batch size."""

    stage: str
    kind: ArtifactKind
    backend: str
    requested: str
    """The dtype compiled for, or the artifact's own; the row records what the runtime reports instead."""
    load: Callable[[], Runner]
    input_shape: tuple[int, ...]
    note: str = ""
    status: str = "measured"
    compiled_here: bool = False
    """Compiled by the bench at ``requested``; skipped when it falls back to a dtype already measured."""
    task: str = DEFAULT_TASK
    """The artifact's task (its meta): what the timing inputs are (``Task.timing_inputs``)."""


def _row(stage: str, kind: ArtifactKind | None, status: str, note: str = "", **fields: Any) -> dict[str, Any]:
    row = dict.fromkeys(ROW_KEYS)
    row.update(stage=stage, artifact_kind=kind.value if kind else None, status=status, note=note, **fields)
    return row


def _backend_ready(name: str) -> tuple[bool, str]:
    try:
        return get_backend(name).available()
    except ImportError as e:
        return False, f"the {name} backend cannot be imported ({e})"


def _backend_module(name: str) -> Any:
    """The backend module, or None where it cannot even be imported here."""
    try:
        return get_backend(name)
    except ImportError:
        return None


def _onnx_file(artifact: Artifact) -> Path | None:
    role = "onnx" if "onnx" in artifact.files else next((r for r, f in artifact.files.items() if f.endswith(".onnx")), None)
    return artifact.path(role) if role else None


def _input_shape(artifact: Artifact, fallback: tuple[int, ...] | None) -> tuple[int, ...]:
    """C,H,W of one image: from the descriptor, else the ONNX/IR input, else the run's torch stages."""
    if artifact.meta.get("input_shape"):
        return tuple(int(d) for d in artifact.meta["input_shape"])
    onnx_path = _onnx_file(artifact)
    if onnx_path is not None and onnx_path.is_file():
        import onnx

        dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
        if dims and all(d.HasField("dim_value") for d in dims):
            return tuple(int(d.dim_value) for d in dims)
    if "xml" in artifact.files and artifact.path("xml").is_file():
        import openvino as ov

        shape = ov.Core().read_model(str(artifact.path("xml"))).inputs[0].get_partial_shape()
        if shape.rank.is_static and all(d.is_static for d in list(shape)[1:]):
            return tuple(d.get_length() for d in list(shape)[1:])
    if fallback:
        return fallback
    raise EdgepipeError(f"{artifact.root / 'artifact.json'}: no input_shape in meta and no static input dims in its "
                        "model file; re-export with a fixed image size")


# --- what to measure for each artifact kind ---------------------------------------------------------
def _torch_plans(stage: str, art: Artifact, profile: HardwareProfile, threads: int,
                 shape: tuple[int, ...]) -> list[_Plan]:
    import torch

    from edgepipe.runtime.torch_runner import TorchRunner

    note = "QAT model: fake quantization simulated in float; INT8 speed shows after compile" if art.quantized else ""
    plans = [_Plan(stage, art.kind, "pytorch", "fp32", lambda: runner_for(art, threads)[0], shape, note)]
    # bf16 autocast only pays where the CPU computes bf16 natively; elsewhere it is emulated and slower.
    if DType.BF16 in profile.dtypes and host_has_native_bf16() and not art.quantized:
        plans.append(_Plan(stage, art.kind, "pytorch", "bf16",
                           lambda: TorchRunner.from_artifact(art, threads, torch.bfloat16), shape, "CPU autocast"))
    return plans


def _openvino_plans(stage: str, art: Artifact, onnx_path: Path, profile: HardwareProfile, threads: int,
                    shape: tuple[int, ...], tmp: Path) -> tuple[list[_Plan], list[dict[str, Any]]]:
    ok, reason = _backend_ready("openvino")
    floats = [d for d in profile.dtypes if d.is_float]
    if not ok:
        return [], [_row(stage, art.kind, f"not run: {reason}", backend="openvino", dtype=d.value) for d in floats]
    ov = get_backend("openvino")
    floats = [d for d in floats if d in ov.DTYPES]
    floats.sort(key=lambda d: d is not DType.FP32)  # fp32 first, so a fallback duplicates it, not vice versa

    def compile_and_load(plan: _Plan, dtype: DType) -> Runner:
        compiled, records = ov.compile(onnx_path, profile, dtype, tmp / stage / dtype.value)
        if records.get("note"):  # e.g. the profile's GPU is not on this host, so it ran on CPU
            plan.note += f"; {records['note']}"
        return ov.load(compiled, threads)

    plans = []
    for d in floats:
        plan = _Plan(stage, art.kind, "openvino", d.value, lambda: None, shape,
                     "ONNX compiled on the fly for this bench", compiled_here=True)
        plan.load = lambda plan=plan, d=d: compile_and_load(plan, d)
        plans.append(plan)
    return plans, []


def _float_onnx(art: Artifact, shape: tuple[int, ...], out_dir: Path, opset: int = 17) -> Path:
    """Export a float torch artifact to ONNX in ``out_dir`` (the library's exporter, as the export stage does)."""
    import onnx

    from edgepipe.models.loading import load_torch_artifact
    from edgepipe.export.onnx_export import export_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    onnx.save(export_onnx(load_torch_artifact(art), shape, opset, task_of_artifact(art), art.meta.get("num_classes")),
              str(path))
    return path


def _host_reference(stage: str, art: Artifact, threads: int, shape: tuple[int, ...]) -> list[_Plan]:
    """The TensorRT artifact's ONNX in ONNX Runtime on this CPU: a labelled stand-in, not a target figure."""
    from edgepipe.backends.onnxruntime import OrtRunner

    path = _onnx_file(art)
    if path is None or not path.is_file():
        return []
    return [_Plan(stage, art.kind, "onnxruntime", art.dtype.value, lambda: OrtRunner(path, threads), shape,
                  "host reference: the TensorRT model's ONNX in ONNX Runtime on this CPU, not the target device",
                  status=HOST_REFERENCE)]


def _plans_for(stage: str, art: Artifact, profile: HardwareProfile, threads: int, shape: tuple[int, ...],
               tmp: Path) -> tuple[list[_Plan], list[dict[str, Any]]]:
    """Runners to time for one artifact (on its task's timing inputs), and rows for what cannot run here (with the
    reason)."""
    plans, rows = _runtime_plans(stage, art, profile, threads, shape, tmp)
    for plan in plans:
        plan.task = task_of_artifact(art).name
    return plans, rows


def _runtime_plans(stage: str, art: Artifact, profile: HardwareProfile, threads: int, shape: tuple[int, ...],
                   tmp: Path) -> tuple[list[_Plan], list[dict[str, Any]]]:
    from edgepipe.backends.onnxruntime import OrtRunner

    kind = art.kind
    if kind is ArtifactKind.TORCH:
        plans = _torch_plans(stage, art, profile, threads, shape)
        if art.quantized:  # its deployable form is the export stage's QDQ ONNX, measured there
            return plans, []
        # A float model is also worth seeing in the deployment runtimes: export it for this bench only.
        path = _float_onnx(art, shape, tmp / f"{stage}-onnx")
        plans.append(_Plan(stage, kind, "onnxruntime", "fp32", lambda: OrtRunner(path, threads), shape,
                           "exported to ONNX for this bench"))
        ov_plans, not_run = _openvino_plans(stage, art, path, profile, threads, shape, tmp)
        return plans + ov_plans, not_run
    if kind is ArtifactKind.ONNX:
        path = _onnx_file(art)
        if path is None:
            return [], [_row(stage, kind, f"not run: {art.root / 'artifact.json'} lists no .onnx file")]
        plans = [_Plan(stage, kind, "onnxruntime", art.dtype.value, lambda: runner_for(art, threads)[0], shape)]
        if art.dtype.is_float and not art.quantized:
            ov_plans, not_run = _openvino_plans(stage, art, path, profile, threads, shape, tmp)
            return plans + ov_plans, not_run
        return plans, []
    if kind is ArtifactKind.TENSORRT_BUNDLE:
        command = art.meta.get("build_command")
        note = (f"a TensorRT bundle holds no engine; build it on {art.meta.get('target', 'the device')}"
                + (f" with: {command}" if command else ""))
        reason = art.meta.get("reason") or "engine not built"
        return _host_reference(stage, art, threads, shape), [
            _row(stage, kind, f"not run: {reason}", note, backend="tensorrt", dtype=art.dtype.value)]
    backend = backend_of(kind).value
    ok, reason = _backend_ready(backend)
    if not ok:
        not_run = [_row(stage, kind, f"not run: {reason}", backend=backend, dtype=art.dtype.value)]
        # an engine built on its device (TensorRT) gets its ONNX timed here as a labelled stand-in
        on_device = getattr(_backend_module(backend), "BUILDS_ON_DEVICE", False)
        return (_host_reference(stage, art, threads, shape) if on_device else []), not_run
    return [_Plan(stage, kind, backend, art.dtype.value, lambda: runner_for(art, threads)[0], shape,
                  art.meta.get("note") or "")], []


# --- measuring --------------------------------------------------------------------------------------
def _measure(plans: list[_Plan], bench_cfg: BenchConfig, progress: Progress) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    kept: dict[tuple[str, str, str], list[dict[str, Any]]] = {}  # (stage, backend, runtime dtype) -> rows
    batches = list(bench_cfg.batch_sizes)
    for plan in plans:
        task = f"bench {plan.stage} {plan.backend} {plan.requested}"
        try:
            runner = plan.load()
        except Exception as e:  # noqa: BLE001 - one runtime failing must not stop the others; the row says why
            log.warning("bench: %s could not be loaded: %s", task, e)
            rows.append(_row(plan.stage, plan.kind, f"failed: {e}", plan.note, backend=plan.backend,
                             dtype=plan.requested))
            progress(task, len(batches), len(batches), {})
            continue
        note = plan.note
        if runner.dtype != plan.requested:
            what = "requested" if plan.compiled_here else "artifact"
            note = (f"{note}; " if note else "") + f"{plan.requested} {what}, runs {runner.dtype} on this host"
        key = (plan.stage, runner.backend, runner.dtype)
        if plan.compiled_here and key in kept:
            log.info("bench: %s runs %s here, already measured; skipped", task, runner.dtype)
            for row in kept[key]:
                row["note"] = (f"{row['note']}; " if row["note"] else "") + (
                    f"{plan.requested} requested too: runs {runner.dtype} on this host, measured once")
            progress(task, len(batches), len(batches), {})
            continue
        for i, batch in enumerate(batches, 1):
            try:
                feeds = get_task(plan.task).timing_inputs({"input_shape": list(plan.input_shape)}, batch)
                lat = time_runner(runner, feeds, bench_cfg.warmup, bench_cfg.iterations)
            except Exception as e:  # noqa: BLE001 - e.g. a batch larger than an engine's profile
                log.warning("bench: %s batch %d failed: %s", task, batch, e)
                row = _row(plan.stage, plan.kind, f"failed: {e}", note, backend=runner.backend, device=runner.device,
                           dtype=runner.dtype, batch=batch, threads=runner.threads)
                progress(task, i, len(batches), {"batch": batch})
            else:
                row = _row(plan.stage, plan.kind, plan.status, note, **lat.as_dict())
                progress(task, i, len(batches), {"batch": batch, "p50_ms": lat.p50_ms, "images_per_s": lat.images_per_s})
            rows.append(row)
            kept.setdefault(key, []).append(row)
        del runner
    return rows


def _default_threads(run_dir: Path) -> int:
    """The run's ``measure.threads`` (so bench and stage figures compare), else PyTorch's default."""
    import torch
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    threads = (cfg.get("measure") or {}).get("threads") if isinstance(cfg, dict) else None
    return int(threads) if threads else torch.get_num_threads()


def _run_stages(run_dir: Path) -> list[tuple[str, str, str | None, Path]]:
    """(stage, status, skipped reason, artifact folder) in pipeline order, from the manifest."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except FileNotFoundError:
        raise EdgepipeError(f"{run_dir}: no manifest.json; not a run folder (run `edgepipe run` first)") from None
    except json.JSONDecodeError:
        raise EdgepipeError(f"{run_dir / 'manifest.json'}: corrupt manifest; rerun the pipeline") from None
    rank = {s: i for i, s in enumerate(manifest.get("order") or STAGE_ORDER)}  # a derived run has its own order
    entries = sorted(manifest.get("stages") or [], key=lambda e: rank.get(e.get("name"), len(rank)))
    return [(e["name"], e.get("status", "pending"), e.get("skipped_reason"),
             run_dir / (e.get("artifact_dir") or e.get("dir") or e["name"])) for e in entries]


def run_bench(run_dir: Path, profile: HardwareProfile, bench_cfg: BenchConfig, progress: Progress | None = None,
              threads: int | None = None) -> dict[str, Any]:
    """Time every stage artifact of a run on this host; write ``<run>/bench/`` bench.json, bench.md, bench.png.

    Args:
        run_dir: The run folder (manifest.json + one folder per stage).
        profile: The run's target; its dtypes decide which float dtypes OpenVINO is tried at and whether
            PyTorch bf16 autocast is timed (only on CPUs with native bf16).
        bench_cfg: Batch sizes, warm-up and timed iterations per measurement.
        progress: ``progress(task, done, total, values)`` after each measurement; one task per runner.
        threads: Inference threads for every runtime (None: the run's ``measure.threads``, else PyTorch's
            default, i.e. the physical cores).

    Returns:
        What bench.json holds: ``run``, ``target``, ``date``, ``host``, ``versions``, ``conditions`` and
        ``rows`` (one per stage/runtime/dtype/batch; ``status`` is "measured", "host reference",
        "not run: ..." or "failed: ...").
    """
    from edgepipe.models.loading import check_artifact_trusted

    run_dir = Path(run_dir)
    progress = progress or (lambda *a: None)
    threads = threads or _default_threads(run_dir)
    stages = _run_stages(run_dir)
    rows: list[dict[str, Any]] = []
    plans: list[_Plan] = []
    seen: dict[str, str] = {}  # kind + content hash -> first stage with that artifact
    fallback_shape: tuple[int, ...] | None = None
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        for stage, status, reason, folder in stages:
            if status != "done":
                why = f"stage {status}" + (f" ({reason})" if reason else "")
                passed = f"passes {folder.name}'s artifact through" if folder.name != stage else ""
                rows.append(_row(stage, _kind_of(folder), f"not run: {why}", passed))
                continue
            try:
                art = Artifact.load(folder)
                digest = f"{art.kind.value}:{art.content_hash()}"  # a bundle may hold the export's very ONNX
                shape = _input_shape(art, fallback_shape)
            except Exception as e:  # noqa: BLE001 - a broken artifact gets a row saying why; the others still run
                rows.append(_row(stage, _kind_of(folder), f"not run: {e}"))
                continue
            check_artifact_trusted(art)  # code a model.json names, not the user's config: refused, nothing written
            if digest in seen:
                rows.append(_row(stage, art.kind, f"not run: same artifact as {seen[digest]}, measured there"))
                continue
            seen[digest] = stage
            fallback_shape = fallback_shape or shape
            new_plans, not_run = _plans_for(stage, art, profile, threads, shape, Path(tmp))
            plans += new_plans
            rows += not_run
        rows += _measure(plans, bench_cfg, progress)
    order = {s: i for i, (s, *_) in enumerate(stages)}
    rows.sort(key=lambda r: order.get(r["stage"], len(order)))  # stable: keeps runtime/batch order per stage
    result = {
        "run": run_dir.name, "target": profile.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": host_cpu(), "isa": list(host_isa())}, "versions": library_versions(installed_only=True),
        "conditions": {"batch_sizes": list(bench_cfg.batch_sizes), "warmup": bench_cfg.warmup,
                       "iterations": bench_cfg.iterations, "threads": threads},
        "rows": rows,
    }
    write_bench(run_dir / "bench", result)
    return result


def bench_artifact(artifact_dir: Path, profile: HardwareProfile, bench_cfg: BenchConfig | None = None,
                   progress: Progress | None = None, threads: int | None = None) -> Path:
    """Bench one artifact folder (e.g. an engine built on the device); results go to ``<artifact_dir>/bench/``.

    Returns:
        The bench folder.
    """
    import torch

    artifact_dir = Path(artifact_dir)
    bench_cfg = bench_cfg or BenchConfig()
    threads = threads or torch.get_num_threads()
    art = Artifact.load(artifact_dir)
    from edgepipe.models.loading import check_artifact_trusted

    check_artifact_trusted(art)
    stage = artifact_dir.name
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        plans, rows = _plans_for(stage, art, profile, threads, _input_shape(art, None), Path(tmp))
        rows += _measure(plans, bench_cfg, progress or (lambda *a: None))
    result = {"run": None, "artifact": str(artifact_dir), "target": profile.name,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": {"cpu": host_cpu(), "isa": list(host_isa())}, "versions": library_versions(installed_only=True),
              "conditions": {"batch_sizes": list(bench_cfg.batch_sizes), "warmup": bench_cfg.warmup,
                             "iterations": bench_cfg.iterations, "threads": threads},
              "rows": rows}
    return write_bench(artifact_dir / "bench", result)


def _kind_of(folder: Path) -> ArtifactKind | None:
    try:
        return Artifact.load(folder).kind
    except EdgepipeError:
        return None


# --- writing ----------------------------------------------------------------------------------------
TABLE_HEAD = ["stage", "artifact", "backend", "dtype", "batch", "p50 (ms)", "p90 (ms)", "p99 (ms)", "images/s",
              "status", "note"]


def _markdown(result: dict[str, Any]) -> str:
    rows, cond, host = result["rows"], result["conditions"], result["host"]
    measured = [r for r in rows if r["p50_ms"] is not None]
    devices = sorted({r["device"] for r in measured if r["device"]})
    table = [[r["stage"], r["artifact_kind"], r["backend"], r["dtype"], r["batch"], fmt.ms(r["p50_ms"]),
              fmt.ms(r["p90_ms"]), fmt.ms(r["p99_ms"]), fmt.ips(r["images_per_s"]), r["status"], r["note"]]
             for r in rows]
    conditions = sorted({(r["warmup"], r["iterations"], r["threads"]) for r in measured}, key=str)
    lines = [f"# edgepipe bench: {fmt.md_cell(result.get('run') or result.get('artifact'))}", "",
             f"- Target profile: {fmt.md_cell(result['target'])}",
             f"- Host: {fmt.md_cell(host['cpu'])}; ISA: {fmt.md_cell(', '.join(host['isa']))}",
             f"- Versions: {fmt.md_cell(', '.join(f'{k} {v}' for k, v in result['versions'].items()))}",
             f"- Date: {result['date']}", "",
             fmt.md_table(TABLE_HEAD, table), "",
             "Conditions (from the measurements): " + ("; ".join(
                 f"{w} untimed warm-up + {n} timed iterations per figure, {fmt.threads(t)}" for w, n, t in conditions)
                 or "nothing was measured") + f"; batch sizes {cond['batch_sizes']}.",
             f"Devices: {fmt.md_cell('; '.join(devices))}.",
             "p50/p90/p99 are percentiles of per-iteration wall-clock latency on one fixed random batch; "
             "images/s = batch × 1000 / mean latency. Rows marked \"host reference\" ran on this CPU as a stand-in "
             "for a runtime that cannot run here; they are not target figures."]
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any]) -> bytes:
    from matplotlib.ticker import NullLocator

    series: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if r["images_per_s"] is not None:
            ref = " (host reference)" if r["status"] == HOST_REFERENCE else ""
            series.setdefault(f"{r['stage']} · {r['backend']} {r['dtype']}{ref}", []).append((r["batch"], r["images_per_s"]))
    fig = fmt.new_figure(width=8, height=4.8)
    ax = fig.add_subplot()
    for label, points in series.items():
        points.sort()
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=label,
                ls="--" if label.endswith("(host reference)") else "-")
    if series:
        batches = sorted({b for points in series.values() for b, _ in points})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        fig.legend(fontsize=7, loc="outside right upper")
    else:
        ax.text(0.5, 0.5, "nothing could be measured on this host (see bench.md)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("batch size (log scale)")
    ax.set_ylabel("images/s (log scale)")
    ax.set_title(f"Throughput vs batch size on {result['host']['cpu']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return fmt.png_bytes(fig)


def write_bench(out_dir: Path, result: dict[str, Any]) -> Path:
    """Write bench.json, bench.md and bench.png into ``out_dir`` atomically; return ``out_dir``."""
    out_dir = Path(out_dir)
    fmt.write_document(out_dir, {"bench.json": result, "bench.md": _markdown(result)})
    fmt.write_document(out_dir, {"bench.png": _plot(result)})  # after the figures, so a plot failure loses none
    return out_dir
