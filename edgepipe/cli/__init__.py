"""The ``edgepipe`` command: run the pipeline or any one stage, bench, report, list profiles.

Library code only logs; this package decides what reaches the terminal (edgepipe.cli.progress: rich progress and
tables). Bad input is one line on stderr naming the file or field, and exit code 2; an interrupted run exits 130 and
resumes when the same command is given again. Here: ``main`` (signals, errors, torchrun) and ``COMMANDS``, each
command's handler; the parser is edgepipe.cli.parser, the handlers edgepipe.cli.stage_commands and
edgepipe.cli.tool_commands.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Callable

from edgepipe.cli import stage_commands, tool_commands
from edgepipe.cli.parser import build_parser, check_args, check_launchable
from edgepipe.engine import signals
from edgepipe.errors import EdgepipeError
from edgepipe.engine.stage import STAGE_ORDER

log = logging.getLogger("edgepipe")

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {
    "run": stage_commands.run_command,
    **dict.fromkeys(STAGE_ORDER, stage_commands.run_command),
    "compile": stage_commands.compile_command,  # also standalone, with --onnx
    "bench": stage_commands.bench_command,
    "compare": stage_commands.compare_command,
    "sweep": stage_commands.sweep_command,
    "report": tool_commands.report_command,
    "import-results": tool_commands.import_results_command,
    "profiles": tool_commands.profiles_command,
    "models": tool_commands.models_command,
    "cache": tool_commands.cache_command,
    "validate": tool_commands.validate_command,
    "estimate": tool_commands.estimate_command,
}
"""Each command of edgepipe.cli.parser.build_parser and the function that carries it out (its exit code)."""
UNLOCKED = ("sweep",)
"""Commands that lock the run folders they write themselves: a sweep's workers share the base run (locked while its
shared stages run) and lock one trial's folder at a time (edgepipe.engine.sweep)."""


def main(argv: list[str] | None = None) -> int:
    """The ``edgepipe`` command (``argv`` None: the program's own arguments). SIGINT or SIGTERM at any moment: one
    line naming what stopped and the command that resumes it, exit 130/143, no traceback (edgepipe.engine.signals)."""
    signals.quiet_telemetry()  # before anything imports openvino or nncf
    signals.RESUMABLE.update(("run", "compare", "sweep", *STAGE_ORDER))
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
    args = build_parser().parse_args(argv)
    from edgepipe.training import distributed

    # each command trusts only the config it is given (not yet imported: nothing trusted)
    if "edgepipe.models.trust" in sys.modules:
        sys.modules["edgepipe.models.trust"].forget_trusted()

    try:
        check_args(args)  # empty values, a --run that is no run folder: before anything is created or joined
        launch = distributed.init_from_env()  # torchrun: join the process group; alone: None
    except EdgepipeError as e:
        print(f"edgepipe: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    _setup_logging(args.verbose, launch)
    who = f"rank {launch.rank} of {launch.world_size}: " if launch else ""
    try:
        if launch is not None:
            check_launchable(args)
            signal.signal(signal.SIGTERM, _stop)  # torchrun stops every rank with SIGTERM when one fails
        if getattr(args, "run", None) is None or args.command in UNLOCKED:
            return COMMANDS[args.command](args)
        from edgepipe.io import run_lock

        with run_lock(args.run) if distributed.is_main() else contextlib.nullcontext():  # one writer per run folder
            distributed.check_shared_run_folder(args.run)
            return COMMANDS[args.command](args)
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
    default = "check the path and run the same command again"
    return f"{where}{e.strerror or type(e).__name__}; {advice.get(e.errno, default)}"


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
