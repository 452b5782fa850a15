"""The emulator lists the model files on disk like ComfyUI (``--models-dir``, ``--extra-model-paths-config``),
re-reads them when they change, and with ``--strict-models`` accepts only those names."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from comfy_helpers import EmulatorFactory, sampler_graph
from comfy_wire import post_prompt
from PIL import Image

from comfyfleet.emulators.comfyui import EmulatorServer
from support import eventually


def _place(path: Path, cache: Path | None = None) -> None:
    """Put a model file at ``path`` the way comfyfleet does: a hard link to a cache file, or a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if cache is None:
        path.write_bytes(b"weights")
    else:
        os.link(cache, path)


async def _choices(http: httpx.AsyncClient, node: str, input_name: str) -> list[str]:
    info = (await http.get(f"/object_info/{node}")).json()[node]
    choices: list[str] = info["input"]["required"][input_name][0]
    return choices


async def _history_entry(emu: EmulatorServer, prompt_id: str) -> dict[str, Any]:
    await eventually(lambda: prompt_id in emu.state.history)
    entry: dict[str, Any] = emu.state.history[prompt_id]
    return entry


async def test_a_placed_file_becomes_loadable_without_restart_and_a_missing_one_is_value_not_in_list(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    cache_file = tmp_path / "cache" / "ab" / "abcdef"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(b"checkpoint bytes")
    async with (
        emulator_factory(models_dir=str(models), accept_any_model=False) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
    ):
        # The folder does not exist yet: an empty list, not an error.
        assert await _choices(http, "CheckpointLoaderSimple", "ckpt_name") == []
        refused = await post_prompt(http, sampler_graph(steps=1, ckpt="fresh.safetensors"))
        assert refused.status_code == 400
        assert refused.json()["error"]["type"] == "prompt_outputs_failed_validation"
        assert refused.json()["node_errors"] == {
            "4": {
                "errors": [
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": "ckpt_name: 'fresh.safetensors' not in []",
                        "extra_info": {
                            "input_name": "ckpt_name",
                            "input_config": [[], {}],
                            "received_value": "fresh.safetensors",
                        },
                    }
                ],
                "dependent_outputs": ["9"],
                "class_type": "CheckpointLoaderSimple",
            }
        }

        _place(models / "checkpoints" / "fresh.safetensors", cache=cache_file)
        _place(models / "checkpoints" / "sdxl" / "nested.safetensors")
        _place(models / "checkpoints" / "fresh.safetensors.part")  # a download in progress is not a model
        _place(models / "checkpoints" / "notes.txt")
        expected = ["fresh.safetensors", "sdxl/nested.safetensors"]
        assert await _choices(http, "CheckpointLoaderSimple", "ckpt_name") == expected
        assert (await http.get("/models/checkpoints")).json() == expected

        accepted = await post_prompt(http, sampler_graph(steps=1, ckpt="fresh.safetensors"))
        assert accepted.status_code == 200, accepted.text
        entry = await _history_entry(emu, accepted.json()["prompt_id"])
        assert entry["status"]["status_str"] == "success"

        # A second file in an existing folder (the directory's mtime changes) is seen at the next /prompt.
        _place(models / "loras" / "style.safetensors")
        graph = sampler_graph(steps=1, ckpt="sdxl/nested.safetensors")
        graph["10"] = {
            "class_type": "LoraLoader",
            "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors",
                       "strength_model": 1.0, "strength_clip": 1.0},
        }  # fmt: skip
        graph["3"]["inputs"]["model"] = ["10", 0]
        assert (await post_prompt(http, graph)).status_code == 200
        os.remove(models / "loras" / "style.safetensors")
        graph["3"]["inputs"]["seed"] = 2
        gone = await post_prompt(http, graph)
        assert gone.status_code == 400
        assert (
            gone.json()["node_errors"]["10"]["errors"][0]["details"]
            == "lora_name: 'style.safetensors' not in []"
        )


