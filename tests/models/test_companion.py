"""The companion pulls a manifest's files from a real control plane (``GET /api/v1/models/blobs/{sha256}``, the
worker's token, ``Range``), verified, into a ComfyUI-style models folder, then becomes the given command."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from file_server import FileServer

from comfyfleet.companion import CompanionError, sync_models
from comfyfleet.config import load_settings
from comfyfleet.models import ModelPolicy, ModelSpec
from comfyfleet.models.service import ModelService
from comfyfleet.runtime import Runtime

DATA = b"companion checkpoint " * 50_000  # about 1 MB
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass
class ControlPlane:
    url: str
    models: ModelService
    spec: ModelSpec  # the manifest's entry, held by the control plane's cache


@pytest.fixture
async def control_plane(tmp_path: Path, file_server: FileServer) -> AsyncIterator[ControlPlane]:
    file_server.files["base.safetensors"] = DATA
    settings = load_settings(
        store=f"sqlite:///{tmp_path / 'cp.db'}",
        outputs=str(tmp_path / "outputs"),
        host="127.0.0.1",
        port=0,
        models={"cache_dir": str(tmp_path / "cp-cache"), "workers_dir": str(tmp_path / "cp-workers")},
        api_keys=[{"key": "tenant-key", "tenant": "acme"}],  # blobs need the worker's token (or an admin key)
    )
    spec = ModelSpec(url=file_server.url("base.safetensors"), sha256=SHA, folder="checkpoints")
    async with Runtime(settings) as runtime:
        running = asyncio.ensure_future(runtime.run())
        try:
            port = await runtime.wait_listening()
            models = runtime.services.models
            assert models is not None
            await models.ensure(spec, ModelPolicy(allow_private=True))
            yield ControlPlane(f"http://127.0.0.1:{port}", models, spec)
        finally:
            runtime.request_stop()
            await running


async def test_pulls_verified_files_into_comfyuis_layout_once(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    root = tmp_path / "worker"
    token = control_plane.models.worker_token("w-1")
    paths = await sync_models(control_plane.url, token, root, [control_plane.spec], retry_base_s=0)
    placed = paths.models_dir / "checkpoints" / "base.safetensors"
    assert placed.read_bytes() == DATA
    assert "checkpoints" in paths.extra_model_paths.read_text()
    assert str(paths.models_dir) in paths.extra_model_paths.read_text()
    assert list((root / "cache" / "partial").iterdir()) == []
    # A restart of the worker finds the file verified in its own cache: nothing is asked of the control plane.
    before = os.stat(placed).st_ino
    await sync_models("http://127.0.0.1:9", token, root, [control_plane.spec], wait_s=0)
    assert os.stat(placed).st_ino == before


async def test_a_cut_download_resumes_with_range(control_plane: ControlPlane, tmp_path: Path) -> None:
    token = control_plane.models.worker_token("w-2")
    spec = control_plane.spec
    # A run cut after half the file left its .part; the next asks only for the rest.
    resumed = tmp_path / "resumed"
    (resumed / "cache" / "partial").mkdir(parents=True)
    (resumed / "cache" / "partial" / f"{SHA}.part").write_bytes(DATA[: len(DATA) // 2])
    paths = await sync_models(control_plane.url, token, resumed, [spec], retry_base_s=0)
    assert (paths.models_dir / "checkpoints" / "base.safetensors").read_bytes() == DATA
    # Proof that only the rest was asked for: a .part whose head is wrong stays wrong, and the whole is refused
    # for its sha256, with nothing in the models folder.
    corrupt = tmp_path / "corrupt"
    (corrupt / "cache" / "partial").mkdir(parents=True)
    (corrupt / "cache" / "partial" / f"{SHA}.part").write_bytes(b"x" * (len(DATA) // 2))
    with pytest.raises(CompanionError, match="sha256"):
        await sync_models(control_plane.url, token, corrupt, [spec], retry_base_s=0)
    assert list((corrupt / "models" / "checkpoints").iterdir()) == []


async def test_refusals_are_clear_and_final(control_plane: ControlPlane, tmp_path: Path) -> None:
    spec = control_plane.spec
    with pytest.raises(CompanionError, match=r"refused this worker's token \(HTTP 401\)"):
        await sync_models(control_plane.url, "cfw.w-3.forged", tmp_path / "forged", [spec], retry_base_s=0)
    with pytest.raises(CompanionError, match=r"refused this worker's token \(HTTP 403\)"):
        await sync_models(control_plane.url, "tenant-key", tmp_path / "tenant", [spec], retry_base_s=0)
    missing = spec.model_copy(update={"sha256": "0" * 64})
    token = control_plane.models.worker_token("w-3")
    with pytest.raises(CompanionError, match=r"did not serve .* within 0\.5s"):
        await sync_models(control_plane.url, token, tmp_path / "missing", [missing], wait_s=0.5)


async def test_the_command_runs_once_the_files_are_in_place(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    manifest = f'[{{"url": "{control_plane.spec.url}", "sha256": "{SHA}", "folder": "checkpoints"}}]'
    env = {
        **os.environ,
        "COMFYFLEET_COMPANION_URL": control_plane.url,
        "COMFYFLEET_COMPANION_TOKEN": control_plane.models.worker_token("w-4"),
        "COMFYFLEET_COMPANION_MANIFEST": manifest,
        "COMFYFLEET_COMPANION_DIR": str(tmp_path / "exec"),
    }
    show = (
        "import os,sys; print(sorted(os.listdir(sys.argv[1] + '/checkpoints')), open(sys.argv[2]).read(),"
        " 'token:', os.environ.get('COMFYFLEET_COMPANION_TOKEN'))"
    )
    command = [sys.executable, "-m", "comfyfleet", "companion", "--", sys.executable, "-c", show, "{models_dir}",
               "{extra_model_paths}"]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("['base.safetensors']")
    assert str(tmp_path / "exec" / "models") in result.stdout
    assert result.stdout.rstrip().endswith(
        "token: None"
    )  # ComfyUI (and its custom nodes) never see the token
    assert env["COMFYFLEET_COMPANION_TOKEN"] not in result.stderr  # no secret in its log

    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "comfyfleet", "companion", "--manifest", "[{}]"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "--manifest must be a JSON list" in bad.stderr
    assert "Traceback" not in bad.stderr
