"""comfyfleet's stand-in for a ComfyUI server, faithful to the measured protocol (docs/emulator.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from comfyfleet.emulators.comfyui.options import DEFAULT_MODELS, EmulatorOptions, OptionsError
from comfyfleet.emulators.comfyui.server import EmulatorServer
from comfyfleet.emulators.comfyui.state import EmulatorStats

__all__ = ["DEFAULT_MODELS", "EmulatorOptions", "EmulatorServer", "EmulatorStats", "OptionsError", "serve"]


async def serve(
    options: EmulatorOptions,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    on_crash: Callable[[], None] | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run the emulator until ``stop`` is set (the CLI sets it from its signal handlers)."""
    async with EmulatorServer(options, host=host, port=port, on_crash=on_crash) as server:
        if on_listening is not None:
            ready = asyncio.ensure_future(server.ready.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stopped.cancel()
            if server.ready.is_set():
                on_listening(server.url)
        await stop.wait()
