"""``python -m edgepipe``: the ``edgepipe`` command, for launchers that start a module (``torchrun -m edgepipe``)."""
import sys

if __name__ == "__main__":
    from edgepipe import signals

    signals.install()  # before edgepipe.cli's imports: a Ctrl-C while they run is noted, then raised inside main()
    signals.quiet_telemetry()
    from edgepipe.cli import main

    sys.exit(main())
