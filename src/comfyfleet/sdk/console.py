"""What the client commands do and print (``comfyfleet submit``, ``tasks``, ``workers``, ``queue``).

Exit codes: 0 success; 1 the task failed or was cancelled; 2 a problem with what was given on the
command line (missing file, not JSON, a UI-format workflow); 3 the server cannot be reached; 4 the server
refused the request (invalid workflow, bad API key, unknown task…); 5 ``--timeout`` passed while waiting;
130 interrupted with Ctrl-C (the task keeps running).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import typer
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
from rich.table import Table

from comfyfleet.domain.graph import UI_FORMAT_HELP, is_ui_format
from comfyfleet.humanize import ago
from comfyfleet.sdk._core import client_config_path
from comfyfleet.sdk.client import Client
from comfyfleet.sdk.errors import (
    ApiError,
    ComfyfleetError,
    InvalidRequest,
    InvalidWorkflow,
    ServerUnreachable,
    Unauthorized,
    WaitTimeout,
)
from comfyfleet.sdk.models import Task, TaskEvent

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REJECTED = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

# From this width on, list tables show every column; narrower terminals (80 columns) get the essential ones.
WIDE_TABLE_COLUMNS = 120

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int, hint: str | None = None) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err.print(escape(hint))
    raise typer.Exit(code)


@contextlib.contextmanager
def _reporting() -> Iterator[None]:
    """Turn the SDK's errors into one clear message and an exit code, never a traceback."""
    try:
        yield
    except ServerUnreachable as exc:
        _fail(
            str(exc),
            EXIT_UNREACHABLE,
            "Start it with 'comfyfleet serve', or point --server (COMFYFLEET_URL) at it.",
        )
    except InvalidWorkflow as exc:
        err.print(f"[bold red]error:[/] the server rejected the workflow: {escape(exc.message)}")
        for line in graph_error_lines(exc.errors):
            err.print(f"  {escape(line)}")
        raise typer.Exit(EXIT_REJECTED) from None
    except InvalidRequest as exc:
        err.print(f"[bold red]error:[/] the server refused the request: {escape(exc.message)}")
        for entry in exc.errors:
            where = ".".join(str(part) for part in entry.get("loc", []))
            err.print(f"  {escape(where)}: {escape(str(entry.get('message', '')))}")
        raise typer.Exit(EXIT_REJECTED) from None
    except Unauthorized as exc:
        _fail(str(exc), EXIT_REJECTED, _unauthorized_hint(exc.status))
    except ApiError as exc:
        _fail(str(exc), EXIT_REJECTED)
    except WaitTimeout as exc:
        _fail(str(exc), EXIT_TIMEOUT, f"Follow it later with: comfyfleet tasks show {exc.task_id}")
    except ComfyfleetError as exc:
        _fail(str(exc), EXIT_USAGE)


def _unauthorized_hint(status: int) -> str:
    if status == 403:
        return "This API key may not do that; an admin key can."
    return (
        f"The server needs a valid API key: pass it with --api-key KEY or set COMFYFLEET_API_KEY "
        f"(or 'api_key' in {client_config_path()})."
    )


def graph_error_lines(errors: list[dict[str, Any]]) -> list[str]:
    """One line per structural problem the API named (``details.errors`` of ``invalid_graph``)."""
    lines = []
    for entry in errors:
        node, name = entry.get("node_id"), entry.get("input_name")
        where = f"node {node}" if node is not None else "workflow"
        if name is not None:
            where += f" input {name!r}"
        lines.append(f"{where}: {entry.get('message', entry.get('type', 'invalid'))}")
    return lines


def node_error_lines(task: Task) -> list[str]:
    """ComfyUI's error and ``node_errors`` (from a worker's 400) as readable lines."""
    return comfy_error_lines(task.error_details.get("error"), task.node_errors)


def comfy_error_lines(top: Any, node_errors: dict[str, Any]) -> list[str]:
    """ComfyUI's top-level ``error`` and its ``node_errors`` as readable lines."""
    lines = []
    if isinstance(top, dict) and top.get("message"):
        lines.append(
            f"{top.get('type', 'error')}: {top['message']}"
            + (f" ({top['details']})" if top.get("details") else "")
        )
    for node_id, node in node_errors.items():
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type") or "?"
        for problem in node.get("errors", []) or []:
            if not isinstance(problem, dict):
                continue
            detail = f": {problem['details']}" if problem.get("details") else ""
            lines.append(
                f"node {node_id} ({class_type}): {problem.get('message', problem.get('type', 'invalid'))}{detail}"
            )
    return lines


