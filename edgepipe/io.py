"""Atomic, rank-aware file writes.

Every artifact and record is written to a temporary file in the same folder and moved into place with
``os.replace``, so a run interrupted at any instant (even by SIGKILL) leaves either the old file or the
new one, never half of one. Under torch.distributed only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised torch.distributed group."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then atomically move ``tmp_path`` to ``path``; on a non-zero torch.distributed rank,
    nothing (rank 0 writes the one copy every rank then reads, see edgepipe.training.distributed)."""
    path = Path(path)
    if not is_main_process():
        return path
    from edgepipe.engine import signals

    path.parent.mkdir(parents=True, exist_ok=True)
    with signals.deferred():  # a Ctrl-C stops the command after this write, never between mkstemp and the cleanup
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files follow the user's umask

            write(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


LOCK_FILE = ".edgepipe.lock"


def lock_holder(path: Path) -> int | None:
    """PID holding the flock on ``path``, from /proc/locks (Linux); None where that cannot be read."""
    try:
        inode = path.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].split(":")[-1] == str(inode):
                return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` while a command writes to it (``fcntl.flock``, released by the OS
    even on SIGKILL). A second writer fails at once with one line naming the holder's PID, or with ``wait`` (a sweep's
    trial, which another worker may be running) waits for it. The lock file is empty and never rewritten, so taking
    the lock leaves a finished run's files as they were."""
    import fcntl

    from edgepipe.errors import EdgepipeError

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgepipeError(f"{run_dir}: is a file, not a run folder; give --run a folder path")
    created = not run_dir.exists()
    path = run_dir / LOCK_FILE
    lock_created, held = not path.exists(), False
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as e:
        raise EdgepipeError(f"{run_dir}: cannot create the run folder or its lock file ({e.strerror}); check the "
                            "path and its permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = lock_holder(path)
            raise EdgepipeError(f"{run_dir}: another edgepipe command{f' (PID {pid})' if pid else ''} is writing to "
                                "this run folder; wait for it to finish or stop it, then run this again") from None
        held = True
        yield
    except BaseException:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:  # a new run that wrote nothing
            path.unlink()
            run_dir.rmdir()
        elif held and lock_created and not (run_dir / "manifest.json").exists():  # a folder that is no run: as it was
            path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock
