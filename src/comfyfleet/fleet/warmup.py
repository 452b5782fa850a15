"""A pool's warm-up workflow: run once on each new worker, after it answers and before it takes tasks.

Loading a checkpoint is most of a cold start's cost. A pool with ``warmup`` (an API-format graph) runs it on
every worker as it comes up, so the first real task finds its models loaded, and the placement knows which
models each worker holds. A graph the worker rejects or cannot run fails the start (the pool is misconfigured:
better to know at once than on the first task); a worker that stops answering meanwhile is simply probed
again, within the pool's ``startup_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.errors import ComfyError, WorkflowRejected
from comfyfleet.comfy.workflow import model_names, node_types


@dataclass(frozen=True, slots=True)
class WarmupResult:
    """``ok`` with the models the graph loaded; otherwise ``error`` says why, and ``fatal`` whether it is the
    graph's fault (fail the start) rather than the worker's answering (try again at the next probe)."""

    ok: bool
    seconds: float
    models: tuple[str, ...] = ()
    error: str | None = None
    fatal: bool = False


async def run_warmup(
    endpoint: str, graph: dict[str, Any], offered: list[str], timeout_s: float
) -> WarmupResult:
    """Run ``graph`` on the ComfyUI at ``endpoint`` (which offers the node types ``offered``) to its end."""
    started = time.monotonic()

    def result(**fields: Any) -> WarmupResult:
        return WarmupResult(seconds=round(time.monotonic() - started, 3), **fields)

    missing = sorted(node_types(graph) - set(offered))
    if missing:
        return result(
            ok=False,
            fatal=True,
            error=f"warm-up workflow uses node types the worker lacks: {', '.join(missing)}",
        )
    prompt_id = str(uuid.uuid4())
    async with ComfyClient(endpoint, events=False) as comfy:
        try:
            async with asyncio.timeout(timeout_s):
                await comfy.submit(graph, prompt_id=prompt_id)
                outcome = await comfy.follow(prompt_id)
        except WorkflowRejected as exc:
            detail = f" {json.dumps(exc.node_errors)[:500]}" if exc.node_errors else ""
            return result(ok=False, fatal=True, error=f"warm-up workflow rejected: {exc}{detail}")
        except TimeoutError:
            with contextlib.suppress(ComfyError):
                await comfy.cancel_job(prompt_id)
            return result(ok=False, fatal=True, error=f"warm-up workflow not done after {timeout_s:.0f}s")
        except ComfyError as exc:
            return result(ok=False, error=f"warm-up interrupted: {exc}")
        with contextlib.suppress(ComfyError):
            await comfy.delete_history([prompt_id])
    if not outcome.ok:
        message = (outcome.error or {}).get("exception_message") or outcome.status
        return result(ok=False, fatal=True, error=f"warm-up workflow failed on the worker: {message}")
    return result(ok=True, models=tuple(sorted(model_names(graph))))
