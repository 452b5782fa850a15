"""The commands the task service carries out, as each front door hands them over, and what it answers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from comfyfleet.domain import Task


class OnReuse(enum.Enum):
    """What a submission whose idempotency key was used before gets."""

    REPLAY = "replay"
    """The task first created with the key, whatever this request says (ComfyUI's retried ``POST /prompt``)."""
    REPLAY_SAME_REQUEST = "replay_same_request"
    """The task first created with the key if this is the same request; another request is refused
    (the REST API's ``Idempotency-Key``)."""
    REFUSE = "refuse"
    """Nothing: a key is used once and any reuse is refused."""


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A key the client names its request by, so that sending it again does not create a second task.

    The key is stored as the task's ``idempotency_key`` (unique per tenant), or, with ``names_task``, it is the
    new task's id itself (ComfyUI's client-chosen ``prompt_id``: unique across tenants).
    """

    key: str
    on_reuse: OnReuse
    names_task: bool = False
    remember_s: float | None = None
    """Held apart from the task, for this many seconds, instead of on it (Comfy API v2's key: used once and
    remembered for a day, then free again). The key is claimed only once the submission passed its checks,
    and stays claimed if storing the task fails in a way that may have stored it."""

    def __post_init__(self) -> None:
        if self.remember_s is not None and (self.on_reuse is not OnReuse.REFUSE or self.names_task):
            raise ValueError("a key remembered for a time is refused on reuse and does not name the task")


class GraphCheck(enum.Enum):
    """How far the graph is checked before the task is stored."""

    STRUCTURE = "structure"
    """Its shape only: nodes, links, no cycle, size. Node types are the workers' business (they may start later)."""
    FLEET = "fleet"
    """As ComfyUI's ``POST /prompt`` checks it, against the node catalogue of the fleet's workers (the last seen
    when none is up); its shape only when no worker was ever seen."""


@dataclass(frozen=True, slots=True)
class StoredInput:
    """An input file comfyfleet already keeps in its output store (an uploaded Comfy API v2 asset), sent to the
    worker like the task's other inputs: ``name`` is the graph's string that becomes the file's path there.
    Only front doors make these (after checking the caller may use the file); a client never names a location."""

    name: str
    folder: str
    key: str
    size: int
    asset_id: str


@dataclass(frozen=True, slots=True)
class SubmitTask:
    """Store a workflow run for ``tenant``. Unset limits take the server's defaults (``dispatch.*``)."""

    payload: dict[str, Any]
    tenant: str
    priority: int = 0
    workflow_id: str | None = None
    max_retries: int | None = None
    timeout_s: float | None = None
    pool: str | None = None
    inputs: list[dict[str, Any]] | None = None
    stored_inputs: tuple[StoredInput, ...] = ()
    """Input files already in the output store, added to ``inputs`` once those passed their checks."""
    webhook: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    models: list[dict[str, Any]] | None = None
    """Model files the task brings (``{url, sha256, folder, name}``), put on its worker before the prompt."""
    idempotency: Idempotency | None = None
    front: bool = False
    """Ahead of the tasks waiting at the same priority (ComfyUI's ``front``): one priority level up, within the
    limits, once the priority given was checked."""
    graph_check: GraphCheck = GraphCheck.STRUCTURE
    partial_execution_targets: list[Any] | None = None
    """With :attr:`GraphCheck.FLEET`: only these output nodes must be valid (ComfyUI's option of that name)."""


@dataclass(frozen=True, slots=True)
class Submitted:
    """A submission's outcome: the task (as it stands at the end of a wait), whether this command created it,
    and ComfyUI's ``node_errors`` for outputs that failed a fleet check while others passed."""

    task: Task
    created: bool
    node_errors: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Cancel a task: a pending one at once, a running one on its worker. ``tenant``: the caller's tenant,
    None for an administrator (any tenant's task)."""

    task_id: str
    tenant: str | None


@dataclass(frozen=True, slots=True)
class ChangePriority:
    """Give a pending task another priority (it keeps its submission order among equals)."""

    task_id: str
    priority: int
    tenant: str | None
