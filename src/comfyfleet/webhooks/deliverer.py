"""Delivers task webhooks from the store's outbox, signed as the Standard Webhooks specification says.

When a task with ``webhook: {"url": …}`` ends, the database writes its delivery row in the same
transaction (see the store's migration 0002), so an ending can never be lost between "the task
completed" and "we meant to tell". This loop leases due deliveries (so several replicas never send one
twice at the same time), POSTs ``{"type": "task.completed" | "task.failed" | "task.cancelled",
"timestamp", "data": <the task as GET /api/v1/tasks/{id} shows it>}`` with the ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` headers, and records every attempt on the delivery. A 2xx
answer is success; anything else is retried with exponential back-off and jitter (honouring
``Retry-After``) until ``webhooks.max_attempts``; 410 Gone stops at once. The URL must point at a public
address unless ``dispatch.allow_private_input_urls`` is set: the same rule as input URLs, checked before
every attempt. Redirects are not followed.

Delivery is at least once: a receiver that answered 2xx but whose answer was lost gets the same
``webhook-id`` again and should deduplicate on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from comfyfleet import metrics
from comfyfleet.config import Settings
from comfyfleet.domain import TERMINAL_STATUSES
from comfyfleet.events import EventBus, TaskEvent
from comfyfleet.http.wire import task_json
from comfyfleet.net import UnsafeAddress, pin_public_address
from comfyfleet.store import NotFound, StaleLease, Store, StoreError, WebhookDelivery

logger = logging.getLogger(__name__)

USER_AGENT = "comfyfleet-webhooks"
_MAX_ERROR_TEXT = 300
_TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)


def _ended_with_webhook(event: TaskEvent) -> bool:
    ended = event.type == "status" and event.data.get("status") in _TERMINAL
    return ended and event.task is not None and event.task.webhook is not None


class WebhooksError(Exception):
    """Root of the webhook deliverer's errors."""


class DelivererClosed(WebhooksError):
    """Used before ``async with`` or after it ended."""


class _Stopped(Exception):
    """Raised inside the TaskGroup to end :meth:`WebhookDeliverer.run` cleanly."""


