"""Must-show 5: ``GET /metrics`` parses with prometheus_client's text parser and has the series: tasks by
status and priority, workers by state and pool, dispatch latency and task duration histograms, worker
start-up time, failures by kind (and webhook attempts)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from comfyfleet import metrics
from support import eventually, running_fleet, seed_workflow, tiny_workflow


def _families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, object], name: str, suffix: str = "", **labels: str) -> float:
    family = families[name]
    for sample in family.samples:  # type: ignore[attr-defined]
        if sample.name == name + suffix and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    raise AssertionError(f"no sample {name}{suffix} {labels}")


async def test_metrics_parse_and_have_every_series(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=1, api_keys=[{"key": "secret-key"}]) as fleet:
        auth = {"Authorization": "Bearer secret-key"}
        done = (
            await fleet.http.post(
                "/api/v1/tasks", json={"payload": tiny_workflow(), "priority": 3}, headers=auth
            )
        ).json()
        bad = (
            await fleet.http.post(
                "/api/v1/tasks", json={"payload": seed_workflow(sampler_name="nope")}, headers=auth
            )
        ).json()
        waiting = await fleet.http.post(
            "/api/v1/tasks", json={"payload": tiny_workflow(), "priority": -2}, headers=auth
        )
        assert waiting.status_code == 201
        await fleet.http.delete(f"/api/v1/tasks/{waiting.json()['id']}", headers=auth)
        fleet.http.headers.update(auth)
        assert (await fleet.wait_task(done["id"]))["status"] == "completed"
        assert (await fleet.wait_task(bad["id"]))["status"] == "failed"
        fleet.http.headers.pop("Authorization")

        async def idle_workers() -> float:
            return _value(
                _families((await fleet.http.get("/metrics")).text),
                "comfyfleet_workers",
                state="idle",
                pool="default",
            )

        # The worker's record says idle again once the registry's next flush (a fifth of a second) wrote it.
        await eventually(idle_workers, until=lambda idle: idle == 1, what="the worker recorded idle")
        before = _families((await fleet.http.get("/metrics")).text)
        metrics.observe_dispatch_latency(0.02)
        metrics.observe_task_duration("completed", 1.5)
        metrics.count_failure("workflow_invalid")
        metrics.observe_worker_startup("default", 7.0)

        response = await fleet.http.get("/metrics")  # no key needed: counts only
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = _families(response.text)

        # Tasks by status and priority, from the store.
        assert families["comfyfleet_tasks"].type == "gauge"  # type: ignore[attr-defined]
        assert _value(families, "comfyfleet_tasks", status="completed", priority="3") == 1
        assert _value(families, "comfyfleet_tasks", status="failed", priority="0") == 1
        assert _value(families, "comfyfleet_tasks", status="cancelled", priority="-2") == 1
        assert _value(families, "comfyfleet_tasks", status="pending", priority="0") == 0
        # Workers by state and pool.
        assert _value(families, "comfyfleet_workers", state="idle", pool="default") == 1
        assert _value(families, "comfyfleet_workers", state="failed", pool="default") == 0
        assert _value(families, "comfyfleet_queue_oldest_pending_age_seconds") == 0
        assert _value(families, "comfyfleet_store_up") == 1
        # Histograms and counters, fed by the components through comfyfleet.metrics.
        for name in (
            "comfyfleet_dispatch_latency_seconds",
            "comfyfleet_task_duration_seconds",
            "comfyfleet_worker_startup_seconds",
        ):
            assert families[name].type == "histogram"  # type: ignore[attr-defined]
        assert families["comfyfleet_task_failures"].type == "counter"  # type: ignore[attr-defined]
        assert families["comfyfleet_webhook_attempts"].type == "counter"  # type: ignore[attr-defined]
        assert (
            _value(families, "comfyfleet_dispatch_latency_seconds", "_count")
            == _value(before, "comfyfleet_dispatch_latency_seconds", "_count") + 1
        )
        assert _value(families, "comfyfleet_dispatch_latency_seconds", "_bucket", le="0.025") >= 1
        assert _value(families, "comfyfleet_task_duration_seconds", "_count", status="completed") >= 1
        assert _value(families, "comfyfleet_task_duration_seconds", "_count", status="failed") >= 0
        assert (
            _value(families, "comfyfleet_task_failures", "_total", kind="workflow_invalid")
            == _value(before, "comfyfleet_task_failures", "_total", kind="workflow_invalid") + 1
        )
        assert _value(families, "comfyfleet_task_failures", "_total", kind="out_of_memory") >= 0
        assert _value(families, "comfyfleet_worker_startup_seconds", "_count", pool="default") >= 1
        assert _value(families, "comfyfleet_webhook_attempts", "_total", outcome="delivered") >= 0
