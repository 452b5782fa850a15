"""comfyfleet's /api/v2 against Comfy API v2's published specification (the OpenAPI document of the
comfy-sdk 0.5.0 source distribution): schemathesis generates requests for every operation and checks that no
answer is a server error and every answer matches its documented schema; the live events are checked against
the spec's event catalogue (``x-sse-events``)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from support import Fleet, eventually, seed_workflow, tiny_workflow

ALICE = {"Authorization": "Bearer key-alice"}
ST_TIMEOUT_S = 600


def inlined(value: Any, spec: dict[str, Any]) -> Any:
    """``value`` with every ``$ref`` into ``spec`` replaced by what it names (the spec has no cycles)."""
    if isinstance(value, dict):
        if "$ref" in value:
            target: Any = spec
            for part in value["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return inlined(target, spec)
        if value.get("nullable") and len(value.get("allOf", ())) == 1:
            # `allOf: [X]` with `nullable` means "X or null" (OpenAPI 3.0); the validator reads the allOf alone.
            merged = {**value, **inlined(value["allOf"][0], spec), "nullable": True}
            del merged["allOf"]
            return inlined(merged, spec)
        return {key: inlined(item, spec) for key, item in value.items()}
    if isinstance(value, list):
        return [inlined(item, spec) for item in value]
    return value


def load(spec: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(spec.read_text())
    return document


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


async def schemathesis(spec: Path, fleet: Fleet, config: Path, *options: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        str(spec),
        "--url",
        fleet.url,
        "--header",
        f"Authorization: {ALICE['Authorization']}",
        "--seed",
        "20260",
        "--no-color",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=config.parent,  # where schemathesis keeps its cache
    )
    output, _ = await asyncio.wait_for(process.communicate(), ST_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.slow
async def test_no_server_error_and_no_schema_violation(
    comfy_spec: Path, fleet: Fleet, tmp_path: Path
) -> None:
    # Real ids for the operations that read one (else every generated id is a 404 and nothing more is tested).
    created = await fleet.http.post("/api/v2/jobs", json={"workflow": tiny_workflow()}, headers=ALICE)
    job_id = created.json()["id"]

    async def ended() -> bool:
        job = (await fleet.http.get(f"/api/v2/jobs/{job_id}", headers=ALICE)).json()
        return bool(job["status"] == "succeeded")

    await eventually(ended, within=30)
    asset = (
        await fleet.http.post(
            "/api/v2/assets",
            data={"content_type": "text/plain", "file_path": "notes.txt"},
            files={"file": ("notes.txt", b"some bytes", "text/plain")},
            headers=ALICE,
        )
    ).json()
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f"""
[[operations]]
include-path-regex = "^/api/v2/jobs/\\\\{{id\\\\}}"
parameters = {{ id = {toml_string(job_id)} }}

[[operations]]
include-path-regex = "^/api/v2/assets/\\\\{{id\\\\}}"
parameters = {{ id = {toml_string(asset["id"])} }}

[[operations]]
include-path-regex = "^/api/v2/assets/by-hash/"
parameters = {{ hash = {toml_string(asset["hash"])} }}
"""
    )
    checks = "not_a_server_error,response_schema_conformance"
    # The event stream's declared schema is ``type: string`` (the whole stream), which schemathesis applies to
    # each event: its events are checked against the catalogue below instead, and here for server errors only.
    code, output = await schemathesis(
        comfy_spec,
        fleet,
        config,
        "--checks",
        checks,
        "--exclude-path-regex",
        "/events$",
        "--max-examples",
        "25",
    )
    assert code == 0, output
    assert "Tested: 10" in output, output  # every operation but the stream
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated is not None, output
    assert int(generated[1]) == int(generated[2]) > 100, output
    code, output = await schemathesis(
        comfy_spec, fleet, config, "--checks", "not_a_server_error", "--include-path-regex", "/events$",
        "--max-examples", "10",
    )  # fmt: skip
    assert code == 0, output
    assert "Tested: 1" in output, output


async def test_events_match_the_spec_catalogue(comfy_spec: Path, fleet: Fleet) -> None:
    spec = load(comfy_spec)
    catalogue = spec["paths"]["/api/v2/jobs/{id}/events"]["get"]["x-sse-events"]
    validators = {
        kind: OAS30Validator(inlined({"$ref": entry["schema"]}, spec)) for kind, entry in catalogue.items()
    }
    created = await fleet.http.post(
        "/api/v2/jobs", json={"workflow": seed_workflow(steps=60, seed=3)}, headers=ALICE
    )
    job_id = created.json()["id"]
    seen: set[str] = set()
    kind = ""
    async with fleet.http.stream("GET", f"/api/v2/jobs/{job_id}/events", headers=ALICE, timeout=60) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        async for line in answer.aiter_lines():
            if line.startswith("id:"):
                raise AssertionError("v2 events carry no id (there is no replay)")
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert kind in validators, kind
                validators[kind].validate(json.loads(line.removeprefix("data: ")))
                seen.add(kind)
    assert {"status", "progress", "preview", "output"} <= seen
    job = (await fleet.http.get(f"/api/v2/jobs/{job_id}", headers=ALICE)).json()
    OAS30Validator(inlined({"$ref": "#/components/schemas/Job"}, spec)).validate(job)
    assert job["status"] == "succeeded"
