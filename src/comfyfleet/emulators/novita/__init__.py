"""A stand-in for Novita AI's GPU-instance API whose instances run local ComfyUI emulators (see server.py)."""

from comfyfleet.emulators.novita.server import API_PREFIX, NovitaEmulator, NovitaEmulatorOptions, serve

__all__ = ["API_PREFIX", "NovitaEmulator", "NovitaEmulatorOptions", "serve"]
