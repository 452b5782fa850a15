"""What routes need from the application, read from ``app.state`` (set once by ``create_app``).

Dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread,
a thread hop per request that cost a fifth of the submission throughput.
"""

from __future__ import annotations

from fastapi import Request

from comfyfleet.api.eta import StartEstimator
from comfyfleet.config import Settings
from comfyfleet.store import Store


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_start_estimator(request: Request) -> StartEstimator:
    estimator: StartEstimator = request.app.state.start_estimator
    return estimator
