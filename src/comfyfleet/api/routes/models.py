"""``/api/v1/models``: models on demand as the fleet sees them, and the blob route remote workers pull from.

``GET /api/v1/models`` answers this host's cache (use, budget, each file with its names, pins and the workers
it is linked into, downloads in progress) and each pool's manifest with the state of every worker's copy.
Model URLs are shown redacted: a token in a URL stays in the config.

``GET /api/v1/models/blobs/{sha256}`` streams a verified cached file, with ``Range``, to a worker that cannot
share this host's disk (the companion beside a remote ComfyUI). It takes an admin API key or the worker's own
token (``Authorization: Bearer cfw.<worker_id>.<signature>``, made by the control plane for that worker).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from comfyfleet.api.schemas import error_responses
from comfyfleet.http.deps import ServicesDep
from comfyfleet.http.errors import ApiError
from comfyfleet.http.responses import JSONBody
from comfyfleet.http.services import Services
from comfyfleet.models.service import ModelService
from comfyfleet.redaction import redact

router = APIRouter(tags=["models"])
blob_router = APIRouter(tags=["models"])
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HostModelsOut(BaseModel):
    host: str = Field(description="The host whose cache this is (the control plane's host name).")
    used_bytes: int
    budget_bytes: int = Field(
        description="models.cache_budget_bytes: beyond it, unpinned files are evicted LRU."
    )
    files: list[dict[str, Any]] = Field(
        description="Each cached file, least recently used first: sha256, size, last_used, pinned (a pool "
        "manifest or a queued or running task needs it), names (folder/name it was asked under), workers "
        "(whose models folder links it)."
    )
    fetching: list[dict[str, Any]] = Field(
        description="Downloads in progress: sha256, bytes, total_bytes, names."
    )


class PoolModelsOut(BaseModel):
    pool: str
    models: list[dict[str, Any]] = Field(
        description="The pool's manifest ({url (redacted), sha256, folder, name})."
    )
    workers: list[dict[str, Any]] = Field(
        description="Each worker of the pool: worker_id, state, and models: its copy of the manifest "
        "(state fetching | ready | failed | unmanaged, files, done_files, bytes, total_bytes, error)."
    )


class ModelsOut(BaseModel):
    hosts: list[HostModelsOut]
    pools: list[PoolModelsOut]


async def require_models(services: ServicesDep) -> ModelService:
    if services.models is None:
        raise ApiError(503, "models_unavailable", "this server does not manage model files")
    return services.models


ModelsDep = Annotated[ModelService, Depends(require_models)]


@router.get(
    "/models",
    response_model=ModelsOut,
    summary="Model files known to the fleet",
    responses=error_responses(401, 503),
)
async def list_models(services: ServicesDep, models: ModelsDep) -> Response:
    """The host's model cache (use, budget, files, downloads in progress) and each pool's manifest with where
    every worker's copy of it stands. See docs/models.md."""
    return JSONBody({"hosts": [models.snapshot()], "pools": _pools(services)})


def _pools(services: Services) -> list[dict[str, Any]]:
    fleet = services.fleet
    if fleet is None:
        return []
    answer = []
    for name, pool in fleet.pools.items():
        workers = [
            {"worker_id": worker.id, "state": worker.state.value, "models": worker.info.get("models")}
            for worker in fleet.workers(pool=name)
            if worker.state.value != "terminated"
        ]
        manifest = [{**spec.model_dump(), "url": redact(spec.url)} for spec in pool.models]
        answer.append({"pool": name, "models": manifest, "workers": workers})
    return answer


@blob_router.get(
    "/models/blobs/{sha256}",
    summary="Download a verified model file (for remote workers)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."},
        206: {"content": {"application/octet-stream": {}}, "description": "The range asked for."},
        **error_responses(401, 403, 404, 416, 503),
    },
)
async def download_blob(
    request: Request,
    services: ServicesDep,
    models: ModelsDep,
    sha256: Annotated[str, Path(description="The file's sha256 (hex).", max_length=64)],
) -> Response:
    """The bytes of a model file this host's cache holds, verified, with `Range` support (a companion resumes
    a cut download). Needs an admin API key or the worker's own token (`Bearer cfw.<worker_id>.<signature>`)."""
    _authorize(request, services, models)
    if not _SHA256.match(sha256):
        raise ApiError(404, "not_found", "no model file has that sha256 here (64 lowercase hex digits)")
    path = models.blob_path(sha256)
    if path is None:
        raise ApiError(404, "not_found", f"this host's cache does not hold model file {sha256}")
    return FileResponse(path, media_type="application/octet-stream", filename=sha256)


def _authorize(request: Request, services: Services, models: ModelService) -> None:
    authorization = request.headers.get("authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and models.worker_of_token(token.strip()) is not None:
        return
    principal = services.keyring.principal_for(authorization or None)  # 401 without a valid key
    if not principal.admin:
        raise ApiError(
            403, "forbidden", "model blobs are for workers: send the worker's token or an admin key"
        )
