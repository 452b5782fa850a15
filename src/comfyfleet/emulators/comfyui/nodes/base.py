"""What the emulator's nodes share: the values that flow between them, the context they run in, a node's spec.

Values that flow between nodes are small Python objects: models are descriptors, a LATENT remembers its
size and a text "material" (seed, prompts, sampler settings) from which VAEDecode synthesises pixels, and
IMAGE is a list of real Pillow images so that the image nodes do real work on real pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.options import EmulatorOptions


class NodeFailed(Exception):
    """A node raised at run time: becomes an ``execution_error`` with these type and message."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


class RunContext(Protocol):
    """What the executor offers a running node."""

    node_id: str
    options: EmulatorOptions
    prompt: Mapping[str, Any]
    extra_data: Mapping[str, Any]

    async def step(self, value: int, total: int, preview: tuple[Image.Image, str] | None = None) -> None:
        """Spend one progress step (``step_time_s``), check for interrupts, report ``progress``; a preview
        ``(image, "JPEG" | "PNG")`` goes out as a binary frame with it."""

    def sampler_preview(self, value: int) -> tuple[Image.Image, str] | None:
        """The preview of a sampler step, or None when previews are off."""

    async def load_model(self, folder: str, name: str, *, from_disk: bool = True) -> None:
        """Load a model into the LRU (``model_load_s``); ``from_disk`` (a loader node) also checks, with
        ``--strict-models`` and model folders, that the file is still there."""

    async def cpu(self, pixels: int, work: Callable[[], Any]) -> Any:
        """Run Pillow work, in a thread when it is big."""

    def output_dir(self) -> str: ...
    def temp_dir(self) -> str: ...
    def input_path(self, name: str) -> str | None: ...


@dataclass(slots=True)
class Latent:
    width: int
    height: int
    batch: int
    material: str


@dataclass(slots=True)
class Model:
    kind: str
    name: str
    patches: list[str] = field(default_factory=list)


NodeOutput = tuple[tuple[Any, ...], dict[str, Any] | None]
Runner = Callable[[RunContext, dict[str, Any]], Awaitable[NodeOutput]]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    display_name: str
    category: str
    required: Mapping[str, Any]  # input name -> spec list, or a callable(Catalogue) -> spec list
    outputs: tuple[str, ...]
    run: Runner
    optional: Mapping[str, Any] = field(default_factory=dict)
    hidden: Mapping[str, str] = field(default_factory=dict)
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    description: str = ""
    validate: Mapping[str, Callable[[str, Mapping[str, Any]], bool | str]] | None = None


def synthesize(material: str, width: int, height: int, index: int) -> Image.Image:
    """A smooth, deterministic picture: a 4x4 colour field from a hash of everything that made it, upscaled."""
    digest = hashlib.shake_256(f"{material}|{width}x{height}|{index}".encode()).digest(48)
    return Image.frombytes("RGB", (4, 4), digest).resize((width, height), Image.Resampling.BICUBIC)


def as_int(value: Any) -> int:
    return int(value)
