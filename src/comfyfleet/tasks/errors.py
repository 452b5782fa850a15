"""Why the task service did not carry out a command: one root, one subclass per decision the caller makes.

Each error has a stable machine ``code`` (snake_case), a ``message`` for people and, where the fault has a
place in the command, ``problems``: one :class:`Problem` per location (``("payload", "3", "seed")``,
``("pool",)``, ``("inputs", 0)``), named after the command's fields. Each front door maps these errors to its
own wire shape in one place: the REST API to ``{"error", "code", "message", "details"}`` with a 4xx status,
the ComfyUI gateway to ComfyUI's 400 body.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a command, at ``location`` (a path into the command's fields). ``extra`` carries
    more facts a client may match on (a graph problem's ``node_id`` and ``input_name``)."""

    location: tuple[str | int, ...]
    message: str
    type: str
    extra: Mapping[str, Any] = field(default_factory=dict)


class TaskCommandError(Exception):
    """Root of the task service's errors: a command it refused or could not apply."""

    def __init__(self, code: str, message: str, problems: Iterable[Problem] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.problems = tuple(problems)


class Rejected(TaskCommandError):
    """The command is wrong as sent (its graph, priority, pool, inputs or webhook): change it and send it again.

    ``comfyui_response``: when the graph was checked against the fleet's node catalogue as ComfyUI checks it,
    ComfyUI's own answer (``{"error", "node_errors"}``, tracebacks removed), for front doors that speak it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        problems: Iterable[Problem] = (),
        *,
        comfyui_response: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message, problems)
        self.comfyui_response = comfyui_response


class IdempotencyConflict(TaskCommandError):
    """The command's idempotency key was used before, and this reuse is not allowed (another request under the
    same key, a key that may be used only once, or a task id another tenant holds). ``task_id``: the task the key
    names when the caller may see it, else None."""

    def __init__(self, code: str, message: str, key: str, task_id: str | None) -> None:
        super().__init__(code, message)
        self.key = key
        self.task_id = task_id


class TaskNotFound(TaskCommandError):
    """No such task, or not one the caller may see."""

    def __init__(self, message: str) -> None:
        super().__init__("not_found", message)


class TaskStateConflict(TaskCommandError):
    """The task's state forbids the command now (it already ended, or already started for a new priority)."""

    def __init__(self, message: str) -> None:
        super().__init__("conflict", message)
