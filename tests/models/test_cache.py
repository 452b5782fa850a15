"""The host cache over a real loopback file server: one verified copy per file, coalesced downloads, final
failures that are not retried and leave nothing half-written, resumed downloads, eviction that spares pinned
files, and the check at start."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from file_server import FileServer, sha256

from comfyfleet.config import ModelSettings
from comfyfleet.models import ModelFetchExhausted, ModelPolicy, ModelRejected, ModelSpec, ModelUnavailable
from comfyfleet.models.service import ModelService

LOOPBACK = ModelPolicy(allow_private=True)


def spec(server: FileServer, name: str, data: bytes, folder: str = "loras") -> ModelSpec:
    server.files[name] = data
    return ModelSpec(url=server.url(name), sha256=sha256(data), folder=folder)


def cache_entries(root: Path) -> list[str]:
    """What is in the cache's visible and partial folders."""
    return sorted(
        str(path.relative_to(root))
        for folder in ("sha256", "partial")
        for path in (root / folder).rglob("*")
        if path.is_file()
    )


async def test_a_file_is_fetched_once_verified_and_linked_into_each_worker(
    models: ModelService, file_server: FileServer
) -> None:
    data = os.urandom(300_000)
    lora = spec(file_server, "style.safetensors", data)
    first, second = models.worker_paths("pool-a-0000000001"), models.worker_paths("pool-a-0000000002")
    await asyncio.gather(
        models.provision([lora], first.models_dir, LOOPBACK),
        models.provision([lora], second.models_dir, LOOPBACK),
        models.ensure(lora, LOOPBACK),
    )
    assert file_server.requests["style.safetensors"] == 1  # three requests, one download
    placed = [paths.models_dir / "loras" / "style.safetensors" for paths in (first, second)]
    assert all(path.read_bytes() == data for path in placed)
    cached = models.cache.path(lora.sha256)
    assert (
        os.stat(placed[0]).st_ino == os.stat(placed[1]).st_ino == os.stat(cached).st_ino
    )  # links, not copies
    assert oct(cached.stat().st_mode & 0o777) == "0o444"
    config = yaml.safe_load(first.extra_model_paths.read_text())["comfyfleet"]
    assert config["base_path"] == str(first.models_dir)
    assert config["loras"] == "loras/"
    await models.provision([lora], first.models_dir, LOOPBACK)
    assert file_server.requests["style.safetensors"] == 1
    [entry] = models.snapshot()["files"]
    assert entry["names"] == ["loras/style.safetensors"]
    assert entry["workers"] == ["pool-a-0000000001", "pool-a-0000000002"]


@pytest.mark.parametrize("failure", ["sha256_mismatch", "not_found", "private_address", "pickle"])
async def test_final_failures_say_why_are_not_retried_and_leave_nothing_half_written(
    models: ModelService, file_server: FileServer, failure: str
) -> None:
    data = os.urandom(50_000)
    good = spec(file_server, "model.safetensors", data)
    policy = LOOPBACK
    if failure == "sha256_mismatch":
        bad, expected = good.model_copy(update={"sha256": sha256(b"other")}), "sha256"
    elif failure == "not_found":
        bad, expected = good.model_copy(update={"url": file_server.url("missing.safetensors")}), "HTTP 404"
    elif failure == "private_address":
        bad, expected, policy = (
            good,
            r"non-public address \(127\.0\.0\.1\); set models_allow_private",
            ModelPolicy(),
        )
    else:
        file_server.files["model.ckpt"] = data
        bad = ModelSpec(url=file_server.url("model.ckpt"), sha256=sha256(data), folder="checkpoints")
        expected, policy = "pickle formats", ModelPolicy(allow_private=True)
    if failure in ("private_address", "pickle"):
        with pytest.raises(ModelRejected, match=expected):
            await models.check_request([bad], policy)
    with pytest.raises((ModelUnavailable, ModelRejected), match=expected):
        await models.ensure(bad, policy)
    served = sum(file_server.requests.values())
    assert served == (1 if failure in ("sha256_mismatch", "not_found") else 0)  # not retried
    assert cache_entries(models.cache.root) == []


async def test_a_download_cut_in_the_middle_resumes_where_it_stopped(
    models: ModelService, file_server: FileServer
) -> None:
    data = os.urandom(1_000_000)
    model = spec(file_server, "big.safetensors", data, folder="checkpoints")
    file_server.cut_after["big.safetensors"] = 400_000
    path = await models.ensure(model, LOOPBACK)
    assert path.read_bytes() == data
    assert file_server.requests["big.safetensors"] == 2
    assert file_server.ranges["big.safetensors"] == [None, "bytes=400000-"]
    assert cache_entries(models.cache.root) == [f"sha256/{model.sha256[:2]}/{model.sha256}"]


async def test_a_partial_file_left_by_a_dead_process_is_resumed(
    model_settings: ModelSettings, file_server: FileServer
) -> None:
    data = os.urandom(200_000)
    model = spec(file_server, "left.safetensors", data)
    async with ModelService(model_settings) as models:
        models.cache.part_path(model.sha256).write_bytes(data[:123_456])
        await models.ensure(model, LOOPBACK)
    assert file_server.ranges["left.safetensors"] == ["bytes=123456-"]


