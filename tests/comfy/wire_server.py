"""A wire-level ComfyUI stand-in for client tests that need one exact frame sequence with one exact timing.

It sends what real ComfyUI 0.33 sends for a trivial two-node prompt (protocol reference A.7), frame for
frame: ``status`` twice at submit (put, then get), then ``execution_start`` … ``execution_success``, the
history write, ``status`` and ``executing{node: null}``. The execution starts only when the client first
polls ``/api/jobs/{id}``, and that poll is answered ``completed`` before the last two frames are sent: the
race a real server wins about one run in six, made certain.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import WSMsgType, web

# What the end of a run sends after the history write; the client should get them even though the poll
# answering "completed" came first.
_TAIL_DELAY_S = 0.05


def _ms() -> int:
    return int(time.time() * 1000)


class RealSequenceServer:
    def __init__(self) -> None:
        self.url = ""
        self.polls = 0
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._prompts: dict[str, dict[str, Any]] = {}
        self._history: dict[str, dict[str, Any]] = {}
        self._runner: web.AppRunner | None = None
        self._tails: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RealSequenceServer:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_post("/prompt", self._prompt)
        app.router.add_get("/api/jobs/{prompt_id}", self._job)
        app.router.add_get("/history/{prompt_id}", self._history_entry)
        app.router.add_post("/history", self._history_delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tails:
            task.cancel()
        await asyncio.gather(*self._tails, return_exceptions=True)
        for ws in list(self._sockets.values()):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _send(self, client_id: str | None, kind: str, data: dict[str, Any]) -> None:
        targets = list(self._sockets.values()) if client_id is None else [self._sockets.get(client_id)]
        for ws in targets:
            if ws is not None and not ws.closed:
                await ws.send_str(json.dumps({"type": kind, "data": data}))

    async def _status(self, remaining: int) -> None:
        await self._send(None, "status", {"status": {"exec_info": {"queue_remaining": remaining}}})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        client_id = request.query.get("clientId", "generated")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets[client_id] = ws
        await ws.send_str(
            json.dumps(
                {
                    "type": "status",
                    "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id},
                }
            )
        )
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break
        self._sockets.pop(client_id, None)
        return ws

    async def _prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt_id = body["prompt_id"]
        self._prompts[prompt_id] = {
            "graph": body["prompt"],
            "client_id": body.get("client_id"),
            "created": _ms(),
            "state": "pending",
        }
        await self._status(1)  # put in the queue
        await self._status(1)  # taken from the queue by the executor
        return web.json_response({"prompt_id": prompt_id, "number": 1, "node_errors": {}})

    async def _job(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        prompt = self._prompts.get(prompt_id)
        if prompt is None:
            return web.json_response({"error": "Job not found"}, status=404)
        self.polls += 1
        if prompt["state"] == "pending":
            await self._run(prompt_id, prompt)
        entry = self._history[prompt_id]
        return web.json_response(
            {
                "id": prompt_id,
                "status": "completed",
                "priority": 1,
                "create_time": prompt["created"],
                "execution_start_time": prompt["started"],
                "execution_end_time": prompt["ended"],
                "outputs_count": 1,
                "outputs": entry["outputs"],
                "execution_status": entry["status"],
            }
        )

    async def _run(self, prompt_id: str, prompt: dict[str, Any]) -> None:
        client_id = prompt["client_id"]
        prompt["state"] = "done"
        prompt["started"] = started = _ms()
        image = {"filename": "probe_00001_.png", "subfolder": "probe", "type": "output"}

        def progress_state(states: dict[str, str]) -> dict[str, Any]:
            nodes = {
                node: {"value": 1 if state == "finished" else 0, "max": 1, "state": state, "node_id": node,
                       "prompt_id": prompt_id, "display_node_id": node, "parent_node_id": None,
                       "real_node_id": node}
                for node, state in states.items()
            }  # fmt: skip
            return {"prompt_id": prompt_id, "nodes": nodes}

        async def send(kind: str, data: dict[str, Any]) -> None:
            await self._send(client_id, kind, data)

        await send("execution_start", {"prompt_id": prompt_id, "timestamp": started})
        await send("execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": _ms()})
        await send("progress_state", progress_state({"1": "running"}))
        await send("executing", {"node": "1", "display_node": "1", "prompt_id": prompt_id})
        await send("progress_state", progress_state({"1": "finished"}))
        await send("progress_state", progress_state({"1": "finished", "2": "running"}))
        await send("executing", {"node": "2", "display_node": "2", "prompt_id": prompt_id})
        await send(
            "executed",
            {"node": "2", "display_node": "2", "output": {"images": [image]}, "prompt_id": prompt_id},
        )
        await send("progress_state", progress_state({"1": "finished", "2": "finished"}))
        prompt["ended"] = ended = _ms()
        await send("execution_success", {"prompt_id": prompt_id, "timestamp": ended})
        self._history[prompt_id] = {
            "prompt": [
                1,
                prompt_id,
                prompt["graph"],
                {"client_id": client_id, "create_time": prompt["created"]},
                ["2"],
            ],
            "outputs": {"2": {"images": [image]}},
            "status": {
                "status_str": "success",
                "completed": True,
                "messages": [
                    ["execution_start", {"prompt_id": prompt_id, "timestamp": started}],
                    ["execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": started}],
                    ["execution_success", {"prompt_id": prompt_id, "timestamp": ended}],
                ],
            },
            "meta": {"2": {"node_id": "2", "display_node": "2", "parent_node": None, "real_node_id": "2"}},
        }

        async def tail() -> None:
            await asyncio.sleep(_TAIL_DELAY_S)  # the poll's answer goes out first
            await self._status(0)
            await send("executing", {"node": None, "prompt_id": prompt_id})

        task = asyncio.create_task(tail())
        self._tails.add(task)
        task.add_done_callback(self._tails.discard)

    async def _history_entry(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self._history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _history_delete(self, request: web.Request) -> web.Response:
        body = await request.json()
        for prompt_id in body.get("delete", []):
            self._history.pop(prompt_id, None)
        return web.Response(status=200)
