"""The worker manager against real parts: a store (SQLite, and PostgreSQL where it matters), ComfyUI emulators
behind static URLs, child processes, and the Novita API emulator."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import (
    EMULATOR_COMMAND,
    FAST_FLEET,
    answers,
    novita_pool_settings,
    running_manager,
    settings,
    wait_for,
)

from comfyfleet.domain import NewTask, Worker, WorkerState
from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.emulators.novita import NovitaEmulator
from comfyfleet.fleet.manager import FleetManager
from comfyfleet.fleet.providers import InstanceState, ProviderContext, build_provider
from comfyfleet.store import Store
from support import eventually


def states(fleet: FleetManager, pool: str | None = None) -> list[WorkerState]:
    return sorted(worker.state for worker in fleet.workers(pool=pool))


async def add_tasks(store: Store, count: int, pool: str | None = None) -> list[str]:
    ids = []
    for _ in range(count):
        task, _ = await store.create_task(
            NewTask(payload={"1": {"class_type": "EmptyImage", "inputs": {}}}, pool=pool)
        )
        ids.append(task.id)
    await store.notify("tasks", "")
    return ids


async def cancel_all(store: Store, task_ids: list[str]) -> None:
    for task_id in task_ids:
        await store.cancel_task(task_id)


# -- static pools -------------------------------------------------------------------------------------------------


async def test_static_workers_become_idle_only_after_a_probe_and_fail_after_the_threshold(
    store: Store, namespace: str
) -> None:
    async with (
        EmulatorServer(EmulatorOptions()) as alive,
        EmulatorServer(EmulatorOptions(startup_delay_s=60)) as silent,
    ):
        config = settings(namespace, workers=[alive.url, silent.url])
        async with running_manager(config, store) as fleet:
            await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "the answering URL is usable")
            ready = fleet.usable_workers()[0]
            assert ready.endpoint == alive.url
            assert ready.state is WorkerState.IDLE
            assert ready.node_types is not None
            assert "KSampler" in ready.node_types
            # The URL whose server does not answer yet is recorded but never handed out.
            others = [w for w in fleet.workers() if w.id != ready.id]
            assert [w.state for w in others] == [WorkerState.STARTING]
            assert (await store.get_worker(ready.id)).state is WorkerState.IDLE

            await fleet.set_assignments(ready.id, ["task-1"])
            assert ready.state is WorkerState.BUSY
            await eventually(
                lambda: _stored_state(store, ready.id, WorkerState.BUSY), what="busy is written behind"
            )
            await fleet.set_assignments(ready.id, [])
            assert ready.state is WorkerState.IDLE

            changed = asyncio.ensure_future(fleet.wait_changed())
            await alive.close()
            await wait_for(fleet, lambda: not fleet.usable_workers(), "the dead server leaves usable_workers")
            assert changed.done(), "wait_changed() returns when a worker goes away"
            gone = (WorkerState.FAILED, WorkerState.TERMINATING, WorkerState.TERMINATED)

            async def failure_written() -> bool:
                return (await store.get_worker(ready.id)).state in gone

            # The dispatcher is told at once; the record is written right behind.
            await eventually(failure_written, what="the failure is written")
            failed = await store.get_worker(ready.id)
            assert "probe" in (failed.error or "")
            # The URL stays configured: a fresh record waits for it to answer again.
            await wait_for(
                fleet,
                lambda: (
                    [w.endpoint for w in fleet.workers() if w.state is WorkerState.STARTING].count(alive.url)
                    == 1
                ),
                "a new record probes the static URL again",
            )
        metrics = await store.worker_metrics()
        assert metrics.total_workers == metrics.starting_workers == 2


async def _stored_state(store: Store, worker_id: str, state: WorkerState) -> bool:
    return (await store.get_worker(worker_id)).state is state


async def test_report_unreachable_hides_the_worker_until_a_probe_passes(
    sqlite_store: Store, namespace: str
) -> None:
    async with EmulatorServer(EmulatorOptions()) as comfy:
        config = settings(namespace, workers=[comfy.url], fleet={"probe_interval_s": 30})
        async with running_manager(config, sqlite_store) as fleet:
            await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "usable")
            worker = fleet.usable_workers()[0]
            await fleet.report_unreachable(worker.id, "connection reset")
            assert fleet.usable_workers() == []
            # The server is fine: the immediate probe puts it back without waiting 30 s.
            await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "back after a passing probe", 10)
            assert worker.state is WorkerState.IDLE


async def test_bad_pool_config_is_a_clear_error(sqlite_store: Store, namespace: str) -> None:
    from comfyfleet.fleet.errors import FleetConfigError

    bad = settings(
        namespace, pools=[{"name": "gpu", "provider": "process", "settings": {"command": "run --no-port"}}]
    )
    with pytest.raises(
        FleetConfigError, match=r"pool 'gpu' \(process\): invalid settings: command: .*\{port\}"
    ):
        FleetManager(bad, sqlite_store)
    bad_name = settings(
        namespace, pools=[{"name": "a--b", "provider": "static", "settings": {"urls": ["http://x"]}}]
    )
    with pytest.raises(FleetConfigError, match="pool name 'a--b'"):
        FleetManager(bad_name, sqlite_store)


# -- process pools ------------------------------------------------------------------------------------------------


def process_pool(log_dir: Path, name: str = "emu", **policy: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "process",
        "min_workers": 0,
        "max_workers": 2,
        "idle_timeout_s": 1.0,
        "settings": {"command": EMULATOR_COMMAND, "terminate_grace_s": 3, "log_dir": str(log_dir)},
        **policy,
    }


@pytest.mark.slow
async def test_process_pool_scales_from_zero_to_demand_and_back(
    sqlite_store: Store, namespace: str, tmp_path: Path
) -> None:
    pool = process_pool(tmp_path / "logs", max_workers=2)
    async with running_manager(settings(namespace, pools=[pool]), sqlite_store) as fleet:
        assert fleet.workers() == []
        task_ids = await add_tasks(sqlite_store, 5)
        await wait_for(
            fleet, lambda: len(fleet.usable_workers()) == 2, "two workers (max) started for 5 tasks"
        )
        assert len(fleet.workers()) == 2, "never more than max_workers"
        endpoints = [w.endpoint or "" for w in fleet.usable_workers()]
        for endpoint in endpoints:
            assert await answers(endpoint)
        logs = sorted(path.name for path in (tmp_path / "logs").iterdir())
        assert logs == sorted(f"{w.id}.log" for w in fleet.workers())

        await cancel_all(sqlite_store, task_ids)
        await wait_for(fleet, lambda: fleet.workers() == [], "back to zero after idle_timeout")
        for endpoint in endpoints:
            assert not await answers(endpoint)
        gone = await sqlite_store.list_workers(include_gone=True)
        assert {w.state for w in gone} == {WorkerState.TERMINATED}
        assert all("idle for" in str(w.info.get("stop_reason")) for w in gone)


@pytest.mark.slow
async def test_killed_process_worker_fails_within_the_threshold_and_is_replaced(
    sqlite_store: Store, namespace: str, tmp_path: Path
) -> None:
    async with running_manager(
        settings(namespace, pools=[process_pool(tmp_path, max_workers=1)]), sqlite_store
    ) as fleet:
        await add_tasks(sqlite_store, 1)
        await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "one worker")
        victim = fleet.usable_workers()[0]
        pid = int(str(victim.provider_id).split("@")[0])
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        os.kill(pid, signal.SIGKILL)
        await wait_for(fleet, lambda: victim.state is not WorkerState.IDLE, "the dead worker is noticed", 10)
        noticed_s = loop.time() - killed_at
        # Threshold 2 probes at 0.2 s; the provider also sees the exit at the first failed probe.
        assert noticed_s < FAST_FLEET["probe_interval_s"] * (FAST_FLEET["failure_threshold"] + 2)
        gone = (WorkerState.FAILED, WorkerState.TERMINATING, WorkerState.TERMINATED)

        async def failure_written() -> bool:
            return (await sqlite_store.get_worker(victim.id)).state in gone

        await eventually(failure_written, what="the failure is written")
        record = await sqlite_store.get_worker(victim.id)
        assert "exited" in (record.error or "")
        await wait_for(
            fleet,
            lambda: len(fleet.usable_workers()) == 1 and fleet.usable_workers()[0].id != victim.id,
            "a replacement is ready",
        )


@pytest.mark.slow
async def test_restart_adopts_its_processes_and_reaps_strangers(
    sqlite_store: Store, namespace: str, tmp_path: Path
) -> None:
    """A comfyfleet killed mid-run left a running worker, a record whose create never finished (but whose
    process exists), and a record whose process died; plus a process with our markers that no record knows."""
    pool_config = process_pool(tmp_path, max_workers=3, idle_timeout_s=60)
    config = settings(namespace, pools=[pool_config])
    installation = await sqlite_store.installation_id()
    context = ProviderContext(installation=installation, namespace=namespace, state_dir=tmp_path)
    from comfyfleet.config import PoolConfig

    outside = build_provider(PoolConfig.model_validate(pool_config), context)
    async with outside:
        now = datetime.now(UTC)
        running = await outside.create("emu-00000000a1")
        half_made = await outside.create("emu-00000000a2")
        stranger = await outside.create("emu-00000000a3")
        for worker_id, handle, state in (
            ("emu-00000000a1", running, WorkerState.IDLE),
            ("emu-00000000a2", None, WorkerState.PENDING),
        ):
            await sqlite_store.upsert_worker(
                Worker(
                    id=worker_id,
                    pool="emu",
                    provider="process",
                    state=state,
                    created_at=now,
                    updated_at=now,
                    provider_id=handle.provider_id if handle else None,
                    endpoint=handle.endpoint if handle else None,
                )
            )
        await sqlite_store.upsert_worker(
            Worker(
                id="emu-00000000a4",
                pool="emu",
                provider="process",
                state=WorkerState.BUSY,
                created_at=now,
                updated_at=now,
                provider_id="999999@1.00",
                endpoint="http://127.0.0.1:9",
            )
        )
        # They ran for a while before the crash: wait until they answer, as a long-running worker would.
        for handle in (running, half_made, stranger):
            await eventually(
                lambda endpoint=handle.endpoint: answers(endpoint or ""), what="the worker process answers"
            )
        # Hand the processes over: the outside provider must not kill them when it closes.
        outside._children.clear()  # type: ignore[attr-defined]

    async with running_manager(config, sqlite_store) as fleet:
        await wait_for(fleet, lambda: len(fleet.usable_workers()) == 2, "both surviving processes adopted")
        assert {w.id for w in fleet.usable_workers()} == {"emu-00000000a1", "emu-00000000a2"}
        assert (await sqlite_store.get_worker("emu-00000000a4")).state is WorkerState.TERMINATED
        checker = build_provider(PoolConfig.model_validate(pool_config), context)
        async with checker:
            await eventually(
                lambda: _state_is(checker, stranger.provider_id, InstanceState.GONE),
                what="the stranger is reaped",
            )
            listed = {i.worker_id for i in await checker.list_ours()}
            assert listed == {"emu-00000000a1", "emu-00000000a2"}
            assert len(fleet.workers()) == 2, "nothing was started twice"
    # A clean shutdown stops the child processes (they cannot outlive comfyfleet usefully).
    async with build_provider(PoolConfig.model_validate(pool_config), context) as after:
        assert await after.list_ours() == []


async def _state_is(provider: Any, provider_id: str, state: InstanceState) -> bool:
    return bool((await provider.describe(provider_id)).state is state)


# -- novita -------------------------------------------------------------------------------------------------------


def novita_pool(novita: NovitaEmulator, **policy: Any) -> dict[str, Any]:
    return {
        "name": "cloud",
        "provider": "novita",
        "min_workers": 0,
        "max_workers": 1,
        "idle_timeout_s": 0.5,
        "settings": novita_pool_settings(novita),
        **policy,
    }


async def test_novita_create_pulling_running_then_deleted_when_idle(
    sqlite_store: Store, namespace: str, novita: NovitaEmulator
) -> None:
    async with running_manager(settings(namespace, pools=[novita_pool(novita)]), sqlite_store) as fleet:
        task_ids = await add_tasks(sqlite_store, 1)
        await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "the cloud worker is ready")
        worker = fleet.usable_workers()[0]
        instance = novita.instances[str(worker.provider_id)]
        assert instance.name == f"{namespace}-{await sqlite_store.installation_id()}-{worker.id}"
        assert instance.history[:4] == ["toCreate", "creating", "pulling", "running"]
        assert instance.comfy is not None
        assert worker.endpoint == instance.comfy.url
        await cancel_all(sqlite_store, task_ids)
        await wait_for(fleet, lambda: fleet.workers() == [], "deleted after idle_timeout")
    await eventually(lambda: _all_removed(novita), what="nothing left behind at Novita")


async def _all_removed(novita: NovitaEmulator) -> bool:
    return all(instance.status == "removed" for instance in novita.instances.values())


@pytest.mark.slow
async def test_novita_failed_start_is_deleted_and_retried_with_backoff(
    sqlite_store: Store, namespace: str, novita: NovitaEmulator
) -> None:
    novita.options.fail_starts = 2
    async with running_manager(settings(namespace, pools=[novita_pool(novita)]), sqlite_store) as fleet:
        await add_tasks(sqlite_store, 1)
        await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "a third attempt succeeds", 30)
        created = sorted(novita.instances.values(), key=lambda i: i.created_at)
        assert len(created) == 3, "one instance per attempt, no more"
        for failed in created[:2]:
            assert failed.history[-1] in ("toRemove", "removing", "removed"), "a failed start is deleted"
            assert "exited" in failed.history
        gone = [
            w for w in await sqlite_store.list_workers(include_gone=True) if w.state is WorkerState.TERMINATED
        ]
        assert len(gone) == 2
        assert all("pull image failed" in (w.error or "") for w in gone), [w.error for w in gone]
        # Back-off: 0.5 s after the first failure, 1 s after the second (FAST_FLEET), so the attempts spread.
        gaps = [(b.created_at - a.created_at) for a, b in itertools.pairwise(created)]
        assert gaps[0] >= 0.5
        assert gaps[1] >= 1.0


async def test_novita_reaper_deletes_an_unknown_instance_with_our_prefix(
    sqlite_store: Store, namespace: str, novita: NovitaEmulator
) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {novita.options.api_key}"}
    body = {
        "productId": "emu-rtx-4090-24g",
        "gpuNum": 1,
        "rootfsSize": 20,
        "imageUrl": "x",
        "kind": "gpu",
        "ports": "8188/http",
    }
    installation = await sqlite_store.installation_id()
    names = {
        "ours": f"{namespace}-{installation}-cloud-0123456789",
        "foreign": "someone-elses-box",
        # Same namespace and pool, another installation (another store): not ours to reap.
        "neighbour": f"{namespace}-{'f' * 16}-cloud-0123456789",
    }
    async with httpx.AsyncClient(base_url=novita.api_base, headers=headers) as api:
        created = {
            key: (await api.post("/gpu/instance/create", json={**body, "name": name})).json()["id"]
            for key, name in names.items()
        }
    async with running_manager(settings(namespace, pools=[novita_pool(novita)]), sqlite_store) as fleet:
        await eventually(
            lambda: _removing(novita, created["ours"]), what="the unknown instance with our prefix is deleted"
        )
        assert fleet.workers() == []
        assert await fleet.reap() == 0, "nothing else is ours to reap"
    for key in ("foreign", "neighbour"):
        assert novita.instances[created[key]].status not in ("toRemove", "removing", "removed"), key


async def _removing(novita: NovitaEmulator, instance_id: str) -> bool:
    return novita.instances[instance_id].status in ("toRemove", "removing", "removed")


# -- several replicas ---------------------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_only_the_leader_starts_workers(
    postgres_store: Store, postgres_url: str, namespace: str, novita: NovitaEmulator
) -> None:
    from comfyfleet.store import open_store

    config = settings(namespace, pools=[novita_pool(novita, max_workers=2, idle_timeout_s=60)])
    async with (
        open_store(postgres_url) as second_store,
        running_manager(config, postgres_store) as first,
        running_manager(config, second_store) as second,
    ):
        await add_tasks(postgres_store, 3)
        await wait_for(first, lambda: len(first.usable_workers()) == 2, "two workers")
        await wait_for(second, lambda: len(second.usable_workers()) == 2, "the follower sees them too")
        assert first.is_leader != second.is_leader
        assert len([i for i in novita.instances.values() if i.status != "removed"]) == 2

        leader, follower = (first, second) if first.is_leader else (second, first)
        busy, other = sorted(follower.usable_workers(), key=lambda w: w.id)
        # The follower's dispatcher assigns a task: the leader learns it (and so never stops that worker).
        await follower.set_assignments(busy.id, ["task-on-follower"])
        await wait_for(
            leader, lambda: leader.worker(busy.id).current_task_ids == ["task-on-follower"], "merged"
        )
        assert leader.worker(busy.id).state is WorkerState.BUSY
        # A drain asked on the follower is carried out by the leader.
        await follower.drain(other.id)
        await wait_for(
            leader, lambda: other.id not in {w.id for w in leader.workers()}, "drained and terminated"
        )
        await eventually(
            lambda: _stored_state(postgres_store, other.id, WorkerState.TERMINATED), what="recorded"
        )
        await wait_for(
            follower, lambda: other.id not in {w.id for w in follower.usable_workers()}, "follower sees it"
        )
        assert (await postgres_store.get_worker(busy.id)).state in (WorkerState.IDLE, WorkerState.BUSY)


# -- undrain ------------------------------------------------------------------------------------------------------


async def _passes_since(fleet: FleetManager, before: int, count: int) -> bool:
    return fleet.reconcile_passes >= before + count


async def test_a_drained_static_worker_is_undrained_back_to_idle_or_busy(
    sqlite_store: Store, namespace: str
) -> None:
    from comfyfleet.fleet.errors import UnknownWorker

    async with (
        EmulatorServer(EmulatorOptions()) as comfy,
        running_manager(settings(namespace, workers=[comfy.url]), sqlite_store) as fleet,
    ):
        await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "the static worker is usable")
        worker = fleet.usable_workers()[0]
        assert (await fleet.drain(worker.id)).state is WorkerState.DRAINING
        assert fleet.usable_workers() == []
        passes = fleet.reconcile_passes
        await eventually(lambda: _passes_since(fleet, passes, 3), what="the reconciler ran")
        assert worker.state is WorkerState.DRAINING, "a static worker is never stopped: it waits"

        assert (await fleet.undrain(worker.id)).state is WorkerState.IDLE
        await wait_for(fleet, lambda: fleet.usable_workers() == [worker], "handed out again")
        assert (await sqlite_store.get_worker(worker.id)).state is WorkerState.IDLE
        assert (await fleet.undrain(worker.id)).state is WorkerState.IDLE, "not draining: unchanged"

        # One holding a task goes back to busy, and keeps its task.
        await fleet.set_assignments(worker.id, ["task-1"])
        await fleet.drain(worker.id)
        assert (await fleet.undrain(worker.id)).state is WorkerState.BUSY
        assert worker.current_task_ids == ["task-1"]
        with pytest.raises(UnknownWorker):
            await fleet.undrain("default-0000000000")


async def test_undrain_refuses_a_worker_whose_stop_has_begun(
    sqlite_store: Store, namespace: str, novita: NovitaEmulator
) -> None:
    from comfyfleet.fleet.errors import WorkerStateConflict

    pool = novita_pool(novita, min_workers=1, idle_timeout_s=600)
    async with running_manager(settings(namespace, pools=[pool]), sqlite_store) as fleet:
        await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "the cloud worker is ready")
        worker = fleet.usable_workers()[0]
        await fleet.drain(worker.id)  # holds no task: the reconciler stops it
        await eventually(
            lambda: _stored_state(sqlite_store, worker.id, WorkerState.TERMINATED),
            what="drained and terminated",
        )
        with pytest.raises(WorkerStateConflict, match="terminated: it cannot be undrained"):
            await fleet.undrain(worker.id)


@pytest.mark.postgres
async def test_undrain_on_a_follower_is_carried_out_by_the_leader(
    postgres_store: Store, postgres_url: str, namespace: str
) -> None:
    from comfyfleet.store import open_store

    async with EmulatorServer(EmulatorOptions()) as comfy:
        config = settings(namespace, workers=[comfy.url])
        async with (
            open_store(postgres_url) as second_store,
            running_manager(config, postgres_store) as first,
            running_manager(config, second_store) as second,
        ):
            await wait_for(first, lambda: len(first.usable_workers()) == 1, "usable")
            await wait_for(second, lambda: len(second.usable_workers()) == 1, "the follower sees it")
            leader, follower = (first, second) if first.is_leader else (second, first)
            worker_id = follower.usable_workers()[0].id
            await follower.drain(worker_id)
            await wait_for(leader, lambda: leader.worker(worker_id).state is WorkerState.DRAINING, "drained")
            await wait_for(follower, lambda: follower.usable_workers() == [], "the follower sees it draining")
            assert (await follower.undrain(worker_id)).state is WorkerState.DRAINING, "left for the leader"
            await wait_for(leader, lambda: leader.worker(worker_id).state is WorkerState.IDLE, "undrained")
            await wait_for(follower, lambda: len(follower.usable_workers()) == 1, "usable again everywhere")
            assert (await postgres_store.get_worker(worker_id)).state is WorkerState.IDLE
