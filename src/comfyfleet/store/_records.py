"""The worker records and the webhook outbox, written once over a dialect's seam (see ``sql.py``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from comfyfleet.domain import Worker, WorkerMetrics, WorkerState
from comfyfleet.store._common import utcnow
from comfyfleet.store._rows import Codec, Row, delivery_from_row, worker_from_row
from comfyfleet.store._statements import Statements
from comfyfleet.store.base import InvalidArgument, NotFound, StaleLease, WebhookDelivery

# What a webhook attempt's outcome makes of its delivery.
_DELIVERY_STATUS = {"delivered": "delivered", "retry": "pending", "failed": "failed"}


class RecordsMixin:
    """Worker records and the webhook outbox; also declares the seam a dialect fills in."""

    sql: Statements
    codec: Codec

    def _is_open(self) -> bool:
        raise NotImplementedError

    async def _read(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """Run one read-only statement."""
        raise NotImplementedError

    async def _write(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """Run one statement that writes, durably; return what it returns."""
        raise NotImplementedError

    async def _read_long(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """A read that may take long (a page of a listing); a dialect may run it apart from the short ones."""
        return await self._read(sql, params)

    async def _write_long(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """A write that may touch many rows (a purge)."""
        return await self._write(sql, params)

    def _now(self) -> dict[str, Any]:
        """The parameter every time-dependent statement gets: the application's clock (``now``)."""
        return {"now": self.codec.dump_time(utcnow())}

    def _lease(self, lease_s: float) -> dict[str, Any]:
        """The parameters of a lease of ``lease_s`` seconds from now (each dialect uses the ones it needs)."""
        now = utcnow()
        return {
            "now": self.codec.dump_time(now),
            "lease_s": float(lease_s),
            "lease_expires": self.codec.dump_time(now + timedelta(seconds=lease_s)),
        }

    # -- workers ----------------------------------------------------------------------------------
    async def upsert_worker(self, worker: Worker) -> Worker:
        codec = self.codec
        params = {
            "id": worker.id,
            "pool": worker.pool,
            "provider": worker.provider,
            "state": WorkerState(worker.state).value,
            "created_at": codec.dump_time(worker.created_at),
            "endpoint": worker.endpoint,
            "provider_id": worker.provider_id,
            "current_task_ids": codec.dump_json(list(worker.current_task_ids)),
            "last_active_at": None
            if worker.last_active_at is None
            else codec.dump_time(worker.last_active_at),
            "health_failures": worker.health_failures,
            "loaded_models": codec.dump_json(list(worker.loaded_models)),
            "node_types": codec.dump_json(worker.node_types),
            "error": worker.error,
            "labels": codec.dump_json(dict(worker.labels)),
            "info": codec.dump_json(dict(worker.info)),
            **self._now(),
        }
        [row] = await self._write(self.sql.upsert_worker, params)
        return worker_from_row(row, codec)

    async def update_worker_activity(self, worker: Worker, *, owner: bool) -> bool:
        codec = self.codec
        params = {
            "id": worker.id,
            "owner": owner,
            "state": WorkerState(worker.state).value,
            "current_task_ids": codec.dump_json(list(worker.current_task_ids)),
            "last_active_at": None
            if worker.last_active_at is None
            else codec.dump_time(worker.last_active_at),
            "loaded_models": codec.dump_json(list(worker.loaded_models)),
            "info": codec.dump_json(dict(worker.info)),
            **self._now(),
        }
        return bool(await self._write(self.sql.update_worker_activity, params))

    async def get_worker(self, worker_id: str) -> Worker:
        rows = await self._read(self.sql.get_worker, {"id": worker_id})
        if not rows:
            raise NotFound(f"worker {worker_id} not found")
        return worker_from_row(rows[0], self.codec)

    async def list_workers(self, *, pool: str | None = None, include_gone: bool = False) -> list[Worker]:
        rows = await self._read(self.sql.list_workers, {"pool": pool, "include_gone": include_gone})
        return [worker_from_row(row, self.codec) for row in rows]

    async def delete_worker(self, worker_id: str) -> None:
        await self._write(self.sql.delete_worker, {"id": worker_id})

    async def worker_metrics(self) -> WorkerMetrics:
        counts: dict[str, int] = {
            state: count for state, count in await self._read(self.sql.workers_by_state, {})
        }
        return WorkerMetrics(
            total_workers=sum(count for state, count in counts.items() if state != WorkerState.TERMINATED),
            idle_workers=counts.get(WorkerState.IDLE, 0),
            running_workers=counts.get(WorkerState.BUSY, 0),
            starting_workers=counts.get(WorkerState.STARTING, 0),
            failed_workers=counts.get(WorkerState.FAILED, 0),
            pending_workers=counts.get(WorkerState.PENDING, 0),
            terminating_workers=counts.get(WorkerState.TERMINATING, 0),
        )

    # -- webhook outbox ---------------------------------------------------------------------------
    async def claim_webhook_deliveries(
        self, owner: str, lease_s: float, *, limit: int = 20
    ) -> list[WebhookDelivery]:
        if limit < 1:
            return []
        params = {"owner": owner, "limit": limit, **self._lease(lease_s)}
        rows = await self._write(self.sql.claim_webhook_deliveries, params)
        deliveries = [delivery_from_row(row, self.codec) for row in rows]
        return sorted(deliveries, key=lambda delivery: (delivery.next_attempt_at, delivery.id))

    async def record_webhook_attempt(
        self,
        delivery_id: int,
        owner: str,
        *,
        outcome: str,
        status_code: int | None,
        error: str | None,
        duration_s: float,
        next_attempt_at: datetime | None = None,
    ) -> WebhookDelivery:
        status = _DELIVERY_STATUS.get(outcome)
        if status is None:
            raise InvalidArgument(
                f"webhook attempt outcome must be delivered, retry or failed, got {outcome!r}"
            )
        params = {
            "id": delivery_id,
            "owner": owner,
            "status": status,
            "next_attempt_at": None if next_attempt_at is None else self.codec.dump_time(next_attempt_at),
            "status_code": status_code,
            "error": error,
            "duration_ms": round(duration_s * 1000, 1),
            **self._now(),
        }
        rows = await self._write(self.sql.record_webhook_attempt, params)
        if not rows:
            raise StaleLease(f"webhook delivery {delivery_id} is not leased to {owner} (or already finished)")
        return delivery_from_row(rows[0], self.codec)

    async def webhook_deliveries(self, task_id: str) -> list[WebhookDelivery]:
        rows = await self._read(self.sql.webhook_deliveries, {"task_id": task_id})
        return [delivery_from_row(row, self.codec) for row in rows]

    async def next_webhook_due_at(self) -> datetime | None:
        rows = await self._read(self.sql.next_webhook_due_at, {})
        return self.codec.load_optional_time(rows[0][0])
