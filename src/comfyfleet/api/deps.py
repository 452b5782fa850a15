"""What routes need from the application, read from ``app.state`` (set once by ``create_app``)."""

from __future__ import annotations

from fastapi import Request

from comfyfleet.config import Settings
from comfyfleet.store import Store


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings
