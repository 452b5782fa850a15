"""How the client commands end: exit codes, and the SDK's errors as one clear message (never a traceback).

Exit codes: 0 success; 1 the task failed or was cancelled; 2 a problem with what was given on the
command line (missing file, not JSON, a UI-format workflow); 3 the server cannot be reached; 4 the server
refused the request (invalid workflow, bad API key, unknown task…); 5 ``--timeout`` passed while waiting;
130 interrupted with Ctrl-C (the task keeps running).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from comfyfleet.sdk._core import client_config_path
from comfyfleet.sdk.errors import (
    ApiError,
    ComfyfleetError,
    InvalidRequest,
    InvalidWorkflow,
    ServerUnreachable,
    Unauthorized,
    WaitTimeout,
)
from comfyfleet.sdk.models import Task

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REJECTED = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int, hint: str | None = None) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err.print(escape(hint))
    raise typer.Exit(code)


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """Turn the SDK's errors into one clear message and an exit code, never a traceback."""
    try:
        yield
    except ServerUnreachable as exc:
        fail(
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
        fail(str(exc), EXIT_REJECTED, _unauthorized_hint(exc.status))
    except ApiError as exc:
        fail(str(exc), EXIT_REJECTED)
    except WaitTimeout as exc:
        fail(str(exc), EXIT_TIMEOUT, f"Follow it later with: comfyfleet tasks show {exc.task_id}")
    except ComfyfleetError as exc:
        fail(str(exc), EXIT_USAGE)


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
