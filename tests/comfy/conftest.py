"""Fixtures for the ComfyUI client and emulator tests: a real emulator on loopback per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from comfy_helpers import EmulatorFactory

from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer


@pytest.fixture
def emulator_factory(tmp_path: Path) -> EmulatorFactory:
    """``async with emulator_factory(step_time_s=0.01) as emu:`` — extra emulators with their own options."""
    counter = 0

    @asynccontextmanager
    async def start(**options: Any) -> AsyncIterator[EmulatorServer]:
        nonlocal counter
        counter += 1
        options.setdefault("base_dir", str(tmp_path / f"emulator-{counter}"))
        async with EmulatorServer(EmulatorOptions(**options)) as server:
            await server.wait_ready()
            yield server

    return start


@pytest.fixture
async def emulator(emulator_factory: EmulatorFactory) -> AsyncIterator[EmulatorServer]:
    async with emulator_factory() as server:
        yield server
