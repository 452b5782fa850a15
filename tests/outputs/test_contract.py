"""The behaviour every output store shares, run against each backend (a local directory; an S3 bucket on a
real S3 HTTP server), so the backends cannot drift apart."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest

from comfyfleet.outputs import (
    SMALL_OUTPUT_BYTES,
    InvalidOutputName,
    OpenedOutput,
    OutputNotFound,
    StoredOutput,
    open_outputs,
)
from comfyfleet.outputs.base import RESERVED_SUFFIX

from .conftest import Backend

# Three parts for the S3 store's multipart upload (8 MiB parts), and an odd size so no chunk boundary lines up.
LARGE = 2 * 8 * 1024 * 1024 + 123_457


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def chunked(data: bytes, size: int = 100_003) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read_all(backend: Backend, task_id: str, name: str) -> tuple[bytes, int]:
    """The file's bytes and how many chunks they came in."""
    chunks = [chunk async for chunk in backend.store.read(task_id, name)]
    return b"".join(chunks), len(chunks)


async def test_large_file_round_trip_in_many_chunks(backend: Backend) -> None:
    data = payload(LARGE)
    stored = await backend.store.put("task-1", "ComfyUI_00001_.png", chunked(data), "image/png")
    assert stored == StoredOutput(name="ComfyUI_00001_.png", size=LARGE, content_type="image/png")
    assert await backend.store.stat("task-1", "ComfyUI_00001_.png") == stored
    content, chunks = await read_all(backend, "task-1", "ComfyUI_00001_.png")
    assert content == data
    assert chunks > 1, "read is streamed, not one buffer"


async def test_empty_and_single_chunk_files(backend: Backend) -> None:
    assert (await backend.store.put("task-1", "empty.txt", chunked(b""), "text/plain")).size == 0
    assert await read_all(backend, "task-1", "empty.txt") == (b"", 0)
    assert (await backend.store.stat("task-1", "empty.txt")).size == 0
    await backend.store.put("task-1", "one.txt", chunked(b"hello"), "text/plain")
    assert await read_all(backend, "task-1", "one.txt") == (b"hello", 1)


async def test_open_reads_a_small_file_whole_and_leaves_a_large_one_to_stream(backend: Backend) -> None:
    small, large = payload(SMALL_OUTPUT_BYTES, seed=2), payload(SMALL_OUTPUT_BYTES + 1, seed=3)
    await backend.store.put("task-1", "small.png", chunked(small), "image/png")
    await backend.store.put("task-1", "large.bin", chunked(large), "")
    assert await backend.store.open("task-1", "small.png") == OpenedOutput(
        StoredOutput(name="small.png", size=len(small), content_type="image/png"), small
    )
    assert await backend.store.open("task-1", "large.bin") == OpenedOutput(
        StoredOutput(name="large.bin", size=len(large), content_type="application/octet-stream"), None
    )
    with pytest.raises(OutputNotFound):
        await backend.store.open("task-1", "missing.png")
    with pytest.raises(InvalidOutputName):
        await backend.store.open("task-1", "../small.png")


@pytest.mark.parametrize(
    ("name", "content_type", "expected"),
    [
        ("clip.mp4", "video/mp4", "video/mp4"),
        ("image.webp", "image/webp", "image/webp"),
        ("notes.txt", "text/plain; charset=utf-8", "text/plain; charset=utf-8"),
        ("latent.latent", "", "application/octet-stream"),
    ],
)
async def test_content_type_is_kept(backend: Backend, name: str, content_type: str, expected: str) -> None:
    stored = await backend.store.put("task-1", name, chunked(b"\x00\x01\x02"), content_type)
    assert stored.content_type == expected
    assert (await backend.store.stat("task-1", name)).content_type == expected


async def test_put_replaces_a_file_of_the_same_name(backend: Backend) -> None:
    await backend.store.put("task-1", "out.png", chunked(payload(300_000, seed=1)), "image/png")
    before = backend.everything()
    replacement = payload(1_000, seed=2)
    stored = await backend.store.put("task-1", "out.png", chunked(replacement), "image/webp")
    assert stored == StoredOutput("out.png", 1_000, "image/webp")
    assert await backend.store.stat("task-1", "out.png") == stored
    assert (await read_all(backend, "task-1", "out.png"))[0] == replacement
    # Replaced in place, nothing left of the old file (the local store may keep the new type beside it).
    assert {name.removesuffix(RESERVED_SUFFIX) for name in backend.everything()} == before


async def test_local_store_keeps_a_content_type_file_only_for_an_unusual_type(tmp_path: Path) -> None:
    store = open_outputs(str(tmp_path))
    await store.put("task-1", "a.png", chunked(b"png"), "image/png")
    await store.put("task-1", "b.PNG", chunked(b"png"), "image/png")
    await store.put("task-1", "c.png", chunked(b"odd"), "image/x-custom")
    await store.put("task-1", "d.bin", chunked(b"bin"), "application/octet-stream")
    files = sorted(path.name for path in (tmp_path / "task-1").iterdir())
    assert files == ["a.png", "b.PNG", "c.png", "c.png" + RESERVED_SUFFIX, "d.bin", "d.bin" + RESERVED_SUFFIX]


@pytest.mark.parametrize("first_type", ["image/x-custom", "image/png"])
async def test_each_replacement_reports_its_own_content_type(backend: Backend, first_type: str) -> None:
    await backend.store.put("task-1", "out.png", chunked(b"first"), first_type)
    for content_type in ["image/png", "application/x-unusual", "image/png"]:
        stored = await backend.store.put("task-1", "out.png", chunked(b"again"), content_type)
        assert stored.content_type == content_type
        assert (await backend.store.stat("task-1", "out.png")).content_type == content_type
        assert (await backend.store.open("task-1", "out.png")).stored.content_type == content_type


