"""Shared fixtures. Store fixtures: ``sqlite_store``, ``postgres_store`` and ``store`` (parametrised over both),
plus ``postgres_url`` (a fresh database of its own, for tests that open several store instances).

PostgreSQL: the schema is built once per session into a template database, and every test gets a clone
(``CREATE DATABASE … TEMPLATE …``), dropped afterwards. The server is ``COMFYFLEET_TEST_POSTGRES``
(default ``postgresql://postgres@127.0.0.1:5432/test``). When it cannot be reached the PostgreSQL tests are
skipped, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from comfyfleet.store import Store, open_store

POSTGRES_URL = os.environ.get("COMFYFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
# Every database a test session creates starts with this and its pid, so a later session can tell the
# leftovers of a killed run (pid gone) from those of a run going on right now.
TEST_DATABASE_PREFIX = "cf_test_"


def postgres_database_url(database: str) -> str:
    """``POSTGRES_URL`` pointing at another database of the same server."""
    return urlsplit(POSTGRES_URL)._replace(path=f"/{database}").geturl()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _admin_execute(*statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _drop_leftovers() -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        names = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", TEST_DATABASE_PREFIX + "%"
        )
        for (name,) in names:
            pid_text = name.removeprefix(TEST_DATABASE_PREFIX).split("_", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _build_template(name: str) -> None:
    await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    async with open_store(postgres_database_url(name)) as store:
        await store.migrate()


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """The name of a migrated template database; skips (fails under CI=true) when PostgreSQL is down."""
    try:
        asyncio.run(_drop_leftovers())
    except Exception as exc:
        message = f"PostgreSQL is unreachable at {POSTGRES_URL} ({type(exc).__name__}: {exc}); scripts/test starts it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    name = f"{TEST_DATABASE_PREFIX}{os.getpid()}_template"
    asyncio.run(_build_template(name))
    yield name
    asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@asynccontextmanager
async def scratch_database(template: str | None) -> AsyncIterator[str]:
    """A new database (a clone of ``template``, or empty), dropped on exit; yields its URL."""
    name = f"{TEST_DATABASE_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
    clone = f' TEMPLATE "{template}"' if template else ""
    await _admin_execute(f'CREATE DATABASE "{name}"{clone}')
    try:
        yield postgres_database_url(name)
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_admin_url(postgres_template: str) -> str:
    """The server's own database (``COMFYFLEET_TEST_POSTGRES``), for creating and dropping others."""
    return POSTGRES_URL


@pytest.fixture
async def postgres_url(postgres_template: str) -> AsyncIterator[str]:
    """A fresh migrated database of this test's own, cloned from the template."""
    async with scratch_database(postgres_template) as url:
        yield url


@pytest.fixture
async def empty_postgres_url(postgres_template: str) -> AsyncIterator[str]:
    """A fresh database without the schema (for migration tests)."""
    async with scratch_database(None) as url:
        yield url


@pytest.fixture
async def postgres_store(postgres_url: str) -> AsyncIterator[Store]:
    async with open_store(postgres_url, max_connections=4) as store:
        yield store


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
async def sqlite_store(sqlite_url: str) -> AsyncIterator[Store]:
    async with open_store(sqlite_url) as store:
        await store.migrate()
        yield store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> Store:
    """Each test using it runs once per backend."""
    opened: Store = request.getfixturevalue(f"{request.param}_store")
    return opened


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], AbstractAsyncContextManager[Store]]:
    """``async with factory() as store``: a brand-new migrated store each call (of each backend in turn),
    for tests that need many independent stores, such as hypothesis state machines."""
    template = request.getfixturevalue("postgres_template") if request.param == "postgres" else None

    @asynccontextmanager
    async def fresh() -> AsyncIterator[Store]:
        if template is None:
            url = f"sqlite:///{tmp_path / uuid.uuid4().hex}.db"
            async with open_store(url) as store:
                await store.migrate()
                yield store
            return
        async with scratch_database(template) as url, open_store(url, max_connections=2) as store:
            yield store

    return fresh
