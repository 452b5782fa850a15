"""The client commands of the ``comfyfleet`` CLI: ``submit``, ``validate``, ``tasks``, ``workers`` and ``queue``.

They talk to a running server through the SDK. Only typer is imported here; the SDK and rich are
imported inside the commands, so ``comfyfleet --help`` and the server commands stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="COMFYFLEET_URL",
        help="URL of the comfyfleet server (default: the client config's url, else http://127.0.0.1:8080).",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="COMFYFLEET_API_KEY",
        help="API key, when the server requires one (default: the client config's api_key).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON instead of a table.")]

tasks_app = typer.Typer(help="List, show, cancel and re-prioritise tasks.", no_args_is_help=True)
workers_app = typer.Typer(help="List, drain and undrain workers.", no_args_is_help=True)
models_app = typer.Typer(
    help="Model files on the fleet's hosts and workers (models on demand).", no_args_is_help=True
)


def submit(
    workflow: Annotated[
        Path, typer.Argument(help="The workflow: an API-format ComfyUI graph (JSON).", show_default=False)
    ],
    priority: Annotated[
        int, typer.Option(help="Higher runs first; equal priorities run in submission order.")
    ] = 0,
    pool: Annotated[
        str | None, typer.Option(help="Run only on workers of this pool.", show_default=False)
    ] = None,
    input_files: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            help="NAME=FILE: place FILE on the worker as NAME, the name the workflow uses (e.g. in LoadImage). Repeatable.",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the task live until it ends and download its outputs.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for the outputs; implies --wait (default: the current directory).",
            show_default=False,
        ),
    ] = None,
    workflow_id: Annotated[
        str | None, typer.Option(help="A label for the task (e.g. the workflow's name).", show_default=False)
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="With --wait: give up waiting after this many seconds (the task keeps running).",
            show_default=False,
        ),
    ] = None,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Submit a workflow. With --wait, show its queue position and progress, then save its outputs."""
    from comfyfleet.sdk.console import run_submit

    run_submit(
        workflow,
        priority=priority,
        pool=pool,
        input_specs=input_files or [],
        wait=wait or out is not None,
        out_dir=out,
        workflow_id=workflow_id,
        timeout=timeout,
        server=server,
        api_key=api_key,
    )


@tasks_app.command("list")
def tasks_list(
    status: Annotated[
        str | None,
        typer.Option(
            help="Only these statuses, comma-separated (pending,running,completed,failed,cancelled).",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="How many tasks, newest first.")] = 20,
    as_json: JsonOption = False,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List tasks, newest first."""
    from comfyfleet.sdk.console import run_tasks_list

    run_tasks_list(status=status, limit=limit, as_json=as_json, server=server, api_key=api_key)


@tasks_app.command("show")
def tasks_show(
    task_id: Annotated[str, typer.Argument(help="The task's id.", show_default=False)],
    as_json: JsonOption = False,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show one task: status, progress, timings, outputs, attempts and errors."""
    from comfyfleet.sdk.console import run_tasks_show

    run_tasks_show(task_id, as_json=as_json, server=server, api_key=api_key)


@tasks_app.command("cancel")
def tasks_cancel(
    task_id: Annotated[str, typer.Argument(help="The task's id.", show_default=False)],
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a task: a pending one at once, a running one is stopped on its worker."""
    from comfyfleet.sdk.console import run_tasks_cancel

    run_tasks_cancel(task_id, server=server, api_key=api_key)


@tasks_app.command("priority")
def tasks_priority(
    task_id: Annotated[str, typer.Argument(help="The task's id.", show_default=False)],
    priority: Annotated[int, typer.Argument(help="Its new priority: higher runs first.", show_default=False)],
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Move a pending task up or down the queue by giving it another priority."""
    from comfyfleet.sdk.console import run_tasks_priority

    run_tasks_priority(task_id, priority, server=server, api_key=api_key)


@workers_app.command("list")
def workers_list(
    as_json: JsonOption = False, server: ServerOption = None, api_key: ApiKeyOption = None
) -> None:
    """List the workers: pool, state, endpoint, tasks and loaded models."""
    from comfyfleet.sdk.console import run_workers_list

    run_workers_list(as_json=as_json, server=server, api_key=api_key)


@workers_app.command("drain")
def workers_drain(
    worker_id: Annotated[str, typer.Argument(help="The worker's id.", show_default=False)],
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Drain a worker: it finishes what it holds, takes nothing new, then stops."""
    from comfyfleet.sdk.console import run_workers_drain

    run_workers_drain(worker_id, server=server, api_key=api_key)


@workers_app.command("undrain")
def workers_undrain(
    worker_id: Annotated[str, typer.Argument(help="The worker's id.", show_default=False)],
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Undrain a draining worker: it takes tasks again (a drained static worker stays draining until then)."""
    from comfyfleet.sdk.console import run_workers_undrain

    run_workers_undrain(worker_id, server=server, api_key=api_key)


@models_app.command("list")
def models_list(
    as_json: JsonOption = False, server: ServerOption = None, api_key: ApiKeyOption = None
) -> None:
    """List the model files of each host's cache (size, pinned, names, workers linked, downloads in progress)
    and each pool's manifest with the state of every worker's copy."""
    from comfyfleet.sdk.models_console import run_models_list

    run_models_list(as_json=as_json, server=server, api_key=api_key)


def queue(as_json: JsonOption = False, server: ServerOption = None, api_key: ApiKeyOption = None) -> None:
    """Show the queue: tasks per status and the age of the oldest pending one."""
    from comfyfleet.sdk.console import run_queue

    run_queue(as_json=as_json, server=server, api_key=api_key)


def validate(
    workflow: Annotated[
        Path, typer.Argument(help="The workflow: an API-format ComfyUI graph (JSON).", show_default=False)
    ],
    as_json: JsonOption = False,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Check a workflow against the fleet without running it: node types, inputs and model files the workers
    offer. Exits 0 when it would run, 4 (and names each problem) when not."""
    from comfyfleet.sdk.console import run_validate

    run_validate(workflow, as_json=as_json, server=server, api_key=api_key)


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``comfyfleet`` CLI."""
    app.command("submit")(submit)
    app.command("validate")(validate)
    app.add_typer(tasks_app, name="tasks")
    app.add_typer(workers_app, name="workers")
    app.add_typer(models_app, name="models")
    app.command("queue")(queue)
