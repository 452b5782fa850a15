"""Must-show 3: a webhook receiver gets exactly one validly signed delivery per task, also when it
failed the first two tries; the attempts are visible on the task."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from comfyfleet import AsyncClient
from comfyfleet.tasks.checks import webhook_problem
from comfyfleet.webhooks import backoff_s
from support import eventually, running_fleet, tiny_workflow

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FAST_RETRIES = {"retry_base_s": 0.05, "retry_max_s": 0.2, "safety_poll_s": 0.5}


@dataclass
class Receiver:
    """A webhook endpoint that fails the first ``fail_first`` tries of every message with a 503."""

    url: str = ""
    fail_first: int = 2
    requests: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        message_id = request.headers.get("webhook-id", "")
        tries = self.requests[message_id]
        tries.append({"headers": dict(request.headers), "body": body})
        self.changed.set()
        if len(tries) <= self.fail_first:
            return web.Response(status=503, text="busy, try later")
        try:
            payload = Webhook(SECRET).verify(body, dict(request.headers))
        except WebhookVerificationError:
            return web.Response(status=401, text="bad signature")
        if message_id in self.accepted:
            return web.Response(status=409, text="duplicate")
        self.accepted[message_id] = payload
        return web.Response(status=204)


@asynccontextmanager
async def receiver(fail_first: int = 2) -> AsyncIterator[Receiver]:
    hooks = Receiver(fail_first=fail_first)
    app = web.Application()
    app.router.add_post("/hooks/comfyfleet", hooks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hooks.url = f"http://127.0.0.1:{port}/hooks/comfyfleet"
    try:
        yield hooks
    finally:
        await runner.cleanup()


async def test_each_task_gets_one_signed_delivery_after_two_failures(tmp_path: Path) -> None:
    async with (
        receiver(fail_first=2) as hooks,
        running_fleet(
            tmp_path,
            workers=2,
            webhook_secret=SECRET,
            webhooks=FAST_RETRIES,
            dispatch={"safety_poll_s": 0.5, "allow_private_input_urls": True},  # the receiver is on loopback
        ) as fleet,
        AsyncClient(fleet.url) as client,
    ):
        tasks = [await client.submit(tiny_workflow(color=color), webhook=hooks.url) for color in (1, 2, 3)]
        finished = [await client.wait(task.id, timeout=20) for task in tasks]
        assert all(task.status == "completed" for task in finished)

        async def all_delivered() -> list[dict[str, Any]] | None:
            shown = [(await client.get(task.id)).webhook_deliveries for task in tasks]
            return (
                [d for [d] in shown if d["status"] == "delivered"]
                if all(len(s) == 1 for s in shown) and all(s[0]["status"] == "delivered" for s in shown)
                else None
            )

        deliveries = await eventually(all_delivered, within=20)

        # One message per task, each tried three times (503, 503, 204) and accepted once.
        assert sorted(hooks.accepted) == sorted(f"msg_{task.id}" for task in tasks)
        for task, delivery in zip(tasks, deliveries, strict=True):
            tries = hooks.requests[f"msg_{task.id}"]
            assert len(tries) == 3
            for attempt in tries:  # every try, failed or not, was validly signed
                Webhook(SECRET).verify(attempt["body"], attempt["headers"])
            payload = hooks.accepted[f"msg_{task.id}"]
            assert payload["type"] == "task.completed"
            assert payload["data"]["id"] == task.id
            assert payload["data"]["status"] == "completed"
            assert payload["data"]["result"]["outputs"][0]["url"].endswith(".png")
            assert delivery["attempts"] == 3
            assert [entry["status_code"] for entry in delivery["history"]] == [503, 503, 204]
            assert delivery["message_id"] == f"msg_{task.id}"
        # The delivered state is recorded after the receiver's answer: nothing more can be sent.
        assert sum(len(tries) for tries in hooks.requests.values()) == 9

        # A wrong secret would not verify: the signature really depends on it.
        body, headers = (
            hooks.requests[f"msg_{tasks[0].id}"][-1]["body"],
            hooks.requests[f"msg_{tasks[0].id}"][-1]["headers"],
        )
        try:
            Webhook("whsec_" + "A" * 43).verify(body, headers)
        except WebhookVerificationError:
            pass
        else:
            raise AssertionError("a signature verified with the wrong secret")


async def test_cancelled_tasks_are_delivered_too_and_bad_hooks_are_refused(tmp_path: Path) -> None:
    async with (
        receiver(fail_first=0) as hooks,
        running_fleet(
            tmp_path,
            workers=1,
            webhook_secret=SECRET,
            webhooks=FAST_RETRIES,
            emulator={"prompt_time_s": 5},
            dispatch={"safety_poll_s": 0.5, "allow_private_input_urls": True},
        ) as fleet,
        AsyncClient(fleet.url) as client,
    ):
        running = await client.submit(tiny_workflow(color=7), webhook=hooks.url)
        prefetched = await client.submit(tiny_workflow(color=6))  # the worker holds one more in its queue
        await eventually(lambda: _status_is(client, prefetched.id, "running"), within=10)
        waiting = await client.submit(tiny_workflow(color=8), webhook={"url": hooks.url})
        assert (await client.cancel(waiting.id)).status == "cancelled"

        async def seen(message_id: str) -> bool:
            return message_id in hooks.accepted

        await eventually(lambda: seen(f"msg_{waiting.id}"), within=10)
        assert hooks.accepted[f"msg_{waiting.id}"]["type"] == "task.cancelled"
        await client.cancel(running.id)
        await client.cancel(prefetched.id)
        assert (await client.wait(running.id, timeout=20)).status == "cancelled"
        await eventually(lambda: seen(f"msg_{running.id}"), within=10)

        for webhook, message in (
            ({"url": "ftp://example.test/x"}, "http(s)"),
            ({"url": hooks.url, "colour": "red"}, "unknown webhook field"),
        ):
            response = await fleet.http.post(
                "/api/v1/tasks", json={"payload": tiny_workflow(), "webhook": webhook}
            )
            assert response.status_code == 422
            assert response.json()["error"] == "invalid_webhook"
            assert message in response.json()["message"]


async def _status_is(client: AsyncClient, task_id: str, status: str) -> bool:
    return (await client.get(task_id)).status == status


async def test_a_private_address_is_refused_like_input_urls(tmp_path: Path) -> None:
    async with (
        receiver(fail_first=0) as hooks,
        running_fleet(
            tmp_path,
            workers=1,
            webhook_secret=SECRET,
            webhooks=FAST_RETRIES,
        ) as fleet,
        AsyncClient(fleet.url) as client,
    ):
        task = await client.submit(tiny_workflow(color=9), webhook=hooks.url)
        await client.wait(task.id, timeout=20)

        async def gave_up() -> dict[str, Any] | None:
            shown = (await client.get(task.id)).webhook_deliveries
            return shown[0] if shown and shown[0]["status"] == "failed" else None

        delivery = await eventually(gave_up, within=10)
        assert "non-public address" in delivery["last_error"]
        assert delivery["attempts"] == 1  # not retried: the address will not become public
        assert not hooks.requests


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    delays = [backoff_s(attempt, base_s=1, max_s=10) for attempt in range(1, 8)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(10, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert webhook_problem({"url": "https://ok.example/h"}) is None


async def test_the_receiver_helper_refuses_bad_signatures() -> None:
    async with receiver(fail_first=0) as hooks, httpx.AsyncClient() as http:
        response = await http.post(
            hooks.url,
            content=json.dumps({"x": 1}),
            headers={"webhook-id": "msg_x", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"},
        )
        assert response.status_code == 401
