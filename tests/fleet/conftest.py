"""Fleet fixtures: the Novita API emulator, ComfyUI emulators to stand behind static URLs, a namespace per test,
and the Docker engine started by ``scripts/test``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fleet_helpers import NOVITA_KEY, docker_image

from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.emulators.novita import NovitaEmulator, NovitaEmulatorOptions
from comfyfleet.fleet.providers import ProviderContext


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own, so labels, names and environment markers never collide with another
    test (or a comfyfleet running on this machine)."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def installation() -> str:
    """An installation id of this test's own (a store makes one at its first migration)."""
    return uuid.uuid4().hex[:16]


@pytest.fixture
def provider_context(namespace: str, installation: str, tmp_path: Path) -> ProviderContext:
    return ProviderContext(installation=installation, namespace=namespace, state_dir=tmp_path / "workers")


@pytest.fixture
def docker_pool_settings() -> dict[str, object]:
    return {"image": docker_image(), "stop_timeout_s": 2}


@pytest.fixture
async def novita() -> AsyncIterator[NovitaEmulator]:
    options = NovitaEmulatorOptions(
        api_key=NOVITA_KEY,
        to_create_s=0.05,
        creating_s=0.05,
        pulling_s=0.15,
        removing_s=0.05,
        stopping_s=0.05,
    )
    async with NovitaEmulator(options) as emulator:
        yield emulator


@pytest.fixture
async def comfy_urls() -> AsyncIterator[list[str]]:
    """Two ComfyUI emulators on loopback, to stand behind static URLs."""
    async with EmulatorServer(EmulatorOptions()) as first, EmulatorServer(EmulatorOptions()) as second:
        await first.wait_ready()
        await second.wait_ready()
        yield [first.url, second.url]
