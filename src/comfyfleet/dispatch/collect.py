"""A finished prompt's result: every output file copied off the worker into comfyfleet's outputs store, the
texts, and the timings, as the task's ``result``."""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import stamina

from comfyfleet.comfy.client import ComfyClient, PromptOutcome
from comfyfleet.dispatch.prefetch import Fetched, Prefetch
from comfyfleet.domain import Task
from comfyfleet.outputs import OutputStore
from comfyfleet.outputs.base import OutputsUnavailable


@dataclass(frozen=True, slots=True)
class Collected:
    outputs: list[dict[str, Any]]
    texts: dict[str, list[str]]


async def collect_outputs(
    client: ComfyClient,
    store: OutputStore,
    task: Task,
    outcome: PromptOutcome,
    prefetch: Prefetch | None = None,
) -> Collected:
    """Copy each output file of ``outcome`` from the worker's ``/view`` (or from what ``prefetch`` already
    fetched) into ``store``, in the outcome's order."""
    outputs: list[dict[str, Any]] = []
    texts: dict[str, list[str]] = {}
    used_names: set[str] = set()
    for node_id, ui in (outcome.outputs or {}).items():
        if not isinstance(ui, dict):
            continue
        for kind, items in ui.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, str) and kind == "text":
                    texts.setdefault(str(node_id), []).append(item)
                if not (isinstance(item, dict) and isinstance(item.get("filename"), str)):
                    continue
                name = item["filename"].replace("/", "_")
                if name in used_names:
                    name = f"{node_id}-{name}"
                used_names.add(name)
                # The file is still on the worker: a storage hiccup is retried here, not by running the
                # prompt again on the GPU.
                async for try_ in stamina.retry_context(on=OutputsUnavailable, attempts=4, timeout=60.0):
                    with try_:
                        fetched = await prefetch.take(item) if prefetch is not None else None
                        stored = await _store_output(
                            client, store, task, (str(node_id), kind, item, name), fetched
                        )
                outputs.append(stored)
    return Collected(outputs, texts)


async def _store_output(
    client: ComfyClient,
    store: OutputStore,
    task: Task,
    output: tuple[str, str, dict[str, Any], str],
    fetched: Fetched | None,
) -> dict[str, Any]:
    node_id, kind, item, name = output
    filename = item["filename"]
    subfolder = str(item.get("subfolder") or "")
    file_type = str(item.get("type") or "output")
    if fetched is not None:
        stored = await store.put(
            task.id, name, _one(fetched.content), _content_type(fetched.content_type, filename)
        )
    else:
        async with client.download(filename, subfolder, file_type) as download:
            content_type = _content_type(download.content_type, filename)
            stored = await store.put(task.id, name, download.chunks, content_type)
    return {
        "node_id": node_id,
        "kind": kind,
        "filename": stored.name,
        "subfolder": subfolder,
        "type": file_type,
        "content_type": stored.content_type,
        "size": stored.size,
        "url": f"/api/v1/tasks/{task.id}/outputs/{quote(stored.name)}",
    }


def _content_type(header: str, filename: str) -> str:
    content_type = header.split(";")[0].strip()
    if not content_type or content_type == "application/octet-stream":
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return content_type


async def _one(content: bytes) -> AsyncIterator[bytes]:
    yield content


def result_of(
    task: Task,
    outcome: PromptOutcome,
    collected: Collected,
    *,
    worker_id: str,
    finished: datetime,
    execution_started_at: datetime | None,
    accepted_at: datetime | None,
) -> dict[str, Any]:
    """The task's ``result``: outputs, texts and timings (ours, plus the worker's own end time)."""
    started = execution_started_at or _history_start(outcome) or task.started_at or task.created_at
    timings: dict[str, Any] = {
        "queued_s": round((started - task.created_at).total_seconds(), 6),
        "executing_s": round((finished - started).total_seconds(), 6),
        "total_s": round((finished - task.created_at).total_seconds(), 6),
        "execution_started_at": started.isoformat(),
    }
    if accepted_at is not None:
        timings["prompt_accepted_at"] = accepted_at.isoformat()
    if outcome.timings.ended_ms is not None:
        # The worker's own clock: when it finished the prompt (execution_success).
        timings["worker_finished_at"] = datetime.fromtimestamp(
            outcome.timings.ended_ms / 1000, UTC
        ).isoformat()
    result: dict[str, Any] = {
        "prompt_id": outcome.prompt_id,
        "worker_id": worker_id,
        "outputs": collected.outputs,
        "timings": timings,
    }
    if collected.texts:
        result["text"] = collected.texts
    return result


def _history_start(outcome: PromptOutcome) -> datetime | None:
    started = outcome.timings.started_ms
    return datetime.fromtimestamp(started / 1000, UTC) if started is not None else None
