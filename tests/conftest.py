"""Fixtures shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_leaked_launch():
    """Every test leaves this process as it found it: no torchrun launch and no collective in progress (a test that
    fakes one and leaks it would make every later test call collectives that do not exist)."""
    yield
    from edgepipe.training import distributed

    assert distributed.launch() is None and not distributed.collective_active(), \
        "the test left a (fake) torchrun launch or collective behind"


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default recipe (digits) for the Jetson, run for real once per session in one process: the
    default-recipe tests check it, and the torchrun test compares a two-process launch with it."""
    from edgepipe.cli import main

    run = tmp_path_factory.mktemp("default") / "digits-jetson"
    assert main(["run", "--config", "digits", "--target", "jetson", "--run", str(run)]) == 0
    return run


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory):
    """One small finished ImageFolder run on generic-cpu, shared by the bad-input matrices (tests/reliability.py)."""
    from tests.reliability import make_finished

    yield from make_finished(tmp_path_factory)
