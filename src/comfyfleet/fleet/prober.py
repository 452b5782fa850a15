"""The prober: health checks of every active worker, start-up checks and warm-up (leader only).

A ``starting`` worker is probed every 0.25 s and becomes ``idle`` only once its models folder holds the pool's
manifest (models on demand, fetched while its ComfyUI boots), its ComfyUI answered ``/system_stats`` and
``/object_info`` in this process, and it ran the pool's warm-up, if any. A ready worker is
probed every ``probe_interval_s``; ``failure_threshold`` failures in a row, or the provider reporting the
instance failed or gone, fail it. Each check runs as a task of its own, so a provider that is slow to answer
holds up no other worker's check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfyfleet import metrics
from comfyfleet.domain import Worker, WorkerState
from comfyfleet.fleet.health import HealthProber, ProbeResult
from comfyfleet.fleet.pools import utcnow
from comfyfleet.fleet.providers import Instance, InstanceState, Provider
from comfyfleet.fleet.registry import MAX_LOADED_MODELS
from comfyfleet.fleet.warmup import run_warmup
from comfyfleet.models import ModelsError
from comfyfleet.store.base import StoreError

if TYPE_CHECKING:
    from comfyfleet.config import FleetSettings, PoolConfig
    from comfyfleet.fleet.pools import PoolTracker
    from comfyfleet.fleet.registry import WorkerRegistry
    from comfyfleet.fleet.signals import FleetSignals, Spawn
    from comfyfleet.models.service import ModelService

logger = logging.getLogger(__name__)

STARTING_PROBE_S = 0.25  # a booting worker is probed often so it is used the moment it answers
ACTIVE_STATES = frozenset({WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING})
GONE_STATES = frozenset({InstanceState.GONE, InstanceState.FAILED, InstanceState.STOPPED})


def instance_problem(instance: Instance) -> str:
    said = f" ({instance.error})" if instance.error else ""
    return f"provider reports the instance {instance.raw_state or instance.state.value}{said}"


async def describe(providers: Mapping[str, Provider], worker: Worker) -> Instance | None:
    """What the provider says of the worker's instance; None when it has no id yet or cannot answer now."""
    provider = providers[worker.pool]
    if worker.provider_id is None:
        return None
    try:
        return await provider.describe(worker.provider_id)
    except Exception as exc:
        logger.warning("worker_describe_failed worker_id=%s error=%s", worker.id, exc)
        return None


