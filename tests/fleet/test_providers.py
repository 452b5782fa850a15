"""One provider contract suite, run against static URLs, local processes, the real Docker engine and the Novita
API emulator: create reports an id at once, the instance becomes reachable, ``list_ours`` finds exactly what
carries our labels / prefix, a fresh provider object rediscovers it, terminate is idempotent and leaves nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest
from fleet_helpers import DEADLINE_S, EMULATOR_COMMAND, answers, novita_pool_settings, pool

from comfyfleet.emulators.novita import NovitaEmulator
from comfyfleet.fleet.providers import Instance, InstanceState, Provider, ProviderContext, build_provider
from comfyfleet.fleet.providers.base import worker_belongs_to_pool
from support import eventually


@dataclass
class Kind:
    name: str
    managed: bool  # comfyfleet starts and stops the instance (everything but static)
    ready_later: bool  # create returns before the ComfyUI answers (checked right after create)
    unknown_id: str
    open: Callable[..., Awaitable[Provider]]  # (pool name, installation=this test's) -> an entered provider
    # Novita deletes asynchronously (toRemove → removing → removed): true once the emulator finished.
    finished: Callable[[str], bool] = lambda provider_id: True


@pytest.fixture(params=["static", "process", pytest.param("docker", marks=pytest.mark.docker), "novita"])
def kind_settings(
    request: pytest.FixtureRequest,
) -> tuple[str, dict[str, object], str, NovitaEmulator | None]:
    """(provider, pool settings, an id that never existed, the Novita emulator) for each provider."""
    name: str = request.param
    if name == "static":
        return name, {"urls": request.getfixturevalue("comfy_urls")}, "http://127.0.0.1:9", None
    if name == "process":
        settings = {"command": [*EMULATOR_COMMAND, "--startup-delay", "0.5"], "terminate_grace_s": 3}
        return name, settings, "999999@1.00", None
    if name == "docker":
        return name, request.getfixturevalue("docker_pool_settings"), "0" * 64, None
    novita: NovitaEmulator = request.getfixturevalue("novita")
    return name, novita_pool_settings(novita), "0123456789abcdef", novita


@pytest.fixture
async def kind(
    kind_settings: tuple[str, dict[str, object], str, NovitaEmulator | None],
    provider_context: ProviderContext,
) -> AsyncIterator[Kind]:
    name, settings, unknown, novita = kind_settings
    async with AsyncExitStack() as stack:
        opened: list[Provider] = []

        async def open_provider(pool_name: str, installation: str | None = None) -> Provider:
            context = provider_context
            if installation is not None:
                context = dataclasses.replace(provider_context, installation=installation)
            provider = build_provider(pool(pool_name, name, settings), context)
            await stack.enter_async_context(provider)
            opened.append(provider)
            return provider

        async def clean_up() -> None:
            for provider in opened:
                for instance in await provider.list_ours():
                    await provider.terminate(instance.provider_id)

        try:
            found = Kind(
                name,
                managed=name != "static",
                ready_later=name in ("process", "novita"),
                unknown_id=unknown,
                open=open_provider,
            )
            if novita is not None:
                found.finished = lambda provider_id: novita.instances[provider_id].status == "removed"
            yield found
        finally:
            await clean_up()


def new_worker_id(pool_name: str) -> str:
    return f"{pool_name}-{uuid.uuid4().hex[:10]}"


async def running(provider: Provider, provider_id: str) -> Instance:
    found: list[Instance] = []

    async def check() -> bool:
        instance = await provider.describe(provider_id)
        assert instance.state not in (InstanceState.FAILED, InstanceState.GONE), instance
        found[:] = [instance]
        return instance.state is InstanceState.RUNNING and instance.endpoint is not None

    await eventually(check, what=f"{provider_id} running with an endpoint", within=DEADLINE_S)
    return found[0]


async def test_create_reports_the_id_at_once_then_the_worker_answers(kind: Kind) -> None:
    provider = await kind.open("pool-a")
    worker_id = new_worker_id("pool-a")
    handle = await provider.create(worker_id)
    assert handle.provider_id
    first = await provider.describe(handle.provider_id)
    assert first.state in (InstanceState.PROVISIONING, InstanceState.RUNNING)
    assert first.worker_id == worker_id
    if kind.ready_later:
        endpoint = handle.endpoint or first.endpoint
        assert endpoint is None or not await answers(endpoint), (
            "create must not wait for the worker to be ready"
        )
    instance = await running(provider, handle.provider_id)
    assert instance.endpoint is not None
    await eventually(
        lambda: answers(instance.endpoint or ""), what="the worker's /system_stats answers", within=DEADLINE_S
    )


async def test_list_ours_finds_this_pool_only_and_a_fresh_provider_rediscovers(kind: Kind) -> None:
    provider = await kind.open("pool-a")
    other_pool = await kind.open("pool-a-b")  # a pool whose name extends the first one's must not mix
    worker_id = new_worker_id("pool-a")
    handle = await provider.create(worker_id)
    listed = {instance.provider_id: instance for instance in await provider.list_ours()}
    assert handle.provider_id in listed
    assert listed[handle.provider_id].worker_id == worker_id
    assert all(i.worker_id is None or worker_belongs_to_pool(i.worker_id, "pool-a") for i in listed.values())
    assert worker_id not in {instance.worker_id for instance in await other_pool.list_ours()}

    # A second provider object for the same pool (comfyfleet restarted) finds and can drive the instance.
    again = await kind.open("pool-a")
    if kind.managed:
        rediscovered = {instance.provider_id: instance for instance in await again.list_ours()}
        assert rediscovered[handle.provider_id].worker_id == worker_id
    again.adopt(handle.provider_id, worker_id)
    instance = await running(again, handle.provider_id)
    await eventually(
        lambda: answers(instance.endpoint or ""), what="the rediscovered worker answers", within=DEADLINE_S
    )
    await again.terminate(handle.provider_id)
    if kind.managed:
        await eventually(
            lambda: _gone(again, handle.provider_id),
            what="terminated through the second provider object",
            within=DEADLINE_S,
        )


# Only the providers that make instances of their own (a static pool's servers are nobody's to reap).
@pytest.mark.parametrize(
    "kind_settings", ["process", pytest.param("docker", marks=pytest.mark.docker), "novita"], indirect=True
)
async def test_list_ours_leaves_another_installations_instances_alone(kind: Kind) -> None:
    """Same namespace, same pool name, another store: neither lists (so neither reaps) the other's instance."""
    ours = await kind.open("pool-a")
    neighbour = await kind.open("pool-a", installation=uuid.uuid4().hex[:16])
    mine = await ours.create(new_worker_id("pool-a"))
    theirs = await neighbour.create(new_worker_id("pool-a"))
    assert {i.provider_id for i in await ours.list_ours()} == {mine.provider_id}
    assert {i.provider_id for i in await neighbour.list_ours()} == {theirs.provider_id}
    # A restart of the same installation (a fresh provider object, the same store) still finds its own.
    again = await kind.open("pool-a")
    assert {i.provider_id for i in await again.list_ours()} == {mine.provider_id}


