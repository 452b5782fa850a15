"""Fixtures for the API tests: an app around a real SQLite store, called in process through ASGI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from comfyfleet.config import Settings
from comfyfleet.runtime import create_app
from comfyfleet.store import Store, open_store


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'api.db'}"


@pytest.fixture
async def api_store(store_url: str) -> AsyncIterator[Store]:
    async with open_store(store_url) as store:
        await store.migrate()
        yield store


@pytest.fixture
def make_client(
    api_store: Store, store_url: str
) -> Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]:
    """``async with make_client(**settings) as client``: the app over ``api_store`` with those settings."""

    @asynccontextmanager
    async def make(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(Settings(store=store_url, **settings), api_store)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://comfyfleet.test"
        ) as client:
            yield client

    return make


@pytest.fixture
async def client(
    make_client: Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]],
) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as opened:
        yield opened
