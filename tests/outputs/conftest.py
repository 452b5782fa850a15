"""Fixtures for the output stores: a real S3 HTTP server on loopback (moto's standalone server), an AWS
environment that sees nothing of this machine, a fresh bucket per test, and ``backend``, parametrised over
every output store so the contract suite runs against each."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.outputs import OutputStore, open_outputs

TEST_REGION = "us-east-1"
TEST_ACCESS_KEY = "comfyfleet-test"
TEST_SECRET_KEY = "comfyfleet-test-secret"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of an S3-compatible server for this test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Test credentials only: no ~/.aws, no profile, no instance metadata, no endpoint from the environment."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", TEST_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3_admin(s3_endpoint: str) -> Any:
    """A plain boto3 client on the test server, to look at the bucket from outside the store."""
    import boto3.session

    session = boto3.session.Session(
        aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY, region_name=TEST_REGION
    )
    return session.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3_bucket(s3_admin: Any, aws_environment: None) -> str:
    """A new empty bucket, with the AWS environment set for the stores that use it."""
    name = f"outputs-{uuid.uuid4().hex[:16]}"
    s3_admin.create_bucket(Bucket=name)
    return name


def bucket_keys(admin: Any, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


@dataclass
class Backend:
    name: str
    store: OutputStore
    # Everything the backend holds anywhere it can write (files under tmp_path, keys of the bucket).
    everything: Callable[[], set[str]]


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        root = tmp_path / "outputs"

        def files() -> set[str]:
            # The whole of tmp_path, so a file written beside the root (an escape) shows up too.
            return {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file()}

        return Backend("local", open_outputs(str(root)), files)
    endpoint = request.getfixturevalue("s3_endpoint")
    admin = request.getfixturevalue("s3_admin")
    bucket = request.getfixturevalue("s3_bucket")

    def keys() -> set[str]:
        return bucket_keys(admin, bucket)

    return Backend(
        "s3", open_outputs(f"s3://{bucket}/runs/a?endpoint_url={endpoint}&region={TEST_REGION}"), keys
    )
