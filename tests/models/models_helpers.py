"""The whole service (API, dispatcher, worker manager, model service) over a pool of emulator processes that
read their models folder strictly (``--models-dir {models_dir} --strict-models``), as real ComfyUI would."""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from support import Fleet, fast_settings, running_fleet
from support.fleet import EMULATOR_COMMAND as SUPPORT_EMULATOR_COMMAND

EMULATOR_COMMAND = [*SUPPORT_EMULATOR_COMMAND, "--models-dir", "{models_dir}", "--strict-models"]


def model_graph(checkpoint: str, lora: str | None = None, seed: int = 1) -> dict[str, Any]:
    """Checkpoint (and LoRA) → prompt → one sampler step on a tiny latent → decode → save."""
    model, clip = ["1", 0], ["1", 1]
    graph: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
    }
    if lora is not None:
        graph["9"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": model,
                "clip": clip,
                "lora_name": lora,
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        }
        model, clip = ["9", 0], ["9", 1]
    graph.update(
        {
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a bottle"}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "positive": ["2", 0],
                    "negative": ["2", 0],
                    "latent_image": ["3", 0],
                    "seed": seed,
                    "steps": 1,
                    "cfg": 7.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                },
            },
            "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "models"}},
        }
    )
    return graph


async def workers(fleet: Fleet, state: str | None = None) -> list[dict[str, Any]]:
    """The workers ``GET /api/v1/workers`` lists, or those in ``state``."""
    response = await fleet.http.get("/api/v1/workers")
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()["workers"]
    return [worker for worker in listed if state is None or worker["state"] == state]


def pool(
    models: list[dict[str, Any]] | None = None, *, min_workers: int = 1, max_workers: int = 2, **extra: Any
) -> dict[str, Any]:
    return {
        "name": "gpu",
        "provider": "process",
        "min_workers": min_workers,
        "max_workers": max_workers,
        "models": models or [],
        "models_allow_private": True,  # the file server is on loopback
        "startup_timeout_s": 60,
        "settings": {"command": EMULATOR_COMMAND},
        **extra,
    }


def service_settings(tmp_path: Path, pools: list[dict[str, Any]], **models: Any) -> dict[str, Any]:
    """The whole configuration (it is also written to a file for ``comfyfleet serve``): the support package's
    fast settings, these pools and a model cache under ``tmp_path``."""
    return fast_settings(
        tmp_path,
        pools=pools,
        fleet={"namespace": f"m{uuid.uuid4().hex[:10]}", "reap_interval_s": 1.0, "start_backoff_base_s": 0.2},
        models={
            "cache_dir": str(tmp_path / "cache"),
            "workers_dir": str(tmp_path / "workers"),
            "fetch_retry_base_s": 0.0,
            **models,
        },
    )


def service(tmp_path: Path, settings: dict[str, Any]) -> AbstractAsyncContextManager[Fleet]:
    """The service in this process with these settings, its pools' workers started by itself."""
    return running_fleet(tmp_path, workers=[], **settings)
