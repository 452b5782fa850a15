"""Output files in an S3-compatible bucket: ``<prefix>/<task id>/<name>`` (needs the ``s3`` extra).

boto3 is blocking, so every call runs in a worker thread (``asyncio.to_thread``); one client is shared, as
botocore clients are thread-safe. Endpoint, region and credentials come from the arguments first, then
from the usual AWS chain (``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``~/.aws``, instance
roles…).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

try:
    import boto3.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"the s3 output store needs boto3: pip install 'comfyfleet[s3]' ({exc})", name=exc.name
    ) from exc

from comfyfleet.outputs.base import (
    SMALL_OUTPUT_BYTES,
    OpenedOutput,
    OutputNotFound,
    OutputsError,
    OutputsUnavailable,
    StoredOutput,
    check_name,
)

# S3 refuses multipart parts under 5 MiB (except the last); a file smaller than one part is a single PUT.
MIN_PART_SIZE = 5 * 1024 * 1024
DEFAULT_PART_SIZE = 8 * 1024 * 1024
MAX_PARTS = 10_000
_READ_CHUNK = 256 * 1024
_DEFAULT_CONTENT_TYPE = "application/octet-stream"
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
ADDRESSING_STYLES = frozenset({"auto", "path", "virtual"})


class S3OutputStore:
    """Output files as objects of one bucket, under an optional key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        if not bucket:
            raise OutputsError("the s3 output store needs a bucket name")
        if addressing_style is not None and addressing_style not in ADDRESSING_STYLES:
            raise OutputsError(f"addressing_style must be one of {', '.join(sorted(ADDRESSING_STYLES))}")
        self.bucket = bucket
        self.prefix = "/".join(segment for segment in prefix.split("/") if segment)
        self.part_size = max(part_size, MIN_PART_SIZE)
        # Keys listed (then deleted) per request by delete_task; 1000 is the most one DeleteObjects takes.
        self.list_page_size = 1000
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(
            # Self-hosted services (MinIO, Ceph…) are usually reached by IP or one host name, without a
            # wildcard DNS entry per bucket.
            s3={"addressing_style": addressing_style or ("path" if endpoint_url else "auto")},
            # Checksums only where S3 requires them: several S3-compatible services reject the newer ones.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
            connect_timeout=10,
            read_timeout=60,
        )
        try:
            session = boto3.session.Session()
            self._client: Any = session.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        except (BotoCoreError, ValueError) as exc:
            # e.g. an endpoint URL botocore cannot use, or an unknown region name.
            raise OutputsError(f"cannot set up the output store {self.location}: {exc}") from exc
        # As resolved from the arguments and the AWS chain.
        self.endpoint_url: str = self._client.meta.endpoint_url
        self.region: str | None = self._client.meta.region_name

    def _key(self, task_id: str, name: str) -> str:
        return self._task_prefix(task_id) + check_name(name)

    def _task_prefix(self, task_id: str) -> str:
        # The trailing slash keeps task "ab" out of task "abc"'s files.
        return f"{self.prefix}/{check_name(task_id)}/" if self.prefix else f"{check_name(task_id)}/"

    async def _call(self, operation: Callable[..., Any], what: str, **params: Any) -> Any:
        """Run one blocking S3 call (on the key or prefix ``what``) in a thread; its failures become this
        package's errors."""
        try:
            return await asyncio.to_thread(operation, **params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise OutputNotFound(f"no output s3://{self.bucket}/{what}") from exc
            message = error.get("Message") or code
            raise OutputsUnavailable(
                f"S3 refused {exc.operation_name} on s3://{self.bucket}/{what}: {message}"
            ) from exc
        except BotoCoreError as exc:
            raise OutputsUnavailable(f"S3 failed on s3://{self.bucket}/{what}: {exc}") from exc

    async def put(
        self, task_id: str, name: str, chunks: AsyncIterator[bytes], content_type: str
    ) -> StoredOutput:
        key = self._key(task_id, name)
        content_type = content_type or _DEFAULT_CONTENT_TYPE
        buffer = bytearray()
        size = 0
        upload: _MultipartUpload | None = None
        try:
            async for chunk in chunks:
                buffer += chunk
                size += len(chunk)
                if len(buffer) >= self.part_size:
                    # The size is unknown until the stream ends: the first full part starts a multipart upload,
                    # so memory stays at one part whatever the file's size.
                    if upload is None:
                        upload = await self._start_multipart(key, content_type)
                    await upload.send(bytes(buffer))
                    buffer.clear()
            if upload is None:
                await self._call(
                    self._client.put_object,
                    key,
                    Bucket=self.bucket,
                    Key=key,
                    Body=bytes(buffer),
                    ContentType=content_type,
                )
            else:
                if buffer:
                    await upload.send(bytes(buffer))
                await upload.complete()
        except BaseException:
            # Nothing is visible under the key until the upload completes; drop the parts S3 keeps meanwhile.
            if upload is not None:
                await upload.abort()
            raise
        return StoredOutput(name=name, size=size, content_type=content_type)

    async def _start_multipart(self, key: str, content_type: str) -> _MultipartUpload:
        created = await self._call(
            self._client.create_multipart_upload, key, Bucket=self.bucket, Key=key, ContentType=content_type
        )
        return _MultipartUpload(self, key, str(created["UploadId"]))

    async def stat(self, task_id: str, name: str) -> StoredOutput:
        key = self._key(task_id, name)
        head = await self._call(self._client.head_object, key, Bucket=self.bucket, Key=key)
        return StoredOutput(
            name=name,
            size=int(head["ContentLength"]),
            content_type=str(head.get("ContentType") or _DEFAULT_CONTENT_TYPE),
        )

    async def open(self, task_id: str, name: str) -> OpenedOutput:
        stored = await self.stat(task_id, name)
        if stored.size > SMALL_OUTPUT_BYTES:
            return OpenedOutput(stored, None)
        content = b"".join([chunk async for chunk in self.read(task_id, name)])
        return OpenedOutput(dataclasses.replace(stored, size=len(content)), content)

    async def read(self, task_id: str, name: str) -> AsyncIterator[bytes]:
        key = self._key(task_id, name)
        response = await self._call(self._client.get_object, key, Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            while chunk := await self._call(body.read, key, amt=_READ_CHUNK):
                yield chunk
        finally:
            # Closed synchronously: under a cancelled (anyio) scope an awaited close would never run.
            body.close()

    async def delete_task(self, task_id: str) -> None:
        prefix = self._task_prefix(task_id)
        listing: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.list_page_size}
        while True:
            page = await self._call(self._client.list_objects_v2, prefix, **listing)
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                deleted = await self._call(
                    self._client.delete_objects,
                    prefix,
                    Bucket=self.bucket,
                    Delete={"Objects": keys, "Quiet": True},
                )
                failures = deleted.get("Errors") or []
                if failures:
                    first = failures[0]
                    raise OutputsUnavailable(
                        f"{self.location} kept {len(failures)} file(s) of task {task_id}: "
                        f"{first.get('Key')}: {first.get('Message') or first.get('Code')}"
                    )
            if not page.get("IsTruncated"):
                return
            listing["ContinuationToken"] = page["NextContinuationToken"]


class _MultipartUpload:
    """The parts sent so far of one object being uploaded."""

    def __init__(self, store: S3OutputStore, key: str, upload_id: str) -> None:
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self.parts: list[dict[str, Any]] = []

    async def send(self, data: bytes) -> None:
        number = len(self.parts) + 1
        if number > MAX_PARTS:
            raise OutputsError(
                f"output {self.key} is larger than {MAX_PARTS} parts of {self.store.part_size} bytes"
            )
        store = self.store
        sent = await store._call(
            store._client.upload_part,
            self.key,
            Bucket=store.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=data,
        )
        self.parts.append({"PartNumber": number, "ETag": sent["ETag"]})

    async def complete(self) -> None:
        store = self.store
        await store._call(
            store._client.complete_multipart_upload,
            self.key,
            Bucket=store.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": self.parts},
        )

    async def abort(self) -> None:
        store = self.store
        # The thread finishes the abort even if this task is cancelled again while waiting for it.
        with contextlib.suppress(OutputsError):
            await store._call(
                store._client.abort_multipart_upload,
                self.key,
                Bucket=store.bucket,
                Key=self.key,
                UploadId=self.upload_id,
            )
