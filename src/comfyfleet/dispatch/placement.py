"""Placement: which pending task goes to which free worker slot. Pure functions, no I/O.

Rules (DESIGN.md "Dispatch"): never a worker that lacks a node type the graph uses; prefer an idle worker,
then one that already has the task's models loaded. Because a GPU that must load a checkpoint loses seconds,
a worker with a free slot may also pick, within the highest priority present, a later task whose models it
already holds instead of the oldest one. A task passed over ``max_skips`` times goes first regardless, so
nothing starves. With fair share (``dispatch.fair_share``) tenants take turns within a priority (:func:`fair_share`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from comfyfleet.domain import Task


@dataclass(frozen=True, slots=True)
class PendingTask:
    id: str
    priority: int
    pool: str | None
    node_types: frozenset[str]
    models: frozenset[str]
    skips: int = 0
    files: frozenset[str] = frozenset()  # sha256 of the model files the task brings


@dataclass(slots=True)
class Slot:
    """One worker with room for ``free`` more prompts."""

    worker_id: str
    pools: frozenset[str]  # the worker's pool name and its labels
    free: int
    assigned: int  # prompts it already holds
    node_types: frozenset[str] | None  # None: not known yet (any graph may be tried)
    recent_models: Sequence[str] = field(default_factory=tuple)  # most recent first
    tie_break: int = 0  # orders equally loaded workers; replicas use different orders to spread out
    manages_models: bool = False  # comfyfleet can put model files in its models folder (not a static URL)
    model_files: frozenset[str] = frozenset()  # sha256 of model files on its host's disk (no download)


def accepts(slot: Slot, task: PendingTask) -> bool:
    if task.pool is not None and task.pool not in slot.pools:
        return False
    if task.files and not slot.manages_models:
        return False
    return slot.node_types is None or task.node_types <= slot.node_types


def model_affinity(slot: Slot, task: PendingTask) -> int:
    """How well the worker covers the task's models: loaded (recently used) counts most, then files on its
    host's disk (no download), then nothing (it must fetch them). Higher is better, 0 = none."""
    score = 10 * len(task.files & slot.model_files)
    if not task.models:
        return score
    recent = list(slot.recent_models)
    for model in task.models:
        if model in recent:
            # The most recently used model is the one most likely still resident.
            score += 1000 - recent.index(model)
    return score


def unplaceable(task: PendingTask, workers: Collection[Slot]) -> bool:
    """No usable worker (free or not) could ever run this task: every one of its pool lacks a node type."""
    candidates = [slot for slot in workers if task.pool is None or task.pool in slot.pools]
    if not candidates or any(slot.node_types is None for slot in candidates):
        return False
    return all(not task.node_types <= (slot.node_types or frozenset()) for slot in candidates)


def plan(
    window: Sequence[PendingTask],
    slots: Sequence[Slot],
    *,
    model_aware: bool = True,
    max_skips: int = 16,
    steal_backlog: int = 3,
) -> list[tuple[str, str]]:
    """Assign tasks of ``window`` (already in priority-then-FIFO order) to free slots.

    Returns ``(task_id, worker_id)`` pairs. Higher priority always wins: a task of a lower priority is only
    placed when no task of a higher priority can use that slot.
    """
    remaining = list(window)
    free = [slot for slot in slots if slot.free > 0]
    assignments: list[tuple[str, str]] = []
    # Idle workers first, then the least loaded, so a burst spreads over the fleet.
    free.sort(key=lambda slot: (slot.assigned > 0, slot.assigned, slot.tie_break, slot.worker_id))
    progress = True
    while remaining and progress:
        progress = False
        for slot in free:
            if slot.free <= 0 or not remaining:
                continue
            choice = _choose(
                slot,
                remaining,
                slots,
                model_aware=model_aware,
                max_skips=max_skips,
                steal_backlog=steal_backlog,
            )
            if choice is None:
                continue
            remaining.remove(choice)
            assignments.append((choice.id, slot.worker_id))
            slot.free -= 1
            slot.assigned += 1
            progress = True
    return assignments


def _choose(
    slot: Slot,
    remaining: Sequence[PendingTask],
    all_slots: Sequence[Slot],
    *,
    model_aware: bool,
    max_skips: int,
    steal_backlog: int,
) -> PendingTask | None:
    usable = [task for task in remaining if accepts(slot, task)]
    if not usable:
        return None
    top_priority = usable[0].priority
    group = [task for task in usable if task.priority == top_priority]
    head = group[0]
    if not model_aware or head.skips >= max_skips:
        return head
    best = max(group, key=lambda task: (model_affinity(slot, task), -group.index(task)))
    if model_affinity(slot, best) > 0:
        return best
    # Nothing this worker holds: take the oldest task that no other worker would serve better. Failing
    # that, take over work of a model that busy workers hold only when its backlog is long enough that
    # they would not get through it soon: loading a model costs seconds, waiting for a holder may not.
    others = [other for other in all_slots if other is not slot]

    def holders(task: PendingTask, candidates: Sequence[Slot]) -> list[Slot]:
        return [other for other in candidates if model_affinity(other, task) > 0 and accepts(other, task)]

    for task in group:
        if not holders(task, others):
            return task
    free_others = [other for other in others if other.free > 0]
    for task in group:
        if holders(task, free_others):
            continue  # a free worker holding its models takes it in this round
        backlog = sum(1 for other in group if other.models == task.models)
        if backlog > steal_backlog * len(holders(task, others)):
            return task
    return None


def fair_share(tasks: Sequence[Task], running: Mapping[str, int]) -> list[Task]:
    """``tasks`` (in claim order) re-ordered so tenants take turns within each priority: a tenant's next task
    is due after as many turns as it already has tasks running plus tasks ahead of it here. A tenant with a
    long backlog therefore does not hold back another's single task: the other goes next, then turns alternate.
    Higher priorities still come first."""
    ahead: dict[str, int] = {}
    keyed = []
    for task in tasks:
        turn = running.get(task.tenant, 0) + ahead.get(task.tenant, 0)
        ahead[task.tenant] = ahead.get(task.tenant, 0) + 1
        keyed.append((-task.priority, turn, task.seq, task))
    return [task for *_, task in sorted(keyed, key=lambda entry: entry[:3])]


def skipped_ids(window: Sequence[PendingTask], chosen: Collection[str]) -> list[str]:
    """Tasks that were passed over: those before the last chosen one in window order that were not chosen."""
    if not chosen:
        return []
    last = max(index for index, task in enumerate(window) if task.id in chosen)
    return [task.id for task in window[:last] if task.id not in chosen]


def recent_models_after(recent: Sequence[str], used: Collection[str], keep: int = 8) -> list[str]:
    ordered = sorted(used)
    return (ordered + [model for model in recent if model not in used])[:keep]


def pools_of(pool: str, labels: Mapping[str, Sequence[str]]) -> frozenset[str]:
    return frozenset({pool, *labels.get(pool, ())})
