"""FastAPI dependencies: what a route is given from the application's :class:`Services`.

Dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread,
a thread hop per request that cost a fifth of the submission throughput. The optional services are
checked here, once: a route that needs one the deployment lacks answers 503 in the error shape.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends
from starlette.requests import HTTPConnection

from comfyfleet.config import Settings
from comfyfleet.events import EventBus
from comfyfleet.http.app import ServiceApp
from comfyfleet.http.auth import Principal, principal_from
from comfyfleet.http.errors import ApiError
from comfyfleet.http.services import FleetControl, Services
from comfyfleet.outputs import OutputStore
from comfyfleet.store import Store
from comfyfleet.tasks import StartEstimator, TaskService

T = TypeVar("T")


def services_of(connection: HTTPConnection) -> Services:
    """The services of the application serving ``connection`` (a request or a WebSocket)."""
    app = connection.app
    if not isinstance(app, ServiceApp):
        raise TypeError(f"comfyfleet's routes must be mounted on a ServiceApp, not {type(app).__name__}")
    return app.services


async def get_services(connection: HTTPConnection) -> Services:
    return services_of(connection)


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_store(services: ServicesDep) -> Store:
    return services.store


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_tasks(services: ServicesDep) -> TaskService:
    return services.tasks


async def get_start_estimator(services: ServicesDep) -> StartEstimator:
    return services.start_estimator


def _required(service: T | None, code: str, message: str) -> T:
    if service is None:
        raise ApiError(503, code, message)
    return service


async def require_bus(services: ServicesDep) -> EventBus:
    return _required(services.bus, "events_unavailable", "this server runs without live events")


async def require_outputs(services: ServicesDep) -> OutputStore:
    return _required(services.outputs, "outputs_unavailable", "this server has no output store")


async def require_fleet(services: ServicesDep) -> FleetControl:
    return _required(services.fleet, "fleet_unavailable", "this server runs without a worker manager")


async def authenticate(connection: HTTPConnection, services: ServicesDep) -> Principal:
    """The caller's :class:`Principal`, or 401 in the error shape."""
    return principal_from(connection, services.keyring)


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]
EstimatorDep = Annotated[StartEstimator, Depends(get_start_estimator)]
BusDep = Annotated[EventBus, Depends(require_bus)]
OutputsDep = Annotated[OutputStore, Depends(require_outputs)]
PrincipalDep = Annotated[Principal, Depends(authenticate)]
