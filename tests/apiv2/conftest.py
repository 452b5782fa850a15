"""Fixtures of the Comfy API v2 tests: a running fleet (two emulator workers) and the official SDK pointed at
it the way its users point it at Comfy Cloud: ``COMFY_BASE_URL`` and ``COMFY_API_KEY``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from comfy_sdk import AsyncComfy

from support import Fleet, running_fleet

ROOT = Path(__file__).resolve().parents[2]
SDK_SDIST = "comfy-sdk==0.5.0"
SPEC_CACHE = ROOT / ".test-run" / "comfy-sdk-0.5.0"


KEYS = [
    {"key": "key-alice", "tenant": "alice"},
    {"key": "key-bob", "tenant": "bob"},
]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """comfyfleet with two emulator workers (slow enough samplers to be seen running) and two tenants."""
    async with running_fleet(
        tmp_path, workers=2, emulator={"step_time_s": 0.01, "previews": True}, api_keys=KEYS
    ) as running:
        yield running


@pytest.fixture
def sdk(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Callable[..., AsyncComfy]:
    """``sdk(key)``: an AsyncComfy client of the tenant of that key, against the fleet."""
    monkeypatch.setenv("COMFY_BASE_URL", fleet.url)
    monkeypatch.delenv("COMFY_API_KEY", raising=False)

    def client(key: str = "key-alice", **options: Any) -> AsyncComfy:
        return AsyncComfy(api_key=key, **options)

    return client


def _pip() -> list[str]:
    """A pip to download with: the test environment's, else the system's, else uv's."""
    for candidate in ([sys.executable, "-m", "pip"], ["python3", "-m", "pip"]):
        if subprocess.run([*candidate, "--version"], capture_output=True, check=False).returncode == 0:
            return candidate
    uvx = shutil.which("uvx")
    if uvx is None:
        pytest.fail("no pip (nor uvx) to download the comfy-sdk source distribution with")
    return [uvx, "pip"]


@pytest.fixture(scope="session")
def comfy_spec() -> Path:
    """Comfy API v2's published specification, ``spec/openapi.yaml`` of the comfy-sdk 0.5.0 source
    distribution (downloaded once into ``.test-run/``; the project keeps no copy)."""
    spec = SPEC_CACHE / "openapi.yaml"
    if spec.exists():
        return spec
    downloads = SPEC_CACHE / "download"
    answer = subprocess.run(
        [*_pip(), "download", "--no-deps", "--no-binary", ":all:", SDK_SDIST, "-d", str(downloads), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    archives = sorted(downloads.glob("comfy_sdk-0.5.0.tar.gz"))
    if answer.returncode != 0 or not archives:
        pytest.fail(f"could not download the {SDK_SDIST} source distribution:\n{answer.stderr[-2000:]}")
    with tarfile.open(archives[0]) as archive:
        member = archive.extractfile("comfy_sdk-0.5.0/spec/openapi.yaml")
        assert member is not None
        spec.write_bytes(member.read())
    return spec