async def test_a_file_removed_after_validation_fails_in_its_loader_like_upstream(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    _place(models / "checkpoints" / "short-lived.safetensors")
    _place(models / "checkpoints" / "holder.safetensors")
    async with (
        emulator_factory(models_dir=str(models), accept_any_model=False, step_time_s=0.05) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
    ):
        # A 1 s prompt holds the executor while the next one is validated and its file removed.
        busy = (await post_prompt(http, sampler_graph(steps=20, ckpt="holder.safetensors"))).json()[
            "prompt_id"
        ]
        queued = await post_prompt(http, sampler_graph(steps=1, ckpt="short-lived.safetensors"))
        assert queued.status_code == 200
        os.remove(models / "checkpoints" / "short-lived.safetensors")
        await _history_entry(emu, busy)
        entry = await _history_entry(emu, queued.json()["prompt_id"])
        error = next(m for m in entry["status"]["messages"] if m[0] == "execution_error")[1]
        assert (error["node_type"], error["exception_type"]) == (
            "CheckpointLoaderSimple",
            "FileNotFoundError",
        )
        assert error["exception_message"].startswith(
            "Model in folder 'checkpoints' with filename 'short-lived.safetensors' not found."
        )


async def test_folders_follow_comfyuis_layout_and_legacy_names(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    _place(models / "unet" / "old-layout.safetensors")
    _place(models / "diffusion_models" / "new-layout.gguf")
    _place(models / "clip" / "clip_l.safetensors")
    _place(models / "upscale_models" / "4x-UltraSharp.pth")
    async with emulator_factory(models_dir=str(models)) as emu, httpx.AsyncClient(base_url=emu.url) as http:
        assert await _choices(http, "UNETLoader", "unet_name") == [
            "new-layout.gguf",
            "old-layout.safetensors",
        ]
        assert await _choices(http, "CLIPLoader", "clip_name") == ["clip_l.safetensors"]
        assert await _choices(http, "VAELoader", "vae_name") == []
        assert {"checkpoints", "loras", "upscale_models", "text_encoders"} <= set(
            (await http.get("/models")).json()
        )
        # Without --strict-models any model-like name is still accepted, as before.
        assert (
            await post_prompt(http, sampler_graph(steps=1, ckpt="anything.safetensors"))
        ).status_code == 200
        upscale = {
            "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.pth"}},
            "2": {
                "class_type": "EmptyImage",
                "inputs": {"width": 16, "height": 8, "batch_size": 1, "color": 9},
            },
            "3": {
                "class_type": "ImageUpscaleWithModel",
                "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]},
            },
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}},
        }
        prompt_id = (await post_prompt(http, upscale)).json()["prompt_id"]
        entry = await _history_entry(emu, prompt_id)
        image = entry["outputs"]["4"]["images"][0]
        view = await http.get("/view", params=image)
        with Image.open(io.BytesIO(view.content)) as png:
            assert png.size == (64, 32)  # 4x


async def test_extra_model_paths_config_is_read_like_comfyui(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    _place(shared / "ckpts" / "from-base.safetensors")
    _place(shared / "more" / "second.safetensors")
    _place(tmp_path / "beside-yaml" / "lora.safetensors")
    _place(shared / "te" / "t5.safetensors")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(
        "comfyfleet:\n"
        "  base_path: shared\n"  # relative to the yaml file
        "  is_default: true\n"
        "  checkpoints: |\n    ckpts\n    more\n"
        "  clip: te\n"  # a legacy name
        "other:\n"
        "  loras: beside-yaml\n"
    )
    async with (
        emulator_factory(extra_model_paths_config=str(config), accept_any_model=False) as emu,
        httpx.AsyncClient(base_url=emu.url) as http,
    ):
        assert await _choices(http, "CheckpointLoaderSimple", "ckpt_name") == [
            "from-base.safetensors",
            "second.safetensors",
        ]
        assert await _choices(http, "CLIPLoader", "clip_name") == ["t5.safetensors"]
        assert await _choices(http, "LoraLoader", "lora_name") == ["lora.safetensors"]


def test_cli_explains_bad_model_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from comfyfleet.cli import app

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["emulator", *args])
        return result.exit_code, result.stderr

    both = run("--models-dir", str(tmp_path), "--model", "checkpoints/a.safetensors")
    assert both[0] == 2
    assert "with --models-dir the files found there are the list" in both[1]
    missing = run("--extra-model-paths-config", str(tmp_path / "nowhere.yaml"))
    assert missing[0] == 2
    assert "cannot read the extra model paths config" in missing[1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("comfyui: [not, a, mapping]\n")
    command = [sys.executable, "-m", "comfyfleet", "emulator", "--extra-model-paths-config", str(bad)]
    broken = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert broken.returncode == 2
    assert "each section of an extra model paths config must be a mapping" in broken.stderr
    assert "Traceback" not in broken.stderr
