"""Rediscovery and the reaper (leader only): the store's records matched with what each provider has.

Each provider's ``list_ours`` answers only instances that carry this installation's identity (the store's
``installation_id``, stamped on every instance at create), so two installations side by side, even with the same
namespace and pool names, never adopt or reap each other's workers.

- Rediscovery (when a replica becomes the leader, once per pool): a record whose instance exists is adopted
  (handed out again only after a probe in this process), a record whose instance is gone is closed, a ``pending``
  record whose create never answered is adopted if its instance exists (found by worker id), closed otherwise.
- Reaping (then, and every ``reap_interval_s``): an instance that no record knows is terminated; terminated
  records older than ``keep_terminated_s`` are deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from comfyfleet.domain import Worker, WorkerState
from comfyfleet.fleet.pools import utcnow
from comfyfleet.fleet.prober import describe
from comfyfleet.fleet.providers import Instance, InstanceState, Provider

if TYPE_CHECKING:
    from comfyfleet.config import FleetSettings, PoolConfig
    from comfyfleet.fleet.registry import WorkerRegistry
    from comfyfleet.fleet.signals import FleetSignals
    from comfyfleet.store.base import Store

logger = logging.getLogger(__name__)


class Reaper:
    def __init__(
        self,
        *,
        registry: WorkerRegistry,
        signals: FleetSignals,
        store: Store,
        pools: Mapping[str, PoolConfig],
        providers: Mapping[str, Provider],
        fleet: FleetSettings,
    ) -> None:
        self._registry = registry
        self._signals = signals
        self._store = store
        self._pools = pools
        self._providers = providers
        self._fleet = fleet

    async def rediscover(self, pool_name: str) -> bool:
        """Match the store's records of this pool with what the provider has: adopt, forget, reap.
        False when the provider could not be asked (the next pass tries again)."""
        provider = self._providers[pool_name]
        try:
            instances = await provider.list_ours()
        except Exception as exc:
            logger.warning("fleet_rediscover_failed pool=%s error=%s", pool_name, exc)
            return False
        by_worker = {instance.worker_id: instance for instance in instances if instance.worker_id}
        for worker in self._registry.of_pool(pool_name):
            if worker.id in self._registry.inflight or worker.state is WorkerState.TERMINATED:
                continue
            if worker.provider_id is None:
                await self._settle_unfinished_create(worker, by_worker.get(worker.id), provider)
            else:
                await self._adopt_or_close(worker, provider)
        await self.reap_pool(pool_name, instances)
        self._signals.changed()
        self._signals.probe.set()
        return True

    async def _settle_unfinished_create(
        self, worker: Worker, found: Instance | None, provider: Provider
    ) -> None:
        registry = self._registry
        if found is not None and found.state is not InstanceState.GONE:
            worker.provider_id = found.provider_id
            worker.endpoint = worker.endpoint or found.endpoint
            provider.adopt(found.provider_id, worker.id)
            registry.transition(worker, WorkerState.STARTING)
            logger.info("worker_adopted worker_id=%s provider_id=%s", worker.id, found.provider_id)
            await registry.write(worker)
            return
        worker.error = "its start never completed (comfyfleet stopped during create)"
        registry.transition(worker, WorkerState.FAILED)
        registry.transition(worker, WorkerState.TERMINATED)
        registry.workers.pop(worker.id, None)
        await registry.write(worker)

    async def _adopt_or_close(self, worker: Worker, provider: Provider) -> None:
        registry = self._registry
        instance = await describe(self._providers, worker)
        if instance is None or worker.provider_id is None:
            return
        if instance.state is InstanceState.GONE:
            worker.error = worker.error or "the instance disappeared while comfyfleet was away"
            if worker.state is not WorkerState.TERMINATING:
                registry.transition(worker, WorkerState.FAILED)
            registry.transition(worker, WorkerState.TERMINATED)
            await registry.write(worker)
            registry.workers.pop(worker.id, None)
            logger.info("worker_forgotten worker_id=%s reason=gone", worker.id)
            return
        provider.adopt(worker.provider_id, worker.id)
        if worker.endpoint is None and instance.endpoint:
            worker.endpoint = instance.endpoint
        # Whatever state it was in, it is handed out again only after a probe in this process.
        self._signals.probe_soon(worker.id)
        logger.info(
            "worker_adopted worker_id=%s provider_id=%s state=%s", worker.id, worker.provider_id, worker.state
        )

    async def reap(self) -> int:
        """Terminate provider instances of this installation that no record knows; prune old terminated
        records. Returns how many instances were reaped."""
        reaped = 0
        for pool_name, provider in self._providers.items():
            if self._pools[pool_name].provider == "static":
                continue
            try:
                instances = await provider.list_ours()
            except Exception as exc:
                logger.warning("fleet_reap_list_failed pool=%s error=%s", pool_name, exc)
                continue
            reaped += await self.reap_pool(pool_name, instances)
        await self._prune_terminated()
        logger.debug("fleet_reap_pass reaped=%d", reaped)
        return reaped

    async def reap_pool(self, pool_name: str, instances: Iterable[Instance]) -> int:
        provider = self._providers[pool_name]
        if self._pools[pool_name].provider == "static":
            return 0
        workers = self._registry.workers.values()
        known_workers = {w.id for w in workers if w.state is not WorkerState.TERMINATED}
        known_ids = {w.provider_id for w in workers if w.provider_id}
        reaped = 0
        for instance in instances:
            if instance.state is InstanceState.GONE:
                continue
            if instance.provider_id in known_ids or (
                instance.worker_id and instance.worker_id in known_workers
            ):
                continue
            if instance.worker_id and await self._registry.store_knows_live(instance.worker_id):
                continue  # another replica's record we have not read yet
            logger.warning(
                "worker_reaped pool=%s provider_id=%s worker_id=%s",
                pool_name,
                instance.provider_id,
                instance.worker_id,
            )
            try:
                await provider.terminate(instance.provider_id)
                reaped += 1
            except Exception as exc:
                logger.warning("worker_reap_failed provider_id=%s error=%s", instance.provider_id, exc)
        return reaped

    async def _prune_terminated(self) -> None:
        if self._fleet.keep_terminated_s <= 0:
            return
        now = utcnow()
        for record in await self._store.list_workers(include_gone=True):
            if (
                record.state is WorkerState.TERMINATED
                and (now - record.updated_at).total_seconds() > self._fleet.keep_terminated_s
            ):
                await self._store.delete_worker(record.id)
