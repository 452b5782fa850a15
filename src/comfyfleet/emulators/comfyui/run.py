"""One prompt being executed: the context its nodes run in, and the frames it sends.

Frames follow upstream's ``PromptExecutor`` and progress hook: ``add_message`` (kept in the history's
``messages``) goes only to the prompt's client unless it is a broadcast; ``progress_state``, ``progress`` and
previews go to the prompt's client, or to every socket when the prompt has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import struct
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from comfyfleet.emulators.comfyui.nodes import NodeFailed
from comfyfleet.emulators.comfyui.options import EmulatorOptions
from comfyfleet.emulators.comfyui.state import ComfyState, QueueItem

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.server import EmulatorServer

PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
# Upstream's ProgressBar sends at most one update per 100 ms and per 0.5 %, except the first, the last
# and any that carries a preview.
_THROTTLE_S = 0.1
_THROTTLE_FRACTION = 0.005


def now_ms() -> int:
    return int(time.time() * 1000)


class Interrupted(Exception):
    def __init__(self, node_id: str | None) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class Crash(Exception):
    """Raised inside the executor to emulate the process dying mid-prompt."""


class PromptRun:
    """What a running node sees (the nodes' ``RunContext``), and the prompt's frames and results."""

    def __init__(self, server: EmulatorServer, state: ComfyState, item: QueueItem) -> None:
        self.server = server
        self.state = state
        self.item = item
        self.options: EmulatorOptions = server.options
        self.prompt: Mapping[str, Any] = item.prompt
        self.extra_data: Mapping[str, Any] = item.extra_data
        self.prompt_id = item.prompt_id
        self.client_id: str | None = item.extra_data.get("client_id")
        self.node_id = ""
        self.messages: list[list[Any]] = []
        self.node_states: dict[str, dict[str, Any]] = {}
        self.values: dict[str, tuple[Any, ...]] = {}
        self.ui_outputs: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []
        self.current_inputs: dict[str, list[Any]] = {}  # of the running node, for its execution_error
        self._last_progress = (0.0, -1)

    # -- frames --
    def send(self, event: str, data: dict[str, Any], *, to_client_only: bool = False) -> None:
        """``send_sync(event, data, client_id)``: to the prompt's socket, or to all when it has none.
        ``to_client_only`` is upstream's ``if server.client_id is not None``: nothing without a client."""
        if self.client_id is None and to_client_only:
            return
        self.state.hub.send(event, data, self.client_id)

    def add_message(self, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        data = {**data, "timestamp": now_ms()}
        self.messages.append([event, data])
        self.send(event, data, to_client_only=not broadcast)

    def progress_state(self, node_id: str, state: str, value: float = 0, maximum: float = 1) -> None:
        self.node_states[node_id] = {
            "value": value,
            "max": maximum,
            "state": state,
            "node_id": node_id,
            "prompt_id": self.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        self.send("progress_state", {"prompt_id": self.prompt_id, "nodes": dict(self.node_states)})

    def start_node(self, node_id: str) -> None:
        """Upstream's ``start_progress`` then ``executing{node}``; each node has a progress bar of its own."""
        self.node_id = node_id
        self._last_progress = (0.0, -1)
        self.progress_state(node_id, "running")
        self.send(
            "executing",
            {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id},
            to_client_only=True,
        )
        if self.client_id is not None:
            self.state.last_node_id = node_id

    # -- RunContext --
    def check_interrupt(self) -> None:
        if self.state.interrupted:
            self.state.interrupted = False
            raise Interrupted(self.node_id or None)

    async def interruptible_sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check_interrupt()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.state.interrupt_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.interrupt_event.wait(), remaining)

    async def step(self, value: int, total: int, preview: tuple[Image.Image, str] | None = None) -> None:
        """One progress-bar update, like upstream's ProgressBar and progress hook."""
        if self.options.step_time_s:
            await self.interruptible_sleep(self.options.step_time_s)
        self.check_interrupt()
        value = min(value, total)
        now = time.monotonic()
        last_time, last_value = self._last_progress
        if not (
            preview is not None
            or last_value < 0
            or value >= total
            or (
                now - last_time >= _THROTTLE_S
                and (value - max(last_value, 0)) / max(total, 1) >= _THROTTLE_FRACTION
            )
        ):
            return
        self._last_progress = (now, value)
        encoded = (_encode(*preview), preview[1]) if preview is not None else None
        metadata_previews = self.state.hub.wants_metadata_previews(self.client_id)
        self.progress_state(self.node_id, "running", value, total)
        if encoded is not None and metadata_previews:
            self._send_preview_with_metadata(*encoded)
        self.send(
            "progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id}
        )
        if encoded is not None and not metadata_previews:
            image, image_format = encoded
            header = struct.pack(">II", PREVIEW_IMAGE, 2 if image_format == "PNG" else 1)
            self.state.hub.send_bytes(header + image, self.client_id)

    def sampler_preview(self, value: int) -> tuple[Image.Image, str] | None:
        """The latent preview of a sampler step (``--previews``): a small JPEG drawn from the step."""
        if not self.options.previews:
            return None
        seed = f"{self.prompt_id}:{value}"
        image = Image.frombytes("RGB", (2, 2), hashlib.sha256(seed.encode()).digest()[:12]).resize((64, 64))
        return image, "JPEG"

    def _send_preview_with_metadata(self, image: bytes, image_format: str) -> None:
        metadata = json.dumps(
            {"node_id": self.node_id, "prompt_id": self.prompt_id, "display_node_id": self.node_id,
             "parent_node_id": None, "real_node_id": self.node_id,
             "image_type": "image/png" if image_format == "PNG" else "image/jpeg"}
        ).encode()  # fmt: skip
        payload = struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(metadata)) + metadata + image
        self.state.hub.send_bytes(payload, self.client_id)

    async def load_model(self, folder: str, name: str, *, from_disk: bool = True) -> None:
        folders = self.server.catalogue.folders
        strict_disk = from_disk and folders.enabled and not self.options.accept_any_model
        if strict_disk and folders.full_path(folder, name) is None:  # deleted since validation, as upstream
            raise NodeFailed(
                "FileNotFoundError", f"Model in folder '{folder}' with filename '{name}' not found."
            )
        key = f"{folder}/{name}"
        loaded = self.state.loaded_models
        if key in loaded:
            loaded.move_to_end(key)
            return
        if self.options.model_load_s:
            await asyncio.sleep(self.options.model_load_s)  # loading ignores interrupts, as upstream
        loaded[key] = None
        self.server.stats.model_loads += 1
        while len(loaded) > self.options.model_cache_size:
            loaded.popitem(last=False)

    async def cpu(self, pixels: int, work: Callable[[], Any]) -> Any:
        if pixels > 256 * 256:
            return await asyncio.to_thread(work)
        return work()

    def output_dir(self) -> str:
        return self.server.output_dir

    def temp_dir(self) -> str:
        return self.server.temp_dir

    def input_path(self, name: str) -> str | None:
        return self.server.annotated_path(name, "input")


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(
        buffer, format=image_format, **({"quality": 95} if image_format == "JPEG" else {"compress_level": 1})
    )
    return buffer.getvalue()


def as_node_failure(exc: Exception) -> NodeFailed:
    """Any error raised inside a node is that prompt's ``execution_error``, named like upstream names it."""
    module = type(exc).__module__
    name = type(exc).__qualname__ if module == "builtins" else f"{module}.{type(exc).__qualname__}"
    return NodeFailed(name, str(exc))
