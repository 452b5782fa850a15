"""Graphs and ids shared by the ComfyUI client and emulator tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from comfyfleet.emulators.comfyui import EmulatorServer
from support.workflows import seed_workflow, tiny_workflow


def seed_payload() -> dict[str, Any]:
    """The seed's example workflow (KSampler, flux1-dev-fp8 checkpoint, 512x512, SaveImage)."""
    return seed_workflow()


def trivial_graph(color: int = 0, prefix: str = "probe/empty", size: int = 64) -> dict[str, Any]:
    """Workflow 1 of the reference: EmptyImage -> SaveImage. Vary ``color`` to avoid the node cache."""
    return tiny_workflow(color, size=size, prefix=prefix)


def sampler_graph(
    seed: int = 1, steps: int = 10, text: str = "a lighthouse", ckpt: str = "flux1-dev-fp8.safetensors"
) -> dict[str, Any]:
    """The seed's shape at 64x64: a KSampler whose steps report progress and honour interrupts."""
    graph = seed_payload()
    graph["3"]["inputs"].update(seed=seed, steps=steps)
    graph["4"]["inputs"]["ckpt_name"] = ckpt
    graph["5"]["inputs"].update(width=64, height=64)
    graph["6"]["inputs"]["text"] = text
    return graph


def new_id() -> str:
    return str(uuid.uuid4())


EmulatorFactory = Callable[..., AbstractAsyncContextManager[EmulatorServer]]
