"""The live view of one task while ``comfyfleet submit --wait`` follows it: queue position, then worker,
node and step progress."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from comfyfleet.sdk.models import TaskEvent


class ProgressDisplay:
    """Queue position, then worker, node and step progress: a live bar on a terminal, plain lines otherwise."""

    def __init__(self, console: Console, nodes: Mapping[str, Any]) -> None:
        self._console = console
        self._nodes = nodes
        self._live = console.is_terminal
        self._progress: Progress | None = None
        self._bar: Any = None
        self._last_line = ""
        self._last_step_print = 0.0

    def __enter__(self) -> ProgressDisplay:
        if self._live:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self._console,
                transient=False,
            )
            self._progress.start()
            self._bar = self._progress.add_task("submitted", total=None)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _show(
        self, line: str, *, completed: float | None = None, total: float | None = None, step: bool = False
    ) -> None:
        if self._progress is not None:
            self._progress.update(self._bar, description=escape(line), completed=completed or 0, total=total)
            return
        if line == self._last_line:
            return
        now = time.monotonic()
        # Plain output: every change of state, and sampler steps at most a few times a second.
        if step and completed != total and now - self._last_step_print < 0.25:
            return
        self._last_step_print = now
        self._last_line = line
        self._console.print(escape(line))

    def on_event(self, event: TaskEvent) -> None:
        data = event.data
        if event.type == "snapshot" and event.task is not None:
            task = event.task
            if task.status == "pending":
                self._queued(task.queue_position, task.estimated_start_s)
            elif task.status == "running":
                self._running(task.phase, task.worker_id)
        elif event.type == "queue_position":
            self._queued(data.get("queue_position"), data.get("estimated_start_s"))
        elif event.type == "status":
            status = data.get("status")
            if status == "pending":
                if data.get("retry_count"):
                    self._show(
                        f"retrying (attempt {int(data.get('attempt') or 0) + 1}): {data.get('error') or ''}".rstrip(
                            ": "
                        )
                    )
                else:
                    self._queued(None)
            elif status == "running":
                self._running(data.get("phase"), data.get("worker_id"))
        elif event.type == "progress":
            node = str(data.get("node") or "?")
            class_type = data.get("class_type") or (self._nodes.get(node) or {}).get("class_type") or "?"
            value, maximum = data.get("value"), data.get("max")
            if isinstance(value, int | float) and isinstance(maximum, int | float) and maximum > 0:
                self._show(
                    f"node {node} ({class_type}): step {value:g}/{maximum:g}",
                    completed=value,
                    total=maximum,
                    step=True,
                )
            else:
                self._show(f"executing node {node} ({class_type})")

    def _queued(self, position: Any, estimate: Any = None) -> None:
        starts = f", starts in about {estimate:g} s" if isinstance(estimate, int | float) else ""
        self._show(f"queued: position {position}{starts}" if isinstance(position, int) else "queued")

    def _running(self, phase: Any, worker_id: Any) -> None:
        worker = f" on worker {worker_id}" if worker_id else ""
        labels = {
            "dispatching": "dispatching",
            "fetching_models": "fetching models",
            "queued_on_worker": "queued",
            "executing": "executing",
        }
        self._show(f"{labels.get(str(phase), 'running')}{worker}")
