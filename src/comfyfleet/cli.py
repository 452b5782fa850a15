"""The ``comfyfleet`` command. Logging and signal handling are set up here and nowhere else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from comfyfleet.emulators import command_line as flags

if TYPE_CHECKING:
    from comfyfleet.models import ModelSpec

app = typer.Typer(
    name="comfyfleet",
    help="Self-hosted serverless ComfyUI: a durable priority queue and an autoscaling fleet of ComfyUI workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _configure_logging(level: str) -> None:
    from comfyfleet.redaction import RedactingFormatter

    logging.basicConfig(level=level.upper())
    # Every line goes through the redaction, whoever logs it (uvicorn logs /ws?token=KEY handshakes, the
    # WebSocket library request headers at debug level, HTTP clients the URLs they fetch).
    formatter = RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    # One line per HTTP request to a worker drowns the service's own events.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", envvar="COMFYFLEET_CONFIG", help="YAML config file.", show_default=False),
]
LogLevelOption = Annotated[str, typer.Option(envvar="COMFYFLEET_LOG_LEVEL", help="Log level.")]
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
    port: flags.Port = 8188,
    host: flags.Host = "127.0.0.1",
    step_time: flags.StepTime = 0.0,
    prompt_time: flags.PromptTime = 0.0,
    model_load_time: flags.ModelLoadTime = 0.0,
    model_cache_size: flags.ModelCacheSize = 2,
    startup_delay: flags.StartupDelay = 0.0,
    history_delay: flags.HistoryDelay = 0.0,
    failure_rate: flags.FailureRate = 0.0,
    oom_rate: flags.OomRate = 0.0,
    crash_after: flags.CrashAfter = None,
    hang: flags.Hang = "0",
    hang_rate: flags.HangRate = 1.0,
    hang_node: flags.HangNode = None,
    seed: flags.Seed = None,
    model: flags.Models = None,
    models_dir: flags.ModelsDir = None,
    extra_model_paths_config: flags.ExtraModelPaths = None,
    strict_models: flags.StrictModels = False,
    cache_none: flags.CacheNone = False,
    previews: flags.Previews = False,
    base_dir: flags.BaseDir = None,
    log_level: LogLevelOption = "info",
) -> None:
    """Run the ComfyUI emulator: a stand-in ComfyUI server for tests, demos and benchmarks."""
    chosen = dict(locals())  # every flag by parameter name, for the emulator's own option handling
    import os

    from comfyfleet.emulators.comfyui import serve as serve_emulator

    _configure_logging(log_level)
    try:
        options = flags.comfyui_options(chosen)
    except ValueError as exc:
        raise _fail(str(exc)) from None

    def crash() -> None:
        logging.getLogger("comfyfleet.emulator").warning("emulator_crash_exit code=70")
        os._exit(70)

    def listening(url: str) -> None:
        typer.echo(f"comfyfleet emulator listening on {url}")

    _serve_until_signal(
        host,
        port,
        lambda stop: serve_emulator(options, host, port, stop, on_crash=crash, on_listening=listening),
    )


def _serve_until_signal(host: str, port: int, serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve(stop)`` until SIGINT or SIGTERM sets ``stop``."""
    import signal

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _register_client_commands() -> None:
    # submit, tasks list|show|cancel, workers list|drain|undrain, queue: they talk to a server through the SDK.
    from comfyfleet.sdk.commands import register

    register(app)


_register_client_commands()