class Prober:
    def __init__(
        self,
        *,
        registry: WorkerRegistry,
        signals: FleetSignals,
        pools: Mapping[str, PoolConfig],
        providers: Mapping[str, Provider],
        trackers: Mapping[str, PoolTracker],
        fleet: FleetSettings,
        http: HealthProber,
        spawn: Spawn,
        models: ModelService | None = None,
    ) -> None:
        self._models = models
        self._registry = registry
        self._signals = signals
        self._pools = pools
        self._providers = providers
        self._trackers = trackers
        self._fleet = fleet
        self._http = http
        self._spawn = spawn
        self._checking: set[str] = set()  # a health check is running for it
        self._check_tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        tick = min(STARTING_PROBE_S, self._fleet.probe_interval_s)
        while not self._signals.stop.is_set():
            await self._signals.wait(self._signals.probe, tick)
            if not self._registry.is_leader or self._signals.stop.is_set():
                continue
            now = time.monotonic()
            due = [
                worker
                for worker in list(self._registry.workers.values())
                if worker.state in ACTIVE_STATES
                and worker.id not in self._registry.inflight
                and worker.pool in self._pools
                and self._signals.probe_due(worker.id, now)
            ]
            for worker in due:
                if worker.id not in self._checking:
                    self._checking.add(worker.id)
                    task = self._spawn(self._check(worker), f"probe-{worker.id}")
                    if task is None:
                        self._checking.discard(worker.id)
                    else:
                        self._check_tasks.add(task)
                        task.add_done_callback(self._check_tasks.discard)

    def cancel_checks(self) -> None:
        """At shutdown: probes have nothing to finish."""
        for check in list(self._check_tasks):
            check.cancel()

    async def _check(self, worker: Worker) -> None:
        try:
            if worker.state is WorkerState.STARTING:
                await self._check_starting(worker)
            else:
                await self._check_live(worker)
        except StoreError as exc:
            logger.warning("worker_probe_store_error worker_id=%s error=%s", worker.id, exc)
        finally:
            self._checking.discard(worker.id)

    async def _fail_start(self, worker: Worker, reason: str) -> None:
        if self._registry.mark_failed(worker, reason):
            self._trackers[worker.pool].start_failed()
            await self._registry.write(worker)

    # -- starting workers -------------------------------------------------------------------------------------

    async def _check_starting(self, worker: Worker) -> None:
        pool = self._pools[worker.pool]
        self._signals.probe_in(worker.id, STARTING_PROBE_S)
        age = (utcnow() - worker.created_at).total_seconds()
        if age > pool.startup_timeout_s:
            await self._fail_start(worker, f"not ready after {pool.startup_timeout_s:g}s")
            return
        if pool.models and not await self._provision(worker, pool, pool.startup_timeout_s - age):
            return
        if worker.endpoint is None and not await self._learn_endpoint(worker):
            return
        assert worker.endpoint is not None
        result = await self._http.probe(worker.endpoint)
        if not result.ok:
            instance = await describe(self._providers, worker)
            if instance is not None and instance.state in GONE_STATES:
                await self._fail_start(worker, instance_problem(instance))
            return
        node_types = await self._http.node_types(worker.endpoint)
        if node_types is None:
            return  # answered /system_stats but not /object_info yet: still starting
        worker.node_types = node_types
        warm = pool.warmup is None or worker.info.get("warmup", {}).get("state") == "done"
        if not warm and not await self._warm_up(worker, pool.warmup or {}, pool.startup_timeout_s - age):
            return
        await self._become_ready(worker, result)

    async def _provision(self, worker: Worker, pool: PoolConfig, budget_s: float) -> bool:
        """Put the pool's manifest in the worker's models folder (while its ComfyUI boots); True once there.
        The progress is the worker's ``info.models``; a file that cannot be had fails the start."""
        state = worker.info.get("models") or {}
        if state.get("state") in ("ready", "unmanaged"):
            return True
        models_dir = worker.info.get("models_dir")
        companion = worker.info.get("models_via") == "companion"  # it pulls them from this host's cache
        if self._models is None or not (isinstance(models_dir, str) or companion):
            # A provider whose workers have no folder on this host: their image or volume must hold the files.
            worker.info["models"] = {"state": "unmanaged", "files": len(pool.models)}
            logger.warning("worker_models_unmanaged worker_id=%s pool=%s", worker.id, pool.name)
            await self._registry.write(worker)
            return True
        started = time.monotonic()
        worker.info["models"] = {"state": "fetching", "files": len(pool.models), "done_files": 0}
        await self._registry.write(worker)

        def progress(update: dict[str, Any]) -> None:
            worker.info["models"] = {"state": "fetching", **update}

        try:
            async with asyncio.timeout(max(budget_s, 0.0)):
                if isinstance(models_dir, str):
                    await self._models.provision(pool.models, Path(models_dir), pool.model_policy, progress)
                else:  # the worker's companion pulls them (GET /api/v1/models/blobs/…) once this host has them
                    for spec in pool.models:
                        await self._models.ensure(spec, pool.model_policy)
        except (ModelsError, TimeoutError) as exc:
            reason = (
                str(exc) if isinstance(exc, ModelsError) else f"not there after {pool.startup_timeout_s:g}s"
            )
            worker.info["models"] = {"state": "failed", "error": reason}
            await self._fail_start(worker, f"model files: {reason}")
            return False
        seconds = round(time.monotonic() - started, 3)
        worker.info["models"] = {"state": "ready", "files": len(pool.models), "seconds": seconds}
        logger.info(
            "worker_models_ready worker_id=%s files=%d seconds=%s", worker.id, len(pool.models), seconds
        )
        await self._registry.write(worker)
        return True

    async def _learn_endpoint(self, worker: Worker) -> bool:
        """Only the provider knows where a cloud instance still provisioning will answer: ask it."""
        self._signals.probe_in(worker.id, self._fleet.probe_interval_s)
        instance = await describe(self._providers, worker)
        if instance is None:
            return False
        if instance.state in GONE_STATES:
            await self._fail_start(worker, instance_problem(instance))
            return False
        if instance.endpoint is None:
            if instance.raw_state and worker.info.get("provider_state") != instance.raw_state:
                worker.info["provider_state"] = instance.raw_state
                await self._registry.write(worker)
            return False
        worker.endpoint = instance.endpoint
        worker.info["provider_state"] = instance.raw_state or instance.state.value
        await self._registry.write(worker)
        return True

    async def _become_ready(self, worker: Worker, result: ProbeResult) -> None:
        worker.health_failures = 0
        worker.error = None
        worker.last_active_at = utcnow()
        worker.info["ready_at"] = worker.last_active_at.isoformat()
        worker.info["startup_s"] = round((worker.last_active_at - worker.created_at).total_seconds(), 3)
        if result.system_stats is not None:
            worker.info["system"] = result.system_stats.get("system", {})
        target = WorkerState.BUSY if worker.current_task_ids else WorkerState.IDLE
        if not self._registry.transition(worker, target):
            return
        self._registry.verified.add(worker.id)
        self._registry.suspect.discard(worker.id)
        self._trackers[worker.pool].worker_ready()
        self._signals.probe_in(worker.id, self._fleet.probe_interval_s)
        await self._registry.write(worker)
        metrics.observe_worker_startup(worker.pool, worker.info["startup_s"])
        logger.info(
            "worker_ready worker_id=%s pool=%s endpoint=%s startup_s=%s",
            worker.id,
            worker.pool,
            worker.endpoint,
            worker.info["startup_s"],
        )
        self._signals.changed()

    async def _warm_up(self, worker: Worker, graph: dict[str, Any], budget_s: float) -> bool:
        """Run the pool's warm-up ``graph`` on a starting worker that answers; True once it has run."""
        if worker.endpoint is None:
            return False
        worker.info["warmup"] = {"state": "running"}
        await self._registry.write(worker)
        outcome = await run_warmup(worker.endpoint, graph, worker.node_types or [], budget_s)
        if not outcome.ok:
            worker.info["warmup"] = {"state": "failed", "error": outcome.error, "seconds": outcome.seconds}
            if outcome.fatal:
                await self._fail_start(worker, outcome.error or "warm-up failed")
            else:
                logger.warning("worker_warmup_retry worker_id=%s error=%s", worker.id, outcome.error)
                await self._registry.write(worker)
            return False
        worker.info["warmup"] = {"state": "done", "seconds": outcome.seconds}
        worker.loaded_models = list(outcome.models)[-MAX_LOADED_MODELS:]
        logger.info(
            "worker_warmed_up worker_id=%s seconds=%s models=%s", worker.id, outcome.seconds, outcome.models
        )
        return True

    # -- ready workers ----------------------------------------------------------------------------------------

    async def _check_live(self, worker: Worker) -> None:
        self._signals.probe_in(worker.id, self._fleet.probe_interval_s)
        if worker.endpoint is None:
            await self._registry.fail(worker, "no endpoint known")
            return
        result = await self._http.probe(worker.endpoint)
        if worker.state not in ACTIVE_STATES:
            # Failed (e.g. recycled by the dispatcher) or stopped while the probe was out: its answer says
            # nothing about the worker now, and must not wipe the reason it failed.
            return
        if result.ok:
            await self._passed(worker)
            return
        worker.health_failures += 1
        worker.error = result.error
        # A worker that failed once is probed again soon, so the threshold is reached in seconds, not minutes.
        self._signals.probe_in(worker.id, min(self._fleet.probe_interval_s, 1.0))
        instance = await describe(self._providers, worker)
        logger.warning(
            "worker_probe_failed worker_id=%s failures=%d error=%s provider_state=%s",
            worker.id,
            worker.health_failures,
            result.error,
            instance.state if instance else None,
        )
        if instance is not None and instance.state in GONE_STATES:
            await self._registry.fail(worker, f"{instance_problem(instance)} (probe: {result.error})")
        elif worker.health_failures >= self._fleet.failure_threshold:
            await self._registry.fail(
                worker, f"{worker.health_failures} failed health probes: {result.error}"
            )
        else:
            await self._registry.write(worker)

    async def _passed(self, worker: Worker) -> None:
        registry = self._registry
        newly_usable = worker.id not in registry.verified or worker.id in registry.suspect
        registry.verified.add(worker.id)
        registry.suspect.discard(worker.id)
        if worker.node_types is None and worker.endpoint is not None:
            worker.node_types = await self._http.node_types(worker.endpoint)
        if worker.health_failures or worker.error:
            worker.health_failures = 0
            worker.error = None
            await registry.write(worker)
        if newly_usable:
            self._signals.changed()
