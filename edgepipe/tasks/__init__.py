"""Tasks, registered by name: what is specific to classification, detection or text (see ``edgepipe.tasks.base``).

``task:`` in the config names one; without it the data decides (``data.kind``: digits and imagefolder are
classification), so every config written before tasks existed means what it meant. A module in this package is
found by its task's name (``edgepipe/tasks/<name>.py``); a task defined elsewhere (a user's package, a test)
registers itself with ``register`` when its module is imported.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from edgepipe.errors import EdgepipeError

if TYPE_CHECKING:
    from edgepipe.tasks.base import Task

DEFAULT = "classification"
"""The task of a config that names none and of an artifact that records none (every run made before tasks)."""
_REGISTRY: dict[str, Task] = {}
T = TypeVar("T")


def register(cls: type[T]) -> type[T]:
    """Class decorator: register one instance of a ``Task`` subclass under its ``name``."""
    from edgepipe.tasks.base import Task

    if not (isinstance(cls, type) and issubclass(cls, Task)) or not isinstance(getattr(cls, "name", None), str):
        raise EdgepipeError(f"edgepipe.tasks.register: {cls!r} is not a Task subclass with a name")
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def known_tasks() -> tuple[str, ...]:
    _discover()
    return tuple(sorted(_REGISTRY))


def get_task(name: str) -> Task:
    """The registered task ``name`` (importing ``edgepipe.tasks.<name>`` on first use)."""
    if name not in _REGISTRY:
        _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EdgepipeError(f"task: unknown task '{name}' (known: {', '.join(sorted(_REGISTRY))}); name one of those, "
                            "or register yours with edgepipe.tasks.register (see README, Adding a task)") from None


def default_task(data_kind: str) -> str:
    """The task a ``data.kind`` implies when the config names none."""
    _discover()
    return next((name for name, task in sorted(_REGISTRY.items()) if data_kind in task.data_kinds), DEFAULT)


def task_of(config: Any) -> Task:
    """The task of a pipeline config (``config.task``, resolved from the data when it names none)."""
    return get_task(config.task or default_task(config.data.kind))


def task_of_artifact(artifact: Any) -> Task:
    """The task an artifact was made for (recorded in its meta; classification for artifacts older than tasks)."""
    meta: Mapping[str, Any] = artifact.meta or {}
    return get_task(meta.get("task") or DEFAULT)


def task_data(task: Task, config: Any) -> Any:
    """The splits a task trains and is scored on: its own loader (``Task.load_data``), else the data ``data.kind``
    names (``edgepipe.data.loading.run_data``)."""
    from edgepipe.data.loading import run_data

    own = task.load_data(config)
    return own if own is not None else run_data(config)
