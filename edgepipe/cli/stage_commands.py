"""The ``edgepipe`` commands that run stages or measure their artifacts: ``run``, each stage (``compile`` also
standalone on an ONNX file), ``bench`` and ``compare``, with how a command opens the run it writes to."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edgepipe.cli.progress import print_table, progress_bars, summary
from edgepipe.errors import EdgepipeError

log = logging.getLogger("edgepipe")


def run_command(args: argparse.Namespace) -> int:
    """`edgepipe run` and `edgepipe STAGE`: open (or prove and create) the run, then run the pipeline or the one
    stage; rank 0 shows progress, the stage table and (after `run`) writes the report."""
    cmd = args.command
    run = _open_run(args)
    from edgepipe.engine.pipeline import run_pipeline, run_stage

    from edgepipe.training import distributed

    if not distributed.is_main():  # the other ranks train their shards and wait; rank 0 shows and writes
        if cmd == "run":
            run_pipeline(run, force_from=args.force)
        else:
            run_stage(run, cmd, force=args.force)
        return 0
    with progress_bars() as progress:
        if cmd == "run":
            run_pipeline(run, force_from=args.force, progress=progress,
                         on_stage=lambda name, m: log.info("%s: %s", name, summary(m)))
        else:
            m = run_stage(run, cmd, force=args.force, progress=progress)
            log.info("%s: %s", cmd, summary(m))
    print_table(run.root)
    if cmd == "run" and not args.no_report:
        from edgepipe.reporting.report import write_report

        md, html = write_report(run.root)
        print(f"report: {md} and {html}")
    return 0


def compile_command(args: argparse.Namespace) -> int:
    """`edgepipe compile`: standalone with --onnx (what a deploy bundle runs on the device), else the stage."""
    return compile_standalone(args) if args.onnx else run_command(args)


def _open_run(args: argparse.Namespace):
    """The run a command writes to. A new config or target is proven first (edgepipe.engine.prepare.preflight) and only
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
    from edgepipe.engine.prepare import preflight
    from edgepipe.engine.run import Run

    exists = (args.run / "manifest.json").exists()
    if not (args.config or args.target):
        run = _with_device(Run.open(args.run), args)
        preflight(run)
        return run
    if not (args.config and args.target) and not exists:
        raise EdgepipeError("a new run folder needs both --config and --target")
    if exists and args.target:
        from edgepipe.engine.run import read_manifest
        from edgepipe.profiles import get_profile

        if get_profile(args.target).name != read_manifest(args.run / "manifest.json")["target"]:
            return _open_target_run(args)
    existing = Run.open(args.run) if not (args.config and args.target) else None
    config = load_config(args.config) if args.config else existing.config
    run = _with_device(Run.create(args.run, config, args.target or existing.profile.name, write=False), args)
    preflight(run)
    run.write_files()
    return run


def _with_device(run, args: argparse.Namespace):
    """``run`` with this command's ``--device`` in place of its config's (checked in preflight like the config's;
    no stage's key holds it: the stages record the device they ran on)."""
    if getattr(args, "device", None):
        from edgepipe.device import parse

        kind, index = parse(args.device, "--device")
        run.config = run.config.model_copy(update={"device": kind if index is None else f"{kind}:{index}"})
    return run


def _open_target_run(args: argparse.Namespace):
    """A finished run given another --target: the target-dependent stages run in ``RUN/targets/<profile name>/``,
    sharing the stages whose key does not change (edgepipe.engine.prepare.target_run); the run's own files stay as they
    are. Proven (preflight) before anything is written, like any new config or target."""
    from edgepipe.config import load_config
    from edgepipe.engine.prepare import preflight, target_run
    from edgepipe.engine.run import Run, write_target_run

    parent = Run.open(args.run)
    config = load_config(args.config) if args.config else parent.config
    force = args.force if args.command == "run" else (args.command if args.force else None)
    view, shared = target_run(parent, config, args.target, config_file=args.config, force=force)
    preflight(_with_device(view, args))
    run = write_target_run(parent, view, shared, args.target)
    log.info("target %s: %s in %s (sharing %s with %s)", run.profile.name, ", ".join(run.own_stages()) or "nothing",
             run.root, ", ".join(shared) or "nothing", parent.root)
    return run


