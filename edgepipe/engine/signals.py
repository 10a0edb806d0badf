"""Ctrl-C and SIGTERM: one line, exit 130/143, the stage recorded ``interrupted``; never a traceback, never a crash.

The first SIGINT or SIGTERM raises ``Interrupted`` (a KeyboardInterrupt, so ``except Exception`` in a library does
not swallow it) in the main thread; the engine records the running stage as ``interrupted`` and the CLI prints one
line naming it and the command that resumes it. Every later signal is only noted: raising again would cut the
recording or the line short with a second traceback. Where native code calls back into Python (OpenVINO's model
conversion calls Python telemetry and decoder functions from C++), ``deferred()`` holds the exception back until the
native call has returned: an exception raised inside such a callback is converted by OpenVINO's C++ into a
RuntimeError ("Check 'false' failed ... KeyboardInterrupt"), i.e. a traceback and a stage recorded ``failed``.

``quiet_telemetry`` keeps OpenVINO's and NNCF's telemetry out of edgepipe's processes (see there).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_AFTER_S = 30.0
"""A signal this long after the first, while the process still runs (something swallowed the interruption or hangs
in native code): leave at once."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised once in the main thread (``signum`` says which)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_first: tuple[int, float] | None = None  # the first signal and when it came
_raised = False  # Interrupted has been raised for it
_armed = False  # between arm() and disarm(): a signal raises; otherwise it is only noted
_defer = 0  # depth of deferred() sections
_stage: tuple[str, str] | None = None  # (stage, run folder) in progress
_previous: dict[int, object] | None = None  # the handlers install() replaced
_watching = False  # the watcher thread runs
RESUMABLE: set[str] = set()
"""The commands that resume where they stopped (the CLI fills it: run, compare and the stages)."""
_line_printed = False


def install() -> None:
    """Take over SIGINT and SIGTERM (main thread only; a second call keeps the first's state, so a signal that came
    while the program was still importing is not lost).

    The signals are blocked in the main thread (and so in every thread it starts later: torch's, OpenVINO's and ONNX
    Runtime's pools) and received by one watcher thread (``_watch``), which hands each to the main thread's Python
    handler. Why: OpenVINO's CPU plugin installs an alternate signal stack in the thread that compiles, and Python's
    handlers run on it (SA_ONSTACK); a SIGTERM or Ctrl-C arriving while the main thread ran OpenVINO or ONNX Runtime
    code (``ov.Core()``, ``compile_model``, ``InferenceSession``) was killed by the kernel with SIGSEGV (si_code
    SI_KERNEL, address 0: the signal frame could not be written; seen in 8 of 30 SIGTERMs ~0.1 s into `edgepipe
    compile` on OpenVINO, on a Sapphire Rapids host whose AMX state makes frames large). No signal frame is ever built
    on a thread running native code now; the watcher only waits."""
    global _previous, _watching
    if _previous is not None or threading.current_thread() is not threading.main_thread():
        return
    _previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    if not _watching:
        _watching = True
        os.register_at_fork(after_in_child=_unblock)  # forked children (DataLoader workers) get them as usual
        threading.Thread(target=_watch, name="edgepipe-signals", daemon=True).start()


def _unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def _watch() -> None:
    """The one thread that receives SIGINT and SIGTERM: each runs the main thread's Python handler for it
    (``_thread.interrupt_main``), at the main thread's next Python step. One that comes FORCE_AFTER_S after the
    first while the main thread is still inside native code (its handler cannot run there) leaves at once."""
    import _thread

    while True:
        global _first
        signum = signal.sigwait(SIGNALS)
        if signal.getsignal(signum) is _handler:
            if _first is None:
                _first = (signum, time.monotonic())  # the order they came in, for the line and the exit code
            elif time.monotonic() - _first[1] > FORCE_AFTER_S:
                _force(signum)  # the main thread is stuck (in native code): leave from here
        _thread.interrupt_main(signum)


def arm() -> None:
    """From here the first signal raises Interrupted (at once, for one that came before)."""
    global _armed
    _armed = True
    check()


def disarm() -> None:
    global _armed
    _armed = False


def check() -> None:
    """Raise Interrupted for a signal that has not stopped the work yet: one that came during a deferred() section,
    or whose exception a library swallowed (the engine calls this before every stage and on every progress step)."""
    global _raised
    if _first is not None and _armed and _defer == 0:
        _raised = True
        raise Interrupted(_first[0])


def received() -> int | None:
    """The first signal this command got, or None."""
    return _first[0] if _first else None


def name() -> str:
    """The signal's name (SIGINT for a KeyboardInterrupt raised otherwise, e.g. before install())."""
    return signal.Signals(received() or signal.SIGINT).name


def _handler(signum: int, frame: object) -> None:
    global _first
    if _first is None:
        _first = (signum, time.monotonic())
    if not _raised:  # the first signal (as the watcher noted it: Python runs pending handlers by signal number)
        check()
        return
    if time.monotonic() - _first[1] > FORCE_AFTER_S:  # the first one did not stop it: stop now, without teardown
        _force(signum)
    # Otherwise ignored: the first one is unwinding, recording the stage and printing the line.


