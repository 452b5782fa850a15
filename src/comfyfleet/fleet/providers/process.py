"""``process``: ComfyUI servers as child processes on this host.

The command is a template, so the same code runs real ComfyUI (``python main.py --listen 127.0.0.1 --port
{port}``) or the emulator (``{python} -m comfyfleet emulator --port {port}``). Placeholders: ``{port}`` (a free
port chosen here), ``{host}``, ``{python}`` (this interpreter), ``{worker_id}``, ``{pool}``, ``{gpu}``.

- ``gpus: [0, 1]``: each worker gets one entry of the list as ``CUDA_VISIBLE_DEVICES`` (a string entry such as
  ``"0,1"`` gives a worker two GPUs); at most one worker per entry at a time.
- Output goes to ``<log_dir>/<worker_id>.log`` (kept after the worker stops, for post-mortems).
- Each child runs in its own session (process group) with ``COMFYFLEET_WORKER_ID``, ``COMFYFLEET_POOL``,
  ``COMFYFLEET_NAMESPACE`` and ``COMFYFLEET_INSTALLATION`` in its environment: that is how ``list_ours`` finds
  children left by a comfyfleet that was killed, so a restart adopts or reaps them, and how it leaves alone
  the children of another installation on the same host (same namespace and pool names, another store). The
  provider id is ``<pid>@<start time>`` so a reused pid is never mistaken for our child.
- Terminate: SIGTERM to the group, SIGKILL after ``terminate_grace_s``.
- A child that exits without being asked is logged at once (``worker_process_killed`` with the signal's name,
  or ``worker_process_exited`` with its exit code): ComfyUI and the emulator exit 0 on SIGTERM, so their own
  log does not say that someone else stopped them. The manager sees it too (the probe fails and ``describe``
  says failed), fails the worker and lets the autoscaler start a replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self, cast

import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator

from comfyfleet.fleet.errors import ProviderRejected, ProviderUnavailable
from comfyfleet.fleet.providers.base import Instance, InstanceState, ProviderHandle, parse_pool_settings
from comfyfleet.models.links import WorkerPaths, worker_paths

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig
    from comfyfleet.fleet.providers import ProviderContext

logger = logging.getLogger(__name__)

ENV_WORKER_ID = "COMFYFLEET_WORKER_ID"
ENV_POOL = "COMFYFLEET_POOL"
ENV_NAMESPACE = "COMFYFLEET_NAMESPACE"
ENV_INSTALLATION = "COMFYFLEET_INSTALLATION"
ENV_PORT = "COMFYFLEET_WORKER_PORT"
_PLACEHOLDERS = ("port", "host", "python", "worker_id", "pool", "gpu", "models_dir", "extra_model_paths")


class ProcessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str | list[str]
    host: str = "127.0.0.1"
    gpus: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    log_dir: str | None = None  # default: <state dir>/<pool>/logs, relative to the working directory
    terminate_grace_s: float = Field(default=10.0, ge=0)

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_ids_as_text(cls, value: object) -> object:
        if isinstance(value, list):
            return [str(item) for item in value]
        return value

    @field_validator("command")
    @classmethod
    def _known_placeholders(cls, value: str | list[str]) -> str | list[str]:
        parts = shlex.split(value) if isinstance(value, str) else value
        if not parts:
            raise ValueError("command is empty")
        for part in parts:
            try:
                part.format(**{name: "" for name in _PLACEHOLDERS})
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"command part {part!r}: unknown placeholder {exc}; use {', '.join('{' + n + '}' for n in _PLACEHOLDERS)}"
                ) from None
        if not any("{port}" in part for part in parts):
            raise ValueError("command must contain {port} so each worker listens on its own port")
        return value


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _provider_id(proc: psutil.Process) -> str:
    return f"{proc.pid}@{proc.create_time():.2f}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"process exited on {_signal_name(-returncode)}"
    return f"process exited with code {returncode}"


class _WorkerProcess(asyncio.SubprocessProtocol):
    """One child we started. Its exit is seen the moment it happens, and logged unless we asked for it."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.stopping = False  # we sent it SIGTERM / SIGKILL ourselves
        self._exited = asyncio.Event()
        self._transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.SubprocessTransport", transport)

    @property
    def pid(self) -> int:
        assert self._transport is not None
        return self._transport.get_pid()

    @property
    def returncode(self) -> int | None:
        return None if self._transport is None else self._transport.get_returncode()

    async def wait(self) -> int | None:
        await self._exited.wait()
        return self.returncode

    def process_exited(self) -> None:
        code = self.returncode
        self._exited.set()
        if self._transport is not None:
            self._transport.close()  # it has exited: this only releases the transport
        if self.stopping or code is None:
            return
        if code < 0:
            logger.warning(
                "worker_process_killed worker_id=%s pid=%s signal=%s",
                self.worker_id,
                self.pid,
                _signal_name(-code),
            )
        else:
            logger.warning(
                "worker_process_exited worker_id=%s pid=%s code=%s", self.worker_id, self.pid, code
            )


