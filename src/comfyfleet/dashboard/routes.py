"""The dashboard's pages: ``/`` (queue, workers, live task list) and ``/tasks/{id}`` (one task, its images).

Pages are rendered on the server from the store; a small inline script keeps them live through the API's
server-sent events (``/api/v1/events``, ``/api/v1/tasks/{id}/events``) and drives the cancel, drain and undrain
buttons through the API. No build step and no third-party files.

With API keys configured, the dashboard asks for a key once and keeps it in an HttpOnly, SameSite=Strict
cookie that the API also accepts (see ``comfyfleet.http.auth``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from comfyfleet.domain import TaskStatus, WorkerState
from comfyfleet.http.auth import DASHBOARD_COOKIE, Principal, principal_from
from comfyfleet.http.deps import ServicesDep
from comfyfleet.http.errors import ApiError
from comfyfleet.http.services import Services
from comfyfleet.humanize import ago, size
from comfyfleet.store import NotFound, StoreError

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
TASK_LIST_LIMIT = 50
COOKIE_MAX_AGE_S = 7 * 24 * 3600


def _iso(moment: datetime | None) -> str:
    return moment.isoformat() if moment is not None else ""


TEMPLATES.env.filters["age"] = ago
TEMPLATES.env.filters["size"] = size
TEMPLATES.env.filters["iso"] = _iso
TEMPLATES.env.filters["quote"] = lambda value: quote(str(value), safe="")


def _principal(request: Request, services: Services) -> Principal | None:
    """The viewer, or None when keys are configured and none (or a wrong one) came with the request."""
    try:
        return principal_from(request, services.keyring)
    except ApiError:
        return None


def _login(request: Request, error: str | None = None, status_code: int = 200) -> Response:
    return TEMPLATES.TemplateResponse(
        request, "login.html", {"error": error, "next": request.url.path}, status_code=status_code
    )


router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, services: ServicesDep) -> Response:
    principal = _principal(request, services)
    if principal is None:
        return _login(request)
    store = services.store
    error = None
    metrics = tasks = workers = None
    try:
        metrics = await store.queue_metrics(tenant=principal.visible_tenant)
        tasks = (await store.list_tasks(tenant=principal.visible_tenant, limit=TASK_LIST_LIMIT)).tasks
        workers = [w for w in await store.list_workers() if w.state is not WorkerState.TERMINATED]
    except StoreError as exc:
        error = f"the task store is unavailable: {exc}"
    by_state: dict[str, int] = {}
    for worker in workers or []:
        by_state[worker.state.value] = by_state.get(worker.state.value, 0) + 1
    return TEMPLATES.TemplateResponse(
        request,
        "index.html",
        {
            "metrics": metrics,
            "tasks": tasks or [],
            "workers": workers or [],
            "workers_by_state": by_state,
            "models": services.models.snapshot() if services.models is not None else None,
            "error": error,
            "principal": principal,
            "login_enabled": services.keyring.enabled,
            "cancellable": {TaskStatus.PENDING, TaskStatus.RUNNING},
        },
    )


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
async def task_page(task_id: str, request: Request, services: ServicesDep) -> Response:
    principal = _principal(request, services)
    if principal is None:
        return _login(request)
    store = services.store
    try:
        task = await store.get_task(str(uuid.UUID(task_id)), tenant=principal.visible_tenant)
    except (ValueError, NotFound):
        return TEMPLATES.TemplateResponse(request, "missing.html", {"task_id": task_id[:80]}, status_code=404)
    position = await store.queue_position(task.id) if task.status is TaskStatus.PENDING else None
    estimate = await services.start_estimator.start_in_s(task, position)
    deliveries = await store.webhook_deliveries(task.id) if task.webhook else []
    result: dict[str, Any] = task.result or {}
    outputs = [o for o in result.get("outputs") or [] if isinstance(o, dict)]
    return TEMPLATES.TemplateResponse(
        request,
        "task.html",
        {
            "task": task,
            "position": position,
            "estimate": estimate,
            "outputs": outputs,
            "images": [o for o in outputs if str(o.get("content_type", "")).startswith("image/")],
            "files": [o for o in outputs if not str(o.get("content_type", "")).startswith("image/")],
            "timings": result.get("timings") or {},
            "node_errors": (task.error_details or {}).get("node_errors") or {},
            "deliveries": deliveries,
            "principal": principal,
            "login_enabled": services.keyring.enabled,
            "terminal": task.is_terminal,
        },
    )


@router.post("/dashboard/login")
async def login(
    request: Request,
    services: ServicesDep,
    key: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    try:
        services.keyring.principal_for(f"Bearer {key.strip()}")
    except ApiError:
        return _login(request, "That key is not valid.", status_code=401)
    target = next if next.startswith("/") and not next.startswith("//") else "/"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        DASHBOARD_COOKIE,
        key.strip(),
        max_age=COOKIE_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/dashboard/logout")
async def logout() -> Response:
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(DASHBOARD_COOKIE, path="/")
    return response
