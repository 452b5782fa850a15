"""``comfyfleet serve`` as a real child process: for what only a process shows (start-up and its log lines,
signals, ``kill -9`` with nothing of the service's shutdown code running, two replicas on one store)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from support.polling import eventually, eventually_blocking

STARTUP_TIMEOUT_S = 30.0
_LISTENING = re.compile(r"api_listening url=(http://\S+)")


def clean_env() -> dict[str, str]:
    """The test's environment without COMFYFLEET_* settings that could change what the server does."""
    return {name: value for name, value in os.environ.items() if not name.startswith("COMFYFLEET_")}


class ServeProcess:
    """``python -m comfyfleet serve --port 0 …`` run in ``workdir`` with its log in ``<name>.log``.

    ``config`` (a dict) is written to ``<name>.yaml`` and passed with ``--config``; ``args`` are more flags.
    The port is the OS's choice: the URL is read from the log's ``api_listening`` line after each ``start``
    (a restart, as after ``kill``, listens on a new port)."""

    def __init__(
        self, workdir: Path, *args: str, config: dict[str, Any] | None = None, name: str = "serve"
    ) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.args = list(args)
        if config is not None:
            import yaml

            config_path = workdir / f"{name}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            self.args = ["--config", str(config_path), *self.args]
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(self) -> ServeProcess:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.url = ""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "comfyfleet", "serve", "--port", "0", *self.args],
                cwd=self.workdir,
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None, "start() the process first"
        return self._process

    @property
    def log(self) -> str:
        """Everything every run of this process logged."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _listening_url(self) -> str | None:
        match = _LISTENING.search(self.log[self._log_start :])
        if match:
            return match[1].replace("0.0.0.0", "127.0.0.1")
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log[-3000:]}")
        return None

    def wait_listening(self, within: float = STARTUP_TIMEOUT_S) -> str:
        """Block until the server says where it listens; returns (and keeps) its URL."""
        self.url = eventually_blocking(self._listening_url, within=within, what="serve listening")
        return self.url

    async def wait_ready(self, within: float = STARTUP_TIMEOUT_S) -> str:
        """Until the server listens and its ``/ready`` answers 200 (store migrated and reachable)."""
        url = await asyncio.to_thread(self.wait_listening, within)

        async def ready_status() -> int:
            try:
                async with httpx.AsyncClient(timeout=5) as http:
                    return (await http.get(f"{url}/ready")).status_code
            except httpx.HTTPError:
                assert self.process.poll() is None, self.log[-3000:]
                return 0

        await eventually(ready_status, until=lambda status: status == 200, within=within, what=f"{url}/ready")
        return url

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the process (SIGTERM: a graceful stop) and wait for it; returns its exit status."""
        if self._process is None:
            return 0
        if self._process.poll() is None:
            self._process.send_signal(signum)
        try:
            return self._process.wait(timeout=STARTUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return self._process.wait()

    async def stop_in_thread(self, signum: int = signal.SIGTERM) -> int:
        """``stop`` from async code: the event loop keeps running meanwhile. It must when it hosts emulators
        the server talks to as it shuts down (closing their WebSockets), or each close waits out its timeout."""
        return await asyncio.to_thread(self.stop, signum)

    def kill(self) -> None:
        """SIGKILL: no shutdown code of the service runs."""
        self.stop(signal.SIGKILL)
