"""What a ComfyUI process keeps in memory, and so loses on restart; and the emulator's own counters."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from comfyfleet.emulators.comfyui.hub import Socket, SocketHub

MAX_HISTORY = 10_000


@dataclass(slots=True)
class QueueItem:
    """Upstream's queue tuple ``(number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive)``."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    sensitive: dict[str, Any]

    def wire(self) -> list[Any]:
        """As ``/queue`` and history show it: the sensitive field stripped."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass(slots=True)
class EmulatorStats:
    """Observer counters. They survive an emulated restart (``/emulator/restart``), not a crash of the process."""

    started_at: float = field(default_factory=time.monotonic)
    prompts_accepted: int = 0
    prompts_rejected: int = 0
    prompts_started: int = 0
    prompts_succeeded: int = 0
    prompts_failed: int = 0
    prompts_interrupted: int = 0
    executions: dict[str, int] = field(default_factory=dict)
    node_executions: dict[str, int] = field(default_factory=dict)
    cached_nodes: int = 0
    model_loads: int = 0
    restarts: int = 0
    crashes: int = 0
    started_since_restart: int = 0


class ComfyState:
    """Everything a ComfyUI process keeps in memory: queue, history, caches, loaded models, sockets."""

    def __init__(self) -> None:
        self.number = 0
        self.heap: list[tuple[float, int, QueueItem]] = []
        self.sequence = 0
        self.running: QueueItem | None = None
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.cache: OrderedDict[str, tuple[tuple[Any, ...], dict[str, Any] | None]] = OrderedDict()
        self.loaded_models: OrderedDict[str, None] = OrderedDict()
        self.hub = SocketHub()
        self.client_id: str | None = None  # of the running prompt
        self.last_node_id: str | None = None
        self.interrupted = False
        self.interrupt_event = asyncio.Event()
        self.work = asyncio.Event()
        self.pending_free: dict[str, bool] = {}

    @property
    def sockets(self) -> dict[str, Socket]:
        return self.hub.sockets

    def queue_remaining(self) -> int:
        return len(self.heap) + (1 if self.running is not None else 0)

    def pending(self) -> list[QueueItem]:
        return [entry[2] for entry in self.heap]  # heap order, as upstream returns it

    def put(self, item: QueueItem) -> None:
        self.sequence += 1
        heapq.heappush(self.heap, (item.number, self.sequence, item))
        self.work.set()

    def pop(self) -> QueueItem:
        _, _, item = heapq.heappop(self.heap)
        self.running = item
        return item

    def wipe_queue(self) -> None:
        """``POST /queue {"clear": true}``: every pending prompt goes, and the change is announced."""
        self.heap = []
        self.send_status()

    def delete_queued(self, prompt_id: str) -> bool:
        """Upstream's ``delete_queue_item``: the first pending match goes, with one ``status`` frame (two when
        it was the last one: that path wipes the queue, which announces itself too). False when none matched."""
        for entry in self.heap:
            if entry[2].prompt_id == prompt_id:
                if len(self.heap) == 1:
                    self.wipe_queue()
                else:
                    self.heap.remove(entry)
                    heapq.heapify(self.heap)
                self.send_status()
                return True
        return False

    def remember(self, prompt_id: str, entry: dict[str, Any]) -> None:
        self.history[prompt_id] = entry
        while len(self.history) > MAX_HISTORY:
            self.history.popitem(last=False)

    def interrupt(self) -> None:
        self.interrupted = True
        self.interrupt_event.set()

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if unload_models or free_memory:
            self.loaded_models.clear()
        if free_memory:
            self.cache.clear()

    def send_status(self) -> None:
        """The ``status`` frame upstream broadcasts on every queue change."""
        self.hub.send_status(self.queue_remaining())
