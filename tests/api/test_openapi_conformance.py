"""The OpenAPI document tells the truth: schemathesis sends what ``/openapi.json`` describes to a real server
(a ComfyUI emulator as its worker, SQLite) and checks every answer against the document — no server error,
every status and content type documented, every body in its documented schema, ``Allow`` listing exactly the
documented methods — with API keys (a tenant's key, and no key at all) and without.

Bounded and deterministic: a fixed seed, derandomized generation and a small number of examples per operation,
so it runs in the test command on every change. A bigger run by hand (it prints how many requests it made)::

    COMFYFLEET_CONFORMANCE_EXAMPLES=300 pytest -s tests/api/test_openapi_conformance.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from api_helpers import API_KEYS, bearer
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from comfyfleet.config import Settings
from comfyfleet.runtime import create_app
from comfyfleet.store import open_store
from support import FleetThread

# Some of schemathesis' own strategies draw from `random` (seen in long runs); hypothesis warns, and warnings
# are errors in this suite. The warning is about schemathesis, not about the server.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
)

# What the document promises about every answer (schemathesis' response conformance checks), and nothing
# about which requests the server should accept: refusing more than the schema says is the server's right.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "unsupported_method",
    "allow_header_conformance",
]
EXAMPLES_PER_OPERATION = int(os.environ.get("COMFYFLEET_CONFORMANCE_EXAMPLES", "12"))
SEED = 20_240_901
# `?wait=` may hold a submission up to 10 minutes while no worker is free (schemathesis may drain the worker
# in open mode); a short cap keeps the run bounded without changing what is checked.
MAX_WAIT_S = 1.0
REQUEST_TIMEOUT_S = 30.0
STREAM_READ_S = 0.5


@dataclass
class Served:
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    requests: int = 0


# name: (API keys configured, the headers the client sends)
CONFIGURATIONS = {
    "open": (False, {}),
    "tenant-key": (True, bearer("alice")),
    "without-key": (True, {}),
}


@pytest.fixture(scope="module", params=list(CONFIGURATIONS))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    keyed, headers = CONFIGURATIONS[request.param]
    workdir = tmp_path_factory.mktemp(f"conformance-{request.param}")
    # One emulator as its worker; the server is up once the worker is usable.
    with FleetThread(workdir, workers=1, api_keys=API_KEYS if keyed else []) as fleet:
        served = Served(fleet.url, dict(headers))
        yield served
    if "COMFYFLEET_CONFORMANCE_EXAMPLES" in os.environ:
        print(f"\nconformance {request.param}: {served.requests} requests")


def _document() -> dict[str, Any]:
    """The OpenAPI document, as the application builds it (it depends neither on the store nor on the keys)."""
    settings = Settings(store="sqlite:///never-opened.db")
    return create_app(settings, open_store(settings.store)).openapi()


schema = schemathesis.openapi.from_dict(
    _document(),
    config=SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "request-timeout": REQUEST_TIMEOUT_S,
            "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        }
    ),
)


@pytest.mark.slow
@schema.parametrize()
@settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_as_documented(case: Any, served: Served) -> None:
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > MAX_WAIT_S:
        case.query["wait"] = MAX_WAIT_S
    # An event stream never ends: its status, headers and first events are read for this long.
    timeout = STREAM_READ_S if case.path.endswith("/events") else REQUEST_TIMEOUT_S
    served.requests += 1
    case.call_and_validate(base_url=served.url, headers=served.headers, timeout=timeout)