@app.command("novita-emulator")
def novita_emulator(
    port: flags.NovitaPort = 8910,
    host: flags.NovitaHost = "127.0.0.1",
    api_key: flags.NovitaApiKey = "novita-emulator-key",
    pulling_time: flags.PullingTime = 2.0,
    comfy_startup_delay: flags.ComfyStartupDelay = 1.0,
    fail_starts: flags.FailStarts = 0,
    log_level: LogLevelOption = "info",
) -> None:
    """Run the Novita AI GPU-instance API emulator (docs/providers.md): instances that run local ComfyUI emulators."""
    from comfyfleet.emulators.novita import serve as serve_novita

    _configure_logging(log_level)
    options = flags.novita_options(api_key, pulling_time, comfy_startup_delay, fail_starts)

    def listening(api_base: str) -> None:
        typer.echo(f"Novita API emulator on {api_base} (Bearer {api_key})")

    _serve_until_signal(
        host, port, lambda stop: serve_novita(options, host, port, stop, on_listening=listening)
    )


@app.command()
def companion(
    url: Annotated[
        str,
        typer.Option(
            envvar="COMFYFLEET_COMPANION_URL", help="The control plane's base URL.", show_default=False
        ),
    ],
    token: Annotated[
        str,
        typer.Option(
            envvar="COMFYFLEET_COMPANION_TOKEN",
            help="The worker's token for the model store (prefer the variable: arguments show in ps).",
            show_default=False,
        ),
    ],
    manifest: Annotated[
        str,
        typer.Option(
            envvar="COMFYFLEET_COMPANION_MANIFEST",
            help="The models to pull: a JSON list of {url, sha256, folder, name}, or @FILE holding one.",
        ),
    ] = "[]",
    directory: Annotated[
        Path,
        typer.Option(
            "--dir",
            envvar="COMFYFLEET_COMPANION_DIR",
            help="Where to keep them: DIR/models is ComfyUI's models folder, DIR/extra_model_paths.yaml points at it.",
        ),
    ] = Path("comfyfleet-models"),
    attempts: Annotated[
        int,
        typer.Option(envvar="COMFYFLEET_COMPANION_ATTEMPTS", min=1, help="Tries per file (each resumes)."),
    ] = 5,
    wait: Annotated[
        float,
        typer.Option(
            envvar="COMFYFLEET_COMPANION_WAIT",
            min=0,
            help="Seconds to wait for the control plane to hold a file.",
        ),
    ] = 600.0,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="Run this once the files are in place (after --), e.g. python main.py --extra-model-paths-config "
            "{extra_model_paths}; {models_dir} and {extra_model_paths} are replaced.",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevelOption = "info",
) -> None:
    """Pull a worker's model files from the control plane, verified, then start ComfyUI (docs/models.md)."""
    from comfyfleet.companion import CompanionError, sync_models

    _configure_logging(log_level)
    specs = _companion_manifest(manifest)
    try:
        paths = asyncio.run(
            sync_models(url, token, directory.absolute(), specs, attempts=attempts, wait_s=wait)
        )
    except CompanionError as exc:
        raise _fail(str(exc), code=1) from None
    if command:
        values = {"models_dir": str(paths.models_dir), "extra_model_paths": str(paths.extra_model_paths)}
        _exec_without_token([part.format_map(values) if "{" in part else part for part in command])


def _companion_manifest(manifest: str) -> list[ModelSpec]:
    import json

    from comfyfleet.models import ModelsError, parse_specs

    try:
        text = Path(manifest[1:]).read_text() if manifest.startswith("@") else manifest
        return parse_specs(json.loads(text))
    except (OSError, ValueError, ModelsError) as exc:
        raise _fail(
            f"--manifest must be a JSON list of {{url, sha256, folder, name}} (or @FILE): {exc}"
        ) from None


def _exec_without_token(argv: list[str]) -> None:
    import os

    # ComfyUI runs custom nodes: it gets no token (the companion needs it no more).
    env = {name: value for name, value in os.environ.items() if name != "COMFYFLEET_COMPANION_TOKEN"}
    try:
        os.execvpe(argv[0], argv, env)  # ComfyUI takes this process over (and its PID under tini)
    except OSError as exc:
        raise _fail(f"cannot run {argv[0]!r}: {exc.strerror or exc}", code=1) from None


def main() -> None:
    app()
