"""Run-folder file handling: the user's umask, and one writer per run folder."""
from __future__ import annotations

from pathlib import Path


def test_run_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    from edgepipe.io import atomic_write_text

    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import pytest

    from edgepipe.errors import EdgepipeError
    from edgepipe.io import LOCK_FILE, run_lock

    run = tmp_path / "run"
    with run_lock(run):
        code = ("import sys\nfrom edgepipe.cli import main\n"
                f"sys.exit(main(['report', '--run', {str(run)!r}]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
        assert f"another edgepipe command (PID {os.getpid()}) is writing to this run folder" in out.stderr
        with pytest.raises(EdgepipeError, match="another edgepipe command"):  # also within one process
            with run_lock(run):
                pass
    with run_lock(run):  # released
        pass
    assert (run / LOCK_FILE).read_bytes() == b""  # never written: a finished run's files stay byte-identical


def test_a_failed_command_on_a_new_folder_leaves_nothing(tmp_path: Path) -> None:
    import pytest

    from edgepipe.io import run_lock

    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "new"):
            raise RuntimeError("bad config")
    assert not (tmp_path / "new").exists()



def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    import pytest

    from edgepipe.errors import EdgepipeError
    from edgepipe.io import run_lock

    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(EdgepipeError, match="a-file/run: cannot create the run folder or its lock file"):
        with run_lock(tmp_path / "a-file" / "run"):  # fails for every user, root included
            pass
