"""The ``edgepipe`` command's entry: the console script (``entry``) and ``python -m edgepipe`` (for launchers that
start a module, ``torchrun -m edgepipe``). Both take over SIGINT and SIGTERM before importing the CLI and the
libraries behind it (edgepipe.engine.signals), so a Ctrl-C at any moment, even while Python is still importing, ends in
one line and not in a KeyboardInterrupt traceback."""
import sys


def entry() -> int:
    from edgepipe.engine import signals

    signals.install()  # before edgepipe.cli's imports: a Ctrl-C while they run is noted, then raised inside main()
    signals.quiet_telemetry()
    from edgepipe.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(entry())
