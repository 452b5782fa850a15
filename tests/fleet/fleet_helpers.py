"""Helpers shared by the fleet tests (fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from comfyfleet.config import PoolConfig, Settings
from comfyfleet.emulators.novita import NovitaEmulator
from comfyfleet.fleet.manager import FleetManager
from comfyfleet.store import Store
from support.fleet import EMULATOR_COMMAND as EMULATOR_COMMAND  # the fleet tests take it from here

NOVITA_KEY = "test-novita-key"
DEADLINE_S = 45.0


def docker_image() -> str:
    """The test worker image built by scripts/test.d/docker.sh; skips (fails under CI=true) without an engine."""
    image = os.environ.get("COMFYFLEET_TEST_DOCKER_IMAGE")
    problem = None
    if not os.environ.get("DOCKER_HOST"):
        problem = "no Docker engine (DOCKER_HOST unset): run the tests through scripts/test"
    elif not image:
        problem = (
            "no test worker image (COMFYFLEET_TEST_DOCKER_IMAGE unset): run the tests through scripts/test"
        )
    else:
        import docker

        try:
            client = docker.from_env(timeout=10)
            try:
                client.images.get(image)
            finally:
                client.close()
        except Exception as exc:
            problem = f"Docker engine or image {image} unusable: {exc}"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    assert image is not None
    return image


def novita_pool_settings(emulator: NovitaEmulator, **extra: object) -> dict[str, object]:
    return {
        "product_id": "emu-rtx-4090-24g",
        "image_url": "example.org/comfyui:latest",
        "base_url": emulator.api_base,
        "api_key": NOVITA_KEY,
        **extra,
    }


def pool(name: str, provider: str, settings: dict[str, object], **policy: object) -> PoolConfig:
    return PoolConfig.model_validate({"name": name, "provider": provider, "settings": settings, **policy})


async def answers(endpoint: str) -> bool:
    """The ComfyUI at ``endpoint`` answers /system_stats."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            response = await client.get(endpoint + "/system_stats")
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and "system" in response.json()


FAST_FLEET = {
    "probe_interval_s": 0.2,
    "probe_timeout_s": 1.0,
    "failure_threshold": 2,
    "reconcile_interval_s": 0.1,
    "reap_interval_s": 0.5,
    "start_backoff_base_s": 0.5,
    "start_backoff_max_s": 2.0,
}


def settings(namespace: str, pools: list[dict[str, Any]] | None = None, **extra: Any) -> Settings:
    return Settings(
        pools=pools or [], fleet={**FAST_FLEET, "namespace": namespace, **extra.pop("fleet", {})}, **extra
    )


@asynccontextmanager
async def running_manager(config: Settings, store: Store, **options: Any) -> AsyncIterator[FleetManager]:
    """The worker manager alone (no API, no dispatcher), running until the block ends."""
    async with FleetManager(config, store, **options) as fleet, asyncio.TaskGroup() as tg:
        tg.create_task(fleet.run(), name="fleet-under-test")
        try:
            yield fleet
        finally:
            fleet.stop()


async def wait_for(
    fleet: FleetManager, predicate: Callable[[], bool], what: str, timeout_s: float = 30.0
) -> None:
    """Wait on the manager's change signal (no polling) until ``predicate`` holds."""
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                waiter = asyncio.ensure_future(fleet.wait_changed())
                # Store-only changes (e.g. a record written) do not signal; re-check at least every 0.2 s.
                await asyncio.wait([waiter], timeout=0.2)
                waiter.cancel()
    except TimeoutError:
        states = [(w.id, w.state.value, w.error) for w in fleet.workers()]
        pytest.fail(f"not within {timeout_s}s: {what}; workers: {states}")
