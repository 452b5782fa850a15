"""What only the S3 store does: where objects land, multipart uploads, S3's own failures, and how an
``s3://`` location is read (and refused)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.config import load_settings
from comfyfleet.outputs import OutputsError, OutputsUnavailable, StoredOutput, open_outputs
from comfyfleet.runtime import Runtime, StartupError

from .conftest import TEST_REGION, bucket_keys
from .test_contract import chunked, payload

PART = 8 * 1024 * 1024


async def test_objects_land_under_the_prefix_with_their_content_type(
    s3_endpoint: str, s3_bucket: str, s3_admin: Any
) -> None:
    # Empty segments of the prefix are dropped: "//runs//a/" is "runs/a".
    store = open_outputs(f"s3://{s3_bucket}//runs//a/?endpoint_url={s3_endpoint}")
    await store.put("task-1", "ComfyUI_00001_.png", chunked(b"png bytes"), "image/png")
    bare = open_outputs(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}")
    await bare.put("task-2", "clip.mp4", chunked(b"mp4 bytes"), "video/mp4")
    assert bucket_keys(s3_admin, s3_bucket) == {"runs/a/task-1/ComfyUI_00001_.png", "task-2/clip.mp4"}
    head = s3_admin.head_object(Bucket=s3_bucket, Key="runs/a/task-1/ComfyUI_00001_.png")
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(b"png bytes")
    # An object put there by anything else is read like one of ours.
    s3_admin.put_object(Bucket=s3_bucket, Key="task-3/external.jpg", Body=b"jpeg", ContentType="image/jpeg")
    assert await bare.stat("task-3", "external.jpg") == StoredOutput("external.jpg", 4, "image/jpeg")


async def test_large_files_go_up_in_parts_small_ones_in_one_request(
    s3_endpoint: str, s3_bucket: str, s3_admin: Any
) -> None:
    store = open_outputs(f"s3://{s3_bucket}/p?endpoint_url={s3_endpoint}")
    mebibyte = 1024 * 1024
    await store.put("t", "small.bin", chunked(payload(PART - 1), mebibyte), "application/octet-stream")
    await store.put("t", "large.bin", chunked(payload(2 * PART + 1), mebibyte), "application/octet-stream")
    # Ends on a part boundary: no empty last part.
    await store.put("t", "exact.bin", chunked(payload(2 * PART), mebibyte), "application/octet-stream")
    # S3 marks a multipart object's ETag with its number of parts.
    etags = {
        name: s3_admin.head_object(Bucket=s3_bucket, Key=f"p/t/{name}")["ETag"].strip('"')
        for name in ("small.bin", "large.bin", "exact.bin")
    }
    assert "-" not in etags["small.bin"]
    assert etags["large.bin"].endswith("-3")
    assert etags["exact.bin"].endswith("-2")
    assert (await store.stat("t", "exact.bin")).size == 2 * PART


async def test_a_failed_upload_is_aborted_on_the_server(
    s3_endpoint: str, s3_bucket: str, s3_admin: Any
) -> None:
    store = open_outputs(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}")

    async def broken() -> AsyncIterator[bytes]:
        yield payload(PART + 1)
        raise ConnectionResetError("worker went away")

    with pytest.raises(ConnectionResetError):
        await store.put("t", "big.bin", broken(), "application/octet-stream")
    assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert bucket_keys(s3_admin, s3_bucket) == set()


async def test_delete_task_pages_through_the_listing(s3_endpoint: str, s3_bucket: str, s3_admin: Any) -> None:
    store: Any = open_outputs(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}")
    store.list_page_size = 2  # S3 lists at most 1000 keys a request: page through 7 files in 4 pages
    for index in range(7):
        await store.put("big", f"{index}.png", chunked(b"x"), "image/png")
    await store.put("bigger", "keep.png", chunked(b"x"), "image/png")
    await store.delete_task("big")
    assert bucket_keys(s3_admin, s3_bucket) == {"bigger/keep.png"}


async def test_a_missing_bucket_is_unavailable_not_a_crash(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_outputs(f"s3://{s3_bucket}-missing?endpoint_url={s3_endpoint}")
    with pytest.raises(OutputsUnavailable, match=r"NoSuchBucket|does not exist") as caught:
        await store.put("t", "a.png", chunked(b"x"), "image/png")
    assert f"s3://{s3_bucket}-missing/t/a.png" in str(caught.value)
    with pytest.raises(OutputsUnavailable):
        await store.delete_task("t")


async def test_no_credentials_is_unavailable(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_outputs(f"s3://{s3_bucket}?endpoint_url={s3_endpoint}")
    with pytest.raises(OutputsUnavailable, match="credentials"):
        await store.put("t", "a.png", chunked(b"x"), "image/png")


async def test_an_unreachable_endpoint_is_unavailable(
    aws_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = open_outputs(f"s3://bucket?endpoint_url=http://127.0.0.1:{closed_port()}")
    with pytest.raises(OutputsUnavailable, match="Could not connect"):
        await store.stat("t", "a.png")


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- reading the location -------------------------------------------------------------------------------
def test_options_in_the_location(aws_environment: None) -> None:
    store: Any = open_outputs("s3://my-bucket/a/b?endpoint_url=http://127.0.0.1:9000&region=eu-west-3")
    assert (store.bucket, store.prefix) == ("my-bucket", "a/b")
    assert store.endpoint_url == "http://127.0.0.1:9000"
    assert store.region == "eu-west-3"
    aws: Any = open_outputs("S3://my-bucket")
    assert (aws.bucket, aws.prefix, aws.region) == ("my-bucket", "", TEST_REGION)
    assert aws.endpoint_url.startswith("https://")
    from_environment: Any = open_outputs("s3://my-bucket/x")
    assert from_environment.region == TEST_REGION


@pytest.mark.slow
def test_endpoint_from_the_aws_environment(aws_environment: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    store: Any = open_outputs("s3://my-bucket")
    assert store.endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://bad bucket/x", "not a valid bucket name"),
        ("s3://bucket:9000/x", "not a valid bucket name"),
        (
            "s3://bucket/x?endpoint=http://h",
            "unknown option 'endpoint' (valid: addressing_style, endpoint_url, region)",
        ),
        ("s3://bucket/x?region=a&region=b", "region is given twice"),
        ("s3://bucket/x?region=", "region is empty"),
        ("s3://bucket/x?garbage", "unknown option"),
        ("s3://bucket/x?endpoint_url=minio:9000", "endpoint_url must be an http:// or https:// URL"),
        ("s3://bucket/x?endpoint_url=http://host:port", "endpoint_url must be an http:// or https:// URL"),
        ("s3://bucket/x?addressing_style=dns", "addressing_style must be one of auto, path, virtual"),
        ("s3://bucket/../x", "'.' or '..'"),
        ("s3://bucket/x#part", "'#'"),
        (
            "gs://bucket/x",
            "unknown outputs location 'gs://bucket/x': use a directory or one of file://, s3://",
        ),
    ],
)
def test_bad_locations_are_refused_clearly(aws_environment: None, location: str, message: str) -> None:
    with pytest.raises(OutputsError) as caught:
        open_outputs(location)
    assert message in str(caught.value)


def test_credentials_in_the_location_are_refused_without_echoing_them(aws_environment: None) -> None:
    with pytest.raises(OutputsError) as caught:
        open_outputs("s3://AKIAEXAMPLE:very-secret@bucket/x")
    assert "AWS_ACCESS_KEY_ID" in str(caught.value)
    assert "very-secret" not in str(caught.value)
    assert "AKIAEXAMPLE" not in str(caught.value)


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "comfyfleet.outputs.s3", raising=False)
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an environment without boto3 shows the import
    with pytest.raises(OutputsError, match=r"pip install 'comfyfleet\[s3\]'"):
        open_outputs("s3://bucket/x")


def test_a_config_file_keeps_an_s3_location_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYFLEET_OUTPUTS", raising=False)
    config = tmp_path / "fleet.yaml"
    config.write_text("outputs: s3://bucket/runs?endpoint_url=http://127.0.0.1:9000\n")
    assert load_settings(config=config).outputs == "s3://bucket/runs?endpoint_url=http://127.0.0.1:9000"
    config.write_text("outputs: results\n")  # a directory is still relative to the file
    assert load_settings(config=config).outputs == str(tmp_path / "results")


@pytest.mark.parametrize("location", ["s3://", "s3://bucket/x?colour=blue", "ftp://host/dir"])
async def test_a_bad_location_is_a_clean_start_up_error(
    tmp_path: Path, aws_environment: None, location: str
) -> None:
    settings = load_settings(store=f"sqlite:///{tmp_path / 'fleet.db'}", outputs=location, port=0)
    with pytest.raises(StartupError, match="outputs location"):
        async with Runtime(settings):
            pass


def test_serve_with_a_bad_location_says_why_in_one_line(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "comfyfleet",
            "serve",
            "--store",
            f"sqlite:///{tmp_path / 'fleet.db'}",
            "--port",
            "0",
            "--outputs",
            "s3://bucket/x?colour=blue",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert completed.returncode == 1, completed
    assert "unknown option 'colour'" in completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