# -- reading the workflow file ---------------------------------------------------------------------
def load_workflow(path: Path) -> dict[str, Any]:
    """The API-format graph in ``path``; a clear message and exit 2 for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(f"workflow file {path} does not exist", EXIT_USAGE)
    except IsADirectoryError:
        _fail(f"{path} is a directory, not a workflow file", EXIT_USAGE)
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read workflow file {path}: {getattr(exc, 'strerror', None) or exc}", EXIT_USAGE)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", EXIT_USAGE)
    if is_ui_format(data):
        _fail(
            f'{path} is a workflow saved in ComfyUI\'s UI format (it has top-level "nodes" and "links"), '
            "not the API format.",
            EXIT_USAGE,
            UI_FORMAT_HELP,
        )
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a saved POST /prompt body
    elif isinstance(data, dict) and isinstance(data.get("payload"), dict):
        data = data["payload"]  # a saved POST /api/v1/tasks body
    if not isinstance(data, dict) or not data or not all(isinstance(node, dict) for node in data.values()):
        _fail(
            f"{path} is not an API-format ComfyUI workflow: expected a JSON object of node id → "
            '{"class_type": …, "inputs": {…}}',
            EXIT_USAGE,
            UI_FORMAT_HELP,
        )
    return data


def parse_input_specs(specs: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for spec in specs:
        name, sep, file_name = spec.partition("=")
        if not sep or not name or not file_name:
            _fail(f"--input {spec!r} must be NAME=FILE, e.g. --input cat.png=./photos/cat.png", EXIT_USAGE)
        path = Path(file_name).expanduser()
        if not path.is_file():
            _fail(f"input file {path} (for --input {name}) does not exist", EXIT_USAGE)
        files[name] = path
    return files


# -- following a task --------------------------------------------------------------------------------
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


def _client(server: str | None, api_key: str | None) -> Client:
    try:
        return Client(server, api_key=api_key)
    except ComfyfleetError as exc:
        _fail(str(exc), EXIT_USAGE)


def run_submit(
    workflow_path: Path,
    *,
    priority: int,
    pool: str | None,
    input_specs: list[str],
    wait: bool,
    out_dir: Path | None,
    workflow_id: str | None,
    timeout: float | None,
    server: str | None,
    api_key: str | None,
) -> None:
    workflow = load_workflow(workflow_path)
    inputs = parse_input_specs(input_specs)
    with _reporting(), _client(server, api_key) as client:
        task = client.submit(
            workflow,
            priority=priority,
            pool=pool,
            inputs=inputs or None,
            workflow_id=workflow_id or workflow_path.stem,
        )
        if not wait:
            if out.is_terminal:
                out.print(
                    f"submitted task [bold]{task.id}[/] (priority {task.priority}); "
                    f"follow it with: comfyfleet tasks show {task.id}"
                )
            else:
                out.print(task.id)  # just the id, for scripts: id=$(comfyfleet submit wf.json)
            return
        err.print(f"submitted task {task.id} (priority {task.priority})")
        try:
            with ProgressDisplay(out, workflow) as display:
                task = client.wait(task.id, timeout=timeout, on_event=display.on_event)
        except KeyboardInterrupt:
            err.print(
                f"stopped waiting; task {task.id} keeps running (comfyfleet tasks cancel {task.id} stops it)"
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
        _report_end(client, task, out_dir or Path("."))


def _report_end(client: Client, task: Task, out_dir: Path) -> None:
    if task.ok:
        timings = (task.result or {}).get("timings") or {}
        total = timings.get("total_s")
        out.print(
            f"completed task {task.id}" + (f" in {total:.2f} s" if isinstance(total, int | float) else "")
        )
        for path in client.download(task, out_dir):
            out.print(f"saved {path} ({path.stat().st_size} bytes)")
        if not task.outputs:
            out.print("the workflow produced no output files")
        return
    err.print(
        f"[bold red]task {task.id} {task.status}[/]"
        + (" " + escape(f"[{task.error_kind}]") if task.error_kind else "")
        + f": {escape(task.error or 'no reason given')}"
    )
    for line in node_error_lines(task):
        err.print(f"  {escape(line)}")
    raise typer.Exit(EXIT_TASK_FAILED)


# -- listing ------------------------------------------------------------------------------------------


def _progress_text(task: Task) -> str:
    if task.status == "pending":
        return "waiting" if task.retry_count == 0 else f"retry {task.retry_count} waiting"
    if task.status == "running":
        progress = task.progress or {}
        node = progress.get("node")
        if node is not None and isinstance(progress.get("max"), int | float) and progress.get("max"):
            return f"node {node} {progress.get('value')}/{progress.get('max')}"
        return f"node {node}" if node is not None else (task.phase or "running")
    if task.status == "completed":
        return f"{len(task.outputs)} output(s)"
    return (task.error_kind or task.error or "")[:60]


def _list_table(columns: list[str], *, keep_whole: set[str]) -> Table:
    """One line per row at any terminal width: the columns in ``keep_whole`` (ids people copy, short states)
    are never cut; the others are shortened with an ellipsis to fit."""
    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ellipsis" if column not in keep_whole else "fold")
    return table


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def run_tasks_list(
    *, status: str | None, limit: int, as_json: bool, server: str | None, api_key: str | None
) -> None:
    with _reporting(), _client(server, api_key) as client:
        page = client.list_tasks(status=status, limit=limit)
    if as_json:
        _print_json([task.raw for task in page.tasks])
        return
    if not page.tasks:
        out.print("no tasks" + (f" with status {status}" if status else ""))
        return
    wide = out.width >= WIDE_TABLE_COLUMNS
    columns = ["ID", "STATUS", "PRI", "AGE", *(["WORKFLOW", "WORKER"] if wide else []), "PROGRESS"]
    table = _list_table(columns, keep_whole={"ID", "STATUS", "PRI", "AGE"})
    for task in page.tasks:
        cells = [task.id, task.status, str(task.priority), ago(task.created_at)]
        if wide:
            cells += [task.workflow_id or "-", task.worker_id or "-"]
        table.add_row(*(escape(cell) for cell in [*cells, _progress_text(task)]))
    out.print(table)


def run_tasks_show(task_id: str, *, as_json: bool, server: str | None, api_key: str | None) -> None:
    with _reporting(), _client(server, api_key) as client:
        task = client.get(task_id)
    if as_json:
        _print_json(task.raw)
        return
    rows: list[tuple[str, str]] = [
        ("id", task.id),
        ("status", task.status + (f" ({task.phase})" if task.phase else "")),
        ("priority", str(task.priority)),
        ("workflow", task.workflow_id or "-"),
        ("pool", task.pool or "-"),
        ("worker", task.worker_id or "-"),
        ("attempt", f"{task.attempt} (retries {task.retry_count})"),
        ("created", f"{task.created_at.isoformat() if task.created_at else '-'} ({ago(task.created_at)})"),
    ]
    if task.queue_position is not None:
        rows.append(("queue position", str(task.queue_position)))
    if task.estimated_start_s is not None:
        rows.append(("estimated start", f"in about {task.estimated_start_s:g} s"))
    if task.status == "running":
        rows.append(("progress", _progress_text(task)))
    timings = (task.result or {}).get("timings") or {}
    if timings:
        rows.append(
            (
                "timings",
                ", ".join(
                    f"{key} {value:.3f}" for key, value in timings.items() if isinstance(value, int | float)
                ),
            )
        )
    if task.error:
        rows.append(("error", f"[{task.error_kind}] {task.error}" if task.error_kind else task.error))
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, escape(value))
    out.print(table)
    for line in node_error_lines(task):
        out.print(f"  {escape(line)}")
    if task.outputs:
        out.print("[bold]outputs[/]")
        for output in task.outputs:
            out.print(
                f"  node {output.node_id} {output.kind}: {output.filename} ({output.size} bytes) {output.url}"
            )
    attempts = task.raw.get("attempts") or []
    if len(attempts) > 1 or any(isinstance(a, dict) and a.get("error") for a in attempts):
        out.print("[bold]attempts[/]")
        for attempt in attempts:
            if isinstance(attempt, dict):
                out.print(
                    f"  #{attempt.get('attempt')} worker {attempt.get('worker_id') or '-'}: "
                    f"{attempt.get('outcome') or '-'}"
                    + (f" ({escape(str(attempt.get('error')))})" if attempt.get("error") else "")
                )
    for delivery in task.webhook_deliveries:
        out.print(
            f"webhook {delivery.get('url')}: {delivery.get('status')} after {delivery.get('attempts')} attempt(s)"
        )


def run_tasks_cancel(task_id: str, *, server: str | None, api_key: str | None) -> None:
    with _reporting(), _client(server, api_key) as client:
        task = client.cancel(task_id)
    if task.status == "cancelled":
        out.print(f"cancelled task {task.id}")
    else:
        out.print(f"cancel requested: task {task.id} is stopping on worker {task.worker_id or '-'}")


def run_tasks_priority(task_id: str, priority: int, *, server: str | None, api_key: str | None) -> None:
    with _reporting(), _client(server, api_key) as client:
        task = client.set_priority(task_id, priority)
    estimate = f", starts in about {task.estimated_start_s:g} s" if task.estimated_start_s is not None else ""
    out.print(f"task {task.id}: priority {task.priority}, queue position {task.queue_position}{estimate}")


def run_workers_list(*, as_json: bool, server: str | None, api_key: str | None) -> None:
    with _reporting(), _client(server, api_key) as client:
        workers = client.workers()
    if as_json:
        _print_json(workers)
        return
    if not workers:
        out.print("no workers")
        return
    wide = out.width >= WIDE_TABLE_COLUMNS
    columns = [
        "ID",
        "POOL",
        *(["PROVIDER"] if wide else []),
        "STATE",
        "TASKS",
        *(["ENDPOINT"] if wide else []),
    ]
    table = _list_table([*columns, "MODELS"], keep_whole={"ID", "STATE", "TASKS"})
    for worker in workers:
        tasks = worker.get("current_task_ids") or (
            [worker["current_task_id"]] if worker.get("current_task_id") else []
        )
        cells = [str(worker.get("id")), str(worker.get("pool") or "-")]
        if wide:
            cells.append(str(worker.get("provider") or "-"))
        cells += [str(worker.get("state") or worker.get("status") or "-"), str(len(tasks))]
        if wide:
            cells.append(str(worker.get("endpoint") or "-"))
        cells.append(", ".join(worker.get("loaded_models") or []) or "-")
        table.add_row(*(escape(cell) for cell in cells))
    out.print(table)


def run_workers_drain(worker_id: str, *, server: str | None, api_key: str | None) -> None:
    with _reporting(), _client(server, api_key) as client:
        worker = client.drain_worker(worker_id)
    out.print(f"draining worker {worker_id} (state {worker.get('state') or worker.get('status') or '?'})")


def run_workers_undrain(worker_id: str, *, server: str | None, api_key: str | None) -> None:
    with _reporting(), _client(server, api_key) as client:
        worker = client.undrain_worker(worker_id)
    state = worker.get("state") or worker.get("status") or "?"
    if state == "draining":  # a follower replica left it for the fleet's leader
        out.print(f"undrain of worker {worker_id} requested (the fleet's leader carries it out)")
    else:
        out.print(f"undrained worker {worker_id} (state {state})")


def run_validate(workflow_path: Path, *, as_json: bool, server: str | None, api_key: str | None) -> None:
    graph = load_workflow(workflow_path)
    with _reporting(), _client(server, api_key) as client:
        report = client.validate(graph)
    if as_json:
        _print_json(report)
    elif report.get("valid"):
        against = (
            "the fleet's workers"
            if report.get("checked_against") == "workers"
            else "its structure only (no worker seen yet)"
        )
        out.print(f"{workflow_path}: valid, checked against {against}")
    else:
        err.print(f"[bold red]error:[/] {escape(str(workflow_path))} would not run:")
        missing = report.get("missing_node_types") or []
        lines = (
            [f"node types no worker offers (custom nodes not installed?): {', '.join(missing)}"]
            if missing
            else []
        )
        lines += graph_error_lines(report.get("errors") or [])
        lines += comfy_error_lines(report.get("error"), report.get("node_errors") or {})
        for line in lines:
            err.print(f"  {escape(line)}")
    if not report.get("valid"):
        raise typer.Exit(EXIT_REJECTED)


def run_queue(*, as_json: bool, server: str | None, api_key: str | None) -> None:
    with _reporting(), _client(server, api_key) as client:
        metrics = client.queue_metrics()
    if as_json:
        _print_json(metrics)
        return
    oldest = metrics.get("oldest_pending_age_s")
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for status in ("pending", "running", "completed", "failed", "cancelled"):
        table.add_row(status, str(metrics.get(f"{status}_tasks", 0)))
    table.add_row("oldest pending", f"{oldest:.1f} s" if isinstance(oldest, int | float) else "-")
    out.print(table)