async def test_failed_upload_keeps_the_previous_file_and_leaves_nothing(backend: Backend) -> None:
    original = payload(50_000)
    await backend.store.put("task-1", "out.png", chunked(original), "image/png")
    before = backend.everything()

    async def broken() -> AsyncIterator[bytes]:
        # Past one S3 part, so the S3 store has a multipart upload under way when the stream fails.
        yield payload(9 * 1024 * 1024, seed=3)
        raise ConnectionResetError("worker went away mid-download")

    with pytest.raises(ConnectionResetError):
        await backend.store.put("task-1", "out.png", broken(), "image/png")
    with pytest.raises(ConnectionResetError):
        await backend.store.put("task-1", "new.png", broken(), "image/png")
    assert await backend.store.stat("task-1", "out.png") == StoredOutput("out.png", 50_000, "image/png")
    assert (await read_all(backend, "task-1", "out.png"))[0] == original
    with pytest.raises(OutputNotFound):
        await backend.store.stat("task-1", "new.png")
    assert backend.everything() == before


async def test_missing_files_are_not_found(backend: Backend) -> None:
    with pytest.raises(OutputNotFound):
        await backend.store.stat("task-1", "out.png")
    with pytest.raises(OutputNotFound):
        await read_all(backend, "task-1", "out.png")
    await backend.store.put("task-1", "out.png", chunked(b"png"), "image/png")
    for task_id, name in [("task-1", "other.png"), ("task-2", "out.png"), ("task", "out.png")]:
        with pytest.raises(OutputNotFound):
            await backend.store.stat(task_id, name)
        with pytest.raises(OutputNotFound):
            await read_all(backend, task_id, name)


INVALID_NAMES = [
    "",
    ".",
    "..",
    "../escape.png",
    "../../etc/passwd",
    "sub/dir.png",
    "/absolute.png",
    "..\\windows.png",
    "nul\x00.png",
    "line\nbreak.png",
    "tab\t.png",
    "é" * 121,  # 242 bytes in UTF-8
    "\udcff.png",  # not encodable as UTF-8
    "image.png.content-type",  # the local store's sidecar of image.png: reserved in every backend
]


async def test_invalid_names_never_leave_the_task(backend: Backend) -> None:
    await backend.store.put("task-1", "keep.png", chunked(b"kept"), "image/png")
    before = backend.everything()
    store = backend.store
    attempts: list[tuple[str, Callable[[], Awaitable[object]]]] = []
    for name in INVALID_NAMES:
        for task_id, file_name in [("task-1", name), (name, "out.png")]:
            attempts += [
                (
                    f"put({task_id!r}, {file_name!r})",
                    partial(store.put, task_id, file_name, chunked(b"evil"), "image/png"),
                ),
                (f"stat({task_id!r}, {file_name!r})", partial(store.stat, task_id, file_name)),
                (f"read({task_id!r}, {file_name!r})", partial(read_all, backend, task_id, file_name)),
            ]
        attempts.append((f"delete_task({name!r})", partial(store.delete_task, name)))
    wrong = []
    for call, attempt in attempts:
        try:
            await attempt()
        except InvalidOutputName:
            continue
        except Exception as exc:
            wrong.append(f"{call} raised {exc!r}")
        else:
            wrong.append(f"{call} was accepted")
    assert not wrong, wrong
    assert backend.everything() == before
    assert (await read_all(backend, "task-1", "keep.png"))[0] == b"kept"


async def test_longest_and_unicode_names_are_accepted(backend: Backend) -> None:
    names = ["é" * 120, "café ☕ 00001.png", "name with spaces & (brackets) [1] +%20.png", "..dots..png"]
    for index, name in enumerate(names):
        await backend.store.put("task-1", name, chunked(bytes([index]) * 10), "image/png")
    for index, name in enumerate(names):
        assert await backend.store.stat("task-1", name) == StoredOutput(name, 10, "image/png")
        assert (await read_all(backend, "task-1", name))[0] == bytes([index]) * 10


async def test_delete_task_removes_its_files_only(backend: Backend) -> None:
    for task_id, name in [
        ("task", "a.png"),
        ("task", "b.png"),
        ("task", "c.mp4"),
        ("task2", "a.png"),
        ("other", "a.png"),
    ]:
        await backend.store.put(task_id, name, chunked(f"{task_id}/{name}".encode()), "image/png")
    await backend.store.delete_task("task")
    for name in ["a.png", "b.png", "c.mp4"]:
        with pytest.raises(OutputNotFound):
            await backend.store.stat("task", name)
    # "task2" starts with "task": a prefix match must not take it along.
    assert (await read_all(backend, "task2", "a.png"))[0] == b"task2/a.png"
    assert (await read_all(backend, "other", "a.png"))[0] == b"other/a.png"
    remaining = backend.everything()
    assert not [entry for entry in remaining if "/task/" in f"/{entry}"], remaining
    await backend.store.delete_task("task")  # already gone: a no-op
    await backend.store.delete_task("never-existed")
    assert backend.everything() == remaining
    # A deleted task's name is usable again.
    await backend.store.put("task", "a.png", chunked(b"again"), "image/png")
    assert (await read_all(backend, "task", "a.png"))[0] == b"again"


async def test_concurrent_puts_and_reads(backend: Backend) -> None:
    files = {f"out-{index}.png": payload(200_000 + index, seed=index) for index in range(6)}
    await asyncio.gather(
        *(backend.store.put("task-1", name, chunked(data), "image/png") for name, data in files.items())
    )
    contents = await asyncio.gather(*(read_all(backend, "task-1", name) for name in files))
    assert [content for content, _ in contents] == list(files.values())
