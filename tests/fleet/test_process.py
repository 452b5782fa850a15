"""The process provider's own promises: one GPU entry per worker via CUDA_VISIBLE_DEVICES, output kept in a log
file per worker, SIGKILL after the grace when SIGTERM is ignored, placeholders checked up front."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from fleet_helpers import pool

from comfyfleet.fleet.errors import FleetConfigError, ProviderRejected
from comfyfleet.fleet.providers import InstanceState, ProviderContext, build_provider
from support import eventually

SLEEPER = [
    "{python}",
    "-c",
    "import sys, time; print('worker on port', sys.argv[1], flush=True); time.sleep(60)",
    "{port}",
]
STUBBORN = [
    "{python}", "-c",
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
    "{port}",
]  # fmt: skip


async def _contains(path: Path, text: str) -> bool:
    return text in await asyncio.to_thread(path.read_text)


async def _has_line(path: Path, line: str) -> bool:
    return line in (await asyncio.to_thread(path.read_text)).splitlines()


def pid_of(provider_id: str) -> int:
    return int(provider_id.split("@")[0])


async def environ_of(provider_id: str) -> dict[str, str]:
    """The worker's environment once it runs its command (right after the fork it still shows ours)."""
    found: dict[str, str] = {}

    async def executed() -> bool:
        found.update(psutil.Process(pid_of(provider_id)).environ())
        return "COMFYFLEET_WORKER_ID" in found

    await eventually(executed, what=f"process {provider_id} runs its command")
    return found


async def test_each_worker_gets_its_own_gpu_and_a_log(
    provider_context: ProviderContext, tmp_path: Path
) -> None:
    settings = {
        "command": SLEEPER,
        "gpus": [0, "1,2"],
        "log_dir": str(tmp_path / "logs"),
        "env": {"EXTRA": "yes"},
    }
    async with build_provider(pool("gpu", "process", settings), provider_context) as provider:
        first = await provider.create("gpu-00000000a1")
        second = await provider.create("gpu-00000000a2")
        with pytest.raises(ProviderRejected, match="every configured GPU already has a worker"):
            await provider.create("gpu-00000000a3")
        environments = [await environ_of(h.provider_id) for h in (first, second)]
        assert [env["CUDA_VISIBLE_DEVICES"] for env in environments] == ["0", "1,2"]
        assert all(env["EXTRA"] == "yes" for env in environments)
        assert [env["COMFYFLEET_WORKER_ID"] for env in environments] == ["gpu-00000000a1", "gpu-00000000a2"]
        assert {env["COMFYFLEET_INSTALLATION"] for env in environments} == {provider_context.installation}
        await provider.terminate(first.provider_id)
        third = await provider.create("gpu-00000000a3")  # the freed GPU is handed out again
        assert (await environ_of(third.provider_id))["CUDA_VISIBLE_DEVICES"] == "0"
        log = tmp_path / "logs" / "gpu-00000000a2.log"
        port = second.endpoint.rsplit(":", 1)[1] if second.endpoint else "?"
        await eventually(
            lambda: _contains(log, f"worker on port {port}"), what="the worker's output is in its log"
        )
        assert "starting:" in log.read_text()  # the command line is logged before the worker's own output


async def test_a_worker_ignoring_sigterm_is_killed_after_the_grace(
    provider_context: ProviderContext, tmp_path: Path
) -> None:
    settings = {"command": STUBBORN, "terminate_grace_s": 0.5, "log_dir": str(tmp_path)}
    async with build_provider(pool("gpu", "process", settings), provider_context) as provider:
        handle = await provider.create("gpu-00000000b1")
        log = tmp_path / "gpu-00000000b1.log"
        await eventually(
            lambda: _has_line(log, "ready"), what="the stubborn worker ignores SIGTERM from now on"
        )
        started = time.monotonic()
        await provider.terminate(handle.provider_id)
        took = time.monotonic() - started
        assert 0.5 <= took < 5
        assert (await provider.describe(handle.provider_id)).state is InstanceState.GONE


def test_the_command_must_take_a_port(provider_context: ProviderContext) -> None:
    with pytest.raises(FleetConfigError, match=r"must contain \{port\}"):
        build_provider(pool("gpu", "process", {"command": "python main.py"}), provider_context)
    with pytest.raises(FleetConfigError, match=r"unknown placeholder 'gpu_id'"):
        build_provider(
            pool("gpu", "process", {"command": "python main.py --port {port} --gpu {gpu_id}"}),
            provider_context,
        )


async def test_an_exit_we_did_not_ask_for_is_logged_with_its_signal(
    provider_context: ProviderContext, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="comfyfleet.fleet.providers.process")
    settings = {"command": SLEEPER, "log_dir": str(tmp_path), "terminate_grace_s": 3}
    async with build_provider(pool("gpu", "process", settings), provider_context) as provider:
        killed = await provider.create("gpu-00000000c1")
        stopped = await provider.create("gpu-00000000c2")
        await environ_of(killed.provider_id)
        os.kill(pid_of(killed.provider_id), signal.SIGKILL)
        expected = (
            f"worker_process_killed worker_id=gpu-00000000c1 pid={pid_of(killed.provider_id)} signal=SIGKILL"
        )

        async def logged() -> bool:
            return expected in caplog.messages

        await eventually(logged, what="the killed worker is logged")
        assert "exited on SIGKILL" in str((await provider.describe(killed.provider_id)).error)
        await provider.terminate(stopped.provider_id)  # our own SIGTERM: nothing to report
        await provider.terminate(killed.provider_id)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert [record.getMessage() for record in warnings] == [expected]
