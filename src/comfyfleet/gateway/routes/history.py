"""``/history``: finished prompts as ComfyUI's history entries."""

from __future__ import annotations

from starlette.responses import Response

from comfyfleet.domain import TERMINAL_STATUSES
from comfyfleet.gateway import shapes
from comfyfleet.gateway.access import PrincipalDep
from comfyfleet.gateway.routes.group import RouteGroup, route
from comfyfleet.gateway.schemas import EMPTY_OK, TOO_LARGE, HistoryEntryOut, answers, refused
from comfyfleet.http.responses import JSONBody

HISTORY_CAP = 1000  # /history without max_items lists at most this many (ComfyUI lists all it keeps)


class HistoryRoutes(RouteGroup):
    @route(
        "GET",
        "/history",
        "Finished prompts (ComfyUI)",
        response_model=dict[str, HistoryEntryOut],
        responses=answers(refused("max_items or offset is not an integer")),
    )
    async def get_history(
        self, principal: PrincipalDep, max_items: str | None = None, offset: str | None = None
    ) -> Response:
        """`{prompt_id: entry}` oldest first; `max_items=N` gives the last N, `offset=K` skips the K oldest
        (within the 1,000 most recent)."""
        try:
            limit = int(max_items) if max_items not in (None, "") else None
            skip = int(offset) if offset not in (None, "") else -1
        except ValueError:
            return JSONBody(
                shapes.prompt_error("invalid_parameter", "max_items and offset must be integers", ""),
                status_code=400,
            )
        cap = HISTORY_CAP if limit is None or skip >= 0 else max(0, min(limit, HISTORY_CAP))
        finished = await self.gateway.tasks(principal, sorted(TERMINAL_STATUSES), cap * 2 if cap else 0)
        entries = [task for task in reversed(finished) if shapes.enters_history(task)][-cap:] if cap else []
        if skip < 0 and limit is not None:
            skip = max(0, len(entries) - limit)
        selected = entries[max(skip, 0) :]
        if limit is not None:
            selected = selected[: max(limit, 0)]
        info = await self.gateway.catalogue.object_info()
        return JSONBody({task.id: shapes.history_entry(task, info) for task in selected})

    @route(
        "GET",
        "/history/{prompt_id}",
        "One finished prompt (ComfyUI)",
        response_model=dict[str, HistoryEntryOut],
        responses=answers(),
    )
    async def get_history_entry(self, prompt_id: str, principal: PrincipalDep) -> Response:
        """`{prompt_id: entry}` once the prompt finished; `{}` while it waits or runs, or when unknown."""
        task = await self.gateway.visible_task(prompt_id, principal)
        if task is None or not shapes.enters_history(task):
            return JSONBody({})
        return JSONBody({task.id: shapes.history_entry(task, await self.gateway.catalogue.object_info())})

    @route(
        "POST",
        "/history",
        "Delete history (ComfyUI; kept)",
        response_class=Response,
        responses=answers(EMPTY_OK, TOO_LARGE),
    )
    async def post_history(self, principal: PrincipalDep) -> Response:
        """Accepted for compatibility; comfyfleet keeps every task's record and outputs."""
        del principal
        return Response(status_code=200)
