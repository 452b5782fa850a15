"""The Novita provider's robustness against its API emulator: rate limits and overload retried (honouring
Retry-After), a create never duplicated, paging that does not say where it starts, auth and input errors."""

from __future__ import annotations

import httpx
import pytest
from fleet_helpers import NOVITA_KEY, novita_pool_settings, pool

from comfyfleet.emulators.novita import API_PREFIX, NovitaEmulator
from comfyfleet.fleet.errors import ProviderRejected, ProviderUnavailable
from comfyfleet.fleet.providers import InstanceState, ProviderContext, build_provider
from comfyfleet.fleet.providers.novita import NovitaProvider, normalise_endpoint


def provider(novita: NovitaEmulator, context: ProviderContext, **settings: object) -> NovitaProvider:
    built = build_provider(pool("cloud", "novita", novita_pool_settings(novita, **settings)), context)
    assert isinstance(built, NovitaProvider)
    return built


async def test_rate_limits_and_overload_are_retried_and_create_is_not_duplicated(
    novita: NovitaEmulator, provider_context: ProviderContext
) -> None:
    novita.options.rate_limit_next = 2
    novita.options.server_error_next = 1
    async with provider(novita, provider_context) as cloud:
        handle = await cloud.create("cloud-00000000aa")
    assert list(novita.instances) == [handle.provider_id], "exactly one instance despite three failed answers"
    assert novita.requests["POST /gpu/instance/create"] == 4
    # After the 503 (whose answer may have been lost) the provider looked for the name before creating again.
    assert novita.requests["GET /gpu/instances"] >= 1


async def test_retries_give_up_with_a_clear_error(
    novita: NovitaEmulator, provider_context: ProviderContext
) -> None:
    novita.options.server_error_next = 100
    async with provider(novita, provider_context, retry_attempts=3) as cloud:
        with pytest.raises(ProviderUnavailable, match="HTTP 503 SERVICE_UNAVAILABLE"):
            await cloud.describe("whatever")
    assert novita.requests["GET /gpu/instance"] == 3


async def test_a_wrong_key_and_a_bad_product_are_rejected(
    novita: NovitaEmulator, provider_context: ProviderContext
) -> None:
    async with provider(novita, provider_context, api_key="not-the-key") as cloud:
        with pytest.raises(ProviderRejected, match=r"HTTP 401 UNAUTHORIZED.*NOVITA_API_KEY"):
            await cloud.list_ours()
    async with provider(novita, provider_context, product_id="no-such-gpu") as cloud:
        with pytest.raises(ProviderRejected, match="product no-such-gpu does not exist"):
            await cloud.create("cloud-00000000ab")
    assert novita.instances == {}


async def test_list_ours_pages_through_everything_once(
    novita: NovitaEmulator, provider_context: ProviderContext
) -> None:
    async with provider(novita, provider_context, page_size=2) as cloud:
        created = {(await cloud.create(f"cloud-00000000{n:02x}")).provider_id for n in range(5)}
        listed = await cloud.list_ours()
    assert sorted(instance.provider_id for instance in listed) == sorted(created)
    assert {instance.worker_id for instance in listed} == {f"cloud-00000000{n:02x}" for n in range(5)}
    assert novita.requests["GET /gpu/instances"] >= 3


async def test_status_error_is_surfaced_as_a_failure(
    novita: NovitaEmulator, provider_context: ProviderContext
) -> None:
    novita.options.fail_starts = 1
    async with provider(novita, provider_context) as cloud:
        handle = await cloud.create("cloud-00000000ac")
        while (instance := await cloud.describe(handle.provider_id)).state is InstanceState.PROVISIONING:
            await novita_step(novita)
        assert instance.state is InstanceState.FAILED
        assert instance.error == "pullImageFailed: pull image failed: manifest unknown"
        await cloud.terminate(handle.provider_id)
    assert novita.instances[handle.provider_id].status in ("toRemove", "removing", "removed")


async def novita_step(novita: NovitaEmulator) -> None:
    # The emulator moves instances on its own timers; yield to it briefly.
    import asyncio

    await asyncio.sleep(0.02)


async def test_emulator_answers_like_the_reference(novita: NovitaEmulator) -> None:
    headers = {"Authorization": f"Bearer {NOVITA_KEY}"}
    async with httpx.AsyncClient(base_url=novita.url, headers=headers) as api:
        missing = await api.get(f"{API_PREFIX}/gpu/instance", params={"instanceId": "nope"})
        assert missing.status_code == 400
        assert missing.json() == {
            "code": 400,
            "reason": "RESOURCE_NOT_FOUND",
            "message": "instance nope not found",
            "metadata": {},
        }
        no_paging = await api.get(f"{API_PREFIX}/gpu/instances")
        assert no_paging.status_code == 400
        assert no_paging.json()["reason"] == "INVALID_PARAMETER"
        products = (await api.get(f"{API_PREFIX}/products")).json()["data"]
        assert all(isinstance(product["price"], int) for product in products)
        unauthenticated = await api.get(f"{API_PREFIX}/products", headers={"Authorization": "Bearer wrong"})
        assert unauthenticated.status_code == 401


def test_endpoint_normalisation() -> None:
    assert normalise_endpoint("abc-8188.proxy.example.net") == "https://abc-8188.proxy.example.net"
    assert normalise_endpoint("http://127.0.0.1:8188/") == "http://127.0.0.1:8188"