class ProcessProvider:
    kind = "process"

    def __init__(self, pool: PoolConfig, context: ProviderContext) -> None:
        self.pool = pool.name
        self.settings = parse_pool_settings(ProcessSettings, pool)
        self._namespace = context.namespace
        self._installation = context.installation
        self._workers_dir = context.workers_dir
        self._log_dir = (
            Path(self.settings.log_dir) if self.settings.log_dir else context.state_dir / pool.name / "logs"
        )
        self._children: dict[str, _WorkerProcess] = {}  # provider id -> our own child
        self._gpu_of: dict[str, str] = {}  # provider id -> gpu entry
        self._worker_of: dict[str, str] = {}  # provider id -> worker id

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # A child that is still ours when comfyfleet stops cleanly would keep a port (and a GPU) forever.
        await asyncio.gather(*(self.terminate(provider_id) for provider_id in list(self._children)))

    @property
    def stops_with_control_plane(self) -> bool:
        return True

    def _command(self, worker_id: str, port: int, gpu: str | None, paths: WorkerPaths) -> list[str]:
        raw = self.settings.command
        parts = shlex.split(raw) if isinstance(raw, str) else list(raw)
        values = {
            "port": str(port),
            "host": self.settings.host,
            "python": sys.executable,
            "worker_id": worker_id,
            "pool": self.pool,
            "gpu": gpu or "",
            "models_dir": str(paths.models_dir),
            "extra_model_paths": str(paths.extra_model_paths),
        }
        return [part.format(**values) for part in parts]

    async def create(self, worker_id: str) -> ProviderHandle:
        gpu: str | None = None
        if self.settings.gpus is not None:
            taken = set(self._gpu_of.values())
            gpu = next((entry for entry in self.settings.gpus if entry not in taken), None)
            if gpu is None:
                raise ProviderRejected(
                    f"process pool {self.pool!r}: every configured GPU already has a worker"
                )
        port = free_port(self.settings.host)
        paths = worker_paths(self._workers_dir, worker_id)
        command = self._command(worker_id, port, gpu, paths)
        env = {
            **os.environ,
            **self.settings.env,
            ENV_WORKER_ID: worker_id,
            ENV_POOL: self.pool,
            ENV_NAMESPACE: self._namespace,
            ENV_INSTALLATION: self._installation,
            ENV_PORT: str(port),
        }
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{worker_id}.log"
        with log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {shlex.join(command)}\n".encode())
            log.flush()
            try:
                _, child = await asyncio.get_running_loop().subprocess_exec(
                    lambda: _WorkerProcess(worker_id),
                    *command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.settings.cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ProviderRejected(f"cannot run {command[0]!r}: {exc.strerror or exc}") from exc
        try:
            provider_id = _provider_id(psutil.Process(child.pid))
        except psutil.Error as exc:
            raise ProviderUnavailable(f"the worker process exited at once; see {log_path}") from exc
        self._children[provider_id] = child
        self._worker_of[provider_id] = worker_id
        if gpu is not None:
            self._gpu_of[provider_id] = gpu
        endpoint = f"http://{self._connect_host()}:{port}"
        return ProviderHandle(
            provider_id,
            endpoint=endpoint,
            info={"log": str(log_path), "gpu": gpu, "pid": child.pid, "models_dir": str(paths.models_dir)},
        )

    def _connect_host(self) -> str:
        host = self.settings.host
        return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)

    def _find(self, provider_id: str) -> psutil.Process | None:
        pid_text, _, started = provider_id.partition("@")
        try:
            proc = psutil.Process(int(pid_text))
            if started and f"{proc.create_time():.2f}" != started:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except (psutil.Error, ValueError):
            return None
        return proc

    async def describe(self, provider_id: str) -> Instance:
        child = self._children.get(provider_id)
        if child is not None and child.returncode is not None:
            return Instance(
                provider_id,
                InstanceState.FAILED,
                worker_id=self._worker_of.get(provider_id),
                error=_exit_text(child.returncode),
                raw_state="exited",
            )
        proc = self._find(provider_id)
        if proc is None:
            return Instance(provider_id, InstanceState.GONE, raw_state="gone")
        port = self._env(proc).get(ENV_PORT)
        endpoint = f"http://{self._connect_host()}:{port}" if port else None
        return Instance(
            provider_id,
            InstanceState.RUNNING,
            worker_id=self._worker_of.get(provider_id),
            endpoint=endpoint,
            raw_state=proc.status(),
        )

    @staticmethod
    def _env(proc: psutil.Process) -> dict[str, str]:
        try:
            environ: dict[str, str] = proc.environ()
            return environ
        except psutil.Error:
            return {}

    async def terminate(self, provider_id: str) -> None:
        child = self._children.pop(provider_id, None)
        if child is not None:
            child.stopping = True
        self._gpu_of.pop(provider_id, None)
        self._worker_of.pop(provider_id, None)
        proc = self._find(provider_id)
        if proc is None:
            if child is not None:
                await child.wait()
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        if await self._wait_gone(proc, child, self.settings.terminate_grace_s):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await self._wait_gone(proc, child, 5.0)

    @staticmethod
    async def _wait_gone(proc: psutil.Process, child: _WorkerProcess | None, timeout_s: float) -> bool:
        if child is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await child.wait()
            except TimeoutError:
                return False
            return True
        # Not our child (adopted after a restart): poll until it is gone (it may vanish between two looks).
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
            await asyncio.sleep(0.05)
        return not proc.is_running()

    async def list_ours(self) -> list[Instance]:
        return await asyncio.to_thread(self._scan)

    def _scan(self) -> list[Instance]:
        found: list[Instance] = []
        for proc in psutil.process_iter():
            env = self._env(proc)
            if (
                env.get(ENV_INSTALLATION) != self._installation
                or env.get(ENV_NAMESPACE) != self._namespace
                or env.get(ENV_POOL) != self.pool
            ):
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                # Only the session leader is the worker; its own children carry the same environment.
                if os.getsid(proc.pid) != proc.pid:
                    continue
                provider_id = _provider_id(proc)
            except (psutil.Error, ProcessLookupError):
                continue
            port = env.get(ENV_PORT)
            found.append(
                Instance(
                    provider_id,
                    InstanceState.RUNNING,
                    worker_id=env.get(ENV_WORKER_ID),
                    endpoint=f"http://{self._connect_host()}:{port}" if port else None,
                    raw_state="running",
                )
            )
        return found

    def adopt(self, provider_id: str, worker_id: str) -> None:
        self._worker_of[provider_id] = worker_id
        proc = self._find(provider_id)
        gpu = self._env(proc).get("CUDA_VISIBLE_DEVICES") if proc is not None else None
        if gpu is not None and self.settings.gpus is not None and gpu in self.settings.gpus:
            self._gpu_of[provider_id] = gpu
