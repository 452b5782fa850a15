"""One attempt of a task on one worker: submit it (inputs, dispatch record, the prompt) or re-attach to it
after adoption, follow it, stop it (cancel, timeout), collect its outputs and end it (complete, fail, retry,
cancel), publishing every change on the way.

The dispatcher (:mod:`comfyfleet.dispatch.dispatcher`) decides where an attempt runs and keeps it in memory
while it runs; the store writes go through its :class:`~comfyfleet.dispatch.record.AttemptRecord`, which
does not give up on a store that cannot answer for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from comfyfleet import metrics
from comfyfleet.comfy.client import ComfyClient, PromptOutcome
from comfyfleet.comfy.errors import ComfyError, PromptLost, WorkflowRejected
from comfyfleet.comfy.events import ComfyEvent
from comfyfleet.comfy.workflow import model_names
from comfyfleet.dispatch import models as task_models
from comfyfleet.dispatch import placement
from comfyfleet.dispatch.collect import collect_outputs, result_of
from comfyfleet.dispatch.inputs import InputError, prepare_inputs
from comfyfleet.dispatch.prefetch import Prefetch
from comfyfleet.dispatch.record import AttemptContext, AttemptRecord
from comfyfleet.dispatch.retry import classify_execution_error, sanitize_execution_error
from comfyfleet.domain import Task, TaskPhase, Worker
from comfyfleet.events import TaskEvent
from comfyfleet.models import ModelsError
from comfyfleet.outputs import OutputsError
from comfyfleet.store import StaleLease, StoreError

logger = logging.getLogger(__name__)

_PROGRESS_WRITE_INTERVAL_S = 0.5


@dataclass(slots=True)
class WorkerSlot:
    """A worker the dispatcher places prompts on: its client and the attempts it holds."""

    worker: Worker
    client: ComfyClient
    attempts: dict[str, Attempt] = field(default_factory=dict)
    recent_models: list[str] = field(default_factory=list)
    retiring: bool = False  # no longer offered by the fleet: gets no new prompts, finishes what it has


class Attempt:
    """One try of a task on the worker of ``slot``; :meth:`run` carries it to its end."""

    def __init__(self, ctx: AttemptContext, slot: WorkerSlot, task: Task, owner: str) -> None:
        self.ctx = ctx
        self.slot = slot
        self.record = AttemptRecord(ctx, task, owner)
        self.prompt_id: str | None = None
        self.submitted = False
        self.cancel = asyncio.Event()
        self.stop_reason: str | None = None  # "cancelled" | "timeout" | "worker_gone" once asked to stop
        self.started_monotonic = ctx.clock.monotonic()
        self.execution_started_at: datetime | None = None
        self.accepted_at: datetime | None = None  # when the worker accepted the prompt
        self.progress: dict[str, Any] = {}
        self.prefetch = Prefetch(slot.client)  # small output files, fetched as their nodes announce them
        self.progress_written: dict[str, Any] | None = None
        self.preview: tuple[bytes, str] | None = None  # the latest preview image and its content type
        self.previews = 0
        self._last_progress_write = -math.inf
        if task.cancel_requested:
            self.cancel.set()

    @property
    def task(self) -> Task:
        return self.record.task

    def request_cancel(self) -> None:
        self.cancel.set()

    def stop(self, reason: str) -> None:
        """Stop the prompt for ``reason`` (e.g. ``worker_gone``) unless it is being stopped already."""
        self.stop_reason = self.stop_reason or reason
        self.cancel.set()

    # -- the whole attempt ----------------------------------------------------------------------
    async def run(self, *, adopted: bool) -> None:
        """Submit (or re-attach), follow and end the attempt. Only a lost lease or a store failure that is
        not an outage leaves it unended here; its lease then expires and it is adopted again."""
        try:
            await self._run(adopted)
        except StaleLease:
            logger.info("attempt_fenced_out task_id=%s attempt=%s", self.task.id, self.record.lease.attempt)
        except StoreError:
            logger.exception("attempt_store_error task_id=%s", self.task.id)
        finally:
            self.prefetch.cancel()
            self.record.drop_phase_write()
            task_models.release_task_models(self.ctx.models, self.task)

    async def _run(self, adopted: bool) -> None:
        task = self.task
        try:
            if adopted and task.prompt_id and task.worker_id == self.slot.worker.id:
                await self._reattach()
            else:
                await self._submit()
            if self.submitted:
                await self._follow_and_finish()
        except asyncio.CancelledError:
            if not self.submitted:
                with contextlib.suppress(StoreError):
                    await asyncio.shield(self.ctx.store.release_task(self.record.lease))
            raise
        except PromptLost as exc:
            await self._retry_or_fail("prompt_lost", f"the worker lost the prompt: {exc.reason}")
        except ComfyError as exc:
            await self._report_unreachable(str(exc))
            await self._retry_or_fail("worker_unreachable", f"worker {self.slot.worker.id} failed: {exc}")
        except StoreError:
            raise
        except OutputsError as exc:
            logger.warning("outputs_not_stored task_id=%s error=%s", task.id, exc)
            await self._retry_or_fail("outputs_unavailable", f"the output files could not be stored: {exc}")
        except Exception:
            logger.exception("attempt_crashed task_id=%s", task.id)
            await self._retry_or_fail("worker_unreachable", "internal error while dispatching")

    # -- submitting -----------------------------------------------------------------------------
    async def _submit(self) -> None:
        if self.cancel.is_set():
            await self.record.finish_cancelled()
            return
        slot, store, task = self.slot, self.ctx.store, self.task
        if task.prompt_id is not None and task.worker_id == slot.worker.id:
            prompt_id = self.prompt_id = task.prompt_id  # recorded by the claim
        else:  # adopted from elsewhere: record where it goes now
            prompt_id = self.prompt_id = str(uuid.uuid4())
            task = await self.record.update(
                "record_dispatch", lambda lease: store.record_dispatch(lease, slot.worker.id, prompt_id)
            )
        await self.record.publish()
        if self.cancel.is_set():  # asked while the dispatch record was being written: nothing was sent
            await self.record.finish_cancelled()
            return
        if task.models and not await self._fetch_models(task):
            return
        try:
            graph = await prepare_inputs(
                task.id,
                task.payload,
                task.inputs,
                lambda data, name, subfolder: slot.client.upload_image(
                    data, name, subfolder=subfolder, overwrite=True
                ),
                http=self.ctx.http,
                max_bytes=self.ctx.max_input_bytes,
                allow_private=self.ctx.settings.allow_private_input_urls,
                outputs=self.ctx.outputs,
            )
        except InputError as exc:
            await self.record.fail("input_invalid", str(exc))
            return
        try:
            await slot.client.submit(graph, prompt_id=prompt_id, extra_data=_extra_data(task))
        except WorkflowRejected as exc:
            details = {"error": exc.error, "node_errors": exc.node_errors}
            await self.record.fail(
                "workflow_invalid", _rejection_message(exc.error, exc.node_errors), details
            )
            return
        self.submitted = True
        self.accepted_at = self.ctx.clock.now()
        runnable_since = max(task.created_at, task.not_before) if task.not_before else task.created_at
        metrics.observe_dispatch_latency((self.accepted_at - runnable_since).total_seconds())
        # The worker runs its prompts in order, so the models of the last one submitted are the ones it
        # will hold: placement plans with that, not with what it held before.
        models = model_names(task.payload)
        if models:
            slot.recent_models = placement.recent_models_after(slot.recent_models, models)
        await self.record.publish(self.record.set_phase_soon(TaskPhase.QUEUED_ON_WORKER))
        logger.info(
            "prompt_submitted task_id=%s worker_id=%s prompt_id=%s", task.id, slot.worker.id, prompt_id
        )

    async def _fetch_models(self, task: Task) -> bool:
        """Put the task's own model files on the worker (phase ``fetching_models``); False when it failed."""
        store, ctx = self.ctx.store, self.ctx
        fetching = await self.record.update(
            "set_phase", lambda lease: store.set_phase(lease, TaskPhase.FETCHING_MODELS)
        )
        await self.record.publish(fetching)

        async def report(progress: dict[str, Any]) -> None:
            await ctx.bus.publish(
                TaskEvent(type="progress", task_id=task.id, tenant=task.tenant, data=progress)
            )
            await self._write_progress(progress)

        try:
            await task_models.provision_task_models(ctx.models, task, self.slot.worker, report)
        except ModelsError as exc:
            logger.warning("task_models_unavailable task_id=%s error=%s", task.id, exc)
            await self.record.fail(task_models.FAILURE_KIND, str(exc))
            return False
        if self.cancel.is_set():  # asked while the files were fetched: nothing was sent
            await self.record.finish_cancelled()
            return False
        return True

    async def _reattach(self) -> None:
        """An adopted attempt: ask the worker what became of its prompt."""
        task = self.task
        assert task.prompt_id is not None
        self.prompt_id = task.prompt_id
        job = await self.slot.client.job(task.prompt_id)
        if job is None:
            if task.phase in (TaskPhase.DISPATCHING, TaskPhase.FETCHING_MODELS):
                # Never reached the worker (or died with it): submitting now cannot run it twice.
                await self._submit()
                return
            raise PromptLost(task.prompt_id, f"worker {self.slot.worker.id} does not know it any more")
        self.submitted = True
        logger.info(
            "attempt_reattached task_id=%s prompt_id=%s status=%s", task.id, task.prompt_id, job.get("status")
        )

    # -- following and stopping -----------------------------------------------------------------
    async def _follow_and_finish(self) -> None:
        assert self.prompt_id is not None
        clock = self.ctx.clock
        deadline = self.started_monotonic + self.task.timeout_s
        # A success the socket carried whole is read from its frames: no history round trip after the end.
        follow = asyncio.ensure_future(
            self.slot.client.follow(self.prompt_id, on_event=self._on_event, from_frames=True)
        )
        stop_wait = asyncio.ensure_future(self.cancel.wait())
        timer = asyncio.ensure_future(clock.sleep(deadline - clock.monotonic()))
        outcome: PromptOutcome | None = None
        try:
            racing: set[asyncio.Future[Any]] = {follow, stop_wait, timer}
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            if follow in done:
                outcome = follow.result()
            else:
                if self.stop_reason is None:
                    self.stop_reason = "cancelled" if self.cancel.is_set() else "timeout"
                outcome = await self._stop_prompt(follow)
        finally:
            for future in (follow, stop_wait, timer):
                if not future.done():
                    future.cancel()
            await asyncio.gather(follow, stop_wait, timer, return_exceptions=True)
        await self._finish(outcome)

    async def _stop_prompt(self, follow: asyncio.Future[PromptOutcome]) -> PromptOutcome | None:
        """Cancel or time out: dequeue or interrupt the prompt, then wait a grace period for it to stop."""
        assert self.prompt_id is not None
        if self.stop_reason != "worker_gone":
            with contextlib.suppress(ComfyError):
                await self.slot.client.cancel_job(self.prompt_id)
        grace = asyncio.ensure_future(self.ctx.clock.sleep(self.ctx.settings.interrupt_grace_s))
        try:
            racing: set[asyncio.Future[Any]] = {follow, grace}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        finally:
            grace.cancel()
        if follow.done():
            try:
                return follow.result()
            except (PromptLost, ComfyError):
                return None  # dequeued before it ran (never enters history), or the worker is gone
        if self.stop_reason != "worker_gone":
            worker_id = self.slot.worker.id
            logger.warning(
                "prompt_ignored_interrupt task_id=%s worker_id=%s prompt_id=%s",
                self.task.id,
                worker_id,
                self.prompt_id,
            )
            try:
                await self.ctx.directory.recycle(worker_id, f"prompt {self.prompt_id} ignored an interrupt")
            except Exception:  # the attempt still ends; the fleet probes the worker anyway
                logger.warning("worker_recycle_failed worker_id=%s", worker_id, exc_info=True)
        return None

    # -- ending ---------------------------------------------------------------------------------
    async def _finish(self, outcome: PromptOutcome | None) -> None:
        task, record = self.task, self.record
        latest = {**self.progress, "nodes_total": len(task.payload)} if self.progress else None
        unwritten = latest if latest is not None and latest != self.progress_written else None
        status = outcome.status if outcome is not None else None
        if outcome is not None and status == "success":
            # The last progress reached rides on the completion write.
            await self._complete(outcome, unwritten)
            self._forget_prompt()
            return
        if unwritten is not None:
            # Progress writes are spaced out while a prompt runs; the task keeps the last one it reached.
            await self._write_progress(unwritten)
        if self.stop_reason == "cancelled":
            await record.finish_cancelled()
        elif self.stop_reason == "timeout":
            message = f"task timed out after {task.timeout_s:g} s"
            if self.ctx.settings.retry_timeouts:
                await self._retry_or_fail("timeout", message)
            else:
                await record.fail("timeout", message)
        elif self.stop_reason == "worker_gone":
            await self._retry_or_fail("worker_lost", f"worker {self.slot.worker.id} went away")
        elif outcome is not None and status == "error":
            error = outcome.error or {}
            kind = classify_execution_error(error)
            message, details = sanitize_execution_error(error)
            if kind == "out_of_memory":
                await self._retry_or_fail(kind, message, details)
            else:
                await record.fail(kind, message, details)
        elif status == "interrupted":
            await self._retry_or_fail("interrupted", "the prompt was interrupted on the worker")
        else:
            await self._retry_or_fail("prompt_lost", "the worker lost the prompt")
        if status in {"error", "interrupted"}:
            self._forget_prompt()

    def _forget_prompt(self) -> None:
        """Keep long-lived workers small: the result is ours now (and already answered)."""
        if self.prompt_id:
            self.slot.client.delete_history_later(self.prompt_id)

    async def _complete(self, outcome: PromptOutcome, progress: dict[str, Any] | None) -> None:
        task, slot, ctx = self.task, self.slot, self.ctx
        collected = await collect_outputs(slot.client, ctx.outputs, task, outcome, self.prefetch)
        result = result_of(
            task,
            outcome,
            collected,
            worker_id=slot.worker.id,
            finished=ctx.clock.now(),
            execution_started_at=self.execution_started_at,
            accepted_at=self.accepted_at,
        )
        completed = await self.record.end(
            "complete", lambda lease: ctx.store.complete_task(lease, result, progress)
        )
        if model_names(task.payload):
            with contextlib.suppress(Exception):
                await ctx.directory.note_loaded_models(slot.worker.id, slot.recent_models)
        await self.record.publish(completed)
        logger.info(
            "task_completed task_id=%s worker_id=%s outputs=%d",
            task.id,
            slot.worker.id,
            len(collected.outputs),
        )

    async def _retry_or_fail(self, kind: str, message: str, details: dict[str, Any] | None = None) -> None:
        cancelled = self.cancel.is_set() and self.stop_reason in {None, "cancelled"}
        await self.record.retry_or_fail(kind, message, details, cancelled=cancelled)

    async def _report_unreachable(self, reason: str) -> None:
        try:
            await self.ctx.directory.report_unreachable(self.slot.worker.id, reason)
        except Exception:  # telling the fleet is a hint; the attempt still ends
            logger.warning("worker_report_failed worker_id=%s", self.slot.worker.id, exc_info=True)

    # -- live events ----------------------------------------------------------------------------
    async def _on_event(self, event: ComfyEvent) -> None:
        kind = event.type
        data = event.data or {}
        task = self.task
        if kind == "preview" and event.image:
            await self._on_preview(event.image, event.image_type or "image/jpeg")
            return
        if kind == "execution_start" and self.execution_started_at is None:
            self.execution_started_at = self.ctx.clock.now()
            # Counts as a progress write: the first node's progress waits for the next one (or the end).
            self._last_progress_write = self.ctx.clock.monotonic()
            await self.record.publish(self.record.set_phase_soon(TaskPhase.EXECUTING))
            return
        if kind == "executed":
            self.prefetch.announced(data.get("output"))
            return
        if kind == "executing" and data.get("node") is not None:
            node = str(data["node"])
            class_type = (task.payload.get(node) or {}).get("class_type")
            self.progress = {"node": node, "class_type": class_type, "value": None, "max": None}
        elif kind == "progress":
            at = str(data["node"]) if data.get("node") is not None else self.progress.get("node")
            self.progress = {
                **self.progress,
                "node": at,
                "value": data.get("value"),
                "max": data.get("max"),
            }
        else:
            return
        progress = {**self.progress, "nodes_total": len(task.payload)}
        await self.ctx.bus.publish(
            TaskEvent(type="progress", task_id=task.id, tenant=task.tenant, data=progress)
        )
        if self.ctx.clock.monotonic() - self._last_progress_write >= _PROGRESS_WRITE_INTERVAL_S:
            await self._write_progress(progress)

    async def _on_preview(self, image: bytes, content_type: str) -> None:
        # Kept in memory only, the newest one: previews are many and only the latest is worth showing.
        self.preview = (image, content_type)
        self.previews += 1
        task = self.task
        data = {
            "preview": self.previews,
            "content_type": content_type,
            "url": f"/api/v1/tasks/{task.id}/preview",
        }
        await self.ctx.bus.publish(TaskEvent(type="preview", task_id=task.id, tenant=task.tenant, data=data))

    async def _write_progress(self, progress: dict[str, Any]) -> None:
        self._last_progress_write = self.ctx.clock.monotonic()
        self.progress_written = progress
        store = self.ctx.store
        await self.record.update_soon(lambda lease: store.set_progress(lease, progress))


def _extra_data(task: Task) -> dict[str, Any]:
    # ComfyUI clients (through the gateway) send extra_data such as extra_pnginfo, which ComfyUI embeds in
    # the PNGs it saves; pass it on.
    comfyui = (task.metadata or {}).get("comfyui") if isinstance(task.metadata, dict) else None
    given = comfyui.get("extra_data") if isinstance(comfyui, dict) else None
    return {
        **(given if isinstance(given, dict) else {}),
        "comfyfleet": {"task_id": task.id, "attempt": task.attempt},
    }


def _rejection_message(error: dict[str, Any], node_errors: dict[str, Any]) -> str:
    parts = [str(error.get("message") or "workflow rejected by ComfyUI")]
    details = error.get("details")
    if details:
        parts.append(str(details))
    for node_id, node in (node_errors or {}).items():
        for item in node.get("errors", []) if isinstance(node, dict) else []:
            parts.append(
                f"node {node_id} ({node.get('class_type')}): {item.get('message')} {item.get('details', '')}".strip()
            )
    return "; ".join(parts)