def _force(signum: int) -> None:
    if not _line_printed:
        sys.stderr.write(f"edgepipe: {signal.Signals(signum).name} again, {FORCE_AFTER_S:g} s after the first; "
                         "leaving at once (run the same command again to resume from the last checkpoint)\n")
    leave(128 + (_first or (signum, 0))[0])


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal back while native code that calls into Python runs (OpenVINO's conversion); raise it after."""
    global _defer
    _defer += 1
    try:
        yield
    finally:
        _defer -= 1
    if not _raised:  # one that was raised already is unwinding (e.g. recording the stage): let it
        check()


def set_stage(name: str | None, run_root: object = None) -> None:
    """Name the stage in progress (None: none) for the line an interruption prints. The engine names it before the
    stage is recorded running and clears it once it is recorded done; a stage stopped by an exception stays named."""
    global _stage
    _stage = (name, str(run_root)) if name else None


def line(command: str, argv: list[str], who: str = "") -> str:
    """The one line for an interruption: which signal, what it stopped, and the command that resumes."""
    import shlex

    global _line_printed
    _line_printed = True
    signum = received() or signal.SIGINT
    how = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
    again = "edgepipe " + shlex.join(argv)
    if _stage is not None:
        name, root = _stage
        return (f"edgepipe: {who}interrupted by {how} during the {name} stage of {root} (recorded as interrupted, "
                f"nothing half-written); `{again}` resumes it from its last checkpoint")
    if _first is not None and not _raised:  # it came after the command's last step
        return (f"edgepipe: {who}{how} came as `edgepipe {command}` was finishing; what it wrote is complete "
                f"(`{again}` finds nothing left to do)")
    resumable = command in RESUMABLE
    return (f"edgepipe: {who}interrupted by {how} during `edgepipe {command}` (nothing half-written); `{again}` "
            + ("resumes it" if resumable else "runs it again"))


def leave(code: int) -> None:
    """Exit now, skipping interpreter teardown. After an interruption the teardown would run with native libraries
    still holding threads (OpenVINO's TBB pool, torch's OpenMP pool), and Python puts SIGINT back to its default
    action while it finalizes, so a Ctrl-C in that window killed the process without a line. (The segfaults seen
    on Ctrl-C into `compile` were another cause, signal frames on OpenVINO's alternate stack: see ``install``.)
    Everything edgepipe writes is already written and closed (atomic writes) when this is called; the streams and
    log handlers are flushed first."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    logging.shutdown()
    os._exit(code)


def finish(code: int, program: bool, command: str, argv: list[str]) -> int:
    """End of a command. As a program (the ``edgepipe`` executable, ``python -m edgepipe``) SIGINT and SIGTERM are
    ignored from here (teardown is never cut), a signal that came after the command's last report point still gets
    its line, and an interrupted command leaves at once (``leave``). Called in-process (tests), the caller's
    handlers come back and nothing is left over for the next call."""
    global _previous, _first, _raised, _armed, _defer, _stage, _line_printed
    _armed = False
    if program:
        for s in SIGNALS:  # under torchrun the launcher's SIGTERM handling (edgepipe.cli) stays
            if signal.getsignal(s) is _handler:
                signal.signal(s, signal.SIG_IGN)
    signum = received()
    if signum is not None:
        if not _line_printed:
            print(line(command, argv), file=sys.stderr)
        code = 128 + signum
        if program:
            leave(code)
    if _previous is not None and not program:
        for s, h in _previous.items():
            signal.signal(s, h)
        _unblock()  # in-process callers (tests) get their signals delivered as before
    _previous, _first, _raised, _armed, _defer, _stage, _line_printed = None, None, False, False, 0, None, False
    return code


def quiet_telemetry() -> None:
    """Keep OpenVINO's and NNCF's telemetry out of this process, before either is imported.

    What sends it: ``import openvino`` runs openvino/tools/ovc/__init__.py, which calls
    ``init_ovc_telemetry('OpenVINO')`` and ``send_event("ov", "import", ...)`` (openvino/tools/ovc/telemetry_utils.py);
    every ``convert_model`` sends more (openvino/tools/ovc/convert_impl.py ``_convert``, ``prepare_ir``: a
    TelemetryExtension the C++ frontend calls), and nncf/telemetry/wrapper.py builds ``NNCFTelemetry``. Each event
    goes through openvino_telemetry/backend/backend_ga4.py ``GA4Backend.send``, which starts a
    ``multiprocessing.Process`` that calls ``urlopen`` (3 s timeout): the child processes that printed network
    errors offline and KeyboardInterrupt tracebacks on Ctrl-C (they share the terminal's process group).
    Consent (openvino_telemetry/utils/opt_in_checker.py ``OptInChecker.check``): both callers pass
    ``enable_opt_in_dialog=False``, so without a consent file telemetry is on. openvino_telemetry 2025.2 offers no
    per-process setting: its documented opt-out (``opt_in_out --opt_out``) writes ``~/intel/openvino_telemetry``
    for every OpenVINO tool of the user (and sends an opt-out event), and ``disable_in_ci`` reads CI/TF_BUILD/
    JENKINS_URL, which other libraries read too (torch/_functorch/config.py reads CI). What both callers do support
    is the package being absent: openvino/tools/ovc (telemetry_utils.py, convert_impl.py, utils.py) fall back to
    ``openvino.tools.ovc.telemetry_stub`` on ImportError, and nncf/telemetry/wrapper.py to ``NNCFTelemetryStub``.
    So this process makes ``import openvino_telemetry`` raise ImportError (a ``None`` entry in sys.modules): nothing
    is written to the user's home, no process is started, nothing reaches the network. Child processes forked from
    this one inherit it; a process that has already imported the package (an in-process caller) keeps it."""
    sys.modules.setdefault("openvino_telemetry", None)