def signed_headers(secret: str, message_id: str, body: str, *, at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for ``body`` sent as ``message_id`` at ``at`` (now by default)."""
    moment = at or datetime.now(UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, moment, body),
    }


def backoff_s(attempts: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before the next try after ``attempts`` failed ones: base·2ⁿ⁻¹, capped, with half of it jitter."""
    ceiling = min(max_s, base_s * 2.0 ** max(attempts - 1, 0))
    jitter: float = (rng or random).random()
    return ceiling / 2 + jitter * ceiling / 2


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        moment: datetime = parsedate_to_datetime(value)
        return max(0.0, (moment - datetime.now(UTC)).total_seconds())
    return None


class WebhookDeliverer:
    """Async context manager; :meth:`run` delivers until cancelled or :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        owner: str,
        bus: EventBus | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.config = settings.webhooks
        self.owner = owner
        self.bus = bus
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.concurrency)
        # A lease outlives one attempt with a margin, so a slow receiver never lets a second replica in.
        self._lease_s = self.config.timeout_s * 2 + 30

    async def __aenter__(self) -> WebhookDeliverer:
        self._http = httpx.AsyncClient(
            timeout=self.config.timeout_s,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            transport=self._transport,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping.set()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        if self._http is None:
            raise DelivererClosed("WebhookDeliverer.run() outside 'async with'")
        try:
            async with asyncio.TaskGroup() as group:
                if self.bus is not None:
                    group.create_task(self._watch_endings(), name="webhooks-watch")
                group.create_task(self._deliver_loop(), name="webhooks-deliver")
                await self._stopping.wait()
                raise _Stopped
        except* _Stopped:
            pass

    async def _watch_endings(self) -> None:
        """A task of this replica that ended with a webhook has a fresh delivery: look at once instead of at
        the next timer (an ending without a webhook has none, and costs no claim)."""
        assert self.bus is not None
        with self.bus.subscribe(maxsize=1024, only=_ended_with_webhook) as subscription:
            async for _ in subscription:
                self._wake.set()

    async def _deliver_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                delivered = await self.deliver_due()
            except StoreError:
                logger.warning("webhook_round_failed", exc_info=True)
                delivered = 0
            if delivered:
                continue  # there may be more due right now
            timeout = self.config.safety_poll_s
            with contextlib.suppress(StoreError):
                due = await self.store.next_webhook_due_at()
                if due is not None:
                    timeout = max(0.0, min(timeout, (due - datetime.now(UTC)).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def deliver_due(self) -> int:
        """One round: lease the due deliveries and attempt each; return how many were attempted."""
        deliveries = await self.store.claim_webhook_deliveries(
            self.owner, self._lease_s, limit=self.config.concurrency * 2
        )
        if deliveries:
            async with asyncio.TaskGroup() as group:
                for delivery in deliveries:
                    group.create_task(self._attempt(delivery), name=f"webhook-{delivery.id}")
        return len(deliveries)

    async def _attempt(self, delivery: WebhookDelivery) -> None:
        async with self._slots:
            started = time.monotonic()
            try:
                outcome, status_code, error, retry_after = await self._post(delivery)
            except StoreError:
                logger.warning(
                    "webhook_task_unreadable delivery_id=%s task_id=%s", delivery.id, delivery.task_id
                )
                return  # the lease expires and the delivery is tried again
            duration = time.monotonic() - started
            attempts = delivery.attempts + 1
            next_at = None
            if outcome == "retry" and attempts >= self.config.max_attempts:
                outcome = "failed"
                error = f"{error} (gave up after {attempts} attempts)"
            if outcome == "retry":
                delay = backoff_s(attempts, base_s=self.config.retry_base_s, max_s=self.config.retry_max_s)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self.config.retry_max_s))
                next_at = datetime.now(UTC) + timedelta(seconds=delay)
            try:
                await self.store.record_webhook_attempt(
                    delivery.id,
                    self.owner,
                    outcome=outcome,
                    status_code=status_code,
                    error=error[:_MAX_ERROR_TEXT] if error else None,
                    duration_s=duration,
                    next_attempt_at=next_at,
                )
            except StaleLease:
                logger.warning("webhook_lease_lost delivery_id=%s", delivery.id)
                return
            metrics.count_webhook_attempt(
                {"delivered": "delivered", "retry": "retry"}.get(outcome, "gave_up")
            )
            logger.info(
                "webhook_attempt task_id=%s delivery_id=%s attempt=%s outcome=%s status=%s",
                delivery.task_id,
                delivery.id,
                attempts,
                outcome,
                status_code,
            )

    async def _post(self, delivery: WebhookDelivery) -> tuple[str, int | None, str | None, float | None]:
        """``(outcome, status code, error, retry-after seconds)`` of one POST."""
        assert self._http is not None
        try:
            task = await self.store.get_task(delivery.task_id)
        except NotFound:
            return "failed", None, "the task no longer exists", None
        secret = (task.webhook or {}).get("secret") or self.settings.webhook_secret
        if not isinstance(secret, str) or not secret:
            return (
                "failed",
                None,
                "no webhook_secret is configured on the server, so the webhook cannot be signed",
                None,
            )
        url = delivery.url
        if urlsplit(url).scheme not in {"http", "https"} or not urlsplit(url).hostname:
            return "failed", None, f"the webhook URL {url[:200]!r} is not an http(s) URL", None
        try:
            target = await pin_public_address(
                url, allow_private=self.settings.dispatch.allow_private_input_urls, label="webhook URL"
            )
        except UnsafeAddress as exc:
            return "failed", None, str(exc), None
        now = datetime.now(UTC)
        body = json.dumps(
            {"type": delivery.event, "timestamp": now.isoformat(), "data": task_json(task)},
            separators=(",", ":"),
            default=_json_default,
        )
        headers = {
            "Content-Type": "application/json",
            **signed_headers(secret, delivery.message_id, body, at=now),
        }
        try:
            response = await self._http.post(
                target.url,
                content=body.encode(),
                headers={**headers, **target.headers},
                extensions=target.extensions,
            )
        except httpx.HTTPError as exc:
            return "retry", None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None
        if response.is_success:
            return "delivered", response.status_code, None, None
        reason = f"HTTP {response.status_code} {response.reason_phrase}".strip()
        if response.status_code == 410:
            return (
                "failed",
                response.status_code,
                f"{reason}: the receiver asked not to be called again",
                None,
            )
        return "retry", response.status_code, reason, _retry_after_s(response)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat().replace("+00:00", "Z")
    return str(value)
