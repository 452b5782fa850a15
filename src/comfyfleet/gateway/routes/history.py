"""``/history``: finished prompts as ComfyUI's history entries."""

from __future__ import annotations

from contextlib import aclosing

from starlette.responses import Response

from comfyfleet.domain import TERMINAL_STATUSES
from comfyfleet.gateway import shapes
from comfyfleet.gateway.access import PrincipalDep
from comfyfleet.gateway.routes.group import RouteGroup, route
from comfyfleet.gateway.schemas import EMPTY_OK, TOO_LARGE, HistoryEntryOut, answers, refused
from comfyfleet.http.auth import Principal
from comfyfleet.http.pages import ByteBudget, json_object
from comfyfleet.http.responses import JSONBody, json_bytes

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
        """`{prompt_id: entry}` oldest first, within the 1,000 most recent: `max_items=N` gives the last N,
        `offset=K` skips the K oldest. An answer holds at most `limits.max_page_bytes` (8 MiB) of entries:
        without `offset` the most recent that fit, with it the first that fit (ask again from the offset
        after them)."""
        try:
            limit = int(max_items) if max_items not in (None, "") else None
            skip = int(offset) if offset not in (None, "") else -1
        except ValueError:
            return JSONBody(
                shapes.prompt_error("invalid_parameter", "max_items and offset must be integers", ""),
                status_code=400,
            )
        window = HISTORY_CAP if limit is None or skip >= 0 else max(0, min(limit, HISTORY_CAP))
        newest_first = await self._entry_ids(principal, window)
        if skip < 0:
            wanted = newest_first  # the most recent entries: a cut by the budget drops the oldest
        else:
            wanted = newest_first[::-1][skip:]
            wanted = wanted[: max(limit, 0)] if limit is not None else wanted
        info = await self.gateway.catalogue.object_info()
        budget = ByteBudget(self.gateway.settings.limits.max_page_bytes)
        entries = await self.gateway.encoded(
            wanted, lambda task: json_bytes(shapes.history_entry(task, info)), budget
        )
        if skip < 0:
            entries.reverse()  # ComfyUI lists history oldest first
        return Response(b"".join(json_object(entries)), media_type="application/json")

    async def _entry_ids(self, principal: Principal, count: int) -> list[str]:
        """The ids of the caller's ``count`` most recent history entries, newest first."""
        ids: list[str] = []
        if count <= 0:
            return ids
        finished = self.gateway.iter_tasks(principal, sorted(TERMINAL_STATUSES), count * 2)
        async with aclosing(finished):
            async for task in finished:
                if shapes.enters_history(task):
                    ids.append(task.id)
                    if len(ids) == count:
                        break
        return ids

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
