"""The ``comfyfleet`` command. Logging and signal handling are set up here and nowhere else."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="comfyfleet",
    help="Self-hosted serverless ComfyUI: a durable priority queue and an autoscaling fleet of ComfyUI workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # One line per HTTP request to a worker drowns the service's own events.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", envvar="COMFYFLEET_CONFIG", help="YAML config file.", show_default=False),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="COMFYFLEET_STORE",
        help="Store URL: sqlite:///path.db (default sqlite:///comfyfleet.db) or postgresql://user@host/db.",
        show_default=False,
    ),
]


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(envvar="COMFYFLEET_HOST", help="Address to listen on.", show_default="127.0.0.1"),
    ] = None,
    port: Annotated[
        int | None, typer.Option(envvar="COMFYFLEET_PORT", help="Port to listen on.", show_default="8080")
    ] = None,
    store: StoreOption = None,
    config: ConfigOption = None,
    worker: Annotated[
        list[str] | None,
        typer.Option(
            "--worker",
            envvar="COMFYFLEET_WORKERS",
            help="URL of a ComfyUI server to use as a static worker (repeatable; in the variable, separate URLs "
            "with spaces or commas).",
            show_default=False,
        ),
    ] = None,
    outputs: Annotated[
        str | None,
        typer.Option(
            envvar="COMFYFLEET_OUTPUTS",
            help="Where output files are kept: a directory, or s3://BUCKET/PREFIX (needs the s3 extra).",
            show_default="./comfyfleet-outputs",
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            envvar="COMFYFLEET_LOG_LEVEL",
            help="Log level: debug, info, warning or error.",
            show_default="info",
        ),
    ] = None,
) -> None:
    """Run the API, the dispatcher and the worker manager."""
    from comfyfleet.config import ConfigError, load_settings
    from comfyfleet.runtime import StartupError
    from comfyfleet.runtime import serve as run_server

    # One value of the variable may hold several URLs: "http://a:8188,http://b:8188".
    workers = [url.strip() for value in worker or [] for url in value.split(",") if url.strip()]
    try:
        settings = load_settings(
            host=host,
            port=port,
            store=store,
            config=config,
            workers=workers or None,
            outputs=outputs,
            log_level=log_level,
        )
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    _configure_logging(settings.log_level)
    try:
        run_server(settings)
    except StartupError as exc:
        raise _fail(str(exc), code=1) from None


@app.command()
def migrate(store: StoreOption = None, config: ConfigOption = None) -> None:
    """Apply pending database migrations and exit."""
    import asyncio

    from comfyfleet.config import ConfigError, load_settings
    from comfyfleet.store import StoreError, open_store

    try:
        settings = load_settings(store=store, config=config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None

    async def run() -> list[int]:
        async with open_store(settings.store) as opened:
            return await opened.migrate()

    try:
        applied = asyncio.run(run())
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"applied migrations: {', '.join(map(str, applied))}" if applied else "store is up to date")


@app.command("hash-key")
def hash_key(key: Annotated[str, typer.Argument(help="The API key to hash for the config file.")]) -> None:
    """Print the sha256 hash of an API key, for api_keys[].key_hash in the config file."""
    from comfyfleet.config import hash_api_key

    typer.echo(hash_api_key(key))


@app.command()
def emulator(
    port: Annotated[
        int, typer.Option(envvar="COMFYFLEET_EMULATOR_PORT", help="Port to listen on (0: a free one).")
    ] = 8188,
    host: Annotated[
        str, typer.Option(envvar="COMFYFLEET_EMULATOR_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    step_time: Annotated[
        float, typer.Option(envvar="COMFYFLEET_EMULATOR_STEP_TIME", help="Seconds per KSampler step.")
    ] = 0.0,
    prompt_time: Annotated[
        float,
        typer.Option(envvar="COMFYFLEET_EMULATOR_PROMPT_TIME", help="Fixed extra seconds of every prompt."),
    ] = 0.0,
    model_load_time: Annotated[
        float,
        typer.Option(
            envvar="COMFYFLEET_EMULATOR_MODEL_LOAD_TIME", help="Seconds to load a model not in the LRU."
        ),
    ] = 0.0,
    model_cache_size: Annotated[
        int, typer.Option(envvar="COMFYFLEET_EMULATOR_MODEL_CACHE_SIZE", help="Models kept loaded (LRU).")
    ] = 2,
    startup_delay: Annotated[
        float, typer.Option(envvar="COMFYFLEET_EMULATOR_STARTUP_DELAY", help="Seconds before the port opens.")
    ] = 0.0,
    history_delay: Annotated[
        float,
        typer.Option(
            envvar="COMFYFLEET_EMULATOR_HISTORY_DELAY",
            help="Gap between execution_success and the history write.",
        ),
    ] = 0.0,
    failure_rate: Annotated[
        float,
        typer.Option(envvar="COMFYFLEET_EMULATOR_FAILURE_RATE", help="Probability of an execution_error."),
    ] = 0.0,
    oom_rate: Annotated[
        float,
        typer.Option(
            envvar="COMFYFLEET_EMULATOR_OOM_RATE", help="Probability of a torch out-of-memory error."
        ),
    ] = 0.0,
    crash_after: Annotated[
        int | None,
        typer.Option(
            envvar="COMFYFLEET_EMULATOR_CRASH_AFTER",
            help="Exit the process when prompt N+1 starts.",
            show_default=False,
        ),
    ] = None,
    hang: Annotated[
        str,
        typer.Option(
            envvar="COMFYFLEET_EMULATOR_HANG", help="Seconds a node ignores interrupts ('inf': forever)."
        ),
    ] = "0",
    hang_rate: Annotated[
        float, typer.Option(envvar="COMFYFLEET_EMULATOR_HANG_RATE", help="Probability that a prompt hangs.")
    ] = 1.0,
    hang_node: Annotated[
        str | None,
        typer.Option(
            envvar="COMFYFLEET_EMULATOR_HANG_NODE",
            help="class_type that hangs (default: the first node run).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            envvar="COMFYFLEET_EMULATOR_SEED", help="Seed of the random faults.", show_default=False
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            envvar="COMFYFLEET_EMULATOR_MODELS",
            help="FOLDER/NAME of a model file (repeatable; replaces the defaults).",
            show_default=False,
        ),
    ] = None,
    strict_models: Annotated[
        bool,
        typer.Option(envvar="COMFYFLEET_EMULATOR_STRICT_MODELS", help="Only listed model names are valid."),
    ] = False,
    cache_none: Annotated[
        bool,
        typer.Option("--cache-none", envvar="COMFYFLEET_EMULATOR_CACHE_NONE", help="No node-output cache."),
    ] = False,
    previews: Annotated[
        bool, typer.Option(envvar="COMFYFLEET_EMULATOR_PREVIEWS", help="KSampler sends binary previews.")
    ] = False,
    base_dir: Annotated[
        str | None,
        typer.Option(
            envvar="COMFYFLEET_EMULATOR_BASE_DIR",
            help="Folder for input/, output/, temp/ (default: a temporary one).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="COMFYFLEET_LOG_LEVEL", help="Log level.")] = "info",
) -> None:
    """Run the ComfyUI emulator: a stand-in ComfyUI server for tests, demos and benchmarks."""
    import asyncio
    import math
    import os
    import signal

    from comfyfleet.comfy.emulator import DEFAULT_MODELS, EmulatorOptions, OptionsError
    from comfyfleet.comfy.emulator import serve as serve_emulator

    _configure_logging(log_level)
    models: dict[str, list[str]] = {folder: list(names) for folder, names in DEFAULT_MODELS.items()}
    if model:
        models = {}
        for entry in model:
            folder, _, name = entry.rpartition("/")
            models.setdefault(folder or "checkpoints", []).append(name)
    try:
        hang_s = math.inf if hang in ("inf", "forever") else float(hang)
        options = EmulatorOptions(
            step_time_s=step_time, prompt_time_s=prompt_time, model_load_s=model_load_time,
            model_cache_size=model_cache_size, startup_delay_s=startup_delay, history_delay_s=history_delay,
            failure_rate=failure_rate, oom_rate=oom_rate, crash_after=crash_after, hang_s=hang_s,
            hang_rate=hang_rate, hang_node=hang_node, seed=seed, cache=not cache_none, previews=previews,
            models=models, accept_any_model=not strict_models, base_dir=base_dir,
        )  # fmt: skip
    except (OptionsError, ValueError) as exc:
        raise _fail(str(exc)) from None

    def crash() -> None:
        logging.getLogger("comfyfleet.emulator").warning("emulator_crash_exit code=70")
        os._exit(70)

    def listening(url: str) -> None:
        typer.echo(f"comfyfleet emulator listening on {url}")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve_emulator(options, host, port, stop, on_crash=crash, on_listening=listening)

    try:
        asyncio.run(run())
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _register_client_commands() -> None:
    # submit, tasks list|show|cancel, workers list|drain, queue: they talk to a server through the SDK.
    from comfyfleet.sdk.commands import register

    register(app)


_register_client_commands()


@app.command("novita-emulator")
def novita_emulator(
    port: Annotated[
        int, typer.Option(envvar="COMFYFLEET_NOVITA_EMULATOR_PORT", help="Port to listen on (0: a free one).")
    ] = 8910,
    host: Annotated[
        str, typer.Option(envvar="COMFYFLEET_NOVITA_EMULATOR_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    api_key: Annotated[
        str, typer.Option(envvar="COMFYFLEET_NOVITA_EMULATOR_API_KEY", help="The Bearer key it accepts.")
    ] = "novita-emulator-key",
    pulling_time: Annotated[
        float,
        typer.Option(
            envvar="COMFYFLEET_NOVITA_EMULATOR_PULLING_TIME",
            help="Seconds an instance spends pulling its image.",
        ),
    ] = 2.0,
    comfy_startup_delay: Annotated[
        float,
        typer.Option(
            envvar="COMFYFLEET_NOVITA_EMULATOR_COMFY_STARTUP_DELAY",
            help="Seconds each instance's ComfyUI takes to answer once running.",
        ),
    ] = 1.0,
    fail_starts: Annotated[
        int,
        typer.Option(
            envvar="COMFYFLEET_NOVITA_EMULATOR_FAIL_STARTS",
            help="The next N created instances fail while pulling.",
        ),
    ] = 0,
    log_level: Annotated[str, typer.Option(envvar="COMFYFLEET_LOG_LEVEL", help="Log level.")] = "info",
) -> None:
    """Run the Novita AI GPU-instance API emulator (docs/providers.md): instances that run local ComfyUI emulators."""
    import asyncio
    import signal

    from comfyfleet.comfy.emulator import EmulatorOptions
    from comfyfleet.fleet.novita_emulator import NovitaEmulatorOptions
    from comfyfleet.fleet.novita_emulator import serve as serve_novita

    _configure_logging(log_level)
    options = NovitaEmulatorOptions(
        api_key=api_key, pulling_s=pulling_time, fail_starts=fail_starts,
        comfy=EmulatorOptions(startup_delay_s=comfy_startup_delay),
    )  # fmt: skip

    def listening(api_base: str) -> None:
        typer.echo(f"Novita API emulator on {api_base} (Bearer {api_key})")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve_novita(options, host, port, stop, on_listening=listening)

    try:
        asyncio.run(run())
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def main() -> None:
    app()