async def test_eviction_keeps_the_budget_and_never_removes_a_pinned_file(
    model_settings: ModelSettings, file_server: FileServer
) -> None:
    async with ModelService(model_settings.model_copy(update={"cache_budget_bytes": 250_000})) as models:
        files = [spec(file_server, f"lora{index}.safetensors", os.urandom(100_000)) for index in range(4)]
        models.pin("task:needs-lora0", [files[0]])
        for model in files:
            await models.ensure(model, LOOPBACK)
        held = {model.sha256 for model in files if models.on_host(model.sha256)}
        assert files[0].sha256 in held  # pinned, though the least recently used
        assert models.cache.used_bytes() <= 250_000
        assert held == {files[0].sha256, files[3].sha256}
        models.unpin("task:needs-lora0")
        await models.ensure(files[1], LOOPBACK)
        assert not models.on_host(files[0].sha256)  # unpinned: now it may go


async def test_the_cache_is_checked_at_start(model_settings: ModelSettings, file_server: FileServer) -> None:
    good, bad = os.urandom(10_000), os.urandom(10_000)
    async with ModelService(model_settings) as models:
        kept = await models.ensure(spec(file_server, "good.safetensors", good), LOOPBACK)
        spoiled = await models.ensure(spec(file_server, "bad.safetensors", bad), LOOPBACK)
    spoiled.chmod(0o644)
    spoiled.write_bytes(b"flipped bits")
    async with ModelService(model_settings) as models:
        assert models.on_host(kept.name)
        assert not models.on_host(spoiled.name)


async def test_a_download_that_outlasts_its_retries_fails_but_keeps_its_bytes_for_a_resume(
    model_settings: ModelSettings, file_server: FileServer
) -> None:
    data = os.urandom(500_000)
    model = spec(file_server, "flaky.safetensors", data)
    file_server.cut_after["flaky.safetensors"] = 200_000
    async with ModelService(model_settings.model_copy(update={"fetch_attempts": 1})) as models:
        with pytest.raises(ModelFetchExhausted, match="gave up after 1 tries"):
            await models.ensure(model, LOOPBACK)
        assert cache_entries(models.cache.root) == [f"partial/{model.sha256}.part"]
        assert (await models.ensure(model, LOOPBACK)).read_bytes() == data
    assert file_server.ranges["flaky.safetensors"] == [None, "bytes=200000-"]


async def test_two_processes_of_one_host_download_a_file_once(
    model_settings: ModelSettings, file_server: FileServer
) -> None:
    # Two services over one cache folder stand for two comfyfleet processes of one host: they share no
    # memory, only the lock file (flock locks of separate opens exclude each other, as across processes).
    data = os.urandom(400_000)
    model = spec(file_server, "shared.safetensors", data)
    file_server.hold_at["shared.safetensors"] = 100_000
    async with ModelService(model_settings) as first, ModelService(model_settings) as second:
        one = asyncio.create_task(first.ensure(model, LOOPBACK))
        await asyncio.to_thread(file_server.holding.wait, 30)
        two = asyncio.create_task(second.ensure(model, LOOPBACK))
        file_server.release.set()
        paths = await asyncio.gather(one, two)
    assert paths[0] == paths[1]
    assert paths[0].read_bytes() == data
    assert file_server.requests["shared.safetensors"] == 1


async def test_a_worker_folder_on_another_file_system_gets_symbolic_links(
    model_settings: ModelSettings, file_server: FileServer
) -> None:
    shm = _another_file_system_than(os.path.dirname(model_settings.cache_dir))
    data = os.urandom(20_000)
    lora = spec(file_server, "far.safetensors", data)
    with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
        settings = model_settings.model_copy(update={"workers_dir": elsewhere})
        async with ModelService(settings) as models:
            paths = models.worker_paths("pool-a-0000000003")
            await models.provision([lora], paths.models_dir, LOOPBACK)
            placed = paths.models_dir / "loras" / "far.safetensors"
            assert placed.is_symlink()
            assert placed.resolve() == models.cache.path(lora.sha256).resolve()
            assert placed.read_bytes() == data


def _another_file_system_than(path: str) -> str:
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(path).st_dev:
        pytest.skip("no second file system (/dev/shm) on this machine")
    return shm


async def test_the_time_to_fetch_missing_files_is_estimated_from_recent_downloads(
    models: ModelService, file_server: FileServer
) -> None:
    held = spec(file_server, "held.safetensors", os.urandom(50_000))
    missing = "0" * 64
    assert models.fetch_estimate_s([missing]) == 0.0  # no download yet: no basis
    await models.ensure(held, LOOPBACK)
    per_file = models.fetch_estimate_s([missing])
    assert per_file > 0
    assert models.fetch_estimate_s([held.sha256]) == 0.0  # here already
    assert models.fetch_estimate_s([missing, "1" * 64, held.sha256]) == pytest.approx(2 * per_file)
