"""Fixtures of the dispatch tests: a private PostgreSQL server that a test may stop and start."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pg_cluster import PrivateCluster, postgres_bindir


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; the test command installs PostgreSQL's server binaries")
    pytest.skip(reason)


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    """A running PostgreSQL server of this test's own (database ``postgres``, user ``postgres``, trust)."""
    bindir = postgres_bindir()
    if bindir is None:
        _unavailable("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    assert bindir is not None
    os_user: str | None = None
    root = Path(tempfile.mkdtemp(prefix="comfyfleet-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            _unavailable("running as root, and there is no 'postgres' OS user to run PostgreSQL as")
            raise
        os_user = "postgres"
        os.chown(root, account.pw_uid, account.pw_gid)
    cluster = PrivateCluster(bindir, root, os_user)
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
