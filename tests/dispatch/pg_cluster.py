"""A private PostgreSQL server for tests that stop and start it: ``initdb`` into a temporary directory, on a
free loopback port, run as the ``postgres`` OS user when the test runs as root (PostgreSQL refuses root).

The shared test server (``COMFYFLEET_TEST_POSTGRES``) must never be stopped by a test; this one is the
test's own. Under ``CI=true`` missing binaries fail the test instead of skipping it.
"""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
from pathlib import Path


def postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: ``pg_config --bindir``, else the Debian layout."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(found.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    def __init__(self, bindir: Path, root: Path, os_user: str | None) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = _free_port()
        self.os_user = os_user
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=False,
            user=self.os_user,
            group=self.os_user,
            cwd=self.root,
            timeout=120,
        )
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}{log}")

    def initdb(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8",
            "--locale=C",
        )  # fmt: skip

    def start(self) -> None:
        # fsync off only trades durability against an OS crash; an immediate stop (a killed server) keeps
        # every committed transaction, as on a production server.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"
        )

    def stop_immediately(self) -> None:
        """``pg_ctl stop -m immediate``: every backend dies at once, as in a crash of the server."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
            user=self.os_user,
            group=self.os_user,
            cwd=self.root,
        )
        shutil.rmtree(self.root, ignore_errors=True)
