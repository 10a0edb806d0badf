"""The ``edgepipe`` command: run the pipeline or any one stage, bench, report, list profiles.

Library code only logs; this module decides what reaches the terminal (rich progress and tables).
Bad input is one line on stderr naming the file or field, and exit code 2; an interrupted run
exits 130 and resumes when the same command is given again.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgepipe.engine import signals
from edgepipe.errors import EdgepipeError
from edgepipe.engine.stage import STAGE_ORDER

log = logging.getLogger("edgepipe")


def _path_arg(text: str) -> Path | str:
    """A path option; an empty one stays the empty string for _check_args to refuse (``Path("")`` is the current
    folder: ``--run ""`` would silently write a run into it)."""
    return Path(text) if text.strip() else text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepipe", description="Distill, prune, quantize, export and compile a "
                                "PyTorch vision model for an edge device, measured at every step.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_args(sp: argparse.ArgumentParser, need_run: bool = True) -> None:
        # --run-dir: the same option under torchrun, whose own parser takes --run for an abbreviation of --run-path.
        sp.add_argument("--run", "--run-dir", dest="run", type=_path_arg, required=need_run,
                        help="run folder (e.g. runs/my-run); spell it --run-dir after `torchrun ... -m edgepipe`")
        sp.add_argument("--config", help="config YAML or shipped recipe name (digits); needed for a new run folder")
        sp.add_argument("--target", help="hardware profile name, alias or YAML path (see `edgepipe profiles`)")

    sp = sub.add_parser("run", help="run every stage in order (skipping unchanged ones)")
    run_args(sp)
    sp.add_argument("--force", choices=STAGE_ORDER, help="rerun this stage and every later one")
    sp.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    for name in STAGE_ORDER:
        sp = sub.add_parser(name, help=f"run the {name} stage alone on the previous stage's artifact")
        run_args(sp, need_run=name != "compile")
        sp.add_argument("--force", action="store_true", help="rerun even if config and input are unchanged")
        if name == "compile":
            sp.add_argument("--onnx", type=_path_arg,
                            help="standalone: compile this ONNX file (e.g. from a deploy bundle)")
            sp.add_argument("--out", type=_path_arg, help="standalone: output folder")
    sp = sub.add_parser("bench", help="measure every stage artifact across backends, dtypes and batch sizes")
    run_args(sp, need_run=False)
    sp.add_argument("--artifact", type=_path_arg, help="measure one artifact folder instead of a run")
    sp = sub.add_parser("compare", help="run the pipeline and the one-line baselines (scratch, PTQ, teacher "
                        "fp32/bf16/int8), measured side by side; writes BENCHMARKS.md/.json/.png")
    run_args(sp)
    sp.add_argument("--device", help="also compile for this device profile (e.g. jetson); its latency is an estimate")
    sp.add_argument("--data", help="override data.path (the ImageFolder root)")
    sp.add_argument("--teacher", help="override teacher.model.program (a torch.export .pt2 file)")
    sp.add_argument("--out", type=_path_arg, default=Path("."), help="folder for BENCHMARKS.md/.json/.png (default: .)")
    sp = sub.add_parser("import-results", help="merge a device's results.json (from a TensorRT bundle's "
                        "edgepipe_trt.py) into the run; the report shows it beside the estimate")
    sp.add_argument("--run", type=_path_arg, required=True, help="the run whose compile stage wrote the bundle")
    sp.add_argument("results", type=_path_arg, help="results.json written on the device")
    sp = sub.add_parser("report", help="write report.md and report.html with plots")
    sp.add_argument("--run", type=_path_arg, required=True)
    sp = sub.add_parser("profiles", help="list hardware profiles; `profiles show NAME` for one")
    sp.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    sp.add_argument("name", nargs="?")
    sub.add_parser("models", help="list registered architectures")
    sp = sub.add_parser("cache", help="list or clear the decoded-image cache ($EDGEPIPE_CACHE, default "
                        "~/.cache/edgepipe); a run's teacher-logits cache is its cache/ folder")
    sp.add_argument("action", nargs="?", choices=["list", "clear"], default="list")
    sp = sub.add_parser("validate", help="validate a config file")
    sp.add_argument("config")
    sp = sub.add_parser("estimate", help="ESTIMATE latency and throughput on a target device (calibrated roofline, "
                        "not measured) for a registered architecture or an ONNX file")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="registered architecture (see `edgepipe models`), e.g. tv_resnet50")
    src.add_argument("--onnx", type=_path_arg, help="ONNX file; its layers are read from the graph (shape inference)")
    sp.add_argument("--kwargs", default="{}", help='architecture kwargs as JSON, e.g. \'{"num_classes": 1000}\'')
    sp.add_argument("--input-shape", help="one image's shape C,H,W (needed with --arch), e.g. 3,224,224")
    sp.add_argument("--target", required=True, help="hardware profile name, alias or YAML path")
    sp.add_argument("--dtype", help="deployed dtype (default: int8 where the target lists it, else its best float)")
    sp.add_argument("--batch", type=int, default=1, help="images per inference (default 1)")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``edgepipe`` command (``argv`` None: the program's own arguments). SIGINT or SIGTERM at any moment: one
    line naming what stopped and the command that resumes it, exit 130/143, no traceback (edgepipe.engine.signals)."""
    signals.quiet_telemetry()  # before anything imports openvino or nncf
    signals.RESUMABLE.update(("run", "compare", *STAGE_ORDER))
    signals.install()
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), "")
    code = 1
    try:
        try:
            signals.arm()  # raises now for a signal that came while the program was starting
            code = _main(argv)
        finally:
            signals.disarm()
    except KeyboardInterrupt:  # one that came outside _main's own handling (parsing arguments, joining torchrun)
        print(signals.line(command, words), file=sys.stderr)
        code = 128 + (signals.received() or signal.SIGINT)
    except Exception:
        if signals.received() is None:
            raise
        # Native code turned the interruption into another error (a C extension's import: "ImportError: initialization
        # failed"; OpenVINO's C++: RuntimeError): the interruption is what happened.
        log.debug("the error the interruption became", exc_info=True)
        print(signals.line(command, words), file=sys.stderr)
        code = 128 + signals.received()
    finally:
        code = signals.finish(code, argv is None, command, words)
    return code


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from edgepipe.training import distributed

    if "edgepipe.models" in sys.modules:  # each command trusts only the config it is given (not yet imported: empty)
        sys.modules["edgepipe.models"].forget_trusted()

    try:
        _check_args(args)  # empty values, a --run that is no run folder: before anything is created or joined
        launch = distributed.init_from_env()  # torchrun: join the process group; alone: None
    except EdgepipeError as e:
        print(f"edgepipe: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    _setup_logging(args.verbose, launch)
    who = f"rank {launch.rank} of {launch.world_size}: " if launch else ""
    try:
        if launch is not None:
            _check_launchable(args)
            signal.signal(signal.SIGTERM, _stop)  # torchrun stops every rank with SIGTERM when one fails
        if getattr(args, "run", None) is None:
            return _dispatch(args)
        from edgepipe.io import run_lock

        with run_lock(args.run) if distributed.is_main() else contextlib.nullcontext():  # one writer per run folder
            distributed.check_shared_run_folder(args.run)
            return _dispatch(args)
    except EdgepipeError as e:
        print(f"edgepipe: error: {who}{_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only folder, disk full, a path that is a file: one line, never a traceback
        log.debug("where the OSError came from", exc_info=True)  # -v shows the traceback
        print(f"edgepipe: error: {who}{_one_line(_os_error_line(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # SIGINT or SIGTERM (edgepipe.engine.signals): the stage is recorded interrupted
        print(signals.line(args.command, sys.argv[1:] if argv is None else list(argv), who), file=sys.stderr)
        return 128 + (signals.received() or signal.SIGINT)
    except distributed.Stopped:
        if distributed.is_main():  # one line for the launch, not one per rank
            print(f"edgepipe: {who}stopped by SIGTERM during {distributed.current_stage() or 'setup'} (torchrun stops "
                  "every rank when one fails); nothing is half-written: run the same command again, with any number "
                  "of processes, to resume from the last checkpoint", file=sys.stderr)
        return 143
    except RuntimeError as e:
        if launch is None:
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's SIGTERM must not cut this line with a traceback
        log.debug("where the error came from", exc_info=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"edgepipe: error: {who}{distributed.current_stage() or 'setup'} stopped: another rank exited or did not "
              f"answer within the {launch.timeout_s:g} s collective timeout ({first}); nothing is half-written: run "
              "the same command again, with any number of processes, to resume from the last checkpoint",
              file=sys.stderr)
        return 1
    finally:
        if launch is not None:  # torchrun's SIGTERM may still come while the process group shuts down
            signal.signal(signal.SIGTERM, _exit_quietly)
        distributed.shutdown()


MAX_LINE = 1000  # characters of one error line: a message that quotes a huge value keeps its start and its advice


def _one_line(text: str) -> str:
    """An error message as one line of bounded length (its end, which says what to do, is kept)."""
    text = " ".join(text.splitlines())
    return text if len(text) <= MAX_LINE else f"{text[:MAX_LINE - 300]} ... {text[-290:]}"


_EMPTY_HINT = {"run": "a run folder, e.g. runs/my-run",
               "config": "a config YAML file or a shipped recipe name (digits)",
               "target": "a hardware profile name, alias or YAML file (see `edgepipe profiles`)",
               "artifact": "an artifact folder", "onnx": "an ONNX file", "out": "an output folder",
               "results": "the results.json written on the device", "device": "a hardware profile name",
               "data": "the ImageFolder root", "teacher": "a torch.export .pt2 file", "dtype": "a dtype, e.g. fp32",
               "name": "a profile name"}
# What a run being created holds before its manifest.json is written
_OWN_FILES = {".edgepipe.lock", ".edgepipe-ranks", "config.yaml", "profile.yaml"}


def _check_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is created, what would silently mean something else: an empty value (``--run ""`` is
    the current folder, ``--target ""`` would keep the run's target) and a --run folder that is not a run folder
    (a command must not turn a folder of other files into a run, nor leave its lock file in a folder it refuses)."""
    positional = {"validate": "config", "import-results": "results", "profiles": "name"}.get(args.command)
    for name, hint in _EMPTY_HINT.items():
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            flag = name.upper() if name == positional else f"--{name}"
            raise EdgepipeError(f"{flag} is empty; give {hint}")
    run = getattr(args, "run", None)
    if run is None or (args.command == "bench" and args.artifact):
        return
    if run.exists() and not run.is_dir():
        raise EdgepipeError(f"{run}: is a file, not a run folder; give --run a folder path")
    if (run / "manifest.json").is_file():
        return
    from edgepipe.io import LOCK_FILE, lock_holder

    if (run / LOCK_FILE).is_file() and lock_holder(run / LOCK_FILE) is not None:
        return  # a run being created by another command: run_lock says which PID holds it
    entries = [p.name for p in run.iterdir()] if run.is_dir() else []
    if args.command in ("run", "compare", *STAGE_ORDER) and args.config and args.target:  # a new run
        others = [n for n in entries if n not in _OWN_FILES and not (n.startswith(".") and n.endswith(".tmp"))]
        if others:
            raise EdgepipeError(f"{run}: a folder that is not empty ({len(entries)} entries, e.g. {others[0]}) and "
                                "not a run folder (no manifest.json); give --run a new or empty folder, or an existing "
                                "run folder")
        return
    state = "is not a run folder (" + ("it does not exist)" if not run.exists() else "no manifest.json)")
    advice = {"bench": "`edgepipe bench --run RUN` measures a run made by `edgepipe run`; to measure one artifact "
                       "folder, `edgepipe bench --artifact DIR --target T`",
              "report": "`edgepipe report --run RUN` reports a run made by `edgepipe run`; give its folder",
              "import-results": "give --run the run whose compile stage wrote the deploy bundle"}
    start = f"start it with `edgepipe {'compare' if args.command == 'compare' else 'run'} --config CONFIG --target " \
            f"TARGET --run {run}`"
    raise EdgepipeError(f"{run}: {state}; {advice.get(args.command, start)}")


def _stop(signum: int, frame: object) -> None:
    from edgepipe.training import distributed

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # raised once: a second SIGTERM must not cut the rank's line
    raise distributed.Stopped()


def _exit_quietly(signum: int, frame: object) -> None:
    """A SIGTERM after the rank has already stopped (or while it shuts down): leave without a traceback; the
    rank's one line, if any, is already printed."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _check_launchable(args: argparse.Namespace) -> None:
    """Under torchrun only the commands that train run: the pipeline and the single stages."""
    if args.command not in ("run", *STAGE_ORDER):
        raise EdgepipeError(f"edgepipe {args.command} runs in one process; start it without torchrun (under torchrun "
                            f"only `run` and the stage commands, which train on every rank)")


def _os_error_line(e: OSError) -> str:
    import errno

    where = f"{e.filename}: " if e.filename else ""
    advice = {errno.ENOSPC: "free some space, then run the same command again (finished stages are kept)",
              errno.EDQUOT: "free some space, then run the same command again (finished stages are kept)",
              errno.EACCES: "the folder is not writable by you; fix its permissions or give another --run",
              errno.EPERM: "the folder is not writable by you; fix its permissions or give another --run",
              errno.EROFS: "the file system is read-only; give a --run folder on a writable one",
              errno.ENOTDIR: "a path component is a file, not a folder; check the path",
              errno.EISDIR: "a folder stands where a file is expected; check the path"}
    return f"{where}{e.strerror or type(e).__name__}; {advice.get(e.errno, 'check the path and run the same command again')}"


def _setup_logging(verbose: bool, launch=None) -> None:
    """Rich log lines; under torchrun every rank but 0 logs only warnings, prefixed with its rank."""
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    if launch is not None and launch.rank != 0:
        level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank {launch.rank}] %(message)s" if launch else "%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False, rich_tracebacks=False)])
    for noisy in ("matplotlib", "PIL", "nncf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "profiles":
        return _profiles(args)
    if cmd == "models":
        from edgepipe.models import ARCHITECTURES

        for name, fn in sorted(ARCHITECTURES.items()):
            print(f"{name:24s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    if cmd == "cache":
        from edgepipe.data import clear_decode_cache, decode_cache

        folder, files = decode_cache()
        if args.action == "clear":
            n, freed = clear_decode_cache()
            print(f"removed {n} decoded-image file(s), {freed / 2**20:.1f} MiB, from {folder}")
            return 0
        for f in files:
            print(f"{f.stat().st_size / 2**20:10.1f} MiB  {f.name}")
        print(f"{len(files)} decoded-image file(s) in {folder} ({sum(f.stat().st_size for f in files) / 2**20:.1f} "
              "MiB); `edgepipe cache clear` removes them")
        return 0
    if cmd == "validate":
        from edgepipe.config import load_config

        cfg = load_config(args.config)
        print(f"{args.config}: valid ({cfg.name})")
        return 0
    if cmd == "estimate":
        return _estimate(args)
    if cmd == "report":
        from edgepipe.reporting.report import write_report

        md, html = write_report(args.run)
        print(f"wrote {md} and {html}")
        return 0
    if cmd == "import-results":
        from edgepipe.engine.device_results import import_results

        out = import_results(args.run, args.results)
        print(f"imported {args.results} -> {out}; `edgepipe report --run {args.run}` shows it")
        return 0
    if cmd == "compile" and args.onnx:
        return _compile_standalone(args)
    if cmd == "bench":
        return _bench(args)
    if cmd == "compare":
        return _compare(args)
    run = _open_run(args)
    from edgepipe.engine.pipeline import run_pipeline, run_stage

    from edgepipe.training import distributed

    if not distributed.is_main():  # the other ranks train their shards and wait; rank 0 shows and writes
        if cmd == "run":
            run_pipeline(run, force_from=args.force)
        else:
            run_stage(run, cmd, force=args.force)
        return 0
    with _progress() as progress:
        if cmd == "run":
            run_pipeline(run, force_from=args.force, progress=progress,
                         on_stage=lambda name, m: log.info("%s: %s", name, _summary(m)))
        else:
            m = run_stage(run, cmd, force=args.force, progress=progress)
            log.info("%s: %s", cmd, _summary(m))
    _print_table(run.root)
    if cmd == "run" and not args.no_report:
        from edgepipe.reporting.report import write_report

        md, html = write_report(run.root)
        print(f"report: {md} and {html}")
    return 0


def _open_run(args: argparse.Namespace):
    """The run a command writes to. A new config or target is proven first (edgepipe.engine.pipeline.preflight) and only
    then written, so a command that fails its checks leaves an existing run folder byte for byte as it was. Under
    torchrun rank 0 does this first (decoding the data into the shared cache) and the other ranks then open what it
    wrote."""
    from edgepipe.training import distributed

    if distributed.is_main():
        run = _open_run_here(args)
        distributed.barrier()
        return run
    distributed.barrier()
    return _open_run_here(args)


def _open_run_here(args: argparse.Namespace):
    from edgepipe.config import load_config
    from edgepipe.engine.pipeline import Run, preflight

    exists = (args.run / "manifest.json").exists()
    if not (args.config or args.target):
        run = Run.open(args.run)
        preflight(run)
        return run
    if not (args.config and args.target) and not exists:
        raise EdgepipeError("a new run folder needs both --config and --target")
    if exists and args.target:
        from edgepipe.engine.pipeline import read_manifest
        from edgepipe.profiles import get_profile

        if get_profile(args.target).name != read_manifest(args.run / "manifest.json")["target"]:
            return _open_target_run(args)
    existing = Run.open(args.run) if not (args.config and args.target) else None
    config = load_config(args.config) if args.config else existing.config
    run = Run.create(args.run, config, args.target or existing.profile.name, write=False)
    preflight(run)
    run.write_files()
    return run


def _open_target_run(args: argparse.Namespace):
    """A finished run given another --target: the target-dependent stages run in ``RUN/targets/<profile name>/``,
    sharing the stages whose key does not change (edgepipe.engine.pipeline.target_run); the run's own files stay as they
    are. Proven (preflight) before anything is written, like any new config or target."""
    from edgepipe.config import load_config
    from edgepipe.engine.pipeline import Run, preflight, target_run, write_target_run

    parent = Run.open(args.run)
    config = load_config(args.config) if args.config else parent.config
    force = args.force if args.command == "run" else (args.command if args.force else None)
    view, shared = target_run(parent, config, args.target, config_file=args.config, force=force)
    preflight(view)
    run = write_target_run(parent, view, shared, args.target)
    log.info("target %s: %s in %s (sharing %s with %s)", run.profile.name, ", ".join(run.own_stages()) or "nothing",
             run.root, ", ".join(shared) or "nothing", parent.root)
    return run


def _summary(m: dict) -> str:
    if m.get("status") == "skipped":
        return f"skipped ({m.get('skipped_reason')})"
    acc = m.get("accuracy", {})
    lat = m.get("latency", {})
    return (f"top-1 {100 * acc.get('top1', 0):.2f}% [{acc.get('backend')}], params {m.get('params', 0):,}, "
            f"MACs {m.get('macs', 0):,}, {m.get('size_bytes', 0) / 1024:.1f} KiB, "
            f"p50 {lat.get('p50_ms', 0):.3f} ms ({lat.get('backend')} {lat.get('dtype')}, batch 1)")


def _print_table(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgepipe.reporting.report import stage_table_rows

    table = Table(title=f"edgepipe run {run_dir}  (latency measured on this host; estimate = target roofline)")
    cols = {"stage": "stage", "status": "status", "precision": "dtype", "top1": "top-1", "delta": "Δ teacher",
            "params": "params", "macs": "MACs", "size_bytes": "size", "p50_ms": "p50 b1 (host)",
            "throughput": "throughput (host)", "estimate_ms": "target estimate"}
    for heading in cols.values():
        table.add_column(heading)
    for row in stage_table_rows(run_dir):
        table.add_row(*[_fmt(c, row.get(c)) for c in cols])
    # Logs and CI are not terminals: rich would wrap the table to 80 columns.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _fmt(col: str, v) -> str:
    if v is None:
        return "—"
    if col in ("top1",):
        return f"{100 * v:.2f}%"
    if col == "delta":
        return f"{100 * v:+.2f} pt"
    if col in ("params", "macs"):
        return f"{v:,}"
    if col == "size_bytes":
        return f"{v / 1024:.1f} KiB"
    if col in ("p50_ms", "estimate_ms"):  # significant digits: a tiny model's estimate is microseconds
        return f"{v:.3g} ms" + (" (est.)" if col == "estimate_ms" else "")
    if col == "throughput":
        return f"{v:,.0f} img/s"
    return str(v)


@contextmanager
def _progress() -> Iterator:
    """A rich progress bar fed by the library's progress(task, done, total, values) callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[values]}"), TimeElapsedColumn(), transient=True,
                    disable=not sys.stderr.isatty())
    tasks: dict[str, int] = {}

    def update(task: str, done: int, total: int, values: dict[str, float]) -> None:
        signals.check()  # an interruption a library swallowed stops the work at its next step
        vals = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total, values=vals)
        bars.update(tasks[task], completed=done, total=total, values=vals)
        if done >= total:
            bars.remove_task(tasks.pop(task))

    with bars:
        yield update


def _profiles(args: argparse.Namespace) -> int:
    import yaml

    from edgepipe.profiles import all_profiles, get_profile

    if args.action == "show":
        if not args.name:
            raise EdgepipeError("usage: edgepipe profiles show NAME")
        print(yaml.safe_dump(get_profile(args.name).model_dump(mode="json"), sort_keys=False), end="")
        return 0
    for name, prof in all_profiles().items():
        aliases = f" (alias: {', '.join(prof.aliases)})" if prof.aliases else ""
        print(f"{name:20s} {prof.backend.value:12s} {','.join(d.value for d in prof.dtypes):18s} "
              f"{prof.description}{aliases}")
    return 0


MAX_ESTIMATE_BATCH = 65_536  # the estimate is arithmetic (nothing is allocated per image); a larger batch is a typo
MAX_ESTIMATE_VALUES = 1 << 26  # one image's values: 256 MiB as fp32 before the first layer (e.g. 3,4096,4096 fits)


def _estimate(args: argparse.Namespace) -> int:
    """`edgepipe estimate`: the calibrated latency ESTIMATE of one model on a target, with its assumptions."""
    import json
    import math

    from edgepipe.errors import short_repr
    from edgepipe.measure.estimate import layer_estimate, model_layers, onnx_layers
    from edgepipe.profiles import get_profile
    from edgepipe.types import DType

    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise EdgepipeError(f"--input-shape {args.input_shape}: expected integers C,H,W, e.g. 3,224,224") from None
        if not shape or any(v < 1 for v in shape):
            raise EdgepipeError(f"--input-shape {args.input_shape}: every dimension must be >= 1")
        if math.prod(shape) > MAX_ESTIMATE_VALUES:
            raise EdgepipeError(f"--input-shape {args.input_shape}: {math.prod(shape):,} values per image, more than "
                                f"the {MAX_ESTIMATE_VALUES:,} the layer count's forward pass may hold in memory; give "
                                "one image's real shape, e.g. 3,224,224")
    if args.batch < 1 or args.batch > MAX_ESTIMATE_BATCH:
        raise EdgepipeError(f"--batch {args.batch}: must be between 1 and {MAX_ESTIMATE_BATCH:,} images per inference "
                            "(no edge runtime takes more)")
    profile = get_profile(args.target)
    try:
        dtype = DType(args.dtype) if args.dtype else profile.compile_dtype(quantized=True)
    except ValueError:
        raise EdgepipeError(f"--dtype {args.dtype}: unknown (known: {', '.join(d.value for d in DType)})") from None
    if args.arch:
        from edgepipe.models import build_arch

        if shape is None:
            raise EdgepipeError("--arch needs --input-shape C,H,W (one image, e.g. 3,224,224)")
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            raise EdgepipeError(f"--kwargs: not valid JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(kwargs, dict):
            raise EdgepipeError("--kwargs: expected a JSON object, e.g. '{\"num_classes\": 1000}'")
        from edgepipe.config import ModelSpec
        from edgepipe.engine.sizes import check_model

        try:
            check_model(ModelSpec(arch=args.arch, kwargs=kwargs), "--kwargs", trains=False)  # on meta: no storage
            model = build_arch(args.arch, kwargs)
        except EdgepipeError as e:  # sizes names the field as a config path: here it is the --kwargs option
            raise EdgepipeError(str(e).replace("--kwargs.kwargs", "--kwargs")) from None
        except Exception as e:  # noqa: BLE001 - a registered builder raises anything (RuntimeError, ValueError, ...)
            first = (str(e).strip().splitlines() or [""])[0][:200]  # on a value it cannot take: all mean bad kwargs
            raise EdgepipeError(f"--kwargs {short_repr(kwargs)}: architecture {args.arch} cannot be built with these "
                                f"values ({type(e).__name__}: {first}); give sizes >= 1 (widths, classes, depths) "
                                "and check each value") from None
        layers, what = model_layers(model, shape), f"{args.arch} {'x'.join(map(str, shape))}"
    else:
        layers, what = onnx_layers(args.onnx, shape), str(args.onnx)
    result = {"model": what, "target": profile.name, **layer_estimate(profile, dtype, layers, args.batch)}
    if args.json:
        print(json.dumps(result))
        return 0
    ideal, cal = result["lower_bound"], result["calibration"]
    print(f"ESTIMATE (not measured): {what} on {profile.name} ({profile.description}), {result['dtype']}, "
          f"batch {result['batch']}")
    print(f"  latency            {result['latency_ms']:.4g} ms per batch")
    print(f"  throughput         {result['images_per_s']:,.0f} images/s")
    if cal:
        print(f"  breakdown          {result['bound']}-bound: compute-limited layers {result['compute_limited_ms']:.3g} ms, "
              f"memory-limited layers {result['memory_limited_ms']:.3g} ms, overheads {result['overhead_ms']:.3g} ms")
    print(f"  ideal lower bound  {ideal['latency_ms']:.4g} ms ({ideal['images_per_s']:,.0f} images/s; {ideal['bound']}-bound "
          "at datasheet peaks, no overheads)")
    print(f"  model              {result['kernels']} kernels, {result['macs'] / 1e9:.3g} GMACs, "
          f"{result['weight_bytes'] / 1e6:.3g} MB weights, {result['activation_bytes'] / 1e6:.3g} MB activations "
          f"per image ({result['dtype']})")
    if cal:
        print(f"  calibration        {cal['family']}: compute efficiency {cal['compute_efficiency']}, bandwidth "
              f"efficiency {cal['bandwidth_efficiency']}, {cal['kernel_launch_us']} us per kernel, "
              f"{cal['enqueue_us']} us per inference; fitted to {len(cal['fitted_on'])} {cal['source']} results "
              f"({cal['table']}), reproduced within {cal['max_fit_error']}x")
    else:
        print(f"  calibration        none: no published results for {profile.name}; the figure is the ideal lower bound")
    print(f"  assumptions        {result['assumptions']}")
    return 0


def _compile_standalone(args: argparse.Namespace) -> int:
    """`edgepipe compile --onnx model.onnx --target T --out DIR`: what a deploy bundle runs on the device."""
    import onnx

    from edgepipe.backends import get_backend
    from edgepipe.profiles import get_profile
    from edgepipe.types import Backend

    if not args.target or not args.out:
        raise EdgepipeError("standalone compile needs --onnx, --target and --out")
    if not args.onnx.is_file():
        raise EdgepipeError(f"{args.onnx}: ONNX file not found")
    profile = get_profile(args.target)
    backend = get_backend(profile.backend)
    ok, reason = backend.available()
    if profile.backend is Backend.TENSORRT and not ok:
        # On the device this command builds the engine; a bundle written here would be a bundle inside a bundle.
        raise EdgepipeError(f"compile --onnx {args.onnx}: no TensorRT engine can be built on this machine ({reason}); "
                            f"run it on the {profile.name} device (see the bundle's README.md)")
    try:
        graph = onnx.load(str(args.onnx), load_external_data=False).graph
        if not graph.input or not graph.node:
            raise ValueError("no inputs or no nodes")
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends for a file that is not ONNX
        raise EdgepipeError(f"{args.onnx}: not an ONNX model ({type(e).__name__}); give the model.onnx of a deploy "
                            "bundle or an export stage") from None
    quantized = any(n.op_type == "QuantizeLinear" for n in graph.node)
    dtype = profile.compile_dtype(quantized)
    artifact, records = backend.compile(args.onnx, profile, dtype, args.out)
    dims = graph.input[0].type.tensor_type.shape.dim
    artifact.meta.setdefault("input_shape", [d.dim_value for d in dims[1:]] if all(d.dim_value for d in dims[1:]) else None)
    artifact.meta.setdefault("target", profile.name)
    artifact.save()
    print(f"compiled {args.onnx} for {profile.name} ({dtype.value}) -> {artifact.root} ({artifact.kind.value})")
    for k, v in records.items():
        print(f"  {k}: {v}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from edgepipe.measure.bench import run_bench
    from edgepipe.engine.pipeline import Run

    if args.config:  # the user's own config: a factory or trust_pickle program it names may build the models
        from edgepipe.config import load_config
        from edgepipe.models import trust_config

        trust_config(load_config(args.config))
    if args.artifact:
        from edgepipe.measure.bench import bench_artifact

        if not args.target:
            raise EdgepipeError("bench --artifact needs --target")
        from edgepipe.profiles import get_profile

        with _progress() as progress:
            out = bench_artifact(args.artifact, get_profile(args.target), progress=progress)
        print(f"wrote {out}")
        return 0
    if not args.run:
        raise EdgepipeError("bench needs --run RUN_FOLDER (or --artifact DIR --target T)")
    run = Run.open(args.run)
    with _progress() as progress:
        result = run_bench(run.root, run.profile, run.config.bench, progress=progress)
    print(f"bench: {len(result.get('rows', []))} measurements -> {run.root / 'bench'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _compare(args: argparse.Namespace) -> int:
    """`edgepipe compare`: the pipeline and its baselines in one resumable command (see edgepipe.reporting.compare)."""
    import shlex

    from edgepipe.reporting.benchmarks import leading_comment
    from edgepipe.reporting.compare import compare
    from edgepipe.config import configs_dir, load_config, validate_config

    if not args.config or not args.target:
        raise EdgepipeError("compare needs --config and --target (e.g. --config cifar10 --target intel-xeon-amx)")
    data = load_config(args.config).model_dump(mode="json")
    if args.data:
        if not Path(args.data).is_dir():
            raise EdgepipeError(f"--data {args.data}: not a folder; give the ImageFolder root holding train/ and test/")
        data["data"]["path"] = args.data
    if args.teacher:
        if not Path(args.teacher).is_file():
            raise EdgepipeError(f"--teacher {args.teacher}: file not found; give the teacher's torch.export .pt2")
        data["teacher"]["model"] = {"program": args.teacher}
    config = validate_config(data, args.config)
    from edgepipe.engine.pipeline import Run, preflight

    preflight(Run.create(args.run, config, args.target, write=False))
    command = "edgepipe " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "edgepipe compare"
    with _progress() as progress:
        config_file = Path(args.config) if Path(args.config).is_file() else configs_dir() / f"{args.config}.yaml"
        result = compare(config, args.run, args.target, args.device, args.out, command, progress,
                         recipe_notes=leading_comment(config_file))
    for c in result["checks"]:
        print(f"{'pass' if c['pass'] else 'MISS'}  {c['claim']}  (measured {c['measured']:.4g})")
    print(f"wrote {args.out / 'BENCHMARKS.md'}, BENCHMARKS.json and BENCHMARKS.png")
    return 0
