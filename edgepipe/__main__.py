"""``python -m edgepipe``: the ``edgepipe`` command, for launchers that start a module (``torchrun -m edgepipe``)."""
import sys

from edgepipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
