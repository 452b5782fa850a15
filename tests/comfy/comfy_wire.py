"""Bare-protocol helpers for the emulator tests: raw httpx and websockets, no comfyfleet client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect


def ws_url(base_url: str, client_id: str | None = None, path: str = "/ws") -> str:
    url = base_url.replace("http://", "ws://", 1) + path
    return f"{url}?clientId={client_id}" if client_id else url


@asynccontextmanager
async def socket(
    base_url: str, client_id: str | None = None, path: str = "/ws"
) -> AsyncIterator[ClientConnection]:
    async with connect(
        ws_url(base_url, client_id, path), compression=None, max_size=None, max_queue=None
    ) as ws:
        yield ws


async def next_json(ws: ClientConnection, within: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(within):
        while True:
            frame = await ws.recv()
            if isinstance(frame, str):
                message: dict[str, Any] = json.loads(frame)
                return message


async def frames_until_done(
    ws: ClientConnection, prompt_id: str, within: float = 10.0
) -> list[dict[str, Any]]:
    """Every frame up to and including ``executing{node: null}`` of ``prompt_id``; binary frames appear
    as ``{"type": "<binary>", "bytes": ...}``."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                frames.append({"type": "<binary>", "bytes": frame})
                continue
            message = json.loads(frame)
            frames.append(message)
            data = message.get("data", {})
            if (
                message["type"] == "executing"
                and data.get("node") is None
                and data.get("prompt_id") == prompt_id
            ):
                return frames


async def frames_until(ws: ClientConnection, event_type: str, within: float = 10.0) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                frames.append({"type": "<binary>", "bytes": frame})
                continue
            message = json.loads(frame)
            frames.append(message)
            if message["type"] == event_type:
                return frames


def types(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["type"] for frame in frames]


async def post_prompt(http: httpx.AsyncClient, graph: dict[str, Any], **fields: Any) -> httpx.Response:
    return await http.post("/prompt", json={"prompt": graph, **fields})
