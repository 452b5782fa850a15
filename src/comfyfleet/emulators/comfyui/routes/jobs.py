"""The jobs API (``/api/jobs…``): upstream's normalised view of queue and history, and cancel by id."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from comfyfleet.emulators.comfyui.routes.common import Route, canonical_uuid, json_body

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.server import EmulatorServer

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
_PREVIEWABLE = ("images", "video", "audio", "gifs", "3d")


class _BadQuery(Exception):
    pass


class JobRoutes:
    def __init__(self, server: EmulatorServer) -> None:
        self.server = server

    def routes(self) -> list[Route]:
        # Declared with the prefix in place: they also answer at /api/api/jobs, and bare /jobs is a 404.
        return [
            ("GET", "/api/jobs", self.get_jobs),
            ("POST", "/api/jobs/cancel", self.post_jobs_cancel),
            ("GET", "/api/jobs/{job_id}", self.get_job),
            ("POST", "/api/jobs/{job_id}/cancel", self.post_job_cancel),
        ]

    def job(self, prompt_id: str, *, full: bool) -> dict[str, Any] | None:
        state = self.server.state
        if state.running is not None and state.running.prompt_id == prompt_id:
            return _unfinished(prompt_id, "in_progress", state.running.number, state.running.extra_data)
        entry = state.history.get(prompt_id)
        if entry is not None:
            return job_from_history(prompt_id, entry, full=full)
        for item in state.pending():
            if item.prompt_id == prompt_id:
                return _unfinished(prompt_id, "pending", item.number, item.extra_data)
        return None

    async def get_job(self, request: web.Request) -> web.Response:
        job = self.job(request.match_info["job_id"], full=True)
        if job is None:
            return web.json_response({"error": "Job not found"}, status=404)
        return web.json_response(job)

    async def get_jobs(self, request: web.Request) -> web.Response:
        try:
            statuses, sort_by, descending, limit, offset = _listing_query(request)
        except _BadQuery as exc:
            return web.json_response({"error": str(exc)}, status=400)
        state = self.server.state
        ids = [
            *([state.running.prompt_id] if state.running else []),
            *(item.prompt_id for item in state.pending()),
            *state.history,
        ]
        jobs = [
            job
            for job in (self.job(i, full=False) for i in dict.fromkeys(ids))
            if job and job["status"] in statuses
        ]
        workflow_id = request.query.get("workflow_id")
        if workflow_id:
            jobs = [job for job in jobs if job.get("workflow_id") == workflow_id]
        jobs.sort(key=lambda job: _sort_key(job, sort_by), reverse=descending)
        page = jobs[offset : offset + limit if limit is not None else None]
        pagination = {
            "offset": offset,
            "limit": limit,
            "total": len(jobs),
            "has_more": offset + len(page) < len(jobs),
        }
        return web.json_response({"jobs": page, "pagination": pagination})

    def _cancel(self, prompt_id: str) -> bool:
        """Interrupt it if it is the running one (no frame: the status comes when it ends), else dequeue it
        (``status`` frames like ``POST /queue`` delete)."""
        state = self.server.state
        if state.running is not None and state.running.prompt_id == prompt_id:
            state.interrupt()
            return True
        return state.delete_queued(prompt_id)

    async def post_job_cancel(self, request: web.Request) -> web.Response:
        return web.json_response({"cancelled": self._cancel(request.match_info["job_id"])})

    async def post_jobs_cancel(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request)
        except ValueError:
            return web.json_response({"error": "Invalid JSON body"}, status=400)
        job_ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(job_ids, list):
            return web.json_response({"error": "job_ids must be a list"}, status=400)
        invalid = [job_id for job_id in job_ids if not canonical_uuid(job_id)]
        if invalid:
            return web.json_response(
                {"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, status=400
            )
        cancelled = [self._cancel(job_id) for job_id in job_ids]
        return web.json_response({"cancelled": any(cancelled)})


def _listing_query(request: web.Request) -> tuple[list[str], str, bool, int | None, int]:
    query = request.query
    statuses = [s.strip() for s in query.get("status", "").split(",") if s.strip()] or list(JOB_STATUSES)
    bad = [s for s in statuses if s not in JOB_STATUSES]
    if bad:
        raise _BadQuery(f"Invalid status value(s): {', '.join(bad)}. Valid values: {', '.join(JOB_STATUSES)}")
    sort_by, sort_order = query.get("sort_by", "created_at"), query.get("sort_order", "desc")
    if sort_by not in ("created_at", "execution_duration"):
        raise _BadQuery("sort_by must be 'created_at' or 'execution_duration'")
    if sort_order not in ("asc", "desc"):
        raise _BadQuery("sort_order must be 'asc' or 'desc'")
    try:
        limit = int(query["limit"]) if query.get("limit") else None
        offset = int(query.get("offset") or 0)
    except ValueError:
        raise _BadQuery("limit and offset must be integers") from None
    if (limit is not None and limit < 1) or offset < 0:
        raise _BadQuery("limit must be positive and offset must be non-negative")
    return statuses, sort_by, sort_order == "desc", limit, offset


def _sort_key(job: dict[str, Any], sort_by: str) -> float:
    if sort_by == "execution_duration":
        start, end = job.get("execution_start_time"), job.get("execution_end_time")
        return float(end - start) if start is not None and end is not None else -1.0
    return float(job.get("create_time") or 0)


def _unfinished(prompt_id: str, status: str, number: float, extra_data: dict[str, Any]) -> dict[str, Any]:
    return {"id": prompt_id, "status": status, "priority": number,
            "create_time": extra_data.get("create_time"), "outputs_count": 0}  # fmt: skip


def job_from_history(prompt_id: str, entry: dict[str, Any], *, full: bool) -> dict[str, Any]:
    messages = entry["status"]["messages"]
    last = messages[-1][0] if messages else None
    if entry["status"]["status_str"] == "success":
        status = "completed"
    elif last == "execution_interrupted":
        status = "cancelled"
    else:
        status = "failed"
    number, _, prompt, extra_data, _ = entry["prompt"]
    files = [
        {**file, "nodeId": node_id, "mediaType": media}
        for node_id, ui in entry["outputs"].items()
        for media, items in ui.items()
        if isinstance(items, list)
        for file in items
        if isinstance(file, dict) and "filename" in file
    ]
    previewable = [file for file in files if file["mediaType"] in _PREVIEWABLE]
    job: dict[str, Any] = {
        "id": prompt_id,
        "status": status,
        "priority": number,
        "create_time": extra_data.get("create_time"),
        "execution_start_time": next(
            (m[1]["timestamp"] for m in messages if m[0] == "execution_start"), None
        ),
        "execution_end_time": messages[-1][1].get("timestamp") if messages else None,
        "outputs_count": len(files),
        "previewable_outputs_count": len(previewable),
        "preview_output": previewable[0] if previewable else None,
    }
    workflow_info = (extra_data.get("extra_pnginfo") or {}).get("workflow")
    if isinstance(workflow_info, dict) and workflow_info.get("id"):
        job["workflow_id"] = workflow_info["id"]
    if status == "failed" and last == "execution_error":
        job["execution_error"] = messages[-1][1]
    if full:
        job["outputs"] = entry["outputs"]
        job["execution_status"] = entry["status"]
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job
