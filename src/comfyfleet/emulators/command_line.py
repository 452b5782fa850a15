"""The emulators' command-line flags (each with its environment variable) and the options they make.

``comfyfleet emulator`` and ``comfyfleet novita-emulator`` (in ``comfyfleet.cli``) declare their parameters
with these types. Only typer is imported here, so the CLI starts fast; the emulators load when run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui import EmulatorOptions
    from comfyfleet.emulators.novita import NovitaEmulatorOptions


def _env(name: str) -> str:
    return f"COMFYFLEET_EMULATOR_{name}"


# -- comfyfleet emulator ------------------------------------------------------------------------------
Port = Annotated[int, typer.Option(envvar=_env("PORT"), help="Port to listen on (0: a free one).")]
Host = Annotated[str, typer.Option(envvar=_env("HOST"), help="Address to listen on.")]
StepTime = Annotated[float, typer.Option(envvar=_env("STEP_TIME"), help="Seconds per KSampler step.")]
PromptTime = Annotated[
    float, typer.Option(envvar=_env("PROMPT_TIME"), help="Fixed extra seconds of every prompt.")
]
ModelLoadTime = Annotated[
    float, typer.Option(envvar=_env("MODEL_LOAD_TIME"), help="Seconds to load a model not in the LRU.")
]
ModelCacheSize = Annotated[
    int, typer.Option(envvar=_env("MODEL_CACHE_SIZE"), help="Models kept loaded (LRU).")
]
StartupDelay = Annotated[
    float, typer.Option(envvar=_env("STARTUP_DELAY"), help="Seconds before the port opens.")
]
HistoryDelay = Annotated[
    float,
    typer.Option(envvar=_env("HISTORY_DELAY"), help="Gap between execution_success and the history write."),
]
FailureRate = Annotated[
    float, typer.Option(envvar=_env("FAILURE_RATE"), help="Probability of an execution_error.")
]
OomRate = Annotated[
    float, typer.Option(envvar=_env("OOM_RATE"), help="Probability of a torch out-of-memory error.")
]
CrashAfter = Annotated[
    int | None,
    typer.Option(
        envvar=_env("CRASH_AFTER"), help="Exit the process when prompt N+1 starts.", show_default=False
    ),
]
Hang = Annotated[
    str, typer.Option(envvar=_env("HANG"), help="Seconds a node ignores interrupts ('inf': forever).")
]
HangRate = Annotated[float, typer.Option(envvar=_env("HANG_RATE"), help="Probability that a prompt hangs.")]
HangNode = Annotated[
    str | None,
    typer.Option(
        envvar=_env("HANG_NODE"),
        help="class_type that hangs (default: the first node run).",
        show_default=False,
    ),
]
Seed = Annotated[
    int | None, typer.Option(envvar=_env("SEED"), help="Seed of the random faults.", show_default=False)
]
Models = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        envvar=_env("MODELS"),
        help="FOLDER/NAME of a model file (repeatable; replaces the defaults).",
        show_default=False,
    ),
]
ModelsDir = Annotated[
    str | None,
    typer.Option(
        envvar=_env("MODELS_DIR"),
        help="Read model lists from this folder, laid out like ComfyUI's models/ (replaces --model).",
        show_default=False,
    ),
]
ExtraModelPaths = Annotated[
    str | None,
    typer.Option(
        "--extra-model-paths-config",
        envvar=_env("EXTRA_MODEL_PATHS_CONFIG"),
        help="Also read model folders from this extra_model_paths.yaml, as ComfyUI does.",
        show_default=False,
    ),
]
StrictModels = Annotated[
    bool, typer.Option(envvar=_env("STRICT_MODELS"), help="Only listed model names are valid.")
]
CacheNone = Annotated[
    bool, typer.Option("--cache-none", envvar=_env("CACHE_NONE"), help="No node-output cache.")
]
Previews = Annotated[bool, typer.Option(envvar=_env("PREVIEWS"), help="KSampler sends binary previews.")]
BaseDir = Annotated[
    str | None,
    typer.Option(
        envvar=_env("BASE_DIR"),
        help="Folder for input/, output/, temp/ (default: a temporary one).",
        show_default=False,
    ),
]


def comfyui_options(flags: Mapping[str, Any]) -> EmulatorOptions:
    """Options from the flags of ``comfyfleet emulator`` (by parameter name). Raises ValueError (or its
    subclass OptionsError) naming a bad value."""
    from comfyfleet.emulators.comfyui import DEFAULT_MODELS, EmulatorOptions
    from comfyfleet.emulators.comfyui.model_folders import read_extra_model_paths

    if flags["model"] and (flags["models_dir"] or flags["extra_model_paths_config"]):
        raise ValueError("--model lists models by hand; with --models-dir the files found there are the list")
    if flags["extra_model_paths_config"]:
        read_extra_model_paths(flags["extra_model_paths_config"])  # a bad file is an error now, not at start
    models: dict[str, list[str]] = {folder: list(names) for folder, names in DEFAULT_MODELS.items()}
    if flags["model"]:
        models = {}
        for entry in flags["model"]:
            folder, _, name = entry.rpartition("/")
            models.setdefault(folder or "checkpoints", []).append(name)
    hang = flags["hang"]
    return EmulatorOptions(
        step_time_s=flags["step_time"], prompt_time_s=flags["prompt_time"], model_load_s=flags["model_load_time"],
        model_cache_size=flags["model_cache_size"], startup_delay_s=flags["startup_delay"],
        history_delay_s=flags["history_delay"], failure_rate=flags["failure_rate"], oom_rate=flags["oom_rate"],
        crash_after=flags["crash_after"], hang_s=math.inf if hang in ("inf", "forever") else float(hang),
        hang_rate=flags["hang_rate"], hang_node=flags["hang_node"], seed=flags["seed"],
        cache=not flags["cache_none"], previews=flags["previews"], models=models,
        accept_any_model=not flags["strict_models"], base_dir=flags["base_dir"], models_dir=flags["models_dir"],
        extra_model_paths_config=flags["extra_model_paths_config"],
    )  # fmt: skip


# -- comfyfleet novita-emulator -----------------------------------------------------------------------
def _novita_env(name: str) -> str:
    return f"COMFYFLEET_NOVITA_EMULATOR_{name}"


NovitaPort = Annotated[
    int, typer.Option(envvar=_novita_env("PORT"), help="Port to listen on (0: a free one).")
]
NovitaHost = Annotated[str, typer.Option(envvar=_novita_env("HOST"), help="Address to listen on.")]
NovitaApiKey = Annotated[str, typer.Option(envvar=_novita_env("API_KEY"), help="The Bearer key it accepts.")]
PullingTime = Annotated[
    float,
    typer.Option(envvar=_novita_env("PULLING_TIME"), help="Seconds an instance spends pulling its image."),
]
ComfyStartupDelay = Annotated[
    float,
    typer.Option(
        envvar=_novita_env("COMFY_STARTUP_DELAY"),
        help="Seconds each instance's ComfyUI takes to answer once running.",
    ),
]
FailStarts = Annotated[
    int,
    typer.Option(envvar=_novita_env("FAIL_STARTS"), help="The next N created instances fail while pulling."),
]


def novita_options(
    api_key: str, pulling_time: float, comfy_startup_delay: float, fail_starts: int
) -> NovitaEmulatorOptions:
    from comfyfleet.emulators.comfyui import EmulatorOptions
    from comfyfleet.emulators.novita import NovitaEmulatorOptions

    return NovitaEmulatorOptions(
        api_key=api_key, pulling_s=pulling_time, fail_starts=fail_starts,
        comfy=EmulatorOptions(startup_delay_s=comfy_startup_delay),
    )  # fmt: skip
