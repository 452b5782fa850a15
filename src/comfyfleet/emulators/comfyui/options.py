"""Options of the ComfyUI emulator: simulated costs, model catalogue and faults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODELS: dict[str, list[str]] = {
    "checkpoints": [
        "flux1-dev-fp8.safetensors",
        "sd_xl_base_1.0.safetensors",
        "v1-5-pruned-emaonly.safetensors",
    ],
    "diffusion_models": ["flux1-dev.safetensors", "flux1-schnell.safetensors"],
    "loras": ["detail_tweaker.safetensors", "pixel_art.safetensors"],
    "vae": ["ae.safetensors", "sdxl_vae.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"],
}

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".sft", ".gguf")


class OptionsError(ValueError):
    """An emulator option has an invalid value or an unknown name."""


@dataclass(slots=True)
class EmulatorOptions:
    """Everything that makes the emulator slower, flakier or different from the default fast server.

    Times are seconds. ``math.inf`` for ``hang_s`` means the hanging node never returns.
    Every field can be changed at run time with ``POST /emulator/faults`` except the folder and catalogue ones.
    """

    # Simulated cost.
    step_time_s: float = 0.0  # KSampler: steps x step_time_s, with progress frames
    prompt_time_s: float = 0.0  # fixed extra time of every prompt (even a fully cached one); interruptible
    model_load_s: float = 0.0  # first use of a model file that is not in the loaded-model LRU
    model_cache_size: int = 2  # capacity of the loaded-model LRU (checkpoints, UNETs, LoRAs, VAEs, CLIPs)
    startup_delay_s: float = 0.0  # the port answers only after this long
    history_delay_s: float = 0.0  # extra gap between execution_success and the history write (the race)
    # Faults (drawn from one RNG seeded by ``seed``).
    failure_rate: float = 0.0  # probability that a prompt fails with an execution_error
    oom_rate: float = 0.0  # probability that a prompt fails with a torch out-of-memory execution_error
    crash_after: int | None = None  # the process dies when it starts prompt number crash_after + 1
    hang_s: float = 0.0  # a node that ignores interrupts for this long (inf: forever)
    hang_rate: float = 1.0  # probability that a prompt hangs, when hang_s > 0
    hang_node: str | None = None  # class_type that hangs; None: the first node that runs
    seed: int | None = None
    # Behaviour.
    cache: bool = True  # node-output cache (an identical resubmission is replayed); False = --cache-none
    previews: bool = False  # KSampler sends a binary JPEG preview per step
    max_upload_size: int = 100 * 1024 * 1024
    # Catalogue and folders.
    models: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_MODELS.items()}
    )
    accept_any_model: bool = True  # any *.safetensors (etc.) name is valid for a model input
    # Model lists read from disk like ComfyUI (instead of ``models``): a ``models/``-style folder and/or
    # an ``extra_model_paths.yaml``; see model_folders.py.
    models_dir: str | None = None
    extra_model_paths_config: str | None = None
    base_dir: str | None = None  # holds input/, output/, temp/; a fresh temporary folder when None

    RUNTIME_FIELDS = (
        "step_time_s",
        "prompt_time_s",
        "model_load_s",
        "model_cache_size",
        "history_delay_s",
        "failure_rate",
        "oom_rate",
        "crash_after",
        "hang_s",
        "hang_rate",
        "hang_node",
        "seed",
        "cache",
        "previews",
        "accept_any_model",
    )

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        for name in (
            "step_time_s",
            "prompt_time_s",
            "model_load_s",
            "startup_delay_s",
            "history_delay_s",
            "hang_s",
        ):
            value = getattr(self, name)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or value < 0
                or math.isnan(value)
            ):
                raise OptionsError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("failure_rate", "oom_rate", "hang_rate"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
                raise OptionsError(f"{name} must be between 0 and 1, got {value!r}")
        if not isinstance(self.model_cache_size, int) or self.model_cache_size < 1:
            raise OptionsError(f"model_cache_size must be an integer >= 1, got {self.model_cache_size!r}")
        if self.crash_after is not None and (not isinstance(self.crash_after, int) or self.crash_after < 0):
            raise OptionsError(f"crash_after must be an integer >= 0 or null, got {self.crash_after!r}")
        if not isinstance(self.max_upload_size, int) or self.max_upload_size < 1:
            raise OptionsError(f"max_upload_size must be a positive integer, got {self.max_upload_size!r}")
        if not isinstance(self.models, dict) or not all(
            isinstance(names, list) and all(isinstance(name, str) for name in names)
            for names in self.models.values()
        ):
            raise OptionsError("models must map a folder name to a list of file names")

    def update(self, changes: dict[str, Any]) -> None:
        """Apply run-time changes (``POST /emulator/faults``); all or nothing."""
        unknown = sorted(set(changes) - set(self.RUNTIME_FIELDS))
        if unknown:
            raise OptionsError(
                f"unknown or fixed option(s): {', '.join(unknown)}; changeable: {', '.join(self.RUNTIME_FIELDS)}"
            )
        candidate = dataclasses.replace(self)
        for name, value in changes.items():
            if name == "hang_s" and value in ("inf", "forever"):
                value = math.inf
            setattr(candidate, name, value)
        candidate.check()
        for name in changes:
            setattr(self, name, getattr(candidate, name))

    def public(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in (f.name for f in dataclasses.fields(self))}
        if values["hang_s"] == math.inf:
            values["hang_s"] = "inf"
        return values
