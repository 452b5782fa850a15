"""Prometheus metrics: ``GET /metrics`` in the text exposition format.

Two kinds of series:

* Counted in this process, as things happen: dispatch latency and task duration histograms, failures by
  kind, worker start-up time, webhook delivery attempts. Components call the small functions below
  (``observe_dispatch_latency``, ``observe_task_duration``, ``count_failure``, ``observe_worker_startup``,
  ``count_webhook_attempt``); each is a few dictionary look-ups and never raises.
* Read from the store at scrape time: tasks by status and priority, workers by state and pool, the age of
  the oldest pending task. They describe the whole fleet, so every replica reports the same values (use
  ``max`` across replicas in queries); the histograms and counters are per replica (use ``sum``).

The metrics live in their own :class:`~prometheus_client.CollectorRegistry`, not the process-wide default
one, so embedding comfyfleet never mixes its series with the host application's.

This package is what every component records into and imports no web framework; ``metrics.routes`` serves
the exposition at ``GET /metrics`` as part of the HTTP edge.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from comfyfleet.domain import TERMINAL_STATUSES, TaskStatus, WorkerState
from comfyfleet.store import Store, StoreError

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

# From a few milliseconds (an idle fleet) to an hour (a deep queue).
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
)
# From a trivial graph to a long video workflow.
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# From a warm local process to a cloud GPU pulling a large image.
_STARTUP_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1800)

DISPATCH_LATENCY = Histogram(
    "comfyfleet_dispatch_latency_seconds",
    "Time from a task becoming runnable (submitted, or its retry coming due) to its prompt being accepted by a worker.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TASK_DURATION = Histogram(
    "comfyfleet_task_duration_seconds",
    "Time from submission to the end of a task, by final status.",
    ["status"],
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)
TASK_FAILURES = Counter(
    "comfyfleet_task_failures",
    "Failed attempts by kind (retried or final): workflow_invalid, execution_error, out_of_memory, "
    "worker_lost, timeout…",
    ["kind"],
    registry=REGISTRY,
)
WORKER_STARTUP = Histogram(
    "comfyfleet_worker_startup_seconds",
    "Time from asking a provider for a worker to its ComfyUI answering a health probe, by pool.",
    ["pool"],
    buckets=_STARTUP_BUCKETS,
    registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "comfyfleet_webhook_attempts",
    "Webhook delivery attempts by outcome: delivered, retry (failed, will try again), gave_up.",
    ["outcome"],
    registry=REGISTRY,
)
MODEL_BYTES_FETCHED = Counter(
    "comfyfleet_model_bytes_fetched",
    "Bytes of model files downloaded into this host's model cache (a resumed download counts what it added).",
    registry=REGISTRY,
)
MODEL_CACHE_HITS = Counter(
    "comfyfleet_model_cache_hits",
    "Model files a worker or task needed that this host's cache already held (no download).",
    registry=REGISTRY,
)
MODEL_EVICTIONS = Counter(
    "comfyfleet_model_evictions",
    "Model files evicted from this host's cache to keep it within models.cache_budget_bytes.",
    registry=REGISTRY,
)
MODEL_FETCH_SECONDS = Histogram(
    "comfyfleet_model_fetch_seconds",
    "Time to download and verify one model file into the host cache.",
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)

# Label values known in advance are created at import, so their series exist (at zero) from the first
# scrape: a rate() over a series that appears only with its first event misses that event.
FAILURE_KINDS = (
    "workflow_invalid",
    "execution_error",
    "out_of_memory",
    "missing_node_type",
    "input_invalid",
    "worker_lost",
    "worker_unreachable",
    "prompt_lost",
    "interrupted",
    "timeout",
    "model_unavailable",
)
for _status in sorted(TERMINAL_STATUSES):
    TASK_DURATION.labels(status=_status.value)
for _kind in FAILURE_KINDS:
    TASK_FAILURES.labels(kind=_kind)
for _outcome in ("delivered", "retry", "gave_up"):
    WEBHOOK_ATTEMPTS.labels(outcome=_outcome)

# Labels come from data (failure kinds, pool names); cap how many distinct values one metric may grow.
_MAX_LABEL_VALUES = 200
_seen_labels: dict[str, set[str]] = {}


def _label(metric: str, value: str) -> str:
    seen = _seen_labels.setdefault(metric, set())
    if value in seen:
        return value
    if len(seen) >= _MAX_LABEL_VALUES:
        return "other"
    seen.add(value)
    return value


def observe_dispatch_latency(seconds: float) -> None:
    """A prompt was accepted by a worker ``seconds`` after its task became runnable."""
    DISPATCH_LATENCY.observe(max(0.0, seconds))


def observe_task_duration(status: str, seconds: float) -> None:
    """A task ended in ``status`` (completed, failed, cancelled) ``seconds`` after it was submitted."""
    TASK_DURATION.labels(status=_label("task_duration", str(status))).observe(max(0.0, seconds))


def count_failure(kind: str) -> None:
    """An attempt failed with ``kind`` (the task's ``error_kind``), whether or not it will be retried."""
    TASK_FAILURES.labels(kind=_label("failures", str(kind or "unknown"))).inc()


def observe_worker_startup(pool: str, seconds: float) -> None:
    """A worker of ``pool`` answered its first health probe ``seconds`` after it was asked for."""
    WORKER_STARTUP.labels(pool=_label("worker_startup", str(pool))).observe(max(0.0, seconds))


def count_webhook_attempt(outcome: str) -> None:
    """One webhook POST ended: ``delivered``, ``retry`` or ``gave_up``."""
    WEBHOOK_ATTEMPTS.labels(outcome=_label("webhooks", outcome)).inc()


def count_model_cache_hit() -> None:
    """A model file was needed and the host cache held it."""
    MODEL_CACHE_HITS.inc()


def count_model_eviction() -> None:
    """A model file left the host cache to keep its budget."""
    MODEL_EVICTIONS.inc()


def observe_model_fetch(fetched_bytes: int, seconds: float) -> None:
    """A model file was downloaded (``fetched_bytes`` of it by this try) and verified in ``seconds``."""
    MODEL_BYTES_FETCHED.inc(max(0, fetched_bytes))
    MODEL_FETCH_SECONDS.observe(max(0.0, seconds))


class _FleetSnapshot(Collector):
    """Gauges read from the store for one scrape."""

    def __init__(
        self,
        tasks: Iterable[tuple[TaskStatus, int, int]],
        workers: Iterable[tuple[str, str]],
        oldest_pending_age_s: float | None,
        store_up: bool,
    ) -> None:
        self._tasks = list(tasks)
        self._workers = Tally(workers)
        self._oldest = oldest_pending_age_s
        self._store_up = store_up

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily(
            "comfyfleet_tasks", "Tasks in the store by status and priority.", labels=["status", "priority"]
        )
        seen_statuses = set()
        for status, priority, count in self._tasks:
            seen_statuses.add(TaskStatus(status))
            tasks.add_metric([TaskStatus(status).value, str(priority)], count)
        for status in TaskStatus:
            # Every status has a series, so "no failed tasks" reads as 0 rather than as no data.
            if status not in seen_statuses:
                tasks.add_metric([status.value, "0"], 0)
        yield tasks

        workers = GaugeMetricFamily(
            "comfyfleet_workers",
            "Workers by state and pool (terminated ones excluded).",
            labels=["state", "pool"],
        )
        pools = sorted({pool for _, pool in self._workers}) or ["default"]
        for pool in pools:
            for state in WorkerState:
                if state is WorkerState.TERMINATED:
                    continue
                workers.add_metric([state.value, pool], self._workers.get((state.value, pool), 0))
        yield workers

        oldest = GaugeMetricFamily(
            "comfyfleet_queue_oldest_pending_age_seconds",
            "Age of the oldest pending task (0 when nothing waits).",
        )
        oldest.add_metric([], self._oldest or 0.0)
        yield oldest

        up = GaugeMetricFamily("comfyfleet_store_up", "1 when the store answered this scrape, else 0.")
        up.add_metric([], 1.0 if self._store_up else 0.0)
        yield up


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


async def render_metrics(store: Store, pools: Iterable[str] = ()) -> bytes:
    """The whole exposition: this process's counters and histograms plus the store's gauges. ``pools``
    (the configured ones) get their start-up series at zero before their first worker starts."""
    for pool in pools:
        WORKER_STARTUP.labels(pool=_label("worker_startup", pool))
    tasks: list[tuple[TaskStatus, int, int]] = []
    workers: list[tuple[str, str]] = []
    oldest: float | None = None
    store_up = True
    try:
        tasks = await store.count_by_status_and_priority()
        workers = [
            (worker.state.value, worker.pool)
            for worker in await store.list_workers()
            if worker.state is not WorkerState.TERMINATED
        ]
        oldest = (await store.queue_metrics()).oldest_pending_age_s
    except StoreError as exc:
        # The process's own series are still worth scraping when the database is down.
        logger.warning("metrics_store_unavailable error=%s", exc)
        store_up = False
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_Forward(REGISTRY))
    scrape.register(_FleetSnapshot(tasks, workers, oldest, store_up))
    return generate_latest(scrape)
