"""Fixtures of the Comfy API v2 tests: a running fleet (two emulator workers) and the official SDK pointed at
it the way its users point it at Comfy Cloud: ``COMFY_BASE_URL`` and ``COMFY_API_KEY``."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from comfy_sdk import AsyncComfy

# The usage tests' helpers (running_fleet, eventually…) are a plain module of that folder.
sys.path.append(str(Path(__file__).resolve().parent.parent / "usage"))

from usage_helpers import Fleet, running_fleet

KEYS = [
    {"key": "key-alice", "tenant": "alice"},
    {"key": "key-bob", "tenant": "bob"},
]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """comfyfleet with two emulator workers (slow enough samplers to be seen running) and two tenants."""
    async with running_fleet(
        tmp_path, workers=2, emulator={"step_time_s": 0.01, "previews": True}, api_keys=KEYS
    ) as running:
        yield running


@pytest.fixture
def sdk(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Callable[..., AsyncComfy]:
    """``sdk(key)``: an AsyncComfy client of the tenant of that key, against the fleet."""
    monkeypatch.setenv("COMFY_BASE_URL", fleet.url)
    monkeypatch.delenv("COMFY_API_KEY", raising=False)

    def client(key: str = "key-alice", **options: Any) -> AsyncComfy:
        return AsyncComfy(api_key=key, **options)

    return client
