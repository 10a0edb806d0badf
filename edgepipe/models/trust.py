"""What may run code when a model is built: a factory or ``trust_pickle``, only from the user's own config.

A run folder is data that travels between machines and people; a ``model.json`` or ``config.yaml`` in it may name a
factory or an unpickled program only when the config given to this command names the same (``check_trusted``).
The trust set lives for one command (``forget_trusted``, called by ``edgepipe.cli.main``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgepipe.config import ModelSpec
from edgepipe.errors import EdgepipeError

_TRUSTED: set[str] = set()
"""Trust keys (``_trust_key``) of the factories and trust_pickle programs this command may honour when a file in a
run folder names them: those of a config the user gave it (``trust_config``) and the builds this process saved."""
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"missing:{path}"
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _trust_key(spec: ModelSpec) -> str | None:
    """What must be trusted for ``spec`` to build: a factory with its kwargs, or the very bytes of a program to
    unpickle (a run folder's copy of it may have been swapped). None: it runs no code from anywhere (a registered
    architecture, or a program loaded by ``load_program``'s restricted loader)."""
    if spec.factory:
        return json.dumps({"factory": spec.factory, "kwargs": spec.kwargs}, sort_keys=True, default=str)
    if spec.program and spec.trust_pickle:
        return f"program-sha256:{_file_digest(Path(spec.program))}"
    return None


def trust(spec: ModelSpec) -> None:
    """Honour ``spec``'s factory or trust_pickle when a run-folder file names the same this command."""
    key = _trust_key(spec)
    if key is not None:
        _TRUSTED.add(key)


def trust_config(config: Any) -> None:
    """Trust the models of a config the user gave this command (a ``PipelineConfig``); a config read back from a
    run folder (its specs carry their origin) trusts nothing."""
    for spec in (config.teacher.model, config.distill.student):
        if spec._origin is None:
            trust(spec)


def forget_trusted() -> None:
    """Start a command trusting nothing (edgepipe.cli.main)."""
    _TRUSTED.clear()


def from_run_folder(spec: ModelSpec, origin: str | Path) -> ModelSpec:
    """Mark ``spec`` as read from ``origin``, a file in a run folder (see ``check_trusted``)."""
    spec._origin = str(origin)
    return spec


def check_trusted(spec: ModelSpec) -> None:
    """Refuse a factory or trust_pickle read from a run folder unless the user's config for this command names it.

    A run folder is data that travels between machines and people (and back from a device); a ``model.json`` or a
    ``config.yaml`` in it naming ``os:system`` must not run it. Specs given in code or in the user's config (no
    ``_origin``) pass; so do registered architectures and programs loaded without trust_pickle."""
    if spec._origin is None:
        return
    key = _trust_key(spec)
    if key is None or key in _TRUSTED:
        return
    if spec.factory:
        raise EdgepipeError(f"{spec._origin} names factory {spec.factory[:200]!r} (kwargs {str(spec.kwargs)[:200]}): "
                            "edgepipe runs code only from a config you give this command, never from a run folder; "
                            "if you trust it, rerun with --config FILE that names this factory")
    raise EdgepipeError(f"{spec._origin} sets trust_pickle: true for {spec.program}: edgepipe unpickles a program only "
                        "when a config you give this command says so for that very file; if you trust it, rerun with "
                        "--config FILE naming it with trust_pickle: true")