def compile_standalone(args: argparse.Namespace) -> int:
    """`edgepipe compile --onnx model.onnx --target T --out DIR`: what a deploy bundle runs on the device."""
    import onnx

    from edgepipe.backends import get_backend
    from edgepipe.profiles import get_profile

    if not args.target or not args.out:
        raise EdgepipeError("standalone compile needs --onnx, --target and --out")
    if not args.onnx.is_file():
        raise EdgepipeError(f"{args.onnx}: ONNX file not found")
    profile = get_profile(args.target)
    backend = get_backend(profile.backend)
    ok, reason = backend.available()
    if backend.BUILDS_ON_DEVICE and not ok:
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
    artifact.meta.setdefault("input_shape",
                             [d.dim_value for d in dims[1:]] if all(d.dim_value for d in dims[1:]) else None)
    artifact.meta.setdefault("target", profile.name)
    artifact.save()
    print(f"compiled {args.onnx} for {profile.name} ({dtype.value}) -> {artifact.root} ({artifact.kind.value})")
    for k, v in records.items():
        print(f"  {k}: {v}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    """`edgepipe bench`: every stage artifact of a run (or one artifact folder) across backends, dtypes, batches."""
    from edgepipe.measure.bench import run_bench
    from edgepipe.engine.run import Run

    if args.config:  # the user's own config: a factory or trust_pickle program it names may build the models
        from edgepipe.config import load_config
        from edgepipe.models.trust import trust_config

        trust_config(load_config(args.config))
    if args.artifact:
        from edgepipe.measure.bench import bench_artifact

        if not args.target:
            raise EdgepipeError("bench --artifact needs --target")
        from edgepipe.profiles import get_profile

        with progress_bars() as progress:
            out = bench_artifact(args.artifact, get_profile(args.target), progress=progress)
        print(f"wrote {out}")
        return 0
    if not args.run:
        raise EdgepipeError("bench needs --run RUN_FOLDER (or --artifact DIR --target T)")
    run = Run.open(args.run)
    with progress_bars() as progress:
        result = run_bench(run.root, run.profile, run.config.bench, progress=progress)
    print(f"bench: {len(result.get('rows', []))} measurements -> {run.root / 'bench'}")
    return 0


def compare_command(args: argparse.Namespace) -> int:
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
            raise EdgepipeError(f"--data {args.data}: not a folder; give the dataset root (an ImageFolder holding train/ and "
                                "test/, or the detection data in its data.kind layout)")
        data["data"]["path"] = args.data
    if args.teacher:
        if not Path(args.teacher).is_file():
            raise EdgepipeError(f"--teacher {args.teacher}: file not found; give the teacher's torch.export .pt2")
        data["teacher"]["model"] = {"program": args.teacher}
    config = validate_config(data, args.config)
    from edgepipe.engine.prepare import preflight
    from edgepipe.engine.run import Run

    preflight(Run.create(args.run, config, args.target, write=False))
    command = "edgepipe " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "edgepipe compare"
    from edgepipe.tasks import task_of

    detection = task_of(config).name == "detection"
    text = task_of(config).name == "text"
    if args.seeds is not None and args.seeds < 1:
        raise EdgepipeError(f"--seeds {args.seeds}: give 1 or more")
    with progress_bars() as progress:
        if text:
            from edgepipe.reporting.text_bench import compare_text

            result = compare_text(config, args.run, args.target, args.device, args.out, command, progress,
                                  seeds=args.seeds or 1)
        elif detection:
            from edgepipe.reporting.detection_bench import compare_detection

            result = compare_detection(config, args.run, args.target, args.device, args.out, command, progress,
                                       seeds=args.seeds or 2)
        else:
            config_file = Path(args.config) if Path(args.config).is_file() else configs_dir() / f"{args.config}.yaml"
            result = compare(config, args.run, args.target, args.device, args.out, command, progress,
                             recipe_notes=leading_comment(config_file), seeds=args.seeds or 1)
    for c in result["checks"]:
        print(f"{'pass' if c['pass'] else 'MISS'}  {c['claim']}  (measured {c['measured']:.4g})")
    written = ("the detection section, BENCHMARKS-detection.json and .png" if detection else
               "the text section, BENCHMARKS-text.json and .png" if text else "BENCHMARKS.json and BENCHMARKS.png")
    print(f"wrote {args.out / 'BENCHMARKS.md'} ({written})")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """`edgepipe sweep`: the study over ``--set`` fields (edgepipe.engine.sweep) and its report
    (edgepipe.reporting.sweep_report)."""
    import hashlib
    import re
    import shlex

    from edgepipe.engine.sweep import Space, parse_sets, sweep
    from edgepipe.io import run_lock
    from edgepipe.reporting.sweep_report import label, write_report

    fields = parse_sets(args.sets)
    if args.seeds < 1:
        raise EdgepipeError(f"--seeds {args.seeds}: give 1 or more")
    if args.trials is not None and (args.sampler != "tpe" or args.trials < 1):
        raise EdgepipeError("--trials N (N >= 1) goes with --sampler tpe; the grid runs every setting at every seed")
    from edgepipe.config import load_config
    from edgepipe.engine.run import Run
    from edgepipe.engine.stage import STAGE_ORDER
    from edgepipe.engine.sweep import check_space, stages_of

    if args.config:
        config = load_config(args.config)
    elif (args.run / "manifest.json").exists():
        config = Run.open(args.run).config
    else:
        raise EdgepipeError(f"{args.run}: not a run folder yet; give --config and --target to start the sweep's base run")
    space = Space(fields, list(range(config.seed, config.seed + args.seeds)))
    check_space(config, space)  # before anything is written: a bad --set leaves the run folder as it was
    stages_of(config, space, tuple(STAGE_ORDER), args.until)
    with run_lock(args.run, wait=True):  # opened (or created) by one worker at a time; released for the trials
        run = _open_run_here(args)
    # default: the swept fields' names and a digest of their values and seeds (another grid is another study)
    digest = hashlib.sha256(repr((sorted(fields.items()), space.seeds)).encode()).hexdigest()[:6]
    swept = [f.split(".")[-1] for f in space.swept]
    study = args.study or re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join([*swept, f"seeds{args.seeds}", digest]))
    command = "edgepipe " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "edgepipe sweep"
    with progress_bars() as progress:
        result = sweep(run, space, study, args.storage, args.sampler, args.trials, args.prune_trials, progress,
                       until=args.until)
    out = args.out or Path(result["folder"])
    summary = write_report(result, out, command, into=args.into, title=args.title)
    chosen = summary["chosen"]
    if chosen:
        print(f"chosen on the held-out split: {label(chosen['setting'])} ({chosen['n']} seed(s))")
    if summary["versus_default"]:
        print(f"against the config's own setting: {summary['versus_default']['reading']}")
    print(f"wrote {out / 'sweep.md'} ({summary['completed']} trials completed, {summary['pruned']} pruned)")
    return 0
