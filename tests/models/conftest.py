"""Fixtures of the models tests: a loopback file server that counts requests, and a model service over a
cache in the test's own folder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from file_server import FileServer

from comfyfleet.config import ModelSettings
from comfyfleet.models.service import ModelService


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    with FileServer().running() as server:
        yield server


@pytest.fixture
def model_settings(tmp_path: Path) -> ModelSettings:
    return ModelSettings(
        cache_dir=str(tmp_path / "cache"), workers_dir=str(tmp_path / "workers"), fetch_retry_base_s=0.0
    )


@pytest.fixture
async def models(model_settings: ModelSettings) -> AsyncIterator[ModelService]:
    async with ModelService(model_settings) as service:
        yield service
