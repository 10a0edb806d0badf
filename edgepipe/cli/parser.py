"""The ``edgepipe`` command line: the argparse parser of every command, and the checks on what it parsed that come
before anything is created (empty values, a --run that is not a run folder, a command torchrun cannot start)."""
from __future__ import annotations

import argparse
from pathlib import Path

from edgepipe.engine.stage import STAGE_ORDER
from edgepipe.errors import EdgepipeError


def path_arg(text: str) -> Path | str:
    """A path option; an empty one stays the empty string for check_args to refuse (``Path("")`` is the current
    folder: ``--run ""`` would silently write a run into it)."""
    return Path(text) if text.strip() else text


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (edgepipe.cli.COMMANDS maps each command to its handler)."""
    p = argparse.ArgumentParser(prog="edgepipe", description="Distill, prune, quantize, export and compile a "
                                "PyTorch vision model for an edge device, measured at every step.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_args(sp: argparse.ArgumentParser, need_run: bool = True) -> None:
        # --run-dir: the same option under torchrun, whose own parser takes --run for an abbreviation of --run-path.
        sp.add_argument("--run", "--run-dir", dest="run", type=path_arg, required=need_run,
                        help="run folder (e.g. runs/my-run); spell it --run-dir after `torchrun ... -m edgepipe`")
        sp.add_argument("--config", help="config YAML or shipped recipe name (digits); needed for a new run folder")
        sp.add_argument("--target", help="hardware profile name, alias or YAML path (see `edgepipe profiles`)")

    def device_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", help="where PyTorch trains and evaluates for this command: auto, cpu, cuda or "
                                         "cuda:N (default: the config's device, auto); not part of any stage's key")

    sp = sub.add_parser("run", help="run every stage in order (skipping unchanged ones)")
    run_args(sp)
    device_arg(sp)
    sp.add_argument("--force", choices=STAGE_ORDER, help="rerun this stage and every later one")
    sp.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    for name in STAGE_ORDER:
        sp = sub.add_parser(name, help=f"run the {name} stage alone on the previous stage's artifact")
        run_args(sp, need_run=name != "compile")
        device_arg(sp)
        sp.add_argument("--force", action="store_true", help="rerun even if config and input are unchanged")
        if name == "compile":
            sp.add_argument("--onnx", type=path_arg,
                            help="standalone: compile this ONNX file (e.g. from a deploy bundle)")
            sp.add_argument("--out", type=path_arg, help="standalone: output folder")
    sp = sub.add_parser("bench", help="measure every stage artifact across backends, dtypes and batch sizes")
    run_args(sp, need_run=False)
    sp.add_argument("--artifact", type=path_arg, help="measure one artifact folder instead of a run")
    sp = sub.add_parser("compare", help="run the pipeline and the one-line baselines (scratch, PTQ, teacher "
                        "fp32/bf16/int8), measured side by side; writes BENCHMARKS.md/.json/.png")
    run_args(sp)
    sp.add_argument("--device", help="also compile for this device profile (e.g. jetson); its latency is an estimate")
    sp.add_argument("--data", help="override data.path (the ImageFolder root)")
    sp.add_argument("--teacher", help="override teacher.model.program (a torch.export .pt2 file)")
    sp.add_argument("--out", type=path_arg, default=Path("."), help="folder for BENCHMARKS.md/.json/.png (default: .)")
    sp.add_argument("--seeds", type=int, help="seeds of the KD-gain rows (the distill stage with and without the "
                    "teacher), the gain stated with its spread; default 1 for classification, 2 for detection")
    sp = sub.add_parser("sweep", help="a study over config fields (Optuna): each trial a run derived from --run, "
                        "chosen on the held-out split; writes sweep.md/.json, convergence and heatmap plots")
    run_args(sp)
    sp.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=V1,V2,...",
                    help="a config field and its values, e.g. distill.temperature=1,2,4,8 (repeat for more fields)")
    sp.add_argument("--seeds", type=int, default=1, help="run each setting at seeds seed .. seed+N-1 (default 1)")
    sp.add_argument("--study", help="study name (default: the swept fields); trials of the same setting are shared "
                    "between studies of one run")
    sp.add_argument("--storage", help="Optuna storage URL shared by every worker of the study (default: "
                    "sqlite:///RUN/sweeps/STUDY/study.db)")
    sp.add_argument("--sampler", choices=("grid", "tpe"), default="grid",
                    help="grid: every setting at every seed; tpe: --trials draws from the same values")
    sp.add_argument("--trials", type=int, help="tpe: number of trials (default: the grid's size)")
    sp.add_argument("--until", choices=STAGE_ORDER, help="run each trial through this stage and score it there "
                    "(default: the first stage that reads each swept field: distill for distill.* and data.*)")
    sp.add_argument("--prune-trials", action="store_true",
                    help="stop a trial whose held-out metric after an epoch is below the median of earlier trials")
    sp.add_argument("--out", type=path_arg, help="folder for the report (default: RUN/sweeps/STUDY)")
    sp.add_argument("--into", type=path_arg, help="also write the report as a section of this Markdown file (e.g. "
                    "BENCHMARKS.md), its plots beside it")
    sp.add_argument("--title", help="a line saying what the study compares (shown in its heading)")
    sp = sub.add_parser("import-results", help="merge a device's results.json (from a TensorRT bundle's "
                        "edgepipe_trt.py) into the run; the report shows it beside the estimate")
    sp.add_argument("--run", type=path_arg, required=True, help="the run whose compile stage wrote the bundle")
    sp.add_argument("results", type=path_arg, help="results.json written on the device")
    sp = sub.add_parser("report", help="write report.md and report.html with plots")
    sp.add_argument("--run", type=path_arg, required=True)
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
    src.add_argument("--onnx", type=path_arg, help="ONNX file; its layers are read from the graph (shape inference)")
    sp.add_argument("--kwargs", default="{}", help='architecture kwargs as JSON, e.g. \'{"num_classes": 1000}\'')
    sp.add_argument("--input-shape", help="one image's shape C,H,W (needed with --arch), e.g. 3,224,224")
    sp.add_argument("--target", required=True, help="hardware profile name, alias or YAML path")
    sp.add_argument("--dtype", help="deployed dtype (default: int8 where the target lists it, else its best float)")
    sp.add_argument("--batch", type=int, default=1, help="images per inference (default 1)")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


_EMPTY_HINT = {"run": "a run folder, e.g. runs/my-run",
               "config": "a config YAML file or a shipped recipe name (digits)",
               "target": "a hardware profile name, alias or YAML file (see `edgepipe profiles`)",
               "artifact": "an artifact folder", "onnx": "an ONNX file", "out": "an output folder",
               "results": "the results.json written on the device", "device": "a hardware profile name",
               "data": "the ImageFolder root", "teacher": "a torch.export .pt2 file", "dtype": "a dtype, e.g. fp32",
               "name": "a profile name"}
# What a run being created holds before its manifest.json is written
_OWN_FILES = {".edgepipe.lock", ".edgepipe-ranks", "config.yaml", "profile.yaml"}


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is created, what would silently mean something else: an empty value (``--run ""`` is
    the current folder, ``--target ""`` would keep the run's target) and a --run folder that is not a run folder
    (a command must not turn a folder of other files into a run, nor leave its lock file in a folder it refuses)."""
    positional = {"validate": "config", "import-results": "results", "profiles": "name"}.get(args.command)
    for name, hint in _EMPTY_HINT.items():
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            flag = name.upper() if name == positional else f"--{name}"
            raise EdgepipeError(f"{flag} is empty; give {hint}")
    if args.command in ("run", *STAGE_ORDER) and getattr(args, "device", None):
        from edgepipe.device import parse

        parse(args.device, "--device")  # the grammar now; whether this machine has it, when a stage runs
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
    if args.command in ("run", "compare", "sweep", *STAGE_ORDER) and args.config and args.target:  # a new run
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


def check_launchable(args: argparse.Namespace) -> None:
    """Under torchrun only the commands that train run: the pipeline and the single stages."""
    if args.command not in ("run", *STAGE_ORDER):
        raise EdgepipeError(f"edgepipe {args.command} runs in one process; start it without torchrun (under torchrun "
                            f"only `run` and the stage commands, which train on every rank)")