async def _gone(provider: Provider, provider_id: str) -> bool:
    return (await provider.describe(provider_id)).state is InstanceState.GONE


async def test_terminate_is_idempotent_and_leaves_nothing(kind: Kind) -> None:
    provider = await kind.open("pool-a")
    worker_id = new_worker_id("pool-a")
    handle = await provider.create(worker_id)
    instance = await running(provider, handle.provider_id)
    assert instance.endpoint is not None
    await provider.terminate(handle.provider_id)
    await provider.terminate(handle.provider_id)  # already gone: still a success
    await provider.terminate(kind.unknown_id)  # never existed: a success too
    assert worker_id not in {listed.worker_id for listed in await provider.list_ours()}
    if kind.managed:
        await eventually(
            lambda: _gone(provider, handle.provider_id), what="the instance is gone", within=DEADLINE_S
        )
        await eventually(
            lambda: _true(kind.finished(handle.provider_id)),
            what="the provider finished deleting it",
            within=DEADLINE_S,
        )
        await eventually(
            lambda: _not_answering(instance.endpoint or ""),
            what="its ComfyUI no longer answers",
            within=DEADLINE_S,
        )
    else:
        # A static URL is never stopped: the server still answers, it just backs no worker.
        assert await answers(instance.endpoint)
        assert (await provider.describe(handle.provider_id)).worker_id is None


async def _true(value: bool) -> bool:
    return value


async def _not_answering(endpoint: str) -> bool:
    return not await answers(endpoint)


async def test_two_workers_get_their_own_instance(kind: Kind) -> None:
    provider = await kind.open("pool-a")
    first = await provider.create(new_worker_id("pool-a"))
    second = await provider.create(new_worker_id("pool-a"))
    assert first.provider_id != second.provider_id
    one, two = await asyncio.gather(
        running(provider, first.provider_id), running(provider, second.provider_id)
    )
    assert one.endpoint != two.endpoint


async def test_describe_of_an_unknown_instance_is_gone(kind: Kind) -> None:
    provider = await kind.open("pool-a")
    assert (await provider.describe(kind.unknown_id)).state is InstanceState.GONE
