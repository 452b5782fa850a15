"""Novita's instances as the emulator keeps them: products, the create request's checks, the answer's shape."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui import EmulatorServer

PRODUCTS: list[dict[str, Any]] = [
    {
        "id": "emu-rtx-4090-24g",
        "name": "RTX 4090 24GB",
        "cpuPerGpu": 16,
        "memoryPerGpu": 62,
        "diskPerGpu": 240,
        "availableDeploy": True,
        "minRootFS": 10,
        "maxRootFS": 6144,
        "minLocalStorage": 0,
        "maxLocalStorage": 0,
        "regions": ["emu-region-1"],
        "price": 35000,
        "monthlyPrice": [{"price": 20000000, "month": 1}],
        "billingMethods": ["onDemand", "monthly", "spot"],
        "spotPrice": 18000,
        "inventoryState": "normal",
    },
    {
        "id": "emu-a100-80g",
        "name": "A100 SXM 80GB",
        "cpuPerGpu": 16,
        "memoryPerGpu": 120,
        "diskPerGpu": 480,
        "availableDeploy": True,
        "minRootFS": 10,
        "maxRootFS": 6144,
        "minLocalStorage": 0,
        "maxLocalStorage": 0,
        "regions": ["emu-region-1"],
        "price": 160000,
        "monthlyPrice": [],
        "billingMethods": ["onDemand"],
        "spotPrice": 0,
        "inventoryState": "low",
    },
]


@dataclasses.dataclass
class Instance:
    id: str
    name: str
    product: dict[str, Any]
    body: dict[str, Any]
    created_at: float
    status: str = "toCreate"
    status_error: dict[str, str] = dataclasses.field(default_factory=lambda: {"state": "", "message": ""})
    comfy: EmulatorServer | None = None
    will_fail: bool = False
    driver: asyncio.Task[None] | None = None
    history: list[str] = dataclasses.field(default_factory=list)

    def set_status(self, status: str) -> None:
        self.status = status
        self.history.append(status)


class ApiError(Exception):
    """An answer in Novita's error shape ``{"code", "reason", "message", "metadata"}``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_PARAMETER", message)


def new_instance(body: dict[str, Any]) -> Instance:
    """An instance for a create request, or :class:`ApiError` naming the first bad field."""
    product_id = body.get("productId")
    if not isinstance(product_id, str) or not product_id:
        raise _invalid("productId is required")
    product = next((p for p in PRODUCTS if p["id"] == product_id), None)
    if product is None:
        raise _invalid(f"product {product_id} does not exist")
    gpu_num = body.get("gpuNum")
    if not isinstance(gpu_num, int) or isinstance(gpu_num, bool) or not 1 <= gpu_num <= 8:
        raise _invalid("gpuNum must be an integer from 1 to 8")
    rootfs = body.get("rootfsSize")
    if not isinstance(rootfs, int) or isinstance(rootfs, bool) or rootfs > 6144:
        raise _invalid("rootfsSize must be an integer up to 6144")
    image = body.get("imageUrl")
    if not isinstance(image, str) or not 1 <= len(image) <= 500:
        raise _invalid("imageUrl must be 1-500 characters")
    if body.get("kind") not in ("gpu", "cpu"):
        raise _invalid("kind must be 'gpu' or 'cpu'")
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > 255:
        raise _invalid("name must be a string of at most 255 characters")
    _check_envs(body.get("envs") or [])
    command = body.get("command") or ""
    if not isinstance(command, str) or len(command) > 2047:
        raise _invalid("command must be a string of at most 2047 characters")
    stored = {**body, "rootfsSize": max(rootfs, 10), "_ports": parse_ports(body.get("ports"))}
    instance = Instance(
        id=secrets.token_hex(8), name=name, product=product, body=stored, created_at=time.time()
    )
    instance.history.append("toCreate")
    return instance


def _check_envs(envs: Any) -> None:
    if (
        not isinstance(envs, list)
        or len(envs) > 100
        or any(not isinstance(env, dict) or not isinstance(env.get("key"), str) for env in envs)
    ):
        raise _invalid("envs must be a list of at most 100 {key, value} objects")


def parse_ports(spec: Any) -> list[tuple[int, str]]:
    if spec in (None, ""):
        return []
    if not isinstance(spec, str):
        raise ApiError(400, "INVALID_PARAMETER", "ports must be a string like '8188/http'")
    ports = []
    for part in spec.split(","):
        part = part.strip()
        number, _, kind = part.partition("/")
        if not number.isdigit() or kind not in ("tcp", "http"):
            raise ApiError(
                400, "INVALID_PARAMETER", f"invalid port {part!r}: use '<port>/http' or '<port>/tcp'"
            )
        if 2222 <= int(number) <= 2224:
            raise ApiError(400, "INVALID_PARAMETER", f"port {number} is reserved")
        ports.append((int(number), kind))
    if len(ports) > 15:
        raise ApiError(400, "INVALID_PARAMETER", "at most 15 ports")
    return ports


def describe(instance: Instance, *, listing: bool) -> dict[str, Any]:
    body = instance.body
    product = instance.product
    mappings = []
    for port, kind in body.get("_ports", []):
        mapping: dict[str, Any] = {"port": port, "type": kind}
        if not listing:
            # Only the ComfyUI port is served by the emulator; others point nowhere useful.
            endpoint = ""
            if instance.status == "running" and instance.comfy is not None:
                endpoint = instance.comfy.url if port == 8188 else f"{instance.comfy.url}/port-{port}"
            mapping["endpoint"] = endpoint
        mappings.append(mapping)
    gpu_num = body.get("gpuNum", 1)
    return {
        "id": instance.id,
        "name": instance.name,
        "clusterId": body.get("clusterId") or "emu-cluster-1",
        "clusterName": "Emulated Cluster",
        "status": instance.status,
        "statusError": dict(instance.status_error),
        "imageUrl": body.get("imageUrl"),
        "imageAuthId": body.get("imageAuthId", ""),
        "command": body.get("command", ""),
        "cpuNum": str(product["cpuPerGpu"] * gpu_num),
        "memory": str(product["memoryPerGpu"] * gpu_num),
        "gpuNum": str(gpu_num),
        "productId": product["id"],
        "productName": product["name"],
        "rootfsSize": body.get("rootfsSize"),
        "portMappings": mappings,
        "volumeMounts": [
            {"type": "local", "size": "0" if listing else 0, "id": "", "mountPath": "/workspace"}
        ],
        "envs": body.get("envs") or [],
        "network": {"id": "", "ip": ""},
        "kind": body.get("kind"),
        "billingMode": body.get("billingMode", "onDemand"),
        "endTime": "-1",
        "spotStatus": "",
        "spotReclaimTime": "0",
        "createdAt": str(int(instance.created_at)),
        "jobs": [],
    }
