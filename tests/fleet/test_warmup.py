"""A pool's warm-up workflow: run on each new worker before it takes tasks, against real emulators."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_helpers import running_manager, settings, wait_for

from comfyfleet.config import ConfigError, PoolConfig, load_settings
from comfyfleet.domain import WorkerState
from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.fleet.warmup import run_warmup
from comfyfleet.store import Store
from support import eventually

CHECKPOINT = "warm_model.safetensors"


def warmup_graph(checkpoint: str = CHECKPOINT) -> dict[str, Any]:
    """Loads a checkpoint and decodes an empty latent with its VAE: a model load and an output, no sampling."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def static_pool(url: str, warmup: dict[str, Any], **policy: Any) -> dict[str, Any]:
    return {"name": "warm", "provider": "static", "settings": {"urls": [url]}, "warmup": warmup, **policy}


async def test_a_worker_takes_tasks_only_after_its_warmup_loaded_the_models(
    store: Store, namespace: str
) -> None:
    async with EmulatorServer(EmulatorOptions(model_load_s=1.0)) as emulator:
        config = settings(namespace, [static_pool(emulator.url, warmup_graph())])
        async with running_manager(config, store) as fleet:
            await wait_for(
                fleet,
                lambda: any(w.info.get("warmup", {}).get("state") == "running" for w in fleet.workers()),
                "the warm-up starts once the worker answers",
            )
            # While its model loads the worker answers probes but is not handed out.
            assert [w.state for w in fleet.workers()] == [WorkerState.STARTING]
            assert fleet.usable_workers() == []

            await wait_for(fleet, lambda: len(fleet.usable_workers()) == 1, "the warmed-up worker is usable")
            worker = fleet.usable_workers()[0]
            assert worker.state is WorkerState.IDLE
            assert worker.info["warmup"]["state"] == "done"
            assert worker.info["warmup"]["seconds"] >= 1.0  # the model load happened during the warm-up
            assert worker.info["startup_s"] >= 1.0  # and counts in the start-up time
            assert worker.loaded_models == [CHECKPOINT]  # the placement knows the model is there
            assert (emulator.stats.prompts_succeeded, emulator.stats.model_loads) == (1, 1)
            assert list(emulator.state.loaded_models) == [f"checkpoints/{CHECKPOINT}"]

            async def warm_record_written() -> bool:
                record = await store.get_worker(worker.id)
                return record.state is WorkerState.IDLE and record.loaded_models == [CHECKPOINT]

            await eventually(warm_record_written, what="the warm worker is written to the store")
            # The warm-up leaves nothing in the worker's history.
            assert emulator.state.history == {}


async def test_a_rejected_warmup_fails_the_start_with_comfyuis_reason(store: Store, namespace: str) -> None:
    options = EmulatorOptions(accept_any_model=False, model_load_s=0.0)
    async with EmulatorServer(options) as emulator:
        config = settings(namespace, [static_pool(emulator.url, warmup_graph("no_such_model.safetensors"))])
        async with running_manager(config, store) as fleet:

            async def start_failed() -> bool:
                records = await store.list_workers(include_gone=True)
                return any("warm-up workflow rejected" in (r.error or "") for r in records)

            await eventually(start_failed, what="the start fails on the rejected warm-up")
            failed = [r for r in await store.list_workers(include_gone=True) if r.error]
            assert "value_not_in_list" in (failed[0].error or "")
            assert "no_such_model.safetensors" in (failed[0].error or "")
            assert fleet.usable_workers() == []
            assert emulator.stats.prompts_accepted == 0


async def test_run_warmup_tells_a_broken_graph_from_a_worker_that_stopped_answering() -> None:
    async with EmulatorServer(EmulatorOptions(failure_rate=1.0, seed=1)) as emulator:
        offered = list((await _object_info(emulator.url)).keys())
        lacking = await run_warmup(emulator.url, warmup_graph(), [t for t in offered if t != "VAEDecode"], 30)
        assert (lacking.ok, lacking.fatal) == (False, True)
        assert lacking.error == "warm-up workflow uses node types the worker lacks: VAEDecode"

        failing = await run_warmup(emulator.url, warmup_graph(), offered, 30)
        assert (failing.ok, failing.fatal) == (False, True)
        assert (failing.error or "").startswith("warm-up workflow failed on the worker:")
        url = emulator.url
    gone = await run_warmup(url, warmup_graph(), offered, 30)
    assert (gone.ok, gone.fatal) == (False, False)  # try again at the next probe
    assert (gone.error or "").startswith("warm-up interrupted:")


def test_warmup_is_read_from_a_json_file_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "warm.json").write_text(
        json.dumps({"prompt": warmup_graph()})
    )  # a saved /prompt body
    (tmp_path / "fleet.yaml").write_text(
        "pools:\n  - name: warm\n    provider: static\n    settings: {urls: ['http://127.0.0.1:8188']}\n"
        "    warmup: flows/warm.json\n"
    )
    loaded = load_settings(config=tmp_path / "fleet.yaml")
    assert loaded.pools[0].warmup == warmup_graph()


@pytest.mark.parametrize(
    ("warmup", "message"),
    [
        ("missing.json", "cannot read warm-up workflow missing.json"),
        ({"nodes": [], "links": []}, "warm-up workflow is not an API-format graph"),
    ],
)
def test_a_bad_warmup_is_a_clear_configuration_error(
    warmup: Any, message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        PoolConfig.model_validate({"name": "warm", "warmup": warmup})
    with pytest.raises(ConfigError, match=message):
        load_settings(pools=[{"name": "warm", "warmup": warmup}])


async def _object_info(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(url + "/object_info")
    body: dict[str, Any] = response.json()
    return body
